"""Sentence (pair) regression (STS-B, custom scores): mean squared error on a 1-wide [CLS] head, scored with
Pearson and Spearman correlation."""

from __future__ import annotations

import numpy as np

from flaxbert import scores
from flaxbert.finetune.kinds._text import TextKind
from flaxbert.finetune.kinds.base import EvalResult
from flaxbert.losses import mean_squared_error
from flaxbert.train.step import LossOutput


class Regression(TextKind):
    name = "regression"
    head = "sequence_classification"
    fixed_num_labels = 1
    regression = True

    def loss(self, out, batch) -> LossOutput:
        t = mean_squared_error(out.logits[..., 0], batch["label"], batch["weight"])
        return LossOutput(terms={"mse": (t.loss_sum, t.weight)})

    def evaluate(self, task, examples, features, outputs, settings) -> EvalResult:
        pred = np.array([float(r[0][0]) for r in outputs.rows])
        preds = [{"where": ex.where, "score": float(p)} for ex, p in zip(examples, pred)]
        if "label" not in features[0]:
            return EvalResult({}, preds)
        gold = np.array([f["label"] for f in features])
        return EvalResult({"pearson": scores.pearson(pred, gold), "spearman": scores.spearman(pred, gold)}, preds)


REGRESSION = Regression()
