"""One table of the arms of a sweep, side by side, with 95% intervals.

python -m vlm.app.arms_table logs/train/multiruns/<time> [logs/eval/runs/<time> ...] [--out DIR]

Each argument is a multirun dir (a row per job, `<dir>/<job num>/`), a train.py run dir or an eval.py run
dir (e.g. an OCR engine's predictions scored by `eval.py predictions=`); `NAME=DIR` names its row. A job is
named by the overrides that set it apart from the sweep's other jobs (`context=text_conv`), an eval.py run of
an OCR engine's predictions by the engine (`tesseract`), any other run by its dir. A run without
`metrics.json` (a job that failed or has not finished) is listed as such.

Columns, from each run's metrics.json, samples.jsonl and (train.py runs) csv/metrics.csv; of the scores,
those the benchmark reports:
- `cer`, `wer`: total character (word) edits / total reference characters (words), the corpus figures of
  benchmark=synthetic, recomputed from each sample's prediction and first reference; 95% percentile
  bootstrap over samples (errors within one sample are not independent, so no binomial interval over
  characters);
- `exact_match`: the samples' `exact_match` where the benchmark records it, else prediction == a
  reference; Wilson score 95% interval. `anls`: the samples' mean, with the bootstrap interval;
- `chars_per_vision_token`, `compression_<tokenizer>` (every tokenizer any run counted), as metrics.json;
- `positions`: what the LLM gives the image: `vision_tokens_per_image` (K), for context=full_text the
  text's mean LLM tokens;
- `train_gflops_per_sample`, `train_ms_per_sample`: one training sample's forward and backward, medians
  over the logged windows of `perf/tflops_per_s` / `perf/samples_per_s` and 1000 / `perf/samples_per_s`;
- `generate_ms_per_item`: generation time per benchmark item, where metrics.json has it
  (`generation_ms_per_item`); for an OCR engine's predictions, its reading time per image (the
  `timing.json` that `vlm.eval.ocr_engines` writes beside them).

Writes `arms.md`, `arms.json` (the rows) and `arms.png` (each score per arm with its interval) to `--out`
(default: the first argument).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import yaml

from vlm.eval.runner import markdown_table

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
SCORES = ("cer", "wer", "exact_match", "anls")


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (nan, nan without trials)."""
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ratio(
    numerators: Sequence[float], denominators: Sequence[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of sum(numerators) / sum(denominators), resampling the pairs."""
    numerators, denominators = np.asarray(numerators, float), np.asarray(denominators, float)
    count = len(numerators)
    if count == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**20 // count)  # resamples drawn at once, so memory stays bounded
    estimates = []
    for start in range(0, resamples, chunk):
        index = rng.integers(0, count, size=(min(chunk, resamples - start), count))
        with np.errstate(divide="ignore", invalid="ignore"):
            estimates.append(numerators[index].sum(1) / denominators[index].sum(1))
    low, high = np.nanpercentile(np.concatenate(estimates), [2.5, 97.5])
    return float(low), float(high)


def edits(prediction: str, reference: str) -> tuple[int, int, int, int]:
    """(character edits, reference characters, word edits, reference words) of one prediction."""
    from torchmetrics.functional.text import char_error_rate, word_error_rate

    chars, words = len(reference), len(reference.split())
    char_edits = round(float(char_error_rate(prediction, reference)) * chars) if chars else len(prediction)
    word_edits = (
        round(float(word_error_rate(prediction, reference)) * words) if words else len(prediction.split())
    )
    return char_edits, chars, word_edits, words


def references(sample: dict) -> list[str]:
    answers = sample.get("answers")
    if isinstance(answers, list):
        return [str(a) for a in answers]
    return [str(sample["answer"])] if "answer" in sample else []


def sample_scores(samples: list[dict], reported: Iterable[str]) -> dict[str, float]:
    """Each score of `SCORES` that the benchmark `reported` and the samples allow, with `<score>_low` and
    `<score>_high` (see the module doc)."""
    reported = set(reported)
    scores: dict[str, float] = {}
    scored = bool(samples) and all("prediction" in s and references(s) for s in samples)
    if scored and reported & {"cer", "wer"}:
        counts = np.array([edits(str(s["prediction"]), references(s)[0]) for s in samples], float)
        for name, (edit_column, length_column) in {"cer": (0, 1), "wer": (2, 3)}.items():
            if name not in reported:
                continue
            total = counts[:, length_column].sum()
            scores[name] = counts[:, edit_column].sum() / total if total else math.nan
            low, high = bootstrap_ratio(counts[:, edit_column], counts[:, length_column])
            scores |= {f"{name}_low": low, f"{name}_high": high}
    if "exact_match" in reported and (scored or (samples and all("exact_match" in s for s in samples))):
        matches = sum(
            bool(s["exact_match"]) if "exact_match" in s else s["prediction"] in references(s)
            for s in samples
        )
        low, high = wilson_interval(matches, len(samples))
        scores |= {"exact_match": matches / len(samples), "exact_match_low": low, "exact_match_high": high}
    if "anls" in reported and samples and all("anls" in s for s in samples):
        values = [float(s["anls"]) for s in samples]
        low, high = bootstrap_ratio(values, [1.0] * len(values))
        scores |= {"anls": statistics.fmean(values), "anls_low": low, "anls_high": high}
    return scores


def training_cost(csv_path: Path) -> dict[str, float]:
    """Training FLOPs and milliseconds per sample (forward + backward), medians over the perf/ windows."""
    if not csv_path.is_file():
        return {}
    with open(csv_path, newline="") as f:
        windows = [
            (float(row["perf/tflops_per_s"]), float(row["perf/samples_per_s"]))
            for row in csv.DictReader(f)
            if row.get("perf/tflops_per_s") and row.get("perf/samples_per_s")
        ]
    if not windows:
        return {}
    return {
        "train_gflops_per_sample": statistics.median(1e3 * tflops / rate for tflops, rate in windows),
        "train_ms_per_sample": statistics.median(1e3 / rate for _, rate in windows),
    }


def positions(metrics: dict, context: str | None) -> float | None:
    """LLM positions given to the image: K, or for context=full_text the text's mean LLM tokens."""
    if context == "full_text":
        llm_tokens = [v for k, v in metrics.items() if k.startswith("mean_tokens_llm_")]
        return llm_tokens[0] if llm_tokens else None
    return metrics.get("vision_tokens_per_image")


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def read_eval(run_dir: Path) -> tuple[dict, list[dict], str | None]:
    """(metrics.json, samples.jsonl's rows, None) of a train.py run's `eval/` or an eval.py run dir, or
    ({}, [], why not) when it has no metrics.json (a run that failed or did not finish)."""
    eval_dir = run_dir / "eval" if (run_dir / "eval").is_dir() else run_dir
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file():
        return {}, [], f"{metrics_path} missing: the run failed or did not finish"
    samples_path = eval_dir / "samples.jsonl"
    lines = samples_path.read_text(encoding="utf-8").splitlines() if samples_path.is_file() else []
    return json.loads(metrics_path.read_text()), [json.loads(line) for line in lines if line.strip()], None


def run_row(name: str, run_dir: Path) -> dict:
    """One row of the table for a train.py or eval.py run dir."""
    row: dict = {"arm": name, "run_dir": str(run_dir)}
    metrics, samples, missing = read_eval(run_dir)
    if missing:
        return row | {"status": "no eval", "reason": missing}
    config = read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    context = (config.get("context") or {}).get("name")
    row |= {"status": "ok", "benchmark": metrics.get("benchmark"), "samples": len(samples)}
    row |= sample_scores(samples, metrics)
    row |= {k: v for k, v in metrics.items() if k == "chars_per_vision_token" or k.startswith("compression_")}
    row["positions"] = positions(metrics, context)
    row |= training_cost(run_dir / "csv" / "metrics.csv")
    if metrics.get("generation_ms_per_item") is not None:
        row["generate_ms_per_item"] = metrics["generation_ms_per_item"]
    elif (engine_ms := engine_ms_per_image(metrics.get("predictions"))) is not None:
        row["generate_ms_per_item"] = engine_ms
    return row


def engine_ms_per_image(predictions: str | None) -> float | None:
    """An OCR engine's reading time per image, from the `timing.json` that `vlm.eval.ocr_engines` wrote
    beside the predictions an eval.py run scored (None where there is none or it cannot be read)."""
    if not predictions:
        return None
    from vlm.eval.ocr_engines import TIMING_FILE

    file = Path(predictions).parent / TIMING_FILE
    try:
        if file.stat().st_size > 65536:
            return None
        value = json.loads(file.read_text()).get("ms_per_image")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def job_names(job_dirs: list[Path]) -> list[str]:
    """Each job's overrides that not every job of the sweep has (its dir name when there are none)."""
    overrides = [read_yaml(job / ".hydra" / "overrides.yaml") or [] for job in job_dirs]
    shared = set.intersection(*(set(o) for o in overrides)) if len(overrides) > 1 else set()
    return [
        " ".join(o for o in own if o not in shared) or job.name
        for own, job in zip(overrides, job_dirs, strict=True)
    ]


def eval_run_name(run_dir: Path) -> str:
    """An eval.py run of an OCR engine's predictions (under `ocr_<engine>/`) is named by the engine."""
    metrics_path = run_dir / "metrics.json"
    source = json.loads(metrics_path.read_text()).get("predictions", "") if metrics_path.is_file() else ""
    engines = [part.removeprefix("ocr_") for part in Path(source).parts if part.startswith("ocr_")]
    return engines[-1] if engines else run_dir.name


def named_path(argument: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (NAME, DIR); a plain path (which may hold `=`) -> ("", path)."""
    name, named, path = argument.partition("=")
    return (name, Path(path)) if named and name and not Path(argument).exists() else ("", Path(argument))


def multirun_jobs(path: Path) -> list[Path] | None:
    """A multirun dir's job dirs (`<dir>/<job num>/`) in job order; None when `path` is not one."""
    if not (path / "multirun.yaml").is_file():
        return None
    return sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def listed_runs(arguments: Sequence[str]) -> list[tuple[str, Path, list[Path] | None]]:
    """(given name or "", run dir, its multirun's job dirs or None) per run the arguments list: a multirun
    dir's jobs in job order, else the run itself; a missing dir is an error naming the argument."""
    runs = []
    for argument in arguments:
        name, path = named_path(argument)
        if not path.is_dir():
            raise FileNotFoundError(f"{argument}: no such directory")
        jobs = multirun_jobs(path)
        runs += [(name, job, jobs) for job in jobs] if jobs is not None else [(name, path, None)]
    return runs


def collect_runs(arguments: Sequence[str]) -> list[tuple[str, Path]]:
    """(row name, run dir) for each argument: a multirun dir's jobs in order (named by their overrides),
    or one run (`NAME=DIR`'s name, else its own)."""
    runs, named_jobs = [], {}
    for name, path, jobs in listed_runs(arguments):
        if jobs is not None:
            if path not in named_jobs:  # the first job of its multirun: name them all at once
                named_jobs.update(zip(jobs, job_names(jobs), strict=True))
            runs.append((named_jobs[path], path))
        elif name:
            runs.append((name, path))
        else:
            runs.append((path.name, path) if (path / "eval").is_dir() else (eval_run_name(path), path))
    return runs


def missing(value) -> bool:
    """None or NaN: a figure a run does not have."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def json_ready(rows: list[dict]) -> list[dict]:
    """The rows with NaN as None (JSON has no NaN)."""
    return [{k: None if missing(v) else v for k, v in row.items()} for row in rows]


def compression_columns(rows: list[dict]) -> list[str]:
    """The `compression_<tokenizer>` keys any row has, in the order first seen."""
    return [key for key in dict.fromkeys(k for row in rows for k in row) if key.startswith("compression_")]


def table_columns(rows: list[dict]) -> list[str]:
    """The value columns any row has, in a fixed order (compression columns in the order first seen)."""
    seen = list(dict.fromkeys(key for row in rows for key in row))
    compression = compression_columns(rows)
    order = [
        "samples",
        *SCORES,
        "chars_per_vision_token",
        *compression,
        "positions",
        "train_gflops_per_sample",
        "train_ms_per_sample",
        "generate_ms_per_item",
    ]
    return [key for key in order if key in seen]


def cell(row: dict, column: str) -> str:
    """A table cell: "–" for a missing figure, a score with its interval in brackets, 4 digits."""
    value = row.get(column)
    if missing(value):
        return "–"
    if column in SCORES and row.get(f"{column}_low") is not None:
        return f"{value:.3f} [{row[f'{column}_low']:.3f}, {row[f'{column}_high']:.3f}]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    """The table (intervals in brackets), then why each run without results has none."""
    columns = table_columns(rows)
    table = [
        {"arm": row["arm"], "status": row["status"]} | {c: cell(row, c) for c in columns} for row in rows
    ]
    benchmarks = sorted({str(row["benchmark"]) for row in rows if row.get("benchmark")})
    lines = [f"benchmark: {', '.join(benchmarks) or '–'}; scores with 95% intervals\n", markdown_table(table)]
    lines += [f"- {row['arm']}: {row['reason']}" for row in rows if row.get("reason")]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """One panel per score: each arm's value with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row["status"] == "ok"]
    scores = [score for score in SCORES if any(score in row for row in done)]
    fig, axes = plt.subplots(
        1, max(1, len(scores)), figsize=(3 + 0.7 * len(done) * len(scores), 3.8), squeeze=False
    )
    for ax, score in zip(axes[0], scores, strict=False):
        shown = [row for row in done if score in row]
        values = np.array([row[score] for row in shown])
        error = np.abs(np.array([[row[f"{score}_low"], row[f"{score}_high"]] for row in shown]).T - values)
        ax.errorbar(range(len(shown)), values, yerr=error, fmt="o", capsize=4)
        ax.set_xticks(range(len(shown)), [row["arm"] for row in shown], rotation=45, ha="right")
        ax.set_title(score)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(arguments: Sequence[str], out_dir: Path) -> list[dict]:
    """The rows of the runs in `arguments`, written to `out_dir` as arms.md, arms.json and arms.png."""
    rows = [run_row(name, run_dir) for name, run_dir in collect_runs(arguments)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "arms.md").write_text(markdown(rows))
    (out_dir / "arms.json").write_text(json.dumps(json_ready(rows), indent=1))
    plot(rows, out_dir / "arms.png")
    return rows
