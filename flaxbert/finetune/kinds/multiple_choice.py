"""Multiple choice (SWAG): each (context, ending) pair scored by the [CLS] head, softmax over the endings,
accuracy of the chosen one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flaxbert import scores
from flaxbert.infer import features as F
from flaxbert.finetune import readers
from flaxbert.finetune.kinds.base import EvalResult, Kind, label_loss, ranked
from flaxbert.train.step import LossOutput


class MultipleChoice(Kind):
    name = "multiple_choice"
    head = "multiple_choice"
    fixed_num_labels = 2  # the head's width is fixed; the value is not used

    def read(self, task, path: Path, columns) -> list:
        return readers.read_swag(path)

    def features(self, task, tokenizer, examples, settings, training: bool) -> list[dict]:
        return F.choice_features(tokenizer, examples, settings.max_length,
                                 with_labels=training or all(ex.label is not None for ex in examples))

    def loss(self, out, batch) -> LossOutput:
        return label_loss(out.logits, batch)

    def evaluate(self, task, examples, features, outputs, settings) -> EvalResult:
        _, probs, pred = ranked(outputs)
        preds = [{"where": ex.where, "label": int(p), "score": float(probs[i, p])}
                 for i, (ex, p) in enumerate(zip(examples, pred))]
        if "label" not in features[0]:
            return EvalResult({}, preds)
        gold = np.array([f["label"] for f in features])
        return EvalResult({"accuracy": scores.accuracy(gold, pred)}, preds)


MULTIPLE_CHOICE = MultipleChoice()
