"""Run a benchmark: generate with our model or read existing predictions, score, write, log.

Files written to the output directory:
- `predictions/` (generation mode): the answers in the benchmark's own format;
- `metrics.json`: the scores (and `prediction_issues`, counts by reason of predictions that could not be
  used as given); `samples.jsonl`: one row per item; `report.md`: the tables, including where each such
  prediction is (also as `tables.json`, {name: rows}, which notebooks/compression.ipynb reads);
- `plots/*.png`; and, for every configured logger, the scalars under `eval/` (W&B also gets the tables
  and plots).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vlm.contracts import Batch
from vlm.data.processing import Collator, SampleProcessor
from vlm.eval.benchmarks.base import Benchmark, Context, Item, PredictionIssue, Result

log = logging.getLogger(__name__)


class GenerationSet(Dataset):
    """Benchmark items -> prompts for generation (map-style, so Lightning shards it across ranks).

    An item whose image cannot be read does not stop the run: it comes back as `{"key", "error"}`,
    gets no prediction, and the benchmark's rule for missing predictions applies (reported).
    """

    def __init__(self, items: list[Item], processor: SampleProcessor) -> None:
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        processor = self.processor
        context = {}
        try:  # an image that does not load or a prompt that does not encode (a lone surrogate)
            if processor.context == "vision":
                views = processor.pixel_values(item.load_images())
                prompt_ids = processor.encode_prompt(item.prompt, len(views), processor.placeholders(views))
            else:  # the text the image shows instead of its pixels
                record = {**item.meta, "prompt": item.prompt, "answers": item.answers}
                prompt_ids, context = processor.text_context(record, item.key)
                views = processor.images.empty()
        except (FileNotFoundError, ValueError) as error:
            return {"key": item.key, "error": str(error)}
        return {
            "key": item.key,
            "prompt_ids": prompt_ids,
            "answer_ids": [],
            "pixel_values": views,
            "answers": item.answers,
            **context,
        }


class GenerationCollator(Collator):
    """Batches the readable items; the unreadable ones travel along as `failed` [(key, error)], and the
    benchmark's `max_new_tokens` with them when given (what `VLMModule.predict_step` generates)."""

    def __init__(self, pad_id: int, max_new_tokens: int | None = None) -> None:
        super().__init__(pad_id)
        self.max_new_tokens = max_new_tokens

    def __call__(self, samples: list[dict]) -> Batch:
        good = [s for s in samples if "error" not in s]
        batch = super().__call__(good) if good else {"keys": []}
        batch["failed"] = [(s["key"], s["error"]) for s in samples if "error" in s]
        if self.max_new_tokens is not None:
            batch["max_new_tokens"] = self.max_new_tokens
        return batch


def generate_predictions(trainer, module, benchmark: Benchmark, items: list[Item], ckpt_path=None) -> dict:
    """{key: generated text} for every readable item, from all ranks (`trainer.predict`, batched)."""
    model = module.model
    processor = SampleProcessor.for_model(model, train=False)
    loader = torch.utils.data.DataLoader(
        GenerationSet(items, processor),
        batch_size=benchmark.batch_size,
        collate_fn=GenerationCollator(model.tokenizer.pad_id, benchmark.max_new_tokens),
        num_workers=min(2, torch.get_num_threads()) if len(items) > benchmark.batch_size else 0,
    )
    outputs = trainer.predict(module, dataloaders=loader, ckpt_path=ckpt_path, weights_only=True) or []
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # each rank predicted its share; the distributed sampler's padding repeats some items, which
        # the dict keyed by item absorbs
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, outputs)
        outputs = [output for rank in gathered for output in rank]
    for key, error in dict.fromkeys(f for output in outputs for f in output["failed"]):
        log.warning("item %s gets no prediction: %s", key, error)
    return {key: text for output in outputs for key, text in output["texts"].items()}


