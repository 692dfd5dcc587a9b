"""DocVQA: ANLS on val; the test split's answers in the official submission JSON.

Items come from shards written by `python -m vlm.app.prepare docvqa` (key `docvqa-<questionId>`, the
question in the meta). The prompt follows lmms-eval: the question, then "Answer the question using a
single word or phrase.", at most 32 new tokens. Prediction format: the official submission JSON,
[{"questionId": int, "answer": str}, ...] (`predictions=FILE` reads the same).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

from vlm.eval.anls import anls_score, docvqa_submission
from vlm.eval.benchmarks.base import (
    Context,
    Item,
    JsonRowsBenchmark,
    Result,
    bar_plot,
    empty_for_missing,
    mean,
    shard_items,
)


@dataclass
class DocVQA(JsonRowsBenchmark):
    predictions_file: ClassVar[str] = "submission.json"
    row_format: ClassVar[str] = "the DocVQA submission JSON [{questionId, answer}, ...]"
    name: str = "docvqa"
    urls: str | list[str] = "data/docvqa/val/*.tar"  # shards of one split
    prompt: str = "<image>\n{question}\nAnswer the question using a single word or phrase."
    threshold: float = 0.5
    batch_size: int = 16
    max_new_tokens: int = 32

    def items(self, context: Context | None = None) -> list[Item]:
        items = shard_items(self.urls, self.limit, self.prompt)
        for item in items:
            if item.meta.get("questionId") is None:
                raise ValueError(
                    f"{item.key}: no questionId in the sample's meta (not a prepared DocVQA shard?)"
                )
        return items

    def to_rows(self, items: list[Item], predictions: dict[str, str]) -> list[dict]:
        rows = [{"questionId": item.meta["questionId"], "answer": predictions[item.key]} for item in items]
        return docvqa_submission(rows)  # checks the ids: one answer per question

    def row_id(self, row: dict) -> str:
        return str(row["questionId"])

    def row_text(self, row: dict) -> str:
        return row["answer"]

    def item_id(self, item: Item) -> str:
        return str(item.meta["questionId"])

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        predictions, notes = empty_for_missing(items, predictions, "questions")
        answered = [item for item in items if item.answers]
        if not answered:  # the test split: nothing to score here, the submission is the result
            notes.append("no gold answers (test split): submit predictions/submission.json to the RRC server")
            return Result({"questions": len(items), "scored": 0}, notes=notes)
        samples, by_type = [], defaultdict(list)
        for item in answered:
            score = anls_score(predictions[item.key], item.answers, self.threshold)
            samples.append(
                {
                    "key": item.key,
                    "question": item.meta.get("question"),
                    "prediction": predictions[item.key],
                    "answers": item.answers,
                    "anls": score,
                }
            )
            for kind in item.meta.get("question_types") or []:
                by_type[kind].append(score)
        metrics = {"questions": len(items), "scored": len(answered), "anls": mean(s["anls"] for s in samples)}
        metrics["exact"] = mean(float(s["anls"] == 1.0) for s in samples)
        table = [
            {"question_type": k, "questions": len(v), "anls": mean(v)} for k, v in sorted(by_type.items())
        ]
        plots = (
            {"anls_by_question_type": bar_plot({r["question_type"]: r["anls"] for r in table}, "ANLS")}
            if table
            else {}
        )
        return Result(metrics, samples, {"by_question_type": table} if table else {}, plots, notes)
