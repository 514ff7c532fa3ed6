"""The benchmark's apples-to-apples check on a tiny config: flaxbert, HF PyTorch and HF Flax agree on
the loss of the same weights and batch, and a deliberately perturbed weight makes the check fail."""

import numpy as np
import pytest

from benchmarks import common, peers
from flaxbert.config import BertConfig

CONFIG = BertConfig.tiny(vocab_size=600, max_position_embeddings=64)


@pytest.fixture(scope="module")
def setup():
    batch = common.pretraining_batch(CONFIG, batch=2, seq=32, predictions=5)
    params = peers.init_params(CONFIG)
    hf_dir = common.hf_copy(params, CONFIG, "pretraining")
    yield batch, params, hf_dir.name
    hf_dir.cleanup()


def _peer_losses(hf_dir, batch):
    return {"torch": peers.hf_torch_runner(hf_dir, CONFIG, batch).loss(),
            "flax": peers.hf_flax_runner(hf_dir, CONFIG, batch, compile_step=False).loss()}


def test_parity_passes_on_the_same_weights(setup):
    batch, params, hf_dir = setup
    ours = peers.flaxbert_runner(CONFIG, params, batch, compile_step=False).loss()
    diffs = peers.check_parity(ours, _peer_losses(hf_dir, batch), peers.parity_rtol(CONFIG))
    assert max(diffs.values()) < 1e-5


def test_parity_fails_loudly_on_a_perturbed_weight(setup):
    batch, params, hf_dir = setup
    bad = {**params, "bert": {**params["bert"], "encoder": {**params["bert"]["encoder"]}}}
    layers = dict(bad["bert"]["encoder"]["layers"])
    ffn = dict(layers["intermediate"])
    ffn["kernel"] = np.asarray(ffn["kernel"]) * 1.5
    layers["intermediate"] = ffn
    bad["bert"]["encoder"]["layers"] = layers
    ours = peers.flaxbert_runner(CONFIG, bad, batch, compile_step=False).loss()
    with pytest.raises(peers.ParityError, match="parity check failed"):
        peers.check_parity(ours, _peer_losses(hf_dir, batch), peers.parity_rtol(CONFIG))


def test_synthetic_batch_follows_the_contract():
    b = common.pretraining_batch(CONFIG, batch=3, seq=32, predictions=5)
    assert b["input_ids"].shape == (3, 32) and b["masked_lm_positions"].shape == (3, 5)
    assert all(len(set(row)) == 5 and 0 not in row for row in b["masked_lm_positions"])
    assert b["input_ids"].max() < CONFIG.vocab_size


def test_input_pipeline_benchmark_runs_every_mode_and_peer(tmp_path):
    from benchmarks import input_pipeline

    report = input_pipeline.main(["--quick", "--seqs", "64", "--batch", "16", "--out", str(tmp_path)])
    (cell,) = report["cells"]
    assert [m["mode"] for m in cell["flaxbert"]] == [input_pipeline.mode_name(*m) for m in input_pipeline.MODES]
    assert all(m["rows_per_s"] > 0 and 0 < m["real_tokens_per_row"] <= 64 for m in cell["flaxbert"])
    assert len(cell["hf"]) == 2 and cell["bare_gather"]["rows_per_s"] > 0
    assert (tmp_path / "input-pipeline.md").read_text().count("| flaxbert ") == len(input_pipeline.MODES)


def test_a_peer_this_machine_cannot_run_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setitem(peers.PRETRAINING_PEERS, "hf_flax",
                        peers.Peer(("transformers:FlaxNoSuchModel",), peers.hf_flax_runner))
    monkeypatch.setitem(peers.PRETRAINING_PEERS, "other", peers.Peer(("no_such_module_here",), peers.hf_flax_runner))
    names, skipped = peers.available(["hf_torch", "hf_flax", "other"])
    assert names == ["hf_torch"]
    assert "has no FlaxNoSuchModel" in skipped["hf_flax"] and "no_such_module_here is not installed" in skipped["other"]
