"""Hugging Face checkpoint interop: the one module that knows HF parameter names.

Loads `flax_model.msgpack` (any FlaxBert* / FlaxDistilBert* class, with or without the encoder's prefix),
`model.safetensors` (single or sharded) and `pytorch_model.bin` (only through torch's weights-only unpickler,
which cannot run code); writes config.json + model.safetensors (PyTorch names) + flax_model.msgpack + tokenizer files.

Internally every source is first turned into a flat dict keyed by HF *Flax* names with Flax layouts
(`encoder/layer/3/attention/self/query/kernel`, kernels [in, out]); one table per family (`HF_NAMES`, by
model_type) maps those to flaxbert's stacked tree, which is the same for every family.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from flaxbert import families
from flaxbert.config import BertConfig
from flaxbert.errors import ConfigError, HFLoadError
from flaxbert.heads import HEADS, init

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
REFUSED_FILES = ("tf_model.h5", "model.ckpt.index", "bert_model.ckpt.index", "model.onnx")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")

_HEAD_OF_ARCH = {}
for _family in families.FAMILIES.values():
    _HEAD_OF_ARCH.update({"Flax" + arch: head for head, arch in _family.architectures.items()})
    _HEAD_OF_ARCH.update({arch: head for head, arch in _family.architectures.items()})


@dataclasses.dataclass
class LoadReport:
    source: str  # the weights file read
    missing: list  # encoder parameters the checkpoint lacked (freshly initialised)
    initialized: list  # head parameters freshly initialised (absent from the checkpoint, or re-initialised)
    unexpected: list  # checkpoint entries flaxbert did not use

    def summary(self) -> str:
        parts = [f"loaded {self.source}"]
        for name in ("missing", "initialized", "unexpected"):
            items = getattr(self, name)
            if items:
                parts.append(f"{name} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        return "; ".join(parts)


@dataclasses.dataclass
class PretrainedModel:
    config: BertConfig
    params: dict
    tokenizer: Any = None
    head: Optional[str] = None
    report: Optional[LoadReport] = None
    hf_extra: dict = dataclasses.field(default_factory=dict)  # id2label, label2id, problem_type, ...

    @property
    def num_labels(self) -> int:
        from flaxbert.heads import num_labels_of
        return num_labels_of(self.params, self.head)

    def check_tokenizer(self, source: str) -> None:
        """An HFLoadError, naming `source`, when there is no tokenizer or it has more tokens than the embedding
        table has rows (its ids past the table would fail, or be clamped, in the middle of a run)."""
        if self.tokenizer is None:
            raise HFLoadError(f"{source}: no tokenizer files (tokenizer.json or vocab.txt) in the model directory")
        n = len(self.tokenizer)
        if n > self.config.vocab_size:
            raise HFLoadError(f"{source}: the tokenizer has {n} tokens but the model's embedding table has only "
                              f"{self.config.vocab_size} rows (vocab_size); the tokenizer is not this model's")


# ----- the name tables, one per family ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HFNames:
    """One family's HF Flax parameter names. flaxbert's own tree is the same for every family (the encoder
    under `bert`, the head under its name); only these names differ."""

    prefix: str  # the encoder's name in HF head models ("bert/...")
    top_level: tuple  # top-level names of a bare encoder's checkpoint (which has no prefix)
    encoder: tuple  # (flaxbert path under bert/, HF Flax name under prefix/)
    layer: str  # HF path of the layer list under prefix/ (layer i is f"{layer}/{i}")
    layer_names: Mapping[str, str]  # flaxbert path inside encoder/layers -> HF suffix inside layer i
    heads: Mapping[Optional[str], tuple]  # head -> ((flaxbert path under the head, HF Flax name), ...)
    # HF entries derived from others (the tied decoder), checked rather than loaded: name -> the HF name it
    # equals, or None for the word embeddings (transposed)
    tied: Mapping[str, Optional[str]]
    # head -> PyTorch entries HF writes as copies (the tied decoder): name -> the PyTorch name it copies
    pt_tied: Mapping[str, Mapping[str, str]]
    no_pooler_heads: tuple = ()  # heads HF saves without the pooler

    def _untied(self, config: BertConfig) -> tuple:
        """The decoder kernels that are weights of their own in this config (tie_word_embeddings false)."""
        return () if config.tie_word_embeddings else tuple(n for n, source in self.tied.items() if source is None)

    def head_names(self, head: Optional[str], config: BertConfig) -> tuple:
        """(flaxbert path under the head, HF Flax name) of `head`'s parameters in `config`: with untied word
        embeddings an MLM head's decoder kernel is one of them."""
        own = tuple(("mlm/decoder/kernel", n) for n in self._untied(config)) if head in MLM_HEADS else ()
        return tuple(self.heads[head]) + own

    def tied_names(self, config: BertConfig) -> dict:
        """The HF entries derived from others in `config`: `tied` less the decoder kernels that are untied."""
        untied = self._untied(config)
        return {n: source for n, source in self.tied.items() if n not in untied}


