"""The long-document arms side by side: one row per arm and document length, seeds pooled.

python -m vlm.app.longdoc_table logs/train/multiruns/<time> [logs/eval/runs/<time> ...] [--out DIR]

Each argument is a multirun dir of train.py (`experiment=longdoc_bpe_cpu longdoc_arm=... seed=...`: a job
per arm and seed, each with its `eval/` of benchmark=longdoc), a train.py run dir, or an eval.py run dir
of benchmark=longdoc (e.g. the OCR-then-truncate view, `benchmark.views=[ocr_text]`); `NAME=DIR` names
its arm. A job's arm is its `longdoc_arm=` override, else its context arm (`context.name`); an eval.py
run of the ocr_text view is `ocr_<engine>`; a run that shows several views (`data.view=both`) gives an
arm per view (`<arm>:<view>`). Runs of the same arm are its seeds. A run without `metrics.json` (failed
or unfinished) is named in the notes.

Per arm and length (benchmark=longdoc's `samples.jsonl` and `tables.json` curve):
- `exact_match`, `anls`: the mean over seeds of each seed's mean over its questions, with a 95%
  interval from a two-level bootstrap (seeds drawn with replacement, then each drawn seed's questions);
  the exact-match interval is never narrower than the Wilson interval of all the questions pooled (the
  bootstrap collapses to a point when every answer is right or every one wrong); `seeds`, `questions`;
- `chars_per_vision_token`, `compression_<tokenizer>`: the document's characters and tokens per LLM
  position it takes (vision tokens; for a text arm, its token positions), `positions` (the prompt's LLM
  positions, question included) and `context_positions` (the document's), `gflops_per_question` and
  `ms_per_question` (with the OCR engine's reading for ocr_text; `ocr_ms_per_page` apart), each the
  mean over seeds of the benchmark's figures;
- `doc_tokens`: the documents' mean length in the LLM's tokens, the plot's x axis.

Writes `longdoc_arms.md`, `longdoc_arms.json` ({"rows", "windows", "notes"}) and `longdoc_arms.png`
(exact match against document length, an interval band per arm, each arm's text window marked) to
`--out` (default: the first argument).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlm.eval.arms_table import (
    Z95,
    cell,
    compression_columns,
    json_ready,
    listed_runs,
    missing,
    read_yaml,
    wilson_interval,
)
from vlm.eval.runner import markdown_table

OUTPUT = "longdoc_arms"
SCORES = ("exact_match", "anls")
COSTS = ("positions", "context_positions", "flops_per_question", "ms_per_question", "ocr_ms_per_page")


@dataclass
class ArmRun:
    """One run's benchmark=longdoc results for one view: its samples and its curve (one point per length)."""

    arm: str
    run_dir: Path
    view: str
    samples: list[dict]
    curve: list[dict]
    metrics: dict = field(default_factory=dict)


def two_level_interval(groups: Sequence[Sequence[float]], resamples: int = 2000, seed: int = 0):
    """95% percentile interval of the mean over groups (seeds) of each group's mean, resampling the groups,
    then the values within each drawn group (nan, nan without values)."""
    groups = [np.asarray(g, float) for g in groups if len(g)]
    if not groups:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    # each group's mean under `resamples` resamples of its own values: (resamples, groups)
    means = np.stack([g[rng.integers(0, len(g), (resamples, len(g)))].mean(1) for g in groups], axis=1)
    chosen = rng.integers(0, len(groups), (resamples, len(groups)))  # the seeds each resample draws
    estimates = np.take_along_axis(means, chosen, axis=1).mean(1)
    low, high = np.percentile(estimates, [2.5, 97.5])
    return float(low), float(high)