def run_benchmark(
    benchmark: Benchmark,
    output_dir: Path,
    *,
    trainer=None,
    module=None,
    datamodule=None,
    predictions_path: str | Path | None = None,
    ckpt_path: str | None = None,
    loggers=(),
) -> dict:
    """Score `benchmark` with the model in `module` (generation) or with `predictions_path`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = module.model if module is not None else None
    context = Context(
        tokenizer=model.tokenizer if model is not None else None,
        vision_tokens_per_image=model.vision_tokens_per_image if model is not None else None,
        image_size=tuple(model.encoder.preprocessing.size) if model is not None else None,
        max_length=int(module.cfg.max_length) if model is not None else None,
        output_dir=output_dir,
        datamodule=datamodule,
        predictions_path=Path(predictions_path) if predictions_path is not None else None,
        model=model,
    )
    items = benchmark.items(context)
    if not items:
        raise ValueError(f"benchmark={benchmark.name} has no items to evaluate")
    if predictions_path is not None:
        predictions = benchmark.read_predictions(Path(predictions_path), items)
        source = str(predictions_path)
    else:
        if module is None or trainer is None:
            raise ValueError("eval.py needs ckpt_path=... (generate) or predictions=... (score them)")
        predictions = {}
        for group, group_items in benchmark.generation_groups(items).items():
            start = time.perf_counter()
            predictions |= generate_predictions(trainer, module, benchmark, group_items, ckpt_path)
            context.generation_seconds[group] = time.perf_counter() - start
        if trainer.is_global_zero:
            written = benchmark.write_predictions(items, predictions, _mkdir(output_dir / "predictions"))
            log.info("predictions written to %s", written)
        source = "generated"
    if trainer is not None and not trainer.is_global_zero:
        return {}
    result = benchmark.score(items, predictions, context)
    result.metrics = {"benchmark": benchmark.name, "predictions": source, **result.metrics}
    if context.generation_seconds:  # wall time of the generation passes, loading and batching included
        result.metrics["generation_ms_per_item"] = (
            1000 * sum(context.generation_seconds.values()) / len(items)
        )
    report_issues(result, getattr(predictions, "issues", []))
    write_result(result, output_dir, benchmark.name)
    log_result(result, loggers or (trainer.loggers if trainer is not None else ()), output_dir)
    print(f"\n{benchmark.name} -> {output_dir}\n{format_table(scalars(result.metrics))}")
    for note in result.notes:
        print(f"NOTE: {note}")
    return result.metrics


def report_issues(result: Result, issues: list[PredictionIssue], shown: int = 1000) -> None:
    """Prediction-file issues into the result: counts by reason (metrics), a note, a table of locations."""
    if not issues:
        return
    result.metrics["prediction_issues"] = {"count": len(issues), **Counter(issue.reason for issue in issues)}
    named = ", ".join(f"{issue.location} ({issue.reason})" for issue in issues[:10])
    more = f" and {len(issues) - 10} more (table 'prediction issues')" if len(issues) > 10 else ""
    result.notes.append(f"{len(issues)} predictions could not be used as given: {named}{more}")
    log.warning(result.notes[-1])
    result.tables["prediction issues"] = [
        {"location": i.location, "reason": i.reason, "action": i.action, "detail": i.detail}
        for i in issues[:shown]
    ]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- outputs ---------------------------------------------------------------------------------------
def scalars(metrics: dict, prefix: str = "") -> dict[str, float | int | str]:
    """Nested metrics flattened to `a/b` names (numbers and strings only)."""
    flat: dict = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(scalars(value, f"{prefix}{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[f"{prefix}{name}"] = value
    return flat


def format_table(metrics: dict) -> str:
    """A two-column text table of the metrics."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)\n"
    columns = list(dict.fromkeys(c for row in rows for c in row))

    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(result: Result, output_dir: Path, name: str) -> None:
    # errors="replace": a lone surrogate left in some prediction text must not lose the results
    utf8 = {"encoding": "utf-8", "errors": "replace"}
    (output_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, ensure_ascii=False), **utf8)
    (output_dir / "tables.json").write_text(json.dumps(result.tables, indent=1, ensure_ascii=False), **utf8)
    with open(output_dir / "samples.jsonl", "w", **utf8) as f:
        for row in result.samples:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    plots = {}
    if result.plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for plot_name, make in result.plots.items():
            path = _mkdir(output_dir / "plots") / f"{plot_name}.png"
            make(path)
            plt.close("all")
            plots[plot_name] = path
    report = [f"# {name}\n"]
    report += [f"> **Note:** {note}\n" for note in result.notes]
    report += [
        "## Metrics\n",
        markdown_table([{"metric": k, "value": v} for k, v in scalars(result.metrics).items()]),
    ]
    for table_name, rows in result.tables.items():
        report += [f"## {table_name}\n", markdown_table(rows)]
    report += [f"## {plot_name}\n\n![{plot_name}](plots/{path.name})\n" for plot_name, path in plots.items()]
    (output_dir / "report.md").write_text("\n".join(report), **utf8)


def log_result(result: Result, loggers, output_dir: Path) -> None:
    """Scalars to every logger under eval/; tables and plots to W&B."""
    from lightning.pytorch.loggers import WandbLogger

    numbers = {f"eval/{k}": float(v) for k, v in scalars(result.metrics).items() if not isinstance(v, str)}
    for logger in loggers:
        logger.log_metrics(numbers)
        if isinstance(logger, WandbLogger):
            for table_name, rows in result.tables.items():
                if rows:
                    columns = list(dict.fromkeys(c for row in rows for c in row))
                    data = [[row.get(c) for c in columns] for row in rows]
                    logger.log_table(key=f"eval/{table_name}", columns=columns, data=data)
            for path in sorted((output_dir / "plots").glob("*.png")):
                logger.log_image(key=f"eval/{path.stem}", images=[str(path)])
        logger.save()