MLM_HEADS = ("masked_lm", "pretraining")  # the heads with the (tied or untied) MLM decoder


def _layer_rules(cfg: BertConfig, names: HFNames):
    """(flaxbert path inside encoder/layers, HF suffix inside layer i, to_ours, to_hf)."""
    H, nh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    split_in = (lambda k: k.reshape(H, nh, hd), lambda k: k.reshape(H, H))
    split_bias = (lambda b: b.reshape(nh, hd), lambda b: b.reshape(H))
    merge_out = (lambda k: k.reshape(nh, hd, H), lambda k: k.reshape(H, H))
    same = (lambda x: x, lambda x: x)
    transforms = {f"attention/{p}/{leaf}": fn for p in ("query", "key", "value")
                  for leaf, fn in (("kernel", split_in), ("bias", split_bias))}
    transforms["attention/output/kernel"] = merge_out
    return [(our, hf, *transforms.get(our, same)) for our, hf in names.layer_names.items()]


_LAYER_PATHS = ("attention/query/kernel", "attention/query/bias", "attention/key/kernel", "attention/key/bias",
                "attention/value/kernel", "attention/value/bias", "attention/output/kernel", "attention/output/bias",
                "attention_norm/scale", "attention_norm/bias", "intermediate/kernel", "intermediate/bias",
                "output/kernel", "output/bias", "output_norm/scale", "output_norm/bias")
def _dense(our: str, hf: str) -> tuple:
    return ((f"{our}/kernel", f"{hf}/kernel"), (f"{our}/bias", f"{hf}/bias"))


def _mlm(dense: str, norm: str, bias: str) -> tuple:
    """The MLM head's names: its transform, the transform's LayerNorm and the decoder's bias (the decoder's
    kernel is the word embeddings)."""
    return _dense("mlm/transform", dense) + (("mlm/transform_norm/scale", f"{norm}/scale"),
                                             ("mlm/transform_norm/bias", f"{norm}/bias"), ("mlm/bias", bias))


_BERT_MLM = _mlm("cls/predictions/transform/dense", "cls/predictions/transform/LayerNorm", "cls/predictions/bias")
# heads whose names are BERT's in every family that has them
_SHARED_HEADS = {None: (), "token_classification": _dense("classifier", "classifier"),
                 "question_answering": _dense("qa_outputs", "qa_outputs")}


