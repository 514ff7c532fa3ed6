"""Forward passes over bucketed batches, task metrics on the outputs, and the output files
(metrics JSON, predictions JSONL, confusion-matrix PNG, per-entity report)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from flaxbert import metrics
from flaxbert.finetune import batching
from flaxbert.finetune import features as F
from flaxbert.finetune.kinds import EvalResult, EvalSettings
from flaxbert.finetune.tasks import Task
from flaxbert.heads import apply_head
from flaxbert.model import ENCODER_KEYS


def make_forward(config, head: str) -> Callable:
    """A jitted deterministic forward pass returning the head's logits as a tuple of arrays."""
    @jax.jit
    def forward(params, batch):
        return tuple(apply_head(params, batch, config, head=head))
    return forward


@dataclasses.dataclass
class Outputs:
    """Per-feature model outputs (numpy, cut to the feature's own length) and throughput."""
    rows: list[tuple[np.ndarray, ...]]
    real_tokens: int
    seconds: float


def run_model(forward: Callable, params, features: Sequence[dict], batch_size: int, boundaries: Sequence[int],
              seq_outputs: bool, progress: bool = False, desc: str = "eval") -> Outputs:
    """Outputs per feature. `seq_outputs`: the head's outputs have a sequence axis (token and span
    logits), which is cut back from the bucket length to the feature's length."""
    rows: list = [None] * len(features)
    n_batches = batching.num_batches(features, batch_size, boundaries)
    batches = batching.make_batches(features, batch_size, boundaries)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=n_batches, desc=desc, leave=False)
    tokens, start = 0, time.perf_counter()
    for batch in batches:
        inputs = {k: batch[k] for k in ENCODER_KEYS if k in batch}
        out = [np.asarray(x) for x in jax.device_get(forward(params, inputs))]
        tokens += batching.real_tokens(batch)
        for row, idx in enumerate(batch["index"]):
            if idx < 0:
                continue
            n = features[idx]["input_ids"].shape[-1]
            rows[idx] = tuple(o[row, :n] if seq_outputs else o[row] for o in out)
    return Outputs(rows, tokens, time.perf_counter() - start)


def evaluate(task: Task, examples: Sequence, features: Sequence[dict], outputs: Outputs,
             qa: F.QASettings = F.QASettings(), ner_scheme: Optional[str] = None, version_2: bool = False,
             null_threshold: float = 0.0) -> EvalResult:
    """Metrics and per-example predictions from per-feature model outputs, scored by the task's kind."""
    return task.spec.evaluate(task, examples, features, outputs,
                              EvalSettings(qa, ner_scheme, version_2, null_threshold))


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
        metrics.save_confusion_matrix_png(result.confusion, list(task.labels), paths["confusion"],
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
