"""Extractive question answering (SQuAD v1.1 and v2.0): start/end span logits over document windows, the
best span per question across its windows (with the no-answer score for v2.0), scored with the official SQuAD
exact match and F1."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flaxbert import scores
from flaxbert.infer import features as F
from flaxbert.finetune import readers
from flaxbert.finetune.kinds.base import EvalResult, Kind
from flaxbert.losses import span_loss
from flaxbert.train.step import LossOutput


class QA(Kind):
    name = "qa"
    head = "question_answering"
    fixed_num_labels = 2  # the head's width is fixed; the value is not used
    sequence_outputs = True

    def read(self, task, path: Path, columns) -> list:
        return readers.read_squad(path)

    def features(self, task, tokenizer, examples, settings, training: bool) -> list[dict]:
        return F.qa_features(tokenizer, examples, settings.qa, training=training)

    def loss(self, out, batch) -> LossOutput:
        t = span_loss(out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"],
                      batch["weight"])
        return LossOutput(terms={"ce": (t.loss_sum, t.weight)}, metrics={"accuracy": (t.correct, t.weight)})

    def evaluate(self, task, examples, features, outputs, settings) -> EvalResult:
        answers = F.qa_postprocess(examples, features, [r[0] for r in outputs.rows], [r[1] for r in outputs.rows],
                                   settings.qa, version_2=settings.version_2, null_threshold=settings.null_threshold)
        preds = [{"id": ex.qid, **dataclasses.asdict(answers[ex.qid])} for ex in examples]
        gold = [scores.SquadExample(ex.qid, tuple(a for a, _ in ex.answers)) for ex in examples]
        texts = {q: a.text for q, a in answers.items()}
        null = {q: a.null_score_diff for q, a in answers.items()} if settings.version_2 else None
        m = scores.squad_evaluate(gold, texts, "2.0" if settings.version_2 else "1.1", null_probs=null,
                                   null_threshold=settings.null_threshold)
        return EvalResult(m, preds)


QA_KIND = QA()
