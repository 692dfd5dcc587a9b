"""Read your own images or PDFs with a checkpoint: text to stdout, per-page timings to JSON if asked.

    python read.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt scan.png report.pdf pages/
    python read.py --ckpt last.ckpt report.pdf --batch-size 16 --no-repeat-ngram-size 20 --json out.json

Defaults come from the checkpoint: the prompt it was trained to read with, its `generation:` settings
(max_new_tokens, the no-repeat n-gram guard). Unreadable files are skipped and named; the exit status
is non-zero only when no page could be read (see vlm.reading).
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="read.py", description="Read images and PDFs with a train.py checkpoint: one text per page."
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="images, PDFs, or folders of them")
    parser.add_argument("--prompt", help="the prompt (default: the one the checkpoint was trained with)")
    parser.add_argument("--batch-size", type=int, default=8, help="pages decoded together (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per page (default: the checkpoint's)")
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        help="n > 0: never complete an n-gram already in the page's text (DeepSeek-OCR: 20-40; "
        "default: the checkpoint's generation.no_repeat_ngram_size)",
    )
    parser.add_argument("--ngram-window", type=int, help="... within its last this-many tokens")
    parser.add_argument("--dpi", type=float, default=100.0, help="PDF rasterising resolution (default 100)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "32-true"])
    parser.add_argument("--json", metavar="OUT.json", help="write the texts, per-page timings and totals")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from vlm.files import atomic_write
    from vlm.reading import load_reader, page_header, read_files

    start = time.perf_counter()
    try:
        module = load_reader(args.ckpt, args.device)
    except (OSError, ValueError) as error:
        print(f"read.py: error: {error}", file=sys.stderr)
        return 2
    load_seconds = time.perf_counter() - start
    several = len(args.inputs) > 1 or any(Path(path).is_dir() for path in args.inputs)

    def show(page) -> None:
        header = f"{page_header(page)}\n" if several or page.pages > 1 else ""
        tqdm.write(header + page.text, file=sys.stdout)  # above the progress bar, if one is shown

    try:
        with logging_redirect_tqdm():
            reading = read_files(
                module,
                args.inputs,
                prompt=args.prompt,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                no_repeat_ngram_size=args.no_repeat_ngram_size,
                ngram_window=args.ngram_window,
                dpi=args.dpi,
                precision=args.precision,
                progress=False if args.no_progress else None,
                on_page=show,
            )
    except ValueError as error:  # a setting that cannot work (a prompt with two <image>s, ...)
        print(f"read.py: error: {error}", file=sys.stderr)
        return 2
    totals = reading.totals()
    if args.json:
        record = reading.to_json(load_seconds=load_seconds) | {"checkpoint": str(args.ckpt)}
        text = json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8", "replace")
        atomic_write(args.json, lambda file: file.write(text))
    print(
        f"read {totals['pages_read']} page(s) in {totals['seconds']:.2f} s"
        + (f", skipped {totals['failed']} (see the warnings)" if totals["failed"] else "")
        + (f"; JSON in {args.json}" if args.json else ""),
        file=sys.stderr,
    )
    return 0 if reading.pages else 1


if __name__ == "__main__":
    sys.exit(main())
