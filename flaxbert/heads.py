"""Task heads on top of the encoder, one module per head registered in `HEAD_TABLE`, the combined module, and
the functional API: `init`, `apply_head`, `logical_axes`. Heads return small NamedTuples. A new head is a
module here and one line in the table (and its HF names in hf.py); a family whose head differs in shape
(DistilBERT's pre_classifier) registers its variant in `FAMILY_HEADS`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxbert.config import BertConfig
from flaxbert.crf import CRFParams
from flaxbert.model import (BertEncoder, Dropout, InputError, LayerNorm, activation, check_batch, cls_states,
                            compute_dtype, encoder_inputs, gather_positions, normal_init, zeros_init)

Array = jax.Array


class PretrainingOutput(NamedTuple):
    mlm_logits: Array  # [batch, predictions, vocab] (only at masked_lm_positions)
    nsp_logits: Array  # [batch, 2], or [batch, instances, 2] for packed rows


class MaskedLMOutput(NamedTuple):
    mlm_logits: Array  # [batch, predictions, vocab], or [batch, seq, vocab] without masked_lm_positions


class SequenceClassifierOutput(NamedTuple):
    logits: Array  # [batch, num_labels]; num_labels == 1 is regression


class TokenClassifierOutput(NamedTuple):
    logits: Array  # [batch, seq, num_labels]


class TokenCRFOutput(NamedTuple):
    logits: Array  # [batch, seq, num_labels] emission scores
    crf: CRFParams  # transitions [num_labels, num_labels], start and end [num_labels] (no batch axis)


class QuestionAnsweringOutput(NamedTuple):
    start_logits: Array  # [batch, seq]
    end_logits: Array  # [batch, seq]


class MultipleChoiceOutput(NamedTuple):
    logits: Array  # [batch, choices]


class MLMHead(nn.Module):
    """dense -> act -> LayerNorm -> logits against the tied word embeddings (or, with tie_word_embeddings
    false, a decoder of its own) + bias."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, attend):
        c = self.config
        dtype = compute_dtype(c)
        h = nn.Dense(c.embedding_dim, dtype=dtype, param_dtype=jnp.float32,  # ELECTRA: down to the embeddings'
                     kernel_init=normal_init(c, ("embed", "embed_out")), bias_init=zeros_init(("embed_out",)),
                     name="transform")(h)
        act = activation(c.family.mlm_activation or c.hidden_act)
        h = LayerNorm(c.layer_norm_eps, dtype, name="transform_norm")(act(h))
        bias = self.param("bias", zeros_init(("vocab",)), (c.vocab_size,), jnp.float32)
        if c.tie_word_embeddings:
            logits = attend(h)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                              kernel_init=normal_init(c, ("embed", "vocab")), name="decoder")(h)
        return logits.astype(jnp.float32) + bias


def _classifier(config: BertConfig, features: int, name: str):
    return nn.Dense(features, dtype=compute_dtype(config), param_dtype=jnp.float32,
                    kernel_init=normal_init(config, ("embed", "labels")), bias_init=zeros_init(("labels",)), name=name)


class _HeadModule(nn.Module):
    """A head's parameters, kept under the head's name in the parameter tree."""

    config: BertConfig
    num_labels: int
    deterministic: bool
    dropout_rate: float = 0.0  # the head's own dropout (`HeadSpec.dropout` names the config fields it comes from)

    def dropped(self, x):
        return Dropout(self.dropout_rate)(x, deterministic=self.deterministic)


class PretrainingHead(_HeadModule):
    """MLM logits at the masked positions (or everywhere without them) and NSP logits on the pooled [CLS]."""

    @nn.compact
    def __call__(self, out, batch, attend):
        mlm_logits = _mlm_logits(self.config, out, batch, attend)
        nsp_logits = _classifier(self.config, 2, "nsp")(out.pooled_output).astype(jnp.float32)
        return PretrainingOutput(mlm_logits, nsp_logits)


class MaskedLMHead(_HeadModule):
    @nn.compact
    def __call__(self, out, batch, attend):
        return MaskedLMOutput(_mlm_logits(self.config, out, batch, attend))


class SequenceClassificationHead(_HeadModule):
    @nn.compact
    def __call__(self, out, batch, attend):
        pooled = self.dropped(out.pooled_output)
        return SequenceClassifierOutput(_classifier(self.config, self.num_labels, "classifier")(pooled)
                                        .astype(jnp.float32))


class TokenClassificationHead(_HeadModule):
    @nn.compact
    def __call__(self, out, batch, attend):
        seq = self.dropped(out.last_hidden_state)
        return TokenClassifierOutput(_classifier(self.config, self.num_labels, "classifier")(seq).astype(jnp.float32))


