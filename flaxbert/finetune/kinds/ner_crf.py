"""NER with a linear-chain CRF over the token classifier (`--task.crf=true`): the loss is the negative CRF
log-likelihood of each row's tag path over its scored positions (the first sub-token of each word), decoding is
Viterbi over the same positions, with the BIO constraints (I-X only after B-X or I-X) unless
`task.crf_constraints=false`. Training uses the unconstrained likelihood; the learned transitions score the
forbidden moves low, and the constraints make them impossible at decoding."""

from __future__ import annotations

import jax.numpy as jnp

from flaxbert import crf, crf_io
from flaxbert.heads import crf_params
from flaxbert.infer import features as F
from flaxbert.finetune.kinds.ner import NER
from flaxbert.train.step import LossOutput


class NERCRF(NER):
    head = crf_io.HEAD

    def __init__(self, name: str, constraints: bool):
        self.name, self.constraints = name, constraints

    def loss(self, out, batch) -> LossOutput:
        labels = batch["token_labels"]  # -100: not scored (padding, special tokens, later sub-tokens)
        mask = (labels >= 0) & (batch["weight"][:, None] > 0)
        ll = crf.log_likelihood(out.logits, jnp.maximum(labels, 0), mask, out.crf)  # [batch]
        # per scored token, as the softmax head's mean, so that the same learning rate suits both
        tokens = jnp.sum(mask).astype(jnp.float32)
        return LossOutput(terms={"crf_nll": (-jnp.sum(ll), tokens)}, metrics={})

    def token_predictions(self, task, features, outputs, settings) -> list:
        params = crf_params(settings.head_params)
        params = crf.bio_constrained(params, task.labels) if self.constraints else params
        masks = [F.word_starts(f["word_ids"]) for f in features]
        return crf.decode([r[0] for r in outputs.rows], masks, params)

    def save_model(self, model, out_dir: str) -> None:
        crf_io.save_pretrained(model, out_dir, constraints=self.constraints)

    def load_model(self, path: str, num_labels: int, on_head_mismatch: str):
        return crf_io.load_pretrained(path, num_labels, on_head_mismatch=on_head_mismatch)


NER_CRF = NERCRF("ner_crf", constraints=True)
NER_CRF_UNCONSTRAINED = NERCRF("ner_crf_unconstrained", constraints=False)
