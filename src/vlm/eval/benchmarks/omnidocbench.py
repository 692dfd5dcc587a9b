"""OmniDocBench v1.5 end to end (`vlm.eval.omnidocbench`, which agrees with the official code).

Ground truth: `OmniDocBench.json` with the page images in `images/` next to it (the official release).
Prediction format: one `<image stem>.md` per page in a folder (the official layout). A page without a
prediction file is dropped from every metric, as the official code does, and reported loudly;
`benchmark.missing=empty` scores it as an empty page instead. The overall score uses
1 - display-formula edit distance where the leaderboard uses CDM (external LaTeX tools), and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vlm.eval.benchmarks.base import Benchmark, Context, Item, Result, bar_plot
from vlm.eval.omnidocbench import score_omnidocbench
from vlm.eval.omnidocbench.ground_truth import image_name, load_ground_truth
from vlm.eval.omnidocbench.score import read_prediction

log = logging.getLogger(__name__)
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
        items = []
        for page in load_ground_truth(gt):
            name = image_name(page)
            items.append(Item(Path(name).stem, images / name, self.prompt, meta={"page": page}))
        return self.limited(items)

    def write_predictions(self, items: list[Item], predictions: dict[str, str], out_dir: Path) -> Path:
        for item in items:
            if item.key in predictions:
                (out_dir / f"{item.key}.md").write_text(predictions[item.key], encoding="utf-8")
        return out_dir

    def read_predictions(self, path: Path, items: list[Item]) -> dict[str, str]:
        if path.is_file():  # also accepted: one JSON object {image stem: markdown}
            return super().read_predictions(path, items)
        found = {item.key: read_prediction(path, image_name(item.meta["page"])) for item in items}
        return {key: text for key, text in found.items() if text is not None}

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        pages = [item.meta["page"] for item in items]
        result = score_omnidocbench(pages, predictions, missing=self.missing, match=self.match)
        notes = []
        if result.missing:
            action = "dropped from every metric (official)" if self.missing == "drop" else "scored as empty"
            shown = ", ".join(result.missing[:10]) + (" ..." if len(result.missing) > 10 else "")
            notes.append(
                f"{len(result.missing)} of {len(items)} pages have no prediction and were {action}: {shown}"
            )
        notes.append(
            f"overall uses {result.metrics['overall_formula_metric']} for formulas (the leaderboard: CDM)"
        )
        tables = {}
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
