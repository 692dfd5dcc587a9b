"""Every arm's precision against compression on one set of axes: benchmark=synthetic_compression runs merged.

python -m vlm.app.compression_arms [NAME=]EVAL_DIR ... [--out DIR]

Each argument is an eval.py run dir of `benchmark=synthetic_compression` (a checkpoint of any context arm,
or an OCR engine's predictions scored by `eval.py predictions=`), or a multirun dir of such runs. Rows are
named as `vlm.eval.arms_table` names them: `NAME=DIR`, else a multirun job's own overrides, an OCR
engine's name, or the run dir's name. A run without `metrics.json` (failed or unfinished), or of another
benchmark, is listed as such.

One row per (arm, point), a point being the snippets of one length, from each run's samples.jsonl and the
vision tokens per image K of its metrics.json:
- `target`: the characters per vision token the length was chosen for (none with `benchmark.lengths`);
- `chars_per_vision_token`, `compression_<tokenizer>`: the ground truths' mean characters (tokens under
  that tokenizer) / K, as the benchmark's curve; `gpt2` first, then every other tokenizer any run counted;
- `precision`, `one_minus_ned`: the samples' means, each with a 95% percentile bootstrap interval over
  the samples (2,000 resamples, seed 0);
- `samples`.
A token count is a function of the text alone, so where a run did not count a tokenizer that another run
counted on the same ground-truth texts (an OCR engine's run has no model tokenizer), its counts are taken
from that run, and the row says so (`counts_from_other_runs`). OCR engines have no K of their own: score
their predictions with the checkpoint arms' K, `benchmark.vision_tokens=K`, which also makes their items
the checkpoints' (the lengths are the targets times K).

Writes `compression_arms.md`, `compression_arms.json` (the rows) and one `precision_vs_compression_<name>.png`
per tokenizer (each arm's precision solid and 1 - NED dashed, with their intervals, and DeepSeek-OCR's Fox
points, whose x is its own tokenizer's ratio; log x) to `--out` (default: the first argument's parent dir,
or the first argument if it is a multirun dir).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from vlm.eval.arms_table import (
    bootstrap_ratio,
    collect_runs,
    compression_columns,
    json_ready,
    missing,
    read_eval,
    references,
)
from vlm.eval.benchmarks.base import curve_plot
from vlm.eval.benchmarks.synthetic import FOX_REFERENCE
from vlm.eval.runner import markdown_table
from vlm.text_accounting import compression_label

BENCHMARK = "synthetic_compression"
SCORES = ("precision", "one_minus_ned")


def read_run(name: str, run_dir: Path) -> dict:
    """{arm, run_dir, status, ...}; with status "ok", `vision_tokens` (K) and `samples` (samples.jsonl)."""
    run = {"arm": name, "run_dir": str(run_dir)}
    metrics, samples, missing = read_eval(run_dir)
    if missing:
        return run | {"status": "no eval", "reason": missing}
    if metrics.get("benchmark") != BENCHMARK:
        return run | {
            "status": "other benchmark",
            "reason": f"{run_dir} is of benchmark={metrics.get('benchmark')}, not {BENCHMARK}",
        }
    if not samples:
        return run | {"status": "no samples", "reason": f"{run_dir} has no samples.jsonl rows"}
    return run | {"status": "ok", "vision_tokens": metrics.get("vision_tokens_per_image"), "samples": samples}


def token_counts(runs: list[dict]) -> dict[str, dict[str, int | None]]:
    """{tokenizer: {text: its token count}} over every run's ground truths (None where runs disagree,
    e.g. two different tokenizers under one name)."""
    counts: dict[str, dict[str, int | None]] = {}
    for run in runs:
        for sample in run.get("samples", []):
            for key, value in sample.items():
                if key.startswith("tokens_"):
                    known = counts.setdefault(key.removeprefix("tokens_"), {})
                    text = references(sample)[0]
                    known[text] = value if known.get(text, value) == value else None
    return counts


def fill_counts(samples: list[dict], counts: dict[str, dict[str, int | None]]) -> list[str]:
    """Adds `tokens_<name>` to the samples from `counts` for each tokenizer they lack and `counts` knows for
    all their ground truths; returns the names added."""
    added = []
    for name, known in counts.items():
        texts = [references(sample)[0] for sample in samples]
        if all(f"tokens_{name}" in sample for sample in samples) or any(known.get(t) is None for t in texts):
            continue
        for sample, text in zip(samples, texts, strict=True):
            sample[f"tokens_{name}"] = known[text]
        added.append(name)
    return added


def point_rows(run: dict) -> list[dict]:
    """One row per length of an "ok" run (see the module doc)."""
    vision_tokens = run["vision_tokens"]
    by_length: dict[int, list[dict]] = {}
    for sample in run["samples"]:
        by_length.setdefault(sample["length"], []).append(sample)
    rows = []
    for length, samples in by_length.items():
        row = {"arm": run["arm"], "status": "ok", "run_dir": run["run_dir"], "length": length}
        row["target"] = samples[0].get("target_chars_per_vision_token")
        if vision_tokens:
            row["chars_per_vision_token"] = statistics.fmean(s["chars"] for s in samples) / vision_tokens
            for key in samples[0]:
                if key.startswith("tokens_"):
                    tokens = statistics.fmean(s[key] for s in samples)
                    row[f"compression_{key.removeprefix('tokens_')}"] = tokens / vision_tokens
        for score in SCORES:
            values = [float(s[score]) for s in samples]
            low, high = bootstrap_ratio(values, [1.0] * len(values))
            row |= {score: statistics.fmean(values), f"{score}_low": low, f"{score}_high": high}
        row |= {"samples": len(samples), "vision_tokens_per_image": vision_tokens}
        if run.get("counts_from_other_runs"):
            row["counts_from_other_runs"] = run["counts_from_other_runs"]
        rows.append(row)
    return rows


def merge_runs(arguments: Sequence[str]) -> list[dict]:
    """The rows of the runs in `arguments`: one per (arm, point), one per run without results."""
    runs = [read_run(name, run_dir) for name, run_dir in collect_runs(arguments)]
    counts = token_counts(runs)
    rows = []
    for run in runs:
        if run["status"] != "ok":
            rows.append({key: run[key] for key in ("arm", "status", "reason", "run_dir")})
            continue
        run["counts_from_other_runs"] = fill_counts(run["samples"], counts)
        rows += point_rows(run)
    return rows


def tokenizers(rows: list[dict]) -> list[str]:
    """The tokenizers any row has a compression for: gpt2 first, then in the order first seen."""
    names = [key.removeprefix("compression_") for key in compression_columns(rows)]
    return sorted(names, key=lambda name: name != "gpt2")


def number(value, digits: int) -> str:
    """`value` to `digits` decimals; "–" for none or NaN."""
    return "–" if missing(value) else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """The table (95% intervals in brackets), then why each run without results has none."""
    names = tokenizers(rows)
    titles = {"precision": "precision", "one_minus_ned": "1-NED"}
    columns = ["target chars/vision token", "chars/vision token", *(f"compression_{name}" for name in names)]
    columns += [*titles.values(), "samples"]
    table = []
    for row in rows:
        line = {"arm": row["arm"], "status": row["status"]} | dict.fromkeys(columns, "–")
        if row["status"] == "ok":
            line["target chars/vision token"] = "–" if row["target"] is None else f"{row['target']:g}"
            line["chars/vision token"] = number(row.get("chars_per_vision_token"), 2)
            line |= {f"compression_{name}": number(row.get(f"compression_{name}"), 2) for name in names}
            for score, title in titles.items():
                bounds = f"{number(row[f'{score}_low'], 3)}, {number(row[f'{score}_high'], 3)}"
                line[title] = f"{number(row[score], 3)} [{bounds}]"
            line["samples"] = row["samples"]
        table.append(line)
    lines = [
        f"benchmark={BENCHMARK}; per (arm, point): precision and 1-NED with 95% bootstrap intervals over samples; "
        "compression_<tokenizer> = the ground truths' tokens / vision tokens per image\n",
        markdown_table(table),
    ]
    lines += [f"- {row['arm']}: {row['reason']}" for row in rows if row.get("reason")]
    borrowed = {
        row["arm"]: row["counts_from_other_runs"] for row in rows if row.get("counts_from_other_runs")
    }
    lines += [
        f"- {arm}: tokens under {', '.join(added)} counted by other runs on the same ground-truth texts"
        for arm, added in borrowed.items()
    ]
    unplaced = sorted(
        {row["arm"] for row in rows if row["status"] == "ok" and not row.get("vision_tokens_per_image")}
    )
    lines += [
        f"- {arm}: no vision tokens per image, so on no compression plot (score with benchmark.vision_tokens=K)"
        for arm in unplaced
    ]
    return "\n".join(lines) + "\n"


def plot_series(rows: list[dict], name: str) -> dict[str, list[dict]]:
    """{arm: its points that have compression_<name>}, arms without such points left out."""
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get(f"compression_{name}") is not None:
            series.setdefault(row["arm"], []).append(row)
    return series


def write_merged(arguments: Sequence[str], out_dir: Path) -> list[dict]:
    """The rows of the runs in `arguments`, written to `out_dir` (see the module doc)."""
    rows = merge_runs(arguments)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compression_arms.md").write_text(markdown(rows), encoding="utf-8")
    (out_dir / "compression_arms.json").write_text(json.dumps(json_ready(rows), indent=1), encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in tokenizers(rows):
        make = curve_plot(
            plot_series(rows, name),
            f"compression_{name}",
            SCORES,
            compression_label(name),
            FOX_REFERENCE,
            xscale="log",  # the targets double from point to point; Fox's points lie at 6.7-19.7
        )
        make(out_dir / f"precision_vs_compression_{name}.png")
        plt.close("all")
    return rows