BERT_NAMES = HFNames(
    prefix="bert",
    top_level=("embeddings", "encoder", "pooler"),
    encoder=(
        ("embeddings/word_embeddings", "embeddings/word_embeddings/embedding"),
        ("embeddings/position_embeddings", "embeddings/position_embeddings/embedding"),
        ("embeddings/token_type_embeddings", "embeddings/token_type_embeddings/embedding"),
        ("embeddings/norm/scale", "embeddings/LayerNorm/scale"),
        ("embeddings/norm/bias", "embeddings/LayerNorm/bias"),
        ("pooler/dense/kernel", "pooler/dense/kernel"),
        ("pooler/dense/bias", "pooler/dense/bias"),
    ),
    layer="encoder/layer",
    layer_names=dict(zip(_LAYER_PATHS, (
        "attention/self/query/kernel", "attention/self/query/bias", "attention/self/key/kernel",
        "attention/self/key/bias", "attention/self/value/kernel", "attention/self/value/bias",
        "attention/output/dense/kernel", "attention/output/dense/bias", "attention/output/LayerNorm/scale",
        "attention/output/LayerNorm/bias", "intermediate/dense/kernel", "intermediate/dense/bias",
        "output/dense/kernel", "output/dense/bias", "output/LayerNorm/scale", "output/LayerNorm/bias"))),
    heads={
        **_SHARED_HEADS,
        "masked_lm": _BERT_MLM,
        "pretraining": _BERT_MLM + _dense("nsp", "cls/seq_relationship"),
        "sequence_classification": _dense("classifier", "classifier"),
        "multiple_choice": _dense("classifier", "classifier"),
    },
    tied={"cls/predictions/decoder/kernel": None, "cls/predictions/decoder/bias": "cls/predictions/bias"},
    pt_tied={head: {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                    "cls.predictions.decoder.bias": "cls.predictions.bias"} for head in ("pretraining", "masked_lm")},
    # transformers builds these without a pooler (add_pooling_layer=False)
    no_pooler_heads=("masked_lm", "token_classification", "question_answering"),
)

_DISTILBERT_CLASSIFIER = _dense("pre_classifier", "pre_classifier") + _dense("classifier", "classifier")
DISTILBERT_NAMES = HFNames(
    prefix="distilbert",
    top_level=("embeddings", "transformer"),
    encoder=(
        ("embeddings/word_embeddings", "embeddings/word_embeddings/embedding"),
        ("embeddings/position_embeddings", "embeddings/position_embeddings/embedding"),
        ("embeddings/norm/scale", "embeddings/LayerNorm/scale"),
        ("embeddings/norm/bias", "embeddings/LayerNorm/bias"),
    ),
    layer="transformer/layer",
    layer_names=dict(zip(_LAYER_PATHS, (
        "attention/q_lin/kernel", "attention/q_lin/bias", "attention/k_lin/kernel", "attention/k_lin/bias",
        "attention/v_lin/kernel", "attention/v_lin/bias", "attention/out_lin/kernel", "attention/out_lin/bias",
        "sa_layer_norm/scale", "sa_layer_norm/bias", "ffn/lin1/kernel", "ffn/lin1/bias", "ffn/lin2/kernel",
        "ffn/lin2/bias", "output_layer_norm/scale", "output_layer_norm/bias"))),
    heads={
        **_SHARED_HEADS,
        "masked_lm": _mlm("vocab_transform", "vocab_layer_norm", "vocab_projector/bias"),
        "sequence_classification": _DISTILBERT_CLASSIFIER,
        "multiple_choice": _DISTILBERT_CLASSIFIER,
    },
    tied={"vocab_projector/kernel": None},
    pt_tied={},  # HF writes the tied vocab_projector.weight only once, as the word embeddings
)

# RoBERTa's and ELECTRA's sentence classifier: a dense layer of its own on token 0, then HF's out_proj
_DENSE_OUT_PROJ = _dense("dense", "classifier/dense") + _dense("classifier", "classifier/out_proj")

# RoBERTa / XLM-R: BERT's encoder names under `roberta/`; the LM head is `lm_head` (its decoder tied, and written
# by HF only as the word embeddings), the sentence classifier `classifier/{dense,out_proj}`.
ROBERTA_NAMES = dataclasses.replace(
    BERT_NAMES,
    prefix="roberta",
    heads={
        **_SHARED_HEADS,
        "masked_lm": _mlm("lm_head/dense", "lm_head/layer_norm", "lm_head/bias"),
        "sequence_classification": _DENSE_OUT_PROJ,
        "multiple_choice": _dense("classifier", "classifier"),
    },
    tied={"lm_head/decoder/kernel": None, "lm_head/decoder/bias": "lm_head/bias"},
    pt_tied={},
    no_pooler_heads=("masked_lm", "sequence_classification", "token_classification", "question_answering"),
)

