"""Model families flaxbert loads: one object per HF model_type, registered in FAMILIES.

A family describes how a HF config.json of that model_type maps onto `BertConfig` fields. The code that
reads HF configs asks `family_for(model_type)`; it does not test model_type strings itself. Adding a
family means one `Family` here (its config names and flags) plus its parameter names in hf.py (and its
head variants, if any, in heads.FAMILY_HEADS).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping, Optional

from flaxbert.errors import ConfigError

# BertConfig fields that a HF config.json carries, under BERT's own names.
BERT_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                  "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "tie_word_embeddings")
BERT_ARCHITECTURES = {
    None: "BertModel",
    "pretraining": "BertForPreTraining",
    "masked_lm": "BertForMaskedLM",
    "sequence_classification": "BertForSequenceClassification",
    "token_classification": "BertForTokenClassification",
    "question_answering": "BertForQuestionAnswering",
    "multiple_choice": "BertForMultipleChoice",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF model_type's config.json reads and writes as `BertConfig` fields."""

    model_type: str  # HF config.json `model_type`
    # HF config key -> BertConfig field, for keys whose names differ from BERT's (DistilBERT's `dim`, ...).
    config_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # head (None: the bare encoder) -> HF class name written to / read from `architectures`
    architectures: Mapping[Optional[str], str] = dataclasses.field(default_factory=lambda: dict(BERT_ARCHITECTURES))
    # BertConfig fields this family's config.json does not carry, with the only value they take
    fixed_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # config.json keys whose only supported value is given (absent means that value); written on save
    required: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"position_embedding_type": "absolute"})
    token_types: bool = True  # a token-type (segment) embedding; without it token_type_ids are ignored
    pooler: bool = True  # a dense+tanh pooler on [CLS] (BERT's); without it pooled_output is None
    refused_heads: Mapping[str, str] = dataclasses.field(default_factory=dict)  # head -> why this family has none
    # config.json keys kept verbatim on load and written back on save (HF settings flaxbert does not use)
    passthrough_keys: tuple = ()
    # BertConfig fields beyond BERT_HF_FIELDS that only this family's config.json carries, under their own names
    # (DistilBERT's head dropout); in another family they keep their defaults
    own_fields: tuple = ()
    # positions count from pad_token_id + 1 and padding tokens sit at position pad_token_id (RoBERTa's
    # fairseq heritage); False: positions 0, 1, ... whatever the tokens
    positions_after_pad: bool = False
    mlm_activation: Optional[str] = None  # the MLM transform's activation when it is not `hidden_act` (RoBERTa's gelu)

    def __post_init__(self):
        for name in ("config_names", "architectures", "fixed_fields", "required", "refused_heads"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def base_architecture(self) -> str:
        """`architectures` written for a bare encoder."""
        return self.architectures[None]

    def check_hf(self, hf: Mapping[str, Any], source: str) -> None:
        """A ConfigError naming the key for a config.json setting this family supports only one value of."""
        for key, only in self.required.items():
            value = hf.get(key, only)
            if value != only:
                raise ConfigError(f"{source}: {key} {value!r} is not supported (only {only!r})")

    def fields_from_hf(self, hf: Mapping[str, Any]) -> dict:
        """The BertConfig fields set in a config.json dict (None values are left to the defaults)."""
        renamed = {self.config_names.get(k, k): v for k, v in hf.items()}
        fields = {k: renamed[k] for k in BERT_HF_FIELDS + self.own_fields
                  if renamed.get(k) is not None and k not in self.fixed_fields}
        fields.update(self.fixed_fields)
        return fields

    def fields_to_hf(self, fields: Mapping[str, Any]) -> dict:
        """config.json keys for BertConfig `fields`, under this family's names."""
        back = {v: k for k, v in self.config_names.items()}
        return {back.get(k, k): fields[k] for k in BERT_HF_FIELDS + self.own_fields if k not in self.fixed_fields}

    def first_position(self, pad_token_id: int) -> int:
        """The position id of a sequence's first token."""
        return pad_token_id + 1 if self.positions_after_pad else 0

    @property
    def has_nsp(self) -> bool:
        """Whether the family has BERT's next-sentence prediction head (and so the MLM + NSP pretraining one)."""
        return "pretraining" not in self.refused_heads

    def check_head(self, head: Optional[str]) -> None:
        """A ConfigError for a head this family does not have."""
        if head in self.refused_heads:
            raise ConfigError(f"model_type {self.model_type!r} has no {head!r} head: {self.refused_heads[head]}")
        if head in HF_HEADS and head not in self.architectures:
            raise ConfigError(f"model_type {self.model_type!r} has no {head!r} head (transformers has no class of "
                              f"it for this family); its heads: {', '.join(h for h in self.architectures if h)}")


BERT = Family(model_type="bert", own_fields=("classifier_dropout",))

# DistilBERT: BERT's post-LN layer under other names, no token types, no pooler; its sentence heads put a
# dense+ReLU (`pre_classifier`) on token 0 instead (flaxbert.heads.FAMILY_HEADS).
DISTILBERT = Family(
    model_type="distilbert",
    config_names={"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                  "hidden_dim": "intermediate_size", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                  "attention_dropout": "attention_probs_dropout_prob"},
    architectures={head: arch.replace("Bert", "DistilBert") for head, arch in BERT_ARCHITECTURES.items()
                   if head != "pretraining"},
    fixed_fields={"type_vocab_size": 0, "layer_norm_eps": 1e-12},
    required={"sinusoidal_pos_embds": False},
    token_types=False,
    pooler=False,
    refused_heads={"pretraining": "DistilBERT has no next-sentence prediction; use 'masked_lm'"},
    own_fields=("seq_classif_dropout", "qa_dropout"),  # its heads' dropout rates (flaxbert.heads.FAMILY_HEADS)
)

# RoBERTa (and XLM-R, whose config.json says xlm-roberta): BERT's encoder and names under `roberta/`, positions
# after the padding id, one token type; its sentence classifier is dense+tanh+out_proj on <s>, not the pooler.
ROBERTA = Family(
    model_type="roberta",
    architectures={head: arch.replace("Bert", "Roberta") for head, arch in BERT_ARCHITECTURES.items()
                   if head != "pretraining"},
    refused_heads={"pretraining": "RoBERTa is trained without next-sentence prediction; use 'masked_lm'"},
    passthrough_keys=("bos_token_id", "eos_token_id"),
    own_fields=("classifier_dropout",),
    positions_after_pad=True,
    mlm_activation="gelu",
)
XLM_ROBERTA = dataclasses.replace(
    ROBERTA, model_type="xlm-roberta",
    architectures={head: arch.replace("Bert", "XLMRoberta") for head, arch in BERT_ARCHITECTURES.items()
                   if head != "pretraining"})

# ELECTRA: BERT's encoder under `electra/`, embeddings of their own width (embedding_size) projected up to
# hidden_size, no pooler; its pretraining head is the discriminator's replaced-token detection, its sentence
# heads a dense+GELU on token 0 (flaxbert.heads.FAMILY_HEADS).
ELECTRA = Family(
    model_type="electra",
    architectures={**{head: arch.replace("Bert", "Electra") for head, arch in BERT_ARCHITECTURES.items()
                      if head != "pretraining"}, "replaced_token_detection": "ElectraForPreTraining"},
    required={"position_embedding_type": "absolute", "summary_type": "first", "summary_use_proj": True},
    pooler=False,
    refused_heads={"pretraining": "ELECTRA has no next-sentence prediction; its pretraining head is "
                                  "'replaced_token_detection' (the discriminator)"},
    passthrough_keys=("summary_activation",),
    own_fields=("embedding_size", "classifier_dropout", "summary_last_dropout"),
    mlm_activation="gelu",
)

FAMILIES: Mapping[str, Family] = MappingProxyType(
    {f.model_type: f for f in (BERT, DISTILBERT, ROBERTA, XLM_ROBERTA, ELECTRA)})
# heads some family has a transformers class of; a family without that class refuses them
HF_HEADS = frozenset(head for family in FAMILIES.values() for head in family.architectures if head)
# BertConfig fields that only some families' config.json carries (each family's `own_fields`)
OWN_FIELDS = frozenset(name for family in FAMILIES.values() for name in family.own_fields)


def family_for(model_type: str, *, source: str = "config") -> Family:
    """The registered family of a HF model_type; a ConfigError naming it and the supported ones otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"{source}: model_type is {model_type!r}, which flaxbert does not load; "
                          f"supported model types: {', '.join(sorted(FAMILIES))}")
    return family
