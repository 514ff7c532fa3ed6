"""BertConfig: the frozen description of a BERT encoder, its presets and its HF mapping."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from flaxbert import families
from flaxbert.errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "tanh", "silu", "swish")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder. Field names follow HF `BertConfig` where one exists."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # HF names: gelu = exact erf, gelu_new / gelu_pytorch_tanh = tanh approx.
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # DistilBERT's head dropout (its config.json keys): before the sentence classifier (sequence classification,
    # multiple choice) and before the span scores (question answering). BERT's heads drop out at
    # hidden_dropout_prob (its QA head not at all) and its config.json has neither, so there they keep these defaults.
    seq_classif_dropout: float = 0.2
    qa_dropout: float = 0.1
    # BERT's, RoBERTa's and ELECTRA's `classifier_dropout`: the dropout of their classifier heads (sequence, token,
    # and BERT's multiple choice); None, as in their config.json, means hidden_dropout_prob
    classifier_dropout: Optional[float] = None
    # ELECTRA's multiple-choice head: the dropout after its summary layer
    summary_last_dropout: float = 0.1
    # False: the MLM decoder has weights of its own (config.json's tie_word_embeddings), not the word embeddings
    tie_word_embeddings: bool = True
    # ELECTRA's embedding width when it is not hidden_size (then a dense layer projects the embeddings up);
    # None: hidden_size, as in every other family
    embedding_size: Optional[int] = None
    # HF model_type of the family (flaxbert.families): its config.json names, heads and which embeddings exist
    model_type: str = "bert"
    # --- flaxbert-only settings (not part of a HF config) ---
    dtype: str = "float32"  # compute dtype; parameters are always float32
    attention_impl: str = "xla"  # xla einsum | dot_product_attention (jax.nn, XLA) | cudnn (GPU, 16-bit, padded rows)
    scan_layers: bool = True  # stack layers on a `layers` axis and lax.scan over them
    remat_policy: str = "none"  # activation checkpointing per layer; see REMAT_POLICIES

    def __post_init__(self):
        family = families.family_for(self.model_type, source="BertConfig")
        for name, only in family.fixed_fields.items():  # e.g. DistilBERT: no token types, eps 1e-12
            if getattr(self, name) != only:
                raise ConfigError(f"BertConfig.{name} must be {only!r} for model_type {self.model_type!r} (its "
                                  f"config.json has no such setting), got {getattr(self, name)!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings") + (("type_vocab_size",) if family.token_types
                                                                        else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"BertConfig.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"BertConfig.hidden_act {self.hidden_act!r} is unknown; choose one of {ACTIVATIONS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"BertConfig.dtype {self.dtype!r} is unknown; choose one of {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"BertConfig.attention_impl {self.attention_impl!r} is unknown; choose one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(
                f"BertConfig.remat_policy {self.remat_policy!r} is unknown; choose one of {REMAT_POLICIES}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "seq_classif_dropout", "qa_dropout",
                     "classifier_dropout", "summary_last_dropout"):
            p = getattr(self, name)
            if p is None and name == "classifier_dropout":
                continue
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ConfigError(f"BertConfig.{name} must be in [0, 1), got {p!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"BertConfig.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in sorted(families.OWN_FIELDS - set(family.own_fields)):
            if getattr(self, name) != defaults[name]:
                raise ConfigError(f"BertConfig.{name} is not a setting of model_type {self.model_type!r} (its heads "
                                  f"do not read it); leave it at {defaults[name]!r}")
        size = self.embedding_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise ConfigError(f"BertConfig.embedding_size must be a positive integer or None, got "
                              f"{self.embedding_size!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"BertConfig.pad_token_id {self.pad_token_id} is outside the vocabulary "
                              f"(vocab_size {self.vocab_size})")

    # ----- presets -----------------------------------------------------------------------------
    @classmethod
    def _preset(cls, layers: int, hidden: int, **overrides) -> "BertConfig":
        fields = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=max(hidden // 64, 1),
                      intermediate_size=4 * hidden)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def tiny(cls, **kw) -> "BertConfig":
        return cls._preset(2, 128, **kw)

    @classmethod
    def mini(cls, **kw) -> "BertConfig":
        return cls._preset(4, 256, **kw)

    @classmethod
    def small(cls, **kw) -> "BertConfig":
        return cls._preset(4, 512, **kw)

    @classmethod
    def medium(cls, **kw) -> "BertConfig":
        return cls._preset(8, 512, **kw)

    @classmethod
    def base(cls, **kw) -> "BertConfig":
        return cls._preset(12, 768, **kw)

    @classmethod
    def large(cls, **kw) -> "BertConfig":
        return cls._preset(24, 1024, **kw)

    @classmethod
    def preset(cls, name: str, **kw) -> "BertConfig":
        presets = ("tiny", "mini", "small", "medium", "base", "large")
        if name not in presets:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {presets}")
        return getattr(cls, name)(**kw)

    # ----- derived values ----------------------------------------------------------------------
    @property
    def family(self) -> families.Family:
        return families.family_for(self.model_type)

    @property
    def embedding_dim(self) -> int:
        """The width of the embedding tables (and of the tied MLM decoder's input)."""
        return self.embedding_size or self.hidden_size

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence the position table holds (RoBERTa's first position is pad + 1, not 0)."""
        return self.max_position_embeddings - self.family.first_position(self.pad_token_id)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)

    def flops_per_token(self, seq_len: int, *, masked_fraction: float = 0.15, training: bool = True) -> float:
        """Model FLOPs per input token (multiply-add = 2 FLOPs), forward+backward when `training`.

        Counts the encoder matmuls (QKV, attention scores and values, output, FFN), the pooler+NSP
        (per sequence, amortised over seq_len) and the MLM head only at `masked_fraction` of the
        tokens, which is what flaxbert computes. Embedding gathers and elementwise work are ignored.
        """
        h, i, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        per_layer = 2 * (4 * h * h + 2 * h * i) + 2 * (2 * seq_len * h)  # dense + attention (QK^T, PV)
        mlm = masked_fraction * 2 * (h * h + h * V)
        pooler = 2 * (h * h + 2 * h) / seq_len
        forward = L * per_layer + mlm + pooler
        return 3.0 * forward if training else forward

    # ----- Hugging Face mapping (per model_type: flaxbert.families) -----------------------------
    @classmethod
    def from_hf_config(cls, hf: Any, *, source: str = "config", **overrides) -> "BertConfig":
        """From a transformers `BertConfig`, a config.json dict, or a path to config.json / a model dir.
        `source` names the origin in error messages."""
        if isinstance(hf, (str, os.PathLike)):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            try:
                with open(path, encoding="utf-8") as f:
                    hf = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no config.json found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(hf, Mapping):
            hf = hf.to_dict()
        family = families.family_for(hf.get("model_type", "bert"), source=source)
        family.check_hf(hf, source)
        fields = family.fields_from_hf(hf)
        fields.update(model_type=family.model_type, **overrides)
        return cls(**fields)

    def to_hf_config(self, **extra) -> dict:
        """A config.json dict that transformers' config class of this family (BertConfig, ...) accepts."""
        family = self.family
        out = family.fields_to_hf({**dataclasses.asdict(self), "embedding_size": self.embedding_dim})
        out.update(family.required)
        out.update(model_type=family.model_type, architectures=[family.base_architecture])
        out.update(extra)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
