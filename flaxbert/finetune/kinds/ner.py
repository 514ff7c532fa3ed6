"""Named-entity recognition (CoNLL-2003 and custom CoNLL files): token classification trained on the first
sub-token of each word (or all of them), predictions mapped back to words, entity-level precision/recall/F1
(conlleval, or a strict scheme) and a per-entity report."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from flaxbert import scores
from flaxbert.infer import features as F
from flaxbert.finetune import readers
from flaxbert.finetune.kinds.base import EvalResult, Kind
from flaxbert.losses import cross_entropy
from flaxbert.train.step import LossOutput


class NER(Kind):
    name = "ner"
    head = "token_classification"
    labels_from_data = True
    sequence_outputs = True
    names_labels = True
    crf_kinds = {True: "ner_crf", False: "ner_crf_unconstrained"}  # task.crf=true, by task.crf_constraints

    def read(self, task, path: Path, columns) -> list:
        return readers.read_conll(path)

    def labels_of(self, examples) -> tuple[str, ...]:
        tags = {t for ex in examples for t in (ex.tags or [])}
        return tuple(sorted(tags, key=lambda t: (t != "O", t[2:], t)))  # O, B-LOC, I-LOC, B-MISC, ...

    def features(self, task, tokenizer, examples, settings, training: bool) -> list[dict]:
        label_to_id = {label: i for i, label in enumerate(task.labels)} if task.labels else None
        return F.ner_features(tokenizer, examples, settings.max_length, label_to_id, settings.label_all_tokens)

    def loss(self, out, batch) -> LossOutput:
        labels = batch["token_labels"]  # -100: not scored (padding, special tokens, later sub-tokens)
        t = cross_entropy(out.logits, jnp.maximum(labels, 0), (labels >= 0) * batch["weight"][:, None])
        return LossOutput(terms={"ce": (t.loss_sum, t.weight)}, metrics={"accuracy": (t.correct, t.weight)})

    def token_predictions(self, task, features, outputs, settings) -> list:
        """The label id predicted at every token of each feature: the softmax argmax."""
        return [r[0].argmax(-1) for r in outputs.rows]

    def evaluate(self, task, examples, features, outputs, settings) -> EvalResult:
        outside = task.labels.index("O") if "O" in task.labels else 0
        pred_tags = []
        token_preds = self.token_predictions(task, features, outputs, settings)
        for ex, f, pred in zip(examples, features, token_preds):
            ids = F.word_predictions(f["word_ids"], pred, len(ex.words), outside)
            pred_tags.append([task.labels[i] for i in ids])
        preds = [{"where": ex.where, "words": ex.words, "tags": tags} for ex, tags in zip(examples, pred_tags)]
        if examples[0].tags is None:
            return EvalResult({}, preds)
        report = scores.entity_report([ex.tags for ex in examples], pred_tags, settings.ner_scheme)
        micro = report["micro avg"]
        correct = sum(t == p for ex, tags in zip(examples, pred_tags) for t, p in zip(ex.tags, tags))
        total = sum(len(ex.tags) for ex in examples)
        m = {"precision": micro.precision, "recall": micro.recall, "f1": micro.f1, "token_accuracy": correct / total}
        return EvalResult(m, preds, entity_report=report)


NER_KIND = NER()