# ELECTRA: BERT's encoder names under `electra/` (no pooler), plus the projection of narrower embeddings (only
# when embedding_size != hidden_size: absent from both trees otherwise); the generator's LM head is
# `generator_predictions` + `generator_lm_head` (its kernel tied), the discriminator `discriminator_predictions`.
ELECTRA_NAMES = dataclasses.replace(
    BERT_NAMES,
    prefix="electra",
    top_level=("embeddings", "embeddings_project", "encoder"),
    encoder=tuple(e for e in BERT_NAMES.encoder if not e[0].startswith("pooler/")) + (
        ("embeddings_project/kernel", "embeddings_project/kernel"),
        ("embeddings_project/bias", "embeddings_project/bias")),
    heads={
        **_SHARED_HEADS,
        "masked_lm": _mlm("generator_predictions/dense", "generator_predictions/LayerNorm", "generator_lm_head/bias"),
        "replaced_token_detection": _dense("dense", "discriminator_predictions/dense") + _dense(
            "prediction", "discriminator_predictions/dense_prediction"),
        "sequence_classification": _DENSE_OUT_PROJ,
        "multiple_choice": _dense("summary", "sequence_summary/summary") + _dense("classifier", "classifier"),
    },
    tied={"generator_lm_head/kernel": None},
    pt_tied={},
    no_pooler_heads=(),
)

HF_NAMES: Mapping[str, HFNames] = {"bert": BERT_NAMES, "distilbert": DISTILBERT_NAMES,  # by model_type
                                   "roberta": ROBERTA_NAMES, "xlm-roberta": ROBERTA_NAMES, "electra": ELECTRA_NAMES}


def names_for(config: BertConfig) -> HFNames:
    return HF_NAMES[config.model_type]


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


# ----- reading the sources into HF Flax names ---------------------------------------------------

_PT_LEAF = [(re.compile(r"(LayerNorm|layer_norm)\.(weight|gamma)$"), r"\1/scale"),
            (re.compile(r"(LayerNorm|layer_norm)\.(beta)$"), r"\1/bias"),
            (re.compile(r"(_embeddings)\.weight$"), r"\1/embedding"), (re.compile(r"\.weight$"), "/kernel"),
            (re.compile(r"\.bias$"), "/bias")]


def _pt_to_flax_names(state: Mapping[str, np.ndarray]) -> dict:
    """PyTorch state dict (dotted names, Linear weights [out, in]) -> HF Flax names and layouts."""
    out = {}
    for name, value in state.items():
        if name.endswith("position_ids"):  # a buffer, not a parameter
            continue
        flax_name = name
        for pattern, repl in _PT_LEAF:
            new = pattern.sub(repl, flax_name)
            if new != flax_name:
                flax_name = new
                break
        flax_name = flax_name.replace(".", "/")
        value = np.asarray(value)
        if flax_name.endswith("/kernel") and value.ndim == 2:
            value = value.T
        out[flax_name] = value
    return out


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open
    try:
        out = {}
        # The flax backend reads every dtype safetensors knows (bfloat16 included); we keep float32 numpy.
        with safe_open(path, framework="flax") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = np.asarray(t.astype(np.float32) if jax.numpy.issubdtype(t.dtype, jax.numpy.floating) else t)
        return out
    except Exception as e:  # safetensors raises its own error types for truncated/invalid files
        raise HFLoadError(f"{path}: not a readable safetensors file ({e})") from None


