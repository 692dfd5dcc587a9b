"""python -m vlm.app.text_accounting install [NAME...]: install the known reference BPE files
(`vlm.text_accounting`; default: gpt2, what `make install` runs)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vlm.text_accounting import install


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m vlm.app.text_accounting install [NAME...]`: install known BPE files (default: gpt2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "install":
        raise SystemExit("usage: python -m vlm.app.text_accounting install [gpt2 ...]")
    for name in args[1:] or ["gpt2"]:
        print(f"{name}: {install(name)}")


if __name__ == "__main__":
    main()
