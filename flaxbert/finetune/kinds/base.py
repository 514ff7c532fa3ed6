"""What a task kind is: the interface every kind implements (one module per kind, registered in `KINDS`).

A kind decides how its files are read, where its label set comes from, how examples become features, which head
and loss train it, how the head's outputs are scored and which extra files an evaluation writes. The fine-tuning
run, the evaluator and the pipelines ask the task's kind instead of testing its name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np

from flaxbert import hf, scores
from flaxbert.losses import cross_entropy
from flaxbert.train.step import LossOutput


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict]  # one JSON-able record per example
    confusion: Optional[np.ndarray] = None  # classification
    entity_report: Optional[dict] = None  # NER: type -> EntityScores
    real_tokens_per_sec: Optional[float] = None  # the eval pass's speed over real (non-pad) tokens


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What scoring may need beyond the outputs (QA post-processing, the NER tagging scheme)."""

    qa: Any = None  # features.QASettings
    ner_scheme: Optional[str] = None
    version_2: bool = False
    null_threshold: float = 0.0
    head_params: Any = None  # the head's parameters, for kinds that decode with them (the CRF's Viterbi)


def label_loss(logits, batch) -> LossOutput:
    """Cross-entropy of one label per row over `logits` [rows, classes], with the accuracy beside it."""
    t = cross_entropy(logits, batch["label"], batch["weight"])
    return LossOutput(terms={"ce": (t.loss_sum, t.weight)}, metrics={"accuracy": (t.correct, t.weight)})


def ranked(outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits [examples, classes], their softmax, the argmax) of per-example [CLS] head outputs."""
    logits = np.stack([r[0] for r in outputs.rows])
    return logits, scores.softmax(logits), logits.argmax(-1)


class Kind:
    """A task kind. Subclasses set the class attributes and override the methods their kind needs."""

    name: ClassVar[str]
    head: ClassVar[str]  # the flaxbert head that trains it
    fixed_num_labels: ClassVar[Optional[int]] = None  # a head of fixed width (None: the task's label count)
    labels_from_data: ClassVar[bool] = False  # the label set is read from the data when the task has none
    regression: ClassVar[bool] = False  # float targets (readers keep labels as numbers)
    packs: ClassVar[bool] = False  # single sequences: several may share a row (task.pack)
    sequence_outputs: ClassVar[bool] = False  # the head's outputs have a sequence axis (cut back per feature)
    names_labels: ClassVar[bool] = False  # the saved model carries id2label / label2id
    label_key: ClassVar[str] = "label"  # the feature key a featurized eval set has when it is labelled
    crf_kinds: ClassVar[Optional[dict]] = None  # {crf_constraints: kind name} that task.crf=true trains instead

    def read(self, task, path: Path, columns) -> list:
        raise NotImplementedError

    def labels_of(self, examples: Sequence) -> tuple[str, ...]:
        """The label set found in `examples` (kinds with `labels_from_data`)."""
        raise NotImplementedError

    def features(self, task, tokenizer, examples: Sequence, settings, training: bool) -> list[dict]:
        raise NotImplementedError

    def loss(self, out, batch) -> LossOutput:
        """The training objective from the head's output on a batch (sum, weight terms for the shared step)."""
        raise NotImplementedError

    def evaluate(self, task, examples: Sequence, features: Sequence[dict], outputs, settings: EvalSettings
                 ) -> EvalResult:
        raise NotImplementedError

    def load_model(self, path: str, num_labels: int, on_head_mismatch: str) -> hf.PretrainedModel:
        """The model directory with this kind's head (a HF directory; kinds with files of their own add them)."""
        return hf.load_pretrained(path, head=self.head, num_labels=num_labels, on_head_mismatch=on_head_mismatch)

    def save_model(self, model: hf.PretrainedModel, out_dir: str) -> None:
        hf.save_pretrained(model, out_dir)