def _read_torch_bin(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise HFLoadError(f"{path}: reading pytorch_model.bin needs torch (pip install torch); "
                          "or convert the checkpoint to model.safetensors") from None
    try:
        # weights_only=True uses torch's restricted unpickler: it refuses any global that is not a
        # tensor/storage type, so a crafted pickle cannot run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HFLoadError(f"{path}: refused by the weights-only loader (it is not a plain state dict of "
                          f"tensors, so it was not executed): {str(e).splitlines()[0]}") from None
    if not isinstance(state, Mapping):
        raise HFLoadError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _read_msgpack(path: str) -> dict:
    from flax import serialization
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = serialization.msgpack_restore(data)  # plain msgpack with ndarray extension: no code runs
    except Exception as e:
        raise HFLoadError(f"{path}: not a readable Flax msgpack file ({e})") from None
    return {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
            for k, v in _flatten(tree).items()}


def _read_sharded(index_path: str, reader: Callable[[str], dict]) -> dict:
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    files = sorted(set(index.get("weight_map", {}).values()))
    if not files:
        raise HFLoadError(f"{index_path}: weight_map is empty")
    out = {}
    for name in files:
        out.update(reader(os.path.join(os.path.dirname(index_path), name)))
    return out


def read_checkpoint(model_dir: str) -> tuple[str, dict]:
    """(weights file, flat dict of HF Flax names -> float32 numpy) from a local HF model directory."""
    present = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(model_dir, f))]
    if not present:
        refused = [f for f in REFUSED_FILES if os.path.exists(os.path.join(model_dir, f))]
        listing = sorted(os.listdir(model_dir))[:12]
        hint = f" ({', '.join(refused)} is not supported: convert it with transformers first)" if refused else ""
        raise HFLoadError(f"{model_dir}: no weights found; expected one of {', '.join(WEIGHT_FILES)}{hint}. "
                          f"Directory holds: {listing}")
    name = present[0]
    path = os.path.join(model_dir, name)
    if name == "model.safetensors":
        flat = _pt_to_flax_names(_read_safetensors(path))
    elif name == "model.safetensors.index.json":
        flat = _pt_to_flax_names(_read_sharded(path, _read_safetensors))
    elif name == "flax_model.msgpack":
        flat = _read_msgpack(path)
    elif name == "pytorch_model.bin":
        flat = _pt_to_flax_names(_read_torch_bin(path))
    else:
        flat = _pt_to_flax_names(_read_sharded(path, _read_torch_bin))
    return path, flat


# ----- mapping HF names <-> flaxbert tree -------------------------------------------------------

def _strip_prefix(flat: dict, names: HFNames) -> dict:
    """Checkpoints of a bare encoder (BertModel) have no `bert/` prefix; head models do. Normalise to the
    prefixed form."""
    out = {}
    for k, v in flat.items():
        top = k.split("/", 1)[0]
        out[f"{names.prefix}/{k}" if top in names.top_level else k] = v
    return out


def _stack_layers(flat: dict, config: BertConfig, names: HFNames, ours: dict, used: set, missing: list) -> None:
    """HF's per-layer tensors (`encoder/layer/<i>/...`) into flaxbert's stacked `layers` arrays, in place."""
    layers = config.num_hidden_layers
    for our, hf_suffix, to_ours, _ in _layer_rules(config, names):
        hf_names = [f"{names.prefix}/{names.layer}/{i}/{hf_suffix}" for i in range(layers)]
        found = [n for n in hf_names if n in flat]
        if len(found) < layers:
            missing.extend(f"bert/encoder/layers/{our}[layer {hf_names.index(n)}]" for n in hf_names if n not in flat)
            if not found:
                continue
        stacked = np.array(ours[f"bert/encoder/layers/{our}"])
        for i, n in enumerate(hf_names):
            if n not in flat:
                continue
            try:
                value = to_ours(flat[n])
            except ValueError:
                raise HFLoadError(f"parameter {n}: checkpoint shape {flat[n].shape} does not fit "
                                  f"{our} of shape {stacked.shape[1:]}") from None
            if value.shape != stacked.shape[1:]:
                raise HFLoadError(f"parameter {n}: checkpoint shape {flat[n].shape} does not match the "
                                  f"model's shape {stacked.shape[1:]}")
            stacked[i] = value
            used.add(n)
        ours[f"bert/encoder/layers/{our}"] = stacked


