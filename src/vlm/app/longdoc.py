"""python -m vlm.app.longdoc [overrides]: write the shards of the long-document data (`data=longdoc`;
`vlm.data.longdoc.LongDoc`), e.g. `data.source.max_chars=900`."""

from __future__ import annotations

import sys

from vlm.app.synthetic import write_shards


def main(argv: list[str] | None = None) -> None:
    write_shards(sys.argv[1:] if argv is None else argv, data="longdoc")


if __name__ == "__main__":
    main()
