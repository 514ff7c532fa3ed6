"""Every recipe in configs/ loads and trains 2 steps of a shrunken copy of itself: the model is made tiny and the
batch small, while everything that makes the recipe (optimizer, schedule, budget, accumulation, masking,
packing, NSP on or off, dtype, remat, dropout) is kept as the file says."""

import dataclasses
import glob
import math
import os

import jax
import pytest

from flaxbert import run_config as rc
from flaxbert.train import loop, pretraining
from flaxbert.train.pretraining import packaged_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
SEQ, PREDICTIONS, VOCAB = 32, 8, 512


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from flaxbert import data, vocab

    root = tmp_path_factory.mktemp("configs")
    vocab.train_wordpiece(packaged_corpus(), VOCAB, root / "vocab", corpus_format="lines")
    for nsp in (True, False):
        data.prepare(packaged_corpus(), str(root / "vocab"), root / f"nsp{int(nsp)}", corpus_format="lines",
                     max_seq_length=SEQ, max_predictions_per_seq=PREDICTIONS, model_vocab_size=VOCAB, nsp=nsp,
                     progress=False)
    return root


def shrunken(cfg: rc.RunConfig, prepared, out) -> rc.RunConfig:
    """The recipe with a 2-layer, 32-wide model, seq 32, a batch of 4 per microbatch and 2 steps."""
    model = dataclasses.replace(cfg.model, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=SEQ)
    accum = min(cfg.run.grad_accum, 2)
    devices = jax.device_count()
    fsdp = math.gcd(cfg.mesh.fsdp, devices)
    return dataclasses.replace(
        cfg, model=model,
        data=dataclasses.replace(cfg.data, prepared_dir=str(prepared / f"nsp{int(cfg.data.nsp)}"),
                                 eval_prepared_dir="", seq_len=SEQ, max_predictions_per_seq=PREDICTIONS),
        mesh=dataclasses.replace(cfg.mesh, data=-1, fsdp=fsdp, tensor=1),
        run=dataclasses.replace(cfg.run, output_dir=str(out), steps=2, global_batch_size=4 * accum * devices,
                                grad_accum=accum, log_every=1, eval_every=0, progress=False, init_from=""),
        checkpoint=dataclasses.replace(cfg.checkpoint, directory="", every=1000, async_save=False))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_trains_two_steps_of_a_shrunken_copy(path, prepared, tmp_path):
    recipe = rc.load(path)
    cfg, task = pretraining.build_task(shrunken(recipe, prepared, tmp_path / "run"))
    # what makes the recipe survived the shrinking
    assert (cfg.optim, cfg.data.masking, cfg.data.packed, cfg.data.nsp, cfg.run.budget_minutes) == \
        (recipe.optim, recipe.data.masking, recipe.data.packed, recipe.data.nsp, recipe.run.budget_minutes)
    assert (cfg.model.dtype, cfg.model.remat_policy, cfg.model.hidden_dropout_prob) == \
        (recipe.model.dtype, recipe.model.remat_policy, recipe.model.hidden_dropout_prob)
    result = loop.train(cfg, task)
    assert result.step == 2 and result.reason == "finished"
    assert math.isfinite(result.last_metrics["loss"]) and result.last_metrics["loss"] > 0
    assert ("nsp_loss" in result.last_metrics) == recipe.data.nsp


def test_the_recipes_say_what_hardware_they_are_sized_for_and_what_to_expect():
    for path in CONFIGS:
        head = open(path, encoding="utf-8").read().split("\nmodel:")[0]
        if os.path.basename(path).startswith(("bert_", "crammed")):
            assert "Sized for:" in head and "Expected:" in head, path
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    assert {"bert_base_phase1", "bert_base_phase2", "bert_large_phase1", "bert_large_phase2", "crammed"} <= names
    for name in ("bert_base_phase1", "bert_base_phase2", "bert_large_phase1", "bert_large_phase2"):
        cfg = rc.load(name)
        assert cfg.optim.name == "lamb" and cfg.run.global_batch_size >= 32768, name
    crammed = rc.load("crammed")
    assert crammed.run.budget_minutes == 1440 and not crammed.data.nsp and crammed.optim.warmup_fraction > 0