def hf_to_flaxbert(flat: dict, config: BertConfig, head: Optional[str], num_labels: int, rng,
                   on_head_mismatch: str = "reinit") -> tuple[dict, LoadReport]:
    """Place HF tensors into a freshly initialised flaxbert tree; returns (params, report)."""
    names = names_for(config)
    flat = _strip_prefix(flat, names)
    fresh = jax.tree.map(np.asarray, init(config, rng, head=head, num_labels=num_labels))
    ours = _flatten(fresh)
    used, missing, initialized = set(), [], []

    def put(our_path: str, value: np.ndarray, hf_name: str, is_head: bool):
        expected = ours[our_path].shape
        if value.shape != expected:
            if is_head and on_head_mismatch == "reinit":
                initialized.append(f"{our_path} (checkpoint {hf_name} has shape {value.shape}, model needs "
                                   f"{expected}: re-initialised)")
                return
            raise HFLoadError(f"parameter {hf_name}: checkpoint shape {value.shape} does not match the model's "
                              f"{our_path} shape {expected}" + (
                                  " (the head has a different number of labels; pass on_head_mismatch='reinit' "
                                  "to re-initialise it)" if is_head else ""))
        ours[our_path] = value.astype(ours[our_path].dtype)

    for our, hf_name in names.encoder:
        key = f"{names.prefix}/{hf_name}"
        if f"bert/{our}" not in ours:  # a parameter this config does not have (ELECTRA's projection when E == H)
            continue
        if key in flat:
            put(f"bert/{our}", flat[key], key, False)
            used.add(key)
        elif not (head in names.no_pooler_heads and our.startswith("pooler/")):  # HF saves that head without one
            missing.append(f"bert/{our}")
    _stack_layers(flat, config, names, ours, used, missing)
    for our, hf_name in names.head_names(head, config):
        path = f"{head}/{our}"
        if hf_name in flat:
            put(path, flat[hf_name], hf_name, True)
            used.add(hf_name)
        else:
            initialized.append(path)
    word = ours["bert/embeddings/word_embeddings"]
    for tied, source in names.tied_names(config).items():
        if tied in flat:
            value = flat[tied]
            if source is None:
                ok = value.T.shape == word.shape and np.allclose(value.T, word)
            else:
                ok = source in flat and np.allclose(value, flat[source])
            if ok:
                used.add(tied)
    unexpected = sorted(k for k in flat if k not in used and not k.endswith("embeddings/position_ids"))
    report = LoadReport("", missing, initialized, unexpected)
    return _unflatten(ours), report


def flaxbert_to_hf(params: Mapping, config: BertConfig, head: Optional[str]) -> dict:
    """flaxbert tree -> flat dict of HF Flax names (with the family's prefix, e.g. `bert/`)."""
    names = names_for(config)
    flat = _flatten(jax.tree.map(np.asarray, dict(params)))
    out = {}
    for our, hf_name in names.encoder:
        if f"bert/{our}" in flat:
            out[f"{names.prefix}/{hf_name}"] = flat[f"bert/{our}"]
    for our, hf_suffix, _, to_hf in _layer_rules(config, names):
        stacked = flat[f"bert/encoder/layers/{our}"]
        for i in range(config.num_hidden_layers):
            out[f"{names.prefix}/{names.layer}/{i}/{hf_suffix}"] = to_hf(stacked[i])
    if head is not None:
        for our, hf_name in names.head_names(head, config):
            out[hf_name] = flat[f"{head}/{our}"]
    return out


def _flax_to_pt_names(flat: Mapping[str, np.ndarray], with_prefix: bool, prefix: str = "bert") -> dict:
    out = {}
    for name, value in flat.items():
        if not with_prefix and name.startswith(f"{prefix}/"):
            name = name[len(prefix) + 1:]
        parts = name.split("/")
        leaf = parts[-1]
        if leaf == "scale":
            parts[-1] = "weight"
        elif leaf == "embedding":
            parts[-1] = "weight"
        elif leaf == "kernel":
            parts[-1] = "weight"
            value = value.T
        out[".".join(parts)] = np.ascontiguousarray(value, dtype=np.float32)
    return out