# The CRF scores are kept divided by CRF_SCALE, so that AdamW (whose steps are about lr in a parameter's own
# units) moves them CRF_SCALE times faster than the encoder: at fine-tuning rates (5e-5) zero-initialised
# transitions would hardly move in an epoch. `crf_params` gives the real scores.
CRF_SCALE = 100.0
CRF_PARAM_NAMES = ("transitions", "start", "end")


def crf_params(head_params: Mapping[str, Any]) -> CRFParams:
    """The CRF scores of a `token_classification_crf` head's parameters."""
    return CRFParams(*(jnp.asarray(head_params[n], jnp.float32) * CRF_SCALE for n in CRF_PARAM_NAMES))


class TokenClassificationCRFHead(_HeadModule):
    """The token classifier's logits as emission scores of a linear-chain CRF (flaxbert/crf.py) whose
    transition, start and end scores start at zero (so the CRF starts as the per-token softmax)."""

    @nn.compact
    def __call__(self, out, batch, attend):
        seq = self.dropped(out.last_hidden_state)
        logits = _classifier(self.config, self.num_labels, "classifier")(seq).astype(jnp.float32)
        n = self.num_labels
        shapes = {"transitions": ((n, n), ("labels", "labels")), "start": ((n,), ("labels",)),
                  "end": ((n,), ("labels",))}
        raw = {name: self.param(name, zeros_init(axes), shape, jnp.float32) for name, (shape, axes) in shapes.items()}
        return TokenCRFOutput(logits, crf_params(raw))


class QuestionAnsweringHead(_HeadModule):
    """Start and end scores per token (after dropout where the family's spec has one: DistilBERT's qa_dropout)."""

    @nn.compact
    def __call__(self, out, batch, attend):
        seq = self.dropped(out.last_hidden_state)
        logits = _classifier(self.config, 2, "qa_outputs")(seq).astype(jnp.float32)
        return QuestionAnsweringOutput(logits[..., 0], logits[..., 1])


class MultipleChoiceHead(_HeadModule):
    """One score per (context, choice) row; `BertWithHead` folds the rows back to [batch, choices]."""

    @nn.compact
    def __call__(self, out, batch, attend):
        pooled = self.dropped(out.pooled_output)
        return MultipleChoiceOutput(_classifier(self.config, 1, "classifier")(pooled).astype(jnp.float32)[..., 0])


def _hidden_dense(config: BertConfig, name: str):
    """A hidden_size -> hidden_size layer of a head."""
    return nn.Dense(config.hidden_size, dtype=compute_dtype(config), param_dtype=jnp.float32,
                    kernel_init=normal_init(config, ("embed", "embed_out")), bias_init=zeros_init(("embed_out",)),
                    name=name)


class _TokenZeroHead(_HeadModule):
    """A sentence head of a family that classifies token 0 with a dense layer of its own instead of BERT's
    pooler: [dropout ->] `dense_name` -> `act` -> dropout; subclasses say which layer, activation and output."""

    dense_name = "dense"
    act = staticmethod(jnp.tanh)
    drop_first = False  # dropout on token 0's state before the dense layer (RoBERTa's and ELECTRA's classifier)


def _token_zero_vector(head: _TokenZeroHead, out, batch):
    h = cls_states(out.last_hidden_state, batch.get("cls_positions"))
    if head.drop_first:
        h = head.dropped(h)
    return head.dropped(head.act(_hidden_dense(head.config, head.dense_name)(h)))


class _TokenZeroSequenceHead(_TokenZeroHead):
    @nn.compact
    def __call__(self, out, batch, attend):
        h = _token_zero_vector(self, out, batch)
        return SequenceClassifierOutput(_classifier(self.config, self.num_labels, "classifier")(h)
                                        .astype(jnp.float32))


class _TokenZeroChoiceHead(_TokenZeroHead):
    @nn.compact
    def __call__(self, out, batch, attend):
        h = _token_zero_vector(self, out, batch)
        return MultipleChoiceOutput(_classifier(self.config, 1, "classifier")(h).astype(jnp.float32)[..., 0])


class PreClassifierSequenceHead(_TokenZeroSequenceHead):
    """DistilBERT's sequence classification: token 0 -> pre_classifier -> ReLU -> dropout -> classifier."""

    dense_name, act = "pre_classifier", staticmethod(jax.nn.relu)


class PreClassifierMultipleChoiceHead(_TokenZeroChoiceHead):
    """DistilBERT's multiple choice: one score per row from pre_classifier on token 0."""

    dense_name, act = "pre_classifier", staticmethod(jax.nn.relu)


