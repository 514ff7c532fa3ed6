"""The DistilBERT family: HF PyTorch and Flax checkpoints of every head class load with logit parity, flaxbert
saves what transformers loads with no missing or unexpected keys, and what DistilBERT lacks is refused."""

import json

import jax
import numpy as np
import pytest

import flaxbert
from flaxbert import BertConfig, families
from flaxbert.errors import ConfigError, HFLoadError
from flaxbert.hf import PretrainedModel, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

HEADS = {
    "Model": None,
    "ForMaskedLM": "masked_lm",
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
    "ForMultipleChoice": "multiple_choice",
}
CONFIGS = {
    "small": dict(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64),
    "relu": dict(vocab_size=100, dim=48, n_layers=3, n_heads=4, hidden_dim=80, max_position_embeddings=64,
                 activation="relu"),
}
SEQ = 12


def _hf_config(name, head):
    return transformers.DistilBertConfig(**CONFIGS[name], num_labels=2 if head == "question_answering" else 3)


def _inputs(head, seed=0):
    shape = (3, 2, SEQ) if head == "multiple_choice" else (3, SEQ)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    mask[..., -3:] = 0  # padding at the end of every row, more in the first
    mask[0, ..., -6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _ours(model, batch):
    """(name, array) of flaxbert's outputs for `model`'s head; the base model's at unpadded positions only."""
    head = model.head
    if head is None:
        out = flaxbert.encode(model.params, batch, model.config)
        assert out.pooled_output is None  # DistilBERT has no pooler
        return {"last_hidden_state": np.asarray(out.last_hidden_state)[batch["attention_mask"].astype(bool)]}
    out = flaxbert.apply_head(model.params, batch, model.config)
    if head == "question_answering":
        return {"start_logits": np.asarray(out.start_logits), "end_logits": np.asarray(out.end_logits)}
    return {"logits": np.asarray(out.mlm_logits if head == "masked_lm" else out.logits)}


def _theirs(ref, head, batch):
    if head is None:
        return {"last_hidden_state": np.asarray(ref.last_hidden_state)[batch["attention_mask"].astype(bool)]}
    if head == "question_answering":
        return {"start_logits": np.asarray(ref.start_logits), "end_logits": np.asarray(ref.end_logits)}
    return {"logits": np.asarray(ref.logits)}


def _perturbed_torch(pt_model, seed):
    """HF initialises biases to 0 and LayerNorms to 1, under which a swapped bias or norm would go unseen."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pt_model.parameters():  # tied weights appear once
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return pt_model


def _perturbed_flax(hf_model, seed):
    leaves, treedef = jax.tree.flatten(hf_model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    hf_model.params = jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    return hf_model


def _torch_outputs(pt_model, batch):
    with torch.no_grad():
        return pt_model.eval()(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})


def _max_diff(ours, theirs):
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].shape == theirs[k].shape, (k, ours[k].shape, theirs[k].shape)
    return max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("suffix", list(HEADS))
def test_pytorch_checkpoint_matches_transformers(tmp_path, suffix, config_name):
    head = HEADS[suffix]
    torch.manual_seed(0)
    pt_model = _perturbed_torch(getattr(transformers, "DistilBert" + suffix)(_hf_config(config_name, head)), 0)
    pt_model.save_pretrained(tmp_path)  # model.safetensors
    model = load_pretrained(str(tmp_path), head="auto")
    assert model.config.model_type == "distilbert" and model.head == head
    assert model.report.missing == [] and model.report.unexpected == [] and model.report.initialized == []
    assert "token_type_embeddings" not in model.params["bert"]["embeddings"] and "pooler" not in model.params["bert"]
    batch = _inputs(head)
    diff = _max_diff(_ours(model, batch), _theirs(_torch_outputs(pt_model, batch), head, batch))
    print(f"pytorch {config_name} {suffix}: max abs diff {diff:.2e}")
    assert diff <= 1e-4, (suffix, diff)


@pytest.mark.parametrize("suffix", list(HEADS))
def test_flax_checkpoint_matches_transformers(tmp_path, suffix):
    head = HEADS[suffix]
    hf_model = _perturbed_flax(getattr(transformers, "FlaxDistilBert" + suffix)(_hf_config("small", head), seed=0), 0)
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "flax_model.msgpack").exists()
    model = load_pretrained(str(tmp_path), head="auto")
    assert model.head == head
    assert model.report.missing == [] and model.report.unexpected == [] and model.report.initialized == []
    batch = _inputs(head)
    diff = _max_diff(_ours(model, batch), _theirs(hf_model(**batch), head, batch))
    print(f"flax {suffix}: max abs diff {diff:.2e}")
    assert diff <= 1e-4, (suffix, diff)


@pytest.mark.parametrize("suffix", list(HEADS))
def test_round_trip_through_transformers(tmp_path, suffix):
    head = HEADS[suffix]
    torch.manual_seed(1)
    _perturbed_torch(getattr(transformers, "DistilBert" + suffix)(_hf_config("relu", head)), 1).save_pretrained(
        tmp_path / "hf")
    model = load_pretrained(str(tmp_path / "hf"), head="auto")
    save_pretrained(model, str(tmp_path / "ours"))
    hf = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert hf["model_type"] == "distilbert" and hf["architectures"] == ["DistilBert" + suffix]
    assert {"dim", "n_layers", "n_heads", "hidden_dim", "activation"} <= set(hf)
    assert not {"hidden_size", "type_vocab_size", "layer_norm_eps", "position_embedding_type"} & set(hf)
    pt_model, info = getattr(transformers, "DistilBert" + suffix).from_pretrained(
        str(tmp_path / "ours"), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    assert pt_model.config.activation == "relu" and pt_model.config.seq_classif_dropout == 0.2
    batch = _inputs(head, seed=1)
    diff = _max_diff(_ours(model, batch), _theirs(_torch_outputs(pt_model, batch), head, batch))
    assert diff <= 1e-5, (suffix, diff)
    flax_model = getattr(transformers, "FlaxDistilBert" + suffix).from_pretrained(str(tmp_path / "ours"))
    diff = _max_diff(_ours(model, batch), _theirs(flax_model(**batch), head, batch))
    assert diff <= 1e-5, (suffix, diff)
    again = load_pretrained(str(tmp_path / "ours"), head="auto")  # flaxbert reads back what it wrote, exactly
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fresh_flaxbert_model_saves_as_distilbert(tmp_path):
    cfg = BertConfig.tiny(vocab_size=100, max_position_embeddings=64, model_type="distilbert", type_vocab_size=0)
    params = flaxbert.init(cfg, jax.random.key(0), head="sequence_classification", num_labels=4)
    assert params["sequence_classification"]["pre_classifier"]["kernel"].shape == (128, 128)
    axes = flaxbert.logical_axes(cfg, head="sequence_classification", num_labels=4)
    assert tuple(axes["sequence_classification"]["pre_classifier"]["kernel"]) == ("embed", "embed_out")
    save_pretrained(PretrainedModel(cfg, params, head="sequence_classification"), str(tmp_path))
    _, info = transformers.DistilBertForSequenceClassification.from_pretrained(str(tmp_path),
                                                                               output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info


def test_token_type_ids_are_ignored(tmp_path):
    transformers.DistilBertModel(_hf_config("small", None)).save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path), head=None)
    batch = _inputs(None)
    plain = flaxbert.encode(model.params, batch, model.config).last_hidden_state
    typed = flaxbert.encode(model.params, {**batch, "token_type_ids": np.ones_like(batch["input_ids"]) * 7},
                            model.config).last_hidden_state
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(typed))


def test_config_mapping_both_ways():
    hf = _hf_config("relu", None).to_dict()
    cfg = BertConfig.from_hf_config(hf)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.hidden_act, cfg.type_vocab_size, cfg.layer_norm_eps) == ("distilbert", 48, 3, 4, 80, "relu", 0, 1e-12)
    back = cfg.to_hf_config()
    assert back["sinusoidal_pos_embds"] is False and back["dim"] == 48 and "type_vocab_size" not in back
    assert BertConfig.from_hf_config(back) == cfg
    assert families.family_for("distilbert") is families.DISTILBERT


def test_sinusoidal_positions_are_refused():
    hf = _hf_config("small", None).to_dict()
    with pytest.raises(ConfigError, match=r"sinusoidal_pos_embds True is not supported \(only False\)"):
        BertConfig.from_hf_config({**hf, "sinusoidal_pos_embds": True})


def test_token_types_are_refused_in_the_config():
    with pytest.raises(ConfigError, match=r"type_vocab_size must be 0 for model_type 'distilbert'"):
        BertConfig.tiny(model_type="distilbert")


def test_pretraining_head_is_refused(tmp_path):
    cfg = BertConfig.tiny(model_type="distilbert", type_vocab_size=0)
    with pytest.raises(ConfigError, match=r"'distilbert' has no 'pretraining' head.*masked_lm"):
        flaxbert.init(cfg, jax.random.key(0), head="pretraining")
    transformers.DistilBertModel(_hf_config("small", None)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"'distilbert' has no 'pretraining' head"):
        load_pretrained(str(tmp_path), head="pretraining")


def test_unsupported_model_type_lists_distilbert(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deberta-v2", "vocab_size": 100}))
    with pytest.raises(HFLoadError, match=r"model_type is 'deberta-v2'.*supported model types: bert, distilbert"):
        load_pretrained(str(tmp_path))