def arm_name(run_dir: Path, metrics: dict) -> str:
    """A job's `longdoc_arm=` override, else its context arm; an eval.py run of the ocr_text view
    `ocr_<engine>`; else the run dir's name."""
    overrides = read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    for override in overrides:
        key, _, value = str(override).lstrip("+").partition("=")
        if key == "longdoc_arm":
            return value
    engine = (metrics.get("ocr_text") or {}).get("ocr_engine")
    if engine:
        return f"ocr_{engine}"
    config = read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    context = (config.get("context") or {}).get("name") if (run_dir / "eval").is_dir() else None
    return context or metrics.get("context") or run_dir.name


def read_run(name: str, run_dir: Path) -> tuple[list[ArmRun], str | None]:
    """The run's results, one ArmRun per view it shows, or why there are none."""
    eval_dir = run_dir / "eval" if (run_dir / "eval").is_dir() else run_dir
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file():
        return [], f"{run_dir}: no {metrics_path.name} (the run failed or did not finish)"
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("benchmark") != "longdoc":
        return [], f"{run_dir}: benchmark={metrics.get('benchmark')}, not longdoc"
    samples_path, tables_path = eval_dir / "samples.jsonl", eval_dir / "tables.json"
    samples = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    curve = json.loads(tables_path.read_text()).get("curve", []) if tables_path.is_file() else []
    views = metrics.get("views") or list(dict.fromkeys(s["view"] for s in samples))
    arm = name or arm_name(run_dir, metrics)
    return [
        ArmRun(
            arm if len(views) == 1 else f"{arm}:{view}",
            run_dir,
            view,
            [s for s in samples if s["view"] == view],
            curve,
            metrics,
        )
        for view in views
    ], None


def mean_of(values) -> float | None:
    values = [v for v in values if not missing(v)]
    return statistics.fmean(values) if values else None


def arm_rows(arm: str, runs: list[ArmRun]) -> list[dict]:
    """The rows of one arm: one per document length, its seeds (runs) pooled."""
    # every length of the curves, also those where the view showed nothing (pages beyond the window)
    lengths = {s["length"] for run in runs for s in run.samples} | {
        p["length"] for run in runs for p in run.curve
    }
    rows = []
    for length in sorted(lengths):
        per_seed = [[s for s in run.samples if s["length"] == length] for run in runs]
        shown = [samples for samples in per_seed if samples]
        points = [next((p for p in run.curve if p["length"] == length), {}) for run in runs]
        view = runs[0].view
        row: dict = {
            "arm": arm,
            "view": view,
            "length": length,
            "doc_tokens": mean_of(p.get("text_tokens") for p in points),
            "seeds": len(shown),
            "questions": sum(len(samples) for samples in shown),
        }
        for score in SCORES:
            groups = [[float(s[score]) for s in samples] for samples in shown]
            row[score] = mean_of(statistics.fmean(g) for g in groups)
            low, high = two_level_interval(groups)
            if score == "exact_match" and groups:
                wilson = wilson_interval(round(sum(map(sum, groups))), sum(map(len, groups)), Z95)
                low, high = min(low, wilson[0]), max(high, wilson[1])
            row[f"{score}_low"], row[f"{score}_high"] = (low, high) if groups else (None, None)
        prefix = f"{view}_"
        ratios = sorted(
            {k.removeprefix(prefix) for p in points for k in p if k.startswith(f"{prefix}compression_")}
        )
        for key in ("chars_per_vision_token", *ratios):
            row[key] = mean_of(p.get(prefix + key) for p in points)
        for key in COSTS:
            source = "ocr_text_ocr_ms_per_page" if key == "ocr_ms_per_page" else prefix + key
            row[key] = mean_of(p.get(source) for p in points)
        flops = row.pop("flops_per_question")
        row["gflops_per_question"] = flops / 1e9 if flops is not None else None
        rows.append(row)
    return rows


