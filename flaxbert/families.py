"""Model families flaxbert loads: one object per HF model_type, registered in FAMILIES.

A family describes how a HF config.json of that model_type maps onto `BertConfig` fields. The code that
reads HF configs asks `family_for(model_type)`; it does not test model_type strings itself. Adding a
family means one `Family` here (its config names and flags) plus its parameter names in hf.py.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

from flaxbert.errors import ConfigError

# BertConfig fields that a HF config.json carries, under BERT's own names.
BERT_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                  "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF model_type's config.json reads and writes as `BertConfig` fields."""

    model_type: str  # HF config.json `model_type`
    # HF config key -> BertConfig field, for keys whose names differ from BERT's (DistilBERT's `dim`, ...).
    config_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    base_architecture: str = "BertModel"  # `architectures` written for a bare encoder

    def __post_init__(self):
        object.__setattr__(self, "config_names", MappingProxyType(dict(self.config_names)))

    def fields_from_hf(self, hf: Mapping[str, Any]) -> dict:
        """The BertConfig fields set in a config.json dict (None values are left to the defaults)."""
        renamed = {self.config_names.get(k, k): v for k, v in hf.items()}
        return {k: renamed[k] for k in BERT_HF_FIELDS if renamed.get(k) is not None}

    def fields_to_hf(self, fields: Mapping[str, Any]) -> dict:
        """config.json keys for BertConfig `fields`, under this family's names."""
        back = {v: k for k, v in self.config_names.items()}
        return {back.get(k, k): fields[k] for k in BERT_HF_FIELDS}


BERT = Family(model_type="bert")

FAMILIES: Mapping[str, Family] = MappingProxyType({f.model_type: f for f in (BERT,)})


def family_for(model_type: str, *, source: str = "config") -> Family:
    """The registered family of a HF model_type; a ConfigError naming it and the supported ones otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"{source}: model_type is {model_type!r}, which flaxbert does not load; "
                          f"supported model types: {', '.join(sorted(FAMILIES))}")
    return family
