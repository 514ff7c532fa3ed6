"""Task metrics on a model's outputs (scored by the task's kind) and the output files (metrics JSON,
predictions JSONL, confusion-matrix PNG, per-entity report). The forward passes are `flaxbert.infer.predict`."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from flaxbert import scores
from flaxbert.finetune.kinds import EvalResult, EvalSettings
from flaxbert.finetune.tasks import Task
from flaxbert.infer import features as F
from flaxbert.infer.predict import Outputs


def evaluate(task: Task, examples: Sequence, features: Sequence[dict], outputs: Outputs,
             qa: F.QASettings = F.QASettings(), ner_scheme: Optional[str] = None, version_2: bool = False,
             null_threshold: float = 0.0, head_params=None) -> EvalResult:
    """Metrics and per-example predictions from per-feature model outputs, scored by the task's kind
    (`head_params`: the head's parameters, for kinds that decode with them)."""
    return task.spec.evaluate(task, examples, features, outputs,
                              EvalSettings(qa, ner_scheme, version_2, null_threshold, head_params))


def write_outputs(result: EvalResult, task: Task, out_dir: str, name: str, extra: Optional[dict] = None) -> dict:
    """`<name>_metrics.json`, `<name>_predictions.jsonl`, and `<name>_confusion.png` (classification)
    or `<name>_entities.txt` (NER) in `out_dir`. Returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"metrics": os.path.join(out_dir, f"{name}_metrics.json"),
             "predictions": os.path.join(out_dir, f"{name}_predictions.jsonl")}
    with open(paths["metrics"], "w", encoding="utf-8") as f:
        json.dump({"task": task.name, "eval_set": name, **result.metrics, **(extra or {})}, f, indent=2)
    with open(paths["predictions"], "w", encoding="utf-8") as f:
        for p in result.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    if result.confusion is not None:
        paths["confusion"] = os.path.join(out_dir, f"{name}_confusion.png")
        scores.save_confusion_matrix_png(result.confusion, list(task.labels), paths["confusion"],
                                          title=f"{task.name} {name}")
    if result.entity_report is not None:
        paths["entities"] = os.path.join(out_dir, f"{name}_entities.txt")
        with open(paths["entities"], "w", encoding="utf-8") as f:
            f.write(format_entity_report(result.entity_report))
    return paths


def format_entity_report(report: dict[str, Any]) -> str:
    lines = [f"{'type':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, s in report.items():
        lines.append(f"{name:<12}{s.precision:>10.4f}{s.recall:>10.4f}{s.f1:>10.4f}{s.support:>10d}")
    return "\n".join(lines) + "\n"
