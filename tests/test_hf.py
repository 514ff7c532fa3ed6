"""Hugging Face interop: HF Flax checkpoints of every class, the MiniLM round trip, and refusals."""

import json
import os
import pickle
import shutil

import jax
import numpy as np
import pytest

import flaxbert
from flaxbert.hf import HFLoadError, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

FLAX_CLASSES = {
    "FlaxBertModel": None,
    "FlaxBertForPreTraining": "pretraining",
    "FlaxBertForMaskedLM": "masked_lm",
    "FlaxBertForSequenceClassification": "sequence_classification",
    "FlaxBertForTokenClassification": "token_classification",
    "FlaxBertForQuestionAnswering": "question_answering",
    "FlaxBertForMultipleChoice": "multiple_choice",
}


def _hf_small_config(**kw):
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, hidden_act="gelu", **kw)


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 99, shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    mask[..., -3:] = 0  # padding at the end of every row
    mask[0, ..., -5:] = 0
    types = np.zeros(shape, np.int32)
    types[..., shape[-1] // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("cls_name", sorted(FLAX_CLASSES))
def test_hf_flax_checkpoint_logits_match(cls_name, tmp_path):
    cls = getattr(transformers, cls_name)
    head = FLAX_CLASSES[cls_name]
    hf_model = cls(_hf_small_config(num_labels=2 if head == "question_answering" else 3), seed=0)
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "flax_model.msgpack").exists()
    model = load_pretrained(str(tmp_path), head="auto")
    assert model.head == head
    assert model.report.unexpected == []
    shape = (3, 2, 12) if head == "multiple_choice" else (3, 12)
    batch = _inputs(shape)
    ref = hf_model(**batch)
    if head is None:
        out = flaxbert.encode(model.params, batch, model.config)
        mask = batch["attention_mask"].astype(bool)
        pairs = [(out.last_hidden_state[mask], ref.last_hidden_state[mask]), (out.pooled_output, ref.pooler_output)]
    elif head in ("pretraining", "masked_lm"):
        positions = np.broadcast_to(np.arange(12, dtype=np.int32), (3, 12))
        out = flaxbert.apply_head(model.params, {**batch, "masked_lm_positions": positions}, model.config)
        pairs = [(out.mlm_logits, ref.logits if head == "masked_lm" else ref.prediction_logits)]
        if head == "pretraining":
            pairs.append((out.nsp_logits, ref.seq_relationship_logits))
    elif head == "question_answering":
        out = flaxbert.apply_head(model.params, batch, model.config)
        pairs = [(out.start_logits, ref.start_logits), (out.end_logits, ref.end_logits)]
    else:
        out = flaxbert.apply_head(model.params, batch, model.config)
        pairs = [(out.logits, ref.logits)]
    for ours, theirs in pairs:
        assert np.asarray(ours).shape == np.asarray(theirs).shape
        diff = np.abs(np.asarray(ours) - np.asarray(theirs)).max()
        assert diff <= 1e-4, (cls_name, diff)


def test_missing_head_is_initialised_and_reported(tmp_path):
    transformers.FlaxBertModel(_hf_small_config(), seed=0).save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path), head="sequence_classification", num_labels=4)
    assert sorted(model.report.initialized) == ["sequence_classification/classifier/bias",
                                                "sequence_classification/classifier/kernel"]
    assert model.params["sequence_classification"]["classifier"]["kernel"].shape == (32, 4)


def test_head_with_other_label_count(tmp_path):
    transformers.FlaxBertForSequenceClassification(_hf_small_config(num_labels=3), seed=0).save_pretrained(tmp_path)
    with pytest.raises(HFLoadError, match=r"classifier/kernel.*\(32, 3\).*\(32, 5\)"):
        load_pretrained(str(tmp_path), num_labels=5, on_head_mismatch="error")
    model = load_pretrained(str(tmp_path), num_labels=5)
    assert any("re-initialised" in item for item in model.report.initialized)
    assert model.num_labels == 5


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_pretrained(str(minilm_dir), head=None)


