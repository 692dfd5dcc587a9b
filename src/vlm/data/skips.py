"""The one way an unusable item is skipped: `Skip`, raised by whoever finds the problem and counted
under its `reason` by whoever reads the items (the training and evaluation streams' `SkipCounter` and
end-of-run report, `python -m vlm.app.prepare`'s index.json, read.py, benchmarks' item loading).

Reasons of the streams: `malformed_json`, `malformed_record`, `invalid_unicode`, `empty_text`,
`corrupt_image`, `image_too_large`, `missing_image`, `too_long`, and from the tar readers `too_large`,
`hidden_member`, `stray_member`, `unreadable_tar`, `truncated_tar` (`vlm.data.processing`,
`vlm.data.datamodule`). Reasons of the converters: `vlm.data.sources` (e.g. `outside_root`,
`not_a_file`, `bad_encoding`, `unsafe_yaml`, `missing_image`, `malformed`).
"""

from __future__ import annotations


class Skip(ValueError):
    """An item that cannot be used; `reason` is the short name it is counted under, `message` what is
    wrong, `key` the item when the raiser knows it (a sample's key, a shard's URL)."""

    def __init__(self, reason: str, message: str = "", key: str | None = None) -> None:
        if key is None:
            text = f"{reason}: {message}" if message else reason
        else:
            text = f"sample {key!r}: {reason}" + (f" ({message})" if message else "")
        super().__init__(text)
        self.reason, self.message, self.key = reason, message, key