def windows(runs: list[ArmRun]) -> dict[str, dict]:
    """Each arm's window: max_length and the document tokens its text view holds (means over its seeds)."""
    arms: dict[str, list[ArmRun]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    return {
        arm: {
            "max_length": mean_of(r.metrics.get("max_length") for r in group),
            "text_window_tokens": mean_of(r.metrics.get("text_window_tokens") for r in group),
        }
        for arm, group in arms.items()
    }


def collect(arguments: Sequence[str]) -> tuple[list[dict], dict[str, dict], list[str]]:
    """(rows, windows, notes) of the runs the arguments name."""
    runs: list[ArmRun] = []
    notes: list[str] = []
    for name, run_dir, _ in listed_runs(arguments):
        found, missing = read_run(name, run_dir)
        runs += found
        if missing:
            notes.append(missing)
    arms: dict[str, list[ArmRun]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    rows = [row for arm, group in arms.items() for row in arm_rows(arm, group)]
    return rows, windows(runs), notes


def markdown(rows: list[dict], arm_windows: dict[str, dict], notes: list[str]) -> str:
    """The table (95% intervals in brackets), each arm's window, then the runs without results."""
    compression = compression_columns(rows)
    columns = [
        "arm",
        "length",
        "doc_tokens",
        "seeds",
        "questions",
        *SCORES,
        "chars_per_vision_token",
        *compression,
        "positions",
        "context_positions",
        "gflops_per_question",
        "ms_per_question",
        "ocr_ms_per_page",
    ]
    columns = [c for c in columns if any(row.get(c) is not None for row in rows)]
    table = [{c: cell(row, c) for c in columns} for row in rows]
    lines = [
        "benchmark=longdoc; length: characters; scores: mean over seeds [95% interval over seeds and "
        "questions]\n",
        markdown_table(table),
        "Windows (max_length; document tokens the text view holds):",
        *(
            f"- {arm}: {w['max_length']:.0f}; {w['text_window_tokens']:.0f}"
            for arm, w in arm_windows.items()
            if w["max_length"] is not None and w["text_window_tokens"] is not None
        ),
    ]
    if notes:
        lines += ["", "Runs without results:", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], arm_windows: dict[str, dict], path: Path) -> None:
    """Exact match against the documents' LLM tokens, one line and interval band per arm; each distinct
    window (max_length, and the document tokens it holds as text) a grey line naming its arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    for index, arm in enumerate(arms):
        points = [r for r in rows if r["arm"] == arm and r["exact_match"] is not None and r["doc_tokens"]]
        if not points:
            continue
        x = [r["doc_tokens"] for r in points]
        colour = f"C{index % 10}"
        ax.plot(x, [r["exact_match"] for r in points], marker="o", color=colour, label=arm)
        ax.fill_between(
            x,
            [r["exact_match_low"] for r in points],
            [r["exact_match_high"] for r in points],
            color=colour,
            alpha=0.15,
        )
    by_window: dict[tuple, list[str]] = {}
    for arm, window in arm_windows.items():
        if window["text_window_tokens"] is not None:
            by_window.setdefault((round(window["text_window_tokens"]), window["max_length"]), []).append(arm)
    for index, ((tokens, max_length), named) in enumerate(sorted(by_window.items())):
        ax.axvline(
            tokens,
            color="gray",
            linestyle=("--", ":", "-.")[index % 3],
            label=f"window {max_length:.0f} ({tokens} document tokens as text): {', '.join(named)}",
        )
    ax.set_xlabel("document length (the LLM's tokens)")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(arguments: Sequence[str], out_dir: Path) -> list[dict]:
    """The rows of the runs in `arguments`, written to `out_dir` (longdoc_arms.md, .json, .png)."""
    rows, arm_windows, notes = collect(arguments)
    if not rows:
        raise ValueError(f"no benchmark=longdoc results in {', '.join(arguments)}: " + "; ".join(notes))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{OUTPUT}.md").write_text(markdown(rows, arm_windows, notes))
    payload = {"rows": json_ready(rows), "windows": arm_windows, "notes": notes}
    (out_dir / f"{OUTPUT}.json").write_text(json.dumps(payload, indent=1))
    plot(rows, arm_windows, out_dir / f"{OUTPUT}.png")
    return rows