class DenseTanhSequenceHead(_TokenZeroSequenceHead):
    """RoBERTa's sentence classifier: dropout -> dense -> tanh -> dropout -> classifier (HF's out_proj) on
    token 0 (<s>)."""

    drop_first = True


class DenseGeluSequenceHead(DenseTanhSequenceHead):
    """ELECTRA's sentence classifier: RoBERTa's with GELU in place of tanh."""

    act = staticmethod(activation("gelu"))


class SummaryMultipleChoiceHead(_TokenZeroChoiceHead):
    """ELECTRA's multiple choice: token 0 -> summary (dense) -> GELU -> dropout -> one score per row."""

    dense_name, act = "summary", staticmethod(activation("gelu"))


class ReplacedTokenOutput(NamedTuple):
    logits: Array  # [batch, seq]: > 0 where the discriminator says the token was replaced


class ReplacedTokenDetectionHead(_HeadModule):
    """ELECTRA's discriminator: per token, dense -> hidden_act -> one logit (replaced or original)."""

    @nn.compact
    def __call__(self, out, batch, attend):
        c = self.config
        h = activation(c.hidden_act)(_hidden_dense(c, "dense")(out.last_hidden_state))
        return ReplacedTokenOutput(_classifier(c, 1, "prediction")(h).astype(jnp.float32)[..., 0])


def _mlm_logits(config: BertConfig, out, batch, attend):
    positions = batch.get("masked_lm_positions")
    h = out.last_hidden_state if positions is None else gather_positions(out.last_hidden_state, positions)
    return MLMHead(config, name="mlm")(h, attend)