# ----- public API -------------------------------------------------------------------------------

def _resolve_dir(path: str) -> str:
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise HFLoadError(f"{path}: expected a model directory (config.json + weights), got a file")
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith((".", "/")):
        try:  # a hub id: the real download path; fails fast offline
            from huggingface_hub import snapshot_download
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.msgpack", "vocab.txt"])
        except Exception as e:
            raise HFLoadError(f"{path}: not a local directory, and downloading it from the Hugging Face Hub "
                              f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raise HFLoadError(f"{path}: no such directory")


def _head_from_config(hf: Mapping) -> Optional[str]:
    for arch in hf.get("architectures") or []:
        if arch in _HEAD_OF_ARCH:
            return _HEAD_OF_ARCH[arch]
    return None


def load_tokenizer_if_present(model_dir: str):
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    from flaxbert.vocab import load_tokenizer
    return load_tokenizer(model_dir)


def encoder_parameters(config: BertConfig) -> int:
    """The encoder's parameter count implied by a config (embeddings, layers, pooler where the family has one)."""
    h, i, L, e = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.embedding_dim
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * e + 2 * e + (
        e * h + h if e != h else 0)
    layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
    return embeddings + L * layer + (h * h + h if config.family.pooler else 0)


def _available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_size(config: BertConfig, flat: Mapping[str, np.ndarray], config_path: str, source: str) -> None:
    """Refuse a config.json that does not describe the checkpoint's tensors, or whose parameters (float32, with
    the optimizer's room ignored) would not fit in the memory available, before allocating anything."""
    names = names_for(config)
    flat = _strip_prefix(dict(flat), names)
    word = flat.get(f"{names.prefix}/embeddings/word_embeddings/embedding")
    expected = (config.vocab_size, config.embedding_dim)
    if word is not None and tuple(word.shape) != expected:
        width = "embedding_size" if config.embedding_dim != config.hidden_size else "hidden_size"
        raise HFLoadError(f"{config_path}: vocab_size x {width} = {expected[0]} x {expected[1]}, but the "
                          f"checkpoint {source} holds word embeddings of shape {tuple(word.shape)}; the config does "
                          f"not describe these weights")
    layer_prefix = f"{names.prefix}/{names.layer}/"
    layers = {int(k[len(layer_prefix):].split("/")[0]) for k in flat
              if k.startswith(layer_prefix) and k[len(layer_prefix):].split("/")[0].isdigit()}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        raise HFLoadError(f"{config_path}: num_hidden_layers = {config.num_hidden_layers}, but the checkpoint "
                          f"{source} holds {max(layers) + 1} layers")
    need, free = 4 * encoder_parameters(config), _available_bytes()
    if free is not None and need > free:
        raise HFLoadError(f"{config_path}: the model it describes has {encoder_parameters(config):,} parameters "
                          f"({need / 2**30:.1f} GiB in float32), more than the {free / 2**30:.1f} GiB of memory "
                          f"available")


def _read_config(path: str, config_overrides: Optional[dict] = None) -> tuple[str, dict, BertConfig]:
    """(the local model directory, its config.json, the BertConfig it describes), or an HFLoadError."""
    model_dir = _resolve_dir(os.fspath(path))
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise HFLoadError(f"{model_dir}: no config.json")
    with open(config_path, encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise HFLoadError(f"{config_path}: not valid JSON ({e})") from None
    try:
        return model_dir, hf, BertConfig.from_hf_config(hf, source=config_path, **(config_overrides or {}))
    except ConfigError as e:
        raise HFLoadError(str(e)) from None


def load_config(path: str, config_overrides: Optional[dict] = None) -> BertConfig:
    """The BertConfig of an HF model directory (its config.json), without reading the weights."""
    return _read_config(path, config_overrides)[2]


def load_pretrained(path: str, head: Optional[str] = "auto", num_labels: Optional[int] = None, *,
                    rng=None, on_head_mismatch: str = "reinit", config_overrides: Optional[dict] = None,
                    load_tokenizer: bool = True) -> PretrainedModel:
    """Load a local HF directory of a registered family (BERT, DistilBERT), or a hub id when online, into
    flaxbert parameters.

    head: "auto" takes the head named by config.json's `architectures`; None loads the bare encoder.
    Heads absent from the checkpoint are freshly initialised and listed in `report.initialized` (and logged).
    on_head_mismatch: "reinit" re-initialises a head whose shape differs (e.g. another number of labels),
    with a warning; "error" refuses.
    """
    if on_head_mismatch not in ("reinit", "error"):
        raise ValueError(f"on_head_mismatch must be 'reinit' or 'error', got {on_head_mismatch!r}")
    model_dir, hf, config = _read_config(path, config_overrides)
    config_path = os.path.join(model_dir, "config.json")
    if head == "auto":
        head = _head_from_config(hf)
    if head is not None and head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {HEADS}, None or 'auto'")
    if head is not None:
        config.family.check_head(head)
    if num_labels is None:
        num_labels = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
    source, flat = read_checkpoint(model_dir)
    check_size(config, flat, config_path, source)  # before anything of the config's size is allocated
    rng = jax.random.key(0) if rng is None else rng
    params, report = hf_to_flaxbert(flat, config, head, num_labels, rng, on_head_mismatch)
    report.source = source
    if report.missing or report.initialized or report.unexpected:
        log.warning("%s", report.summary())
    extra = {k: hf[k] for k in ("id2label", "label2id", "problem_type") + config.family.passthrough_keys if k in hf}
    if head in ("sequence_classification", "token_classification") and extra.get("id2label") and \
            len(extra["id2label"]) != num_labels:
        extra = {k: v for k, v in extra.items() if k not in ("id2label", "label2id")}
    tokenizer = load_tokenizer_if_present(model_dir) if load_tokenizer else None
    return PretrainedModel(config, params, tokenizer, head, report, extra)


def save_pretrained(model: PretrainedModel, out_dir: str, *, tokenizer=None, flax: bool = True) -> None:
    """Write config.json, model.safetensors (PyTorch names), flax_model.msgpack (HF Flax names) and the
    tokenizer files, so transformers (PyTorch or Flax) loads the directory with no missing weights."""
    from flax import serialization
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    head, names, family = model.head, names_for(model.config), model.config.family
    family.check_head(head)
    flat = flaxbert_to_hf(model.params, model.config, head)
    if head in names.no_pooler_heads:  # as HF writes it: transformers would report the pooler as unexpected
        flat = {k: v for k, v in flat.items() if not k.startswith(f"{names.prefix}/pooler/")}
    extra = dict(model.hf_extra)
    if head in ("sequence_classification", "token_classification"):
        n = model.num_labels
        extra.setdefault("id2label", {str(i): f"LABEL_{i}" for i in range(n)})
        extra.setdefault("label2id", {v: int(k) for k, v in extra["id2label"].items()})
        if head == "sequence_classification" and n == 1:
            extra.setdefault("problem_type", "regression")
    hf_config = model.config.to_hf_config(architectures=[family.architectures[head]], **extra)
    pt = _flax_to_pt_names(flat, with_prefix=head is not None, prefix=names.prefix)
    for tied, source in names.pt_tied.get(head, {}).items():  # the tied decoder, written where HF writes it
        if tied not in pt:  # an untied decoder is written as the head's own weight
            pt[tied] = pt[source].copy()
    tmp = os.path.join(out_dir, ".tmp-model.safetensors")
    save_file(pt, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    if flax:
        tree = _unflatten(flat)
        if head is None:
            tree = tree[names.prefix]
        with open(os.path.join(out_dir, "flax_model.msgpack"), "wb") as f:
            f.write(serialization.msgpack_serialize(tree))
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
