"""OmniDocBench v1.5 end to end (`vlm.eval.omnidocbench`, which agrees with the official code).

Ground truth: `OmniDocBench.json` with the page images in `images/` next to it (the official release).
Prediction format: one `<image stem>.md` per page in a folder (the official layout). A page without a
prediction file is dropped from every metric, as the official code does, and reported loudly;
`benchmark.missing=empty` scores it as an empty page instead. The overall score uses
1 - display-formula edit distance where the leaderboard uses CDM (external LaTeX tools), and says so.
With the vision tokens per page (the checkpoint's or `vision_tokens`), the ground truth's text blocks
(formulas and tables left out) give characters per vision token and `compression_<tokenizer>` under the
model's tokenizer and each of `tokenizers` (`vlm.text_accounting`).

Untrusted inputs: a prediction file over `MAX_PREDICTION_SIZE`, or one whose markdown cannot be scored, is
scored as an empty page; undecodable bytes become U+FFFD; a table pair over `teds_max_node_pairs` gets
TEDS 0 (the official time-out); a malformed page entry of a given ground truth is skipped. Each is named
in report.md and counted in metrics.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vlm.eval.benchmarks.base import (
    MAX_PREDICTION_SIZE,
    Benchmark,
    Context,
    Item,
    PredictionIssue,
    Predictions,
    Result,
    bar_plot,
    read_json_members,
    text_metrics,
)
from vlm.eval.omnidocbench import score_omnidocbench
from vlm.eval.omnidocbench.ground_truth import TEXT_CATEGORIES, check_page, image_name, sort_by_order
from vlm.eval.omnidocbench.score import TEDS_MAX_NODE_PAIRS, decode_prediction, prediction_file

log = logging.getLogger(__name__)
MAX_GT_BYTES = 2**30  # the ground truth is read whole (the v1.5 release is far smaller)
PAGE_METRICS = (
    "text_edit",
    "display_formula_edit",
    "table_TEDS",
    "table_TEDS_S",
    "table_edit",
    "reading_order_edit",
)


@dataclass
class OmniDocBench(Benchmark):
    name: str = "omnidocbench"
    gt: str | None = None  # OmniDocBench.json; None = the one next to `predictions=`, else data_dir's
    data_dir: str = "data/omnidocbench"  # the official release: OmniDocBench.json + images/
    images_dir: str | None = None  # None = images/ next to the ground truth
    prompt: str = "<image>\nConvert the document to markdown."
    missing: str = "drop"  # official: pages without a prediction leave every metric; "empty": score as ""
    match: str = "quick_match"  # or simple_match
    teds_max_node_pairs: int | None = TEDS_MAX_NODE_PAIRS  # larger table pairs score TEDS 0; None = no bound
    batch_size: int = 4
    max_new_tokens: int = 4096

    def gt_path(self, context: Context | None) -> Path:
        if self.gt:
            return Path(self.gt)
        predictions = context.predictions_path if context is not None else None
        if predictions is not None:  # a release unpacked with its predictions beside the ground truth
            found = sorted(Path(predictions).resolve().parent.glob("OmniDocBench*.json"))
            if len(found) == 1:
                log.info("ground truth: %s (next to predictions=%s)", found[0], predictions)
                return found[0]
        path = Path(self.data_dir) / "OmniDocBench.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"benchmark=omnidocbench: no ground truth at {path}; give benchmark.gt=<OmniDocBench.json>"
            )
        return path

    def items(self, context: Context | None = None) -> list[Item]:
        gt = self.gt_path(context)
        images = Path(self.images_dir) if self.images_dir else gt.parent / "images"
        pages, self.gt_issues = read_ground_truth(gt)
        items = []
        for page in pages:
            name = image_name(page)
            items.append(Item(Path(name).stem, images / name, self.prompt, meta={"page": page}))
        return self.limited(items)

    def write_predictions(self, items: list[Item], predictions: dict[str, str], out_dir: Path) -> Path:
        for item in items:
            if item.key in predictions:
                (out_dir / f"{item.key}.md").write_text(predictions[item.key], encoding="utf-8")
        return out_dir

    def read_predictions(self, path: Path, items: list[Item]) -> Predictions:
        if path.is_file():  # also accepted: one JSON object {image stem: markdown}
            predictions = super().read_predictions(path, items)
            for issue in predictions.issues:
                if issue.key is not None:  # a page with an unusable prediction counts as empty, not missing
                    predictions[issue.key], issue.action = "", "scored as empty"
            return predictions
        predictions = Predictions()
        for item in items:
            file = prediction_file(path, image_name(item.meta["page"]))
            if file is None:
                continue
            size = file.stat().st_size
            if size > MAX_PREDICTION_SIZE:
                issue = PredictionIssue(str(file), "too_long", "scored as empty", f"{size} bytes", item.key)
                predictions.issues.append(issue)
                predictions[item.key] = ""
                continue
            raw = file.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                issue = PredictionIssue(
                    str(file), "invalid_unicode", "decoded with U+FFFD", str(error), item.key
                )
                predictions.issues.append(issue)
            predictions[item.key] = decode_prediction(raw)
        return predictions

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        pages = [item.meta["page"] for item in items]
        result = score_omnidocbench(
            pages,
            predictions,
            missing=self.missing,
            match=self.match,
            teds_max_node_pairs=self.teds_max_node_pairs,
        )
        notes, tables = [], {}
        gt_issues = getattr(self, "gt_issues", [])
        if gt_issues:
            notes.append(
                f"{len(gt_issues)} ground-truth page entries were malformed and skipped: {_shown(gt_issues)}"
            )
            result.metrics["gt_pages_skipped"] = len(gt_issues)
            tables["skipped ground-truth pages"] = [{"entry": issue} for issue in gt_issues]
        if result.unscorable:
            notes.append(
                f"{len(result.unscorable)} pages have a prediction that could not be scored and were scored as "
                f"empty: {_shown(list(result.unscorable))}"
            )
            result.metrics["unscorable_pages"] = list(result.unscorable)
            tables["unscorable pages"] = [{"page": k, "reason": v} for k, v in result.unscorable.items()]
        if result.table_issues:
            notes.append(
                f"{len(result.table_issues)} tables got TEDS 0 without a comparison (over the bound of "
                f"{self.teds_max_node_pairs} node pairs, or failed; the official scorer: a 120 s time-out): "
                + _shown([f"{t['page']} table {t['gt_idx']}" for t in result.table_issues])
            )
            result.metrics["teds_zeroed_tables"] = [
                f"{t['page']} table {t['gt_idx']}" for t in result.table_issues
            ]
            tables["tables with TEDS set to 0"] = result.table_issues
        if result.missing:
            action = "dropped from every metric (official)" if self.missing == "drop" else "scored as empty"
            shown = ", ".join(result.missing[:10]) + (" ..." if len(result.missing) > 10 else "")
            notes.append(
                f"{len(result.missing)} of {len(items)} pages have no prediction and were {action}: {shown}"
            )
        notes.append(
            f"overall uses {result.metrics['overall_formula_metric']} for formulas (the leaderboard: CDM)"
        )
        accounting = self.accounting(context)
        counts = [accounting.count(page_text(page)) for page in pages]
        result.metrics |= text_metrics(accounting, counts, self.vision_tokens_per_image(context))
        for attribute, values in result.breakdowns.get("text_edit", {}).items():
            rows = []
            for value in values:
                row = {attribute: value}
                for metric in PAGE_METRICS:
                    row[metric] = result.breakdowns.get(metric, {}).get(attribute, {}).get(value)
                rows.append(row)
            tables[f"by {attribute}"] = rows
        plots = {
            f"text_edit_by_{attribute}": bar_plot(values, "text edit distance (lower is better)")
            for attribute, values in result.breakdowns.get("text_edit", {}).items()
            if attribute in ("data_source", "language", "layout")
        }
        return Result(result.metrics, result.pages, tables, plots, notes)


def page_text(page: dict) -> str:
    """The page's ground-truth text: its text blocks in reading order, one per line."""
    blocks = [
        block
        for block in page["layout_dets"]
        if block.get("category_type") in TEXT_CATEGORIES and isinstance(block.get("text"), str)
    ]
    return "\n".join(block["text"] for block in sort_by_order(blocks))


def read_ground_truth(path: Path) -> tuple[list[dict], list[str]]:
    """The pages of a user-given OmniDocBench.json, and `location: why` of each page entry skipped because
    it does not parse, is malformed or repeats an image."""
    json_issues: list[PredictionIssue] = []
    pages, skipped, names = [], [], set()
    for index, (location, page) in enumerate(read_json_members(path, "[", json_issues, MAX_GT_BYTES)):
        try:
            check_page(page, index)
            name = image_name(page)
            if name in names:
                raise ValueError(f"image {name} appears twice")
        except ValueError as error:
            skipped.append(f"{location}: {error}")
            continue
        names.add(name)
        pages.append(page)
    skipped += [f"{issue.location}: {issue.reason}" for issue in json_issues]
    skipped.sort(key=lambda entry: int(entry.removeprefix(f"{path}:").split(":")[0]))
    if skipped:
        log.warning("ground truth %s: %d page entries skipped: %s", path, len(skipped), _shown(skipped))
    if not pages:
        raise ValueError(f"ground truth {path}: no valid page entry ({_shown(skipped)})")
    return pages, skipped


def _shown(names: list[str], count: int = 10) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")
