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
from family_parity import HEADS, check_flax_class, check_torch_class, round_trip_from

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

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


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("suffix", list(HEADS))
def test_pytorch_checkpoint_matches_transformers(tmp_path, suffix, config_name):
    head = HEADS[suffix]
    diff = check_torch_class(getattr(transformers, "DistilBert" + suffix), _hf_config(config_name, head), tmp_path,
                             "distilbert", head, _inputs(head))
    print(f"pytorch {config_name} {suffix}: max abs diff {diff:.2e}")
    params = load_pretrained(str(tmp_path), head="auto").params
    assert "token_type_embeddings" not in params["bert"]["embeddings"] and "pooler" not in params["bert"]


@pytest.mark.parametrize("suffix", list(HEADS))
def test_flax_checkpoint_matches_transformers(tmp_path, suffix):
    head = HEADS[suffix]
    diff = check_flax_class(getattr(transformers, "FlaxDistilBert" + suffix), _hf_config("small", head), tmp_path,
                            "distilbert", head, _inputs(head))
    print(f"flax {suffix}: max abs diff {diff:.2e}")


@pytest.mark.parametrize("suffix", list(HEADS))
def test_round_trip_through_transformers(tmp_path, suffix):
    head = HEADS[suffix]
    hf = round_trip_from(getattr(transformers, "DistilBert" + suffix), getattr(transformers, "FlaxDistilBert" + suffix),
                         _hf_config("relu", head), tmp_path, "distilbert", head, _inputs(head, seed=1))
    assert hf["model_type"] == "distilbert" and hf["architectures"] == ["DistilBert" + suffix]
    assert {"dim", "n_layers", "n_heads", "hidden_dim", "activation"} <= set(hf)
    assert not {"hidden_size", "type_vocab_size", "layer_norm_eps", "position_embedding_type"} & set(hf)
    assert (hf["activation"], hf["seq_classif_dropout"]) == ("relu", 0.2)


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
