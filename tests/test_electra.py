"""The ELECTRA family: HF PyTorch and Flax checkpoints of every head class (the discriminator's replaced-token
detection among them) load with logit parity on padded batches, with embeddings narrower than the layers
(projected up) and as wide, and flaxbert saves what transformers loads with no missing or unexpected keys."""

import json

import jax
import numpy as np
import pytest

import flaxbert
from flaxbert import BertConfig
from flaxbert.errors import ConfigError, HFLoadError
from flaxbert.hf import PretrainedModel, load_pretrained, save_pretrained
from family_parity import HEADS, check_flax_class, check_torch_class, round_trip_from

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

HEADS = {**HEADS, "ForPreTraining": "replaced_token_detection"}
CONFIGS = {  # a small generator-like model with narrow embeddings; one whose embeddings are as wide as its layers
    "projected": dict(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=40),
    "wide": dict(vocab_size=120, embedding_size=48, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=80, max_position_embeddings=32, hidden_act="gelu_new", layer_norm_eps=1e-5),
}
SEQ = 12


def _hf_config(name, head):
    return transformers.ElectraConfig(**CONFIGS[name], num_labels=2 if head == "question_answering" else 3)


def _inputs(head, seed=0):
    shape = (3, 2, SEQ) if head == "multiple_choice" else (3, SEQ)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, shape).astype(np.int32)
    types = (np.arange(SEQ) >= SEQ // 2).astype(np.int32) * np.ones(shape, np.int32)
    mask = np.ones(shape, np.int32)
    mask[..., -3:] = 0
    mask[0, ..., -6:] = 0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("suffix", list(HEADS))
def test_pytorch_checkpoint_matches_transformers(tmp_path, suffix, name):
    head = HEADS[suffix]
    diff = check_torch_class(getattr(transformers, "Electra" + suffix), _hf_config(name, head), tmp_path, "electra",
                             head, _inputs(head))
    print(f"pytorch {name} {suffix}: max abs diff {diff:.2e}")
    params = load_pretrained(str(tmp_path), head="auto").params
    assert ("embeddings_project" in params["bert"]) == (name == "projected")


@pytest.mark.parametrize("suffix", list(HEADS))
def test_flax_checkpoint_matches_transformers(tmp_path, suffix):
    head = HEADS[suffix]
    diff = check_flax_class(getattr(transformers, "FlaxElectra" + suffix), _hf_config("projected", head), tmp_path,
                            "electra", head, _inputs(head))
    print(f"flax {suffix}: max abs diff {diff:.2e}")


@pytest.mark.parametrize("suffix", list(HEADS))
def test_round_trip_through_transformers(tmp_path, suffix):
    head = HEADS[suffix]
    hf = round_trip_from(getattr(transformers, "Electra" + suffix), getattr(transformers, "FlaxElectra" + suffix),
                         _hf_config("projected", head), tmp_path, "electra", head, _inputs(head, seed=1))
    assert hf["model_type"] == "electra" and hf["architectures"] == ["Electra" + suffix]
    assert (hf["embedding_size"], hf["hidden_size"], hf["summary_type"]) == (16, 32, "first")


def test_fresh_flaxbert_discriminator_saves_as_electra(tmp_path):
    cfg = BertConfig.tiny(vocab_size=100, max_position_embeddings=64, model_type="electra", embedding_size=64)
    params = flaxbert.init(cfg, jax.random.key(0), head="replaced_token_detection")
    assert params["bert"]["embeddings"]["word_embeddings"].shape == (100, 64)
    assert params["bert"]["embeddings_project"]["kernel"].shape == (64, 128)
    axes = flaxbert.logical_axes(cfg, head="replaced_token_detection")
    assert tuple(axes["bert"]["embeddings_project"]["kernel"]) == ("embed", "embed_out")
    save_pretrained(PretrainedModel(cfg, params, head="replaced_token_detection"), str(tmp_path))
    _, info = transformers.ElectraForPreTraining.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    ids = np.random.default_rng(0).integers(1, 100, (2, 9)).astype(np.int32)
    logits = flaxbert.apply_head(params, {"input_ids": ids}, cfg).logits
    assert logits.shape == (2, 9)  # one replaced-or-original score per token


def test_what_electra_lacks_is_refused(tmp_path):
    cfg = BertConfig.tiny(vocab_size=100, model_type="electra")
    with pytest.raises(ConfigError, match="ELECTRA has no next-sentence prediction; its pretraining head is "
                                          "'replaced_token_detection'"):
        flaxbert.init(cfg, jax.random.key(0), head="pretraining")
    with pytest.raises(ConfigError, match=r"model_type 'bert' has no 'replaced_token_detection' head"):
        flaxbert.init(BertConfig.tiny(), jax.random.key(0), head="replaced_token_detection")
    with pytest.raises(ConfigError, match="embedding_size is not a setting of model_type 'bert'"):
        BertConfig.tiny(embedding_size=64)
    transformers.ElectraModel(_hf_config("projected", None)).save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "embedding_size": 24}))
    with pytest.raises(HFLoadError, match=r"vocab_size x embedding_size = 100 x 24, but the checkpoint .* holds "
                                          r"word embeddings of shape \(100, 16\)"):
        load_pretrained(str(tmp_path), head=None)