CLASSIFIER_DROPOUT = ("classifier_dropout", "hidden_dropout_prob")  # HF: classifier_dropout, else the hidden rate


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A registered head: its module, whether its width is the task's label count, whether its batch has a
    choices axis ([batch, choices, seq]), whether it predicts at masked positions, and the BertConfig fields its
    dropout rate in training comes from, as the family's HF class reads them: the first that is not None
    (empty: no dropout, as in HF's BERT QA head)."""

    module: type
    sized_by_labels: bool = False
    choices: bool = False
    masked_positions: bool = False
    dropout: tuple[str, ...] = CLASSIFIER_DROPOUT

    def dropout_rate(self, config: BertConfig) -> float:
        rates = [getattr(config, name) for name in self.dropout if getattr(config, name) is not None]
        return float(rates[0]) if rates else 0.0


HEAD_TABLE: dict[str, HeadSpec] = {
    "pretraining": HeadSpec(PretrainingHead, masked_positions=True, dropout=("hidden_dropout_prob",)),
    "masked_lm": HeadSpec(MaskedLMHead, masked_positions=True, dropout=("hidden_dropout_prob",)),
    "sequence_classification": HeadSpec(SequenceClassificationHead, sized_by_labels=True),
    "token_classification": HeadSpec(TokenClassificationHead, sized_by_labels=True),
    "token_classification_crf": HeadSpec(TokenClassificationCRFHead, sized_by_labels=True),
    "question_answering": HeadSpec(QuestionAnsweringHead, dropout=()),
    "multiple_choice": HeadSpec(MultipleChoiceHead, choices=True),
    "replaced_token_detection": HeadSpec(ReplacedTokenDetectionHead, dropout=()),  # ELECTRA's only
}
HEADS = tuple(HEAD_TABLE)
_ROBERTA_HEADS = {
    "sequence_classification": HeadSpec(DenseTanhSequenceHead, sized_by_labels=True),
    "multiple_choice": HeadSpec(MultipleChoiceHead, choices=True, dropout=("hidden_dropout_prob",)),  # not classifier_
}
# Heads whose shape (or dropout) differs in a family (model_type -> head -> spec); the others are HEAD_TABLE's.
FAMILY_HEADS: dict[str, dict[str, HeadSpec]] = {
    "distilbert": {
        "sequence_classification": HeadSpec(PreClassifierSequenceHead, sized_by_labels=True,
                                            dropout=("seq_classif_dropout",)),
        "multiple_choice": HeadSpec(PreClassifierMultipleChoiceHead, choices=True, dropout=("seq_classif_dropout",)),
        "question_answering": HeadSpec(QuestionAnsweringHead, dropout=("qa_dropout",)),
    },
    "roberta": _ROBERTA_HEADS,
    "xlm-roberta": _ROBERTA_HEADS,
    "electra": {
        "sequence_classification": HeadSpec(DenseGeluSequenceHead, sized_by_labels=True),
        "multiple_choice": HeadSpec(SummaryMultipleChoiceHead, choices=True, dropout=("summary_last_dropout",)),
    },
}


def head_spec(config: BertConfig, head: str) -> HeadSpec:
    """The registered head of `config`'s family; a ConfigError for a head the family does not have."""
    config.family.check_head(head)
    return FAMILY_HEADS.get(config.model_type, {}).get(head, HEAD_TABLE[head])


class BertWithHead(nn.Module):
    """The encoder under `bert` and one head under its own name."""

    config: BertConfig
    head: Optional[str] = None
    num_labels: int = 2
    deterministic: bool = True

    @nn.compact
    def __call__(self, batch):
        inputs = encoder_inputs(batch)
        spec = head_spec(self.config, self.head) if self.head is not None else None
        choices = None
        if spec is not None and spec.choices:  # [batch, choices, seq] -> [batch * choices, seq]
            choices = inputs["input_ids"].shape[1]
            inputs = {k: v.reshape((-1, v.shape[-1])) for k, v in inputs.items()}
        bert = BertEncoder(self.config, self.deterministic, name="bert")
        out = bert(**inputs, cls_positions=batch.get("cls_positions"))
        if spec is None:
            return out
        result = spec.module(self.config, self.num_labels, self.deterministic, spec.dropout_rate(self.config),
                             name=self.head)(
            out, batch, bert.embeddings.attend)
        if choices is not None:
            result = result._replace(logits=result.logits.reshape(-1, choices))
        return result


def _check_head(head: Optional[str]) -> None:
    if head is not None and head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {HEADS} (or None for the bare encoder)")


def _example_batch(config: BertConfig, head: Optional[str]) -> dict:
    seq = min(8, config.max_position_embeddings)
    spec = HEAD_TABLE.get(head, HeadSpec(None))
    shape = (1, 2, seq) if spec.choices else (1, seq)
    batch = {k: jnp.zeros(shape, jnp.int32) for k in ("input_ids", "token_type_ids")}
    batch["attention_mask"] = jnp.ones(shape, jnp.int32)
    if spec.masked_positions:
        batch["masked_lm_positions"] = jnp.zeros((1, 2), jnp.int32)
    return batch


def _module(config, head, num_labels, deterministic=True) -> BertWithHead:
    _check_head(head)
    if head is not None:
        head_spec(config, head)  # refuses a head the family does not have
    if head is not None and HEAD_TABLE[head].sized_by_labels and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    return BertWithHead(config, head, num_labels, deterministic)


def _boxed_shapes(config, head, num_labels):
    module = _module(config, head, num_labels)
    return jax.eval_shape(lambda r: module.init(r, _example_batch(config, head)), jax.random.key(0))["params"]


def init(config: BertConfig, rng: Array, head: Optional[str] = None, num_labels: int = 2) -> dict:
    """Fresh float32 parameters: {"bert": ...} plus the head's tree under its name."""
    module = _module(config, head, num_labels)
    variables = jax.jit(lambda r: module.init(r, _example_batch(config, head)))(rng)
    return nn.meta.unbox(variables["params"])


def logical_axes(config: BertConfig, head: Optional[str] = None, num_labels: int = 2):
    """The tree of logical PartitionSpecs matching `init`'s parameters (no arrays are allocated)."""
    return nn.get_partition_spec(_boxed_shapes(config, head, num_labels))


def param_shapes(config: BertConfig, head: Optional[str] = None, num_labels: int = 2):
    """ShapeDtypeStructs of `init`'s parameters (no arrays are allocated)."""
    return nn.meta.unbox(_boxed_shapes(config, head, num_labels))


def head_of(params: Mapping[str, Any]) -> Optional[str]:
    heads = [k for k in params if k in HEADS]
    if len(heads) > 1:
        raise ValueError(f"parameters hold several heads: {heads}")
    return heads[0] if heads else None


def num_labels_of(params: Mapping[str, Any], head: Optional[str]) -> int:
    if head is not None and HEAD_TABLE[head].sized_by_labels:
        return int(params[head]["classifier"]["kernel"].shape[-1])
    return 2


def apply_head(params, batch: Mapping[str, Any], config: BertConfig, head: Optional[str] = None, *,
               dropout_rng: Optional[Array] = None):
    """Encoder + head. `head` defaults to the head found in `params`. Dropout only with `dropout_rng`."""
    head = head_of(params) if head is None else head
    _check_head(head)
    if head is not None and head not in params:
        raise InputError(f"params have no {head!r} head (found: {sorted(params)})")
    check_batch(batch, config, seq_axis=2 if head is not None and HEAD_TABLE[head].choices else 1)
    module = _module(config, head, num_labels_of(params, head), deterministic=dropout_rng is None)
    variables = {"params": {k: params[k] for k in ("bert", head) if k is not None}}
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return module.apply(variables, batch, rngs=rngs)
