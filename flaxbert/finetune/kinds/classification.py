"""Sentence (pair) classification: GLUE, emotion, custom CSV/JSON tasks. Cross-entropy on the [CLS] head;
accuracy plus the task's own scores (MCC for CoLA, F1 for MRPC/QQP, macro F1 for custom tasks), a confusion
matrix, and per-example predictions with the label name and its probability."""

from __future__ import annotations

import numpy as np

from flaxbert import scores
from flaxbert.finetune.kinds._text import TextKind
from flaxbert.finetune.kinds.base import EvalResult, label_loss, ranked
from flaxbert.train.step import LossOutput

SCORES = {"mcc": lambda y, p, n: scores.matthews_corrcoef(y, p),
          "f1": lambda y, p, n: scores.f1_binary(y, p, pos_label=1),
          "macro_f1": lambda y, p, n: scores.f1_macro(y, p, n)}


def task_scores(task, gold: np.ndarray, pred: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and the task's own `scores` (names in SCORES)."""
    out = {"accuracy": scores.accuracy(gold, pred)}
    out.update({name: SCORES[name](gold, pred, num_labels) for name in task.scores})
    return out


class Classification(TextKind):
    name = "classification"
    head = "sequence_classification"
    labels_from_data = True
    names_labels = True

    def labels_of(self, examples) -> tuple[str, ...]:
        labels = {ex.label for ex in examples if ex.label is not None}
        if labels and all(label.lstrip("-").isdigit() for label in labels):
            return tuple(sorted(labels, key=int))
        return tuple(sorted(labels))

    def loss(self, out, batch) -> LossOutput:
        return label_loss(out.logits, batch)

    def evaluate(self, task, examples, features, outputs, settings) -> EvalResult:
        logits, probs, pred = ranked(outputs)
        names = task.labels or tuple(str(i) for i in range(logits.shape[-1]))
        preds = [{"where": ex.where, "label": names[p], "score": float(probs[i, p])}
                 for i, (ex, p) in enumerate(zip(examples, pred))]
        if "label" not in features[0]:
            return EvalResult({}, preds)
        gold, n = np.array([f["label"] for f in features]), logits.shape[-1]
        return EvalResult(task_scores(task, gold, pred, n), preds, scores.confusion_matrix(gold, pred, n))


CLASSIFICATION = Classification()