def test_round_trip_through_transformers(minilm, tmp_path):
    torch = pytest.importorskip("torch")
    out_dir = tmp_path / "saved"
    save_pretrained(minilm, str(out_dir))
    assert {"config.json", "model.safetensors", "flax_model.msgpack", "vocab.txt"} <= set(os.listdir(out_dir))
    pt, info = transformers.BertModel.from_pretrained(str(out_dir), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    enc = tok(["A round trip through transformers.", "Short."], padding=True, return_tensors="np")
    batch = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    ours = flaxbert.encode(minilm.params, batch, minilm.config)
    with torch.no_grad():
        theirs = pt.eval()(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
    mask = batch["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(ours.last_hidden_state)[mask] - theirs.last_hidden_state.numpy()[mask]).max()
    assert diff <= 1e-5, diff
    flax_model = transformers.FlaxBertModel.from_pretrained(str(out_dir))  # reads flax_model.msgpack
    flax_out = flax_model(**batch)
    diff = np.abs(np.asarray(ours.last_hidden_state)[mask] - np.asarray(flax_out.last_hidden_state)[mask]).max()
    assert diff <= 1e-5, diff
    # flaxbert reads back what it wrote, exactly
    again = load_pretrained(str(out_dir), head=None)
    for a, b in zip(jax.tree.leaves(minilm.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("head,cls_name", [("pretraining", "BertForPreTraining"),
                                           ("sequence_classification", "BertForSequenceClassification")])
def test_saved_heads_load_in_transformers_without_missing_weights(tmp_path, head, cls_name):
    cfg = flaxbert.BertConfig.tiny(vocab_size=99, max_position_embeddings=64)
    params = flaxbert.init(cfg, jax.random.key(3), head=head, num_labels=3)
    from flaxbert.hf import PretrainedModel
    save_pretrained(PretrainedModel(cfg, params, head=head), str(tmp_path))
    model, info = getattr(transformers, cls_name).from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "tf_model.h5").write_bytes(b"\x89HDF")
    with pytest.raises(HFLoadError, match=r"no weights found.*tf_model\.h5 is not supported"):
        load_pretrained(str(tmp_path))


def test_config_of_another_model_type(tmp_path, minilm_dir):
    shutil.copy(minilm_dir / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((minilm_dir / "config.json").read_text())
    cfg["model_type"] = "albert"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFLoadError, match=r"config\.json: model_type is 'albert'"):
        load_pretrained(str(tmp_path))


def test_parameter_shape_mismatch_names_both_shapes(tmp_path, minilm_dir):
    from safetensors.numpy import load_file, save_file
    state = load_file(str(minilm_dir / "model.safetensors"))
    state["encoder.layer.2.intermediate.dense.weight"] = state["encoder.layer.2.intermediate.dense.weight"][:1000]
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(HFLoadError, match=r"encoder/layer/2/intermediate/dense/kernel.*\(384, 1000\).*\(384, 1536\)"):
        load_pretrained(str(tmp_path), load_tokenizer=False)


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": 12_000_000, "num_attention_heads": 12}, r"vocab_size x hidden_size = 30522 x 12000000.*"
                                                             r"word embeddings of shape \(30522, 384\)"),
    ({"num_hidden_layers": 9}, r"num_hidden_layers = 9.*holds 6 layers"),
    ({"intermediate_size": 10 ** 12}, r"parameters \(.* GiB in float32\), more than the .* GiB of memory available"),
])
def test_a_config_that_does_not_fit_its_weights_or_the_memory_is_refused_before_allocating(tmp_path, minilm_dir,
                                                                                         change, message):
    """Without the check, hidden_size 12,000,000 hung while the new parameters were built."""
    import time
    shutil.copy(minilm_dir / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((minilm_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    start = time.perf_counter()
    with pytest.raises(HFLoadError, match=message):
        load_pretrained(str(tmp_path), load_tokenizer=False)
    assert time.perf_counter() - start < 30


class _Payload:
    """Unpickling this would create a file: proof of code execution if the loader ever ran it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path, minilm_dir):
    pytest.importorskip("torch")
    target = tmp_path / "pwned.txt"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.word_embeddings.weight": _Payload(str(target))}, f)
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(HFLoadError, match="refused by the weights-only loader"):
        load_pretrained(str(tmp_path), load_tokenizer=False)
    assert not target.exists()
    # the same payload through plain pickle does run: the test would notice a loader that executes it
    with open(tmp_path / "pytorch_model.bin", "rb") as f:
        pickle.load(f)
    assert target.exists()


def test_pytorch_bin_is_loaded_when_plain(tmp_path, minilm_dir, minilm):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    torch.save(load_file(str(minilm_dir / "model.safetensors")), tmp_path / "pytorch_model.bin")
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    model = load_pretrained(str(tmp_path), head=None, load_tokenizer=False)
    for a, b in zip(jax.tree.leaves(minilm.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_directory_and_offline_hub_id():
    with pytest.raises(HFLoadError, match="no such directory"):
        load_pretrained("./definitely/not/here")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(HFLoadError, match="Hugging Face Hub"):
            load_pretrained("google-bert/bert-base-uncased")
    finally:
        del os.environ["HF_HUB_OFFLINE"]
