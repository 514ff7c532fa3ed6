"""Training on a wall-clock budget (`run.budget_minutes`): the rate the host hands the step equals the optimizer's
own rate, a budget run stops on time with its learning rate at the end value, the training clock survives a
resume, and the snapshot hook sees the parameters at the points it asks for. Also MLM-only data (`data.nsp`)."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from flaxbert import heads
from flaxbert import run_config as rc
from flaxbert import sharding as shd
from flaxbert.train import loop, optim
from flaxbert.train import step as st
from flaxbert.train.writer import latest_by_step, read_jsonl
from flaxbert.train.pretraining import make_loss_fn, packaged_corpus
from flaxbert.train.engine import init_sharded_state
from train_helpers import synthetic_batch, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_budget_lr_warms_up_on_steps_and_decays_on_time():
    cfg = rc.OptimConfig(lr=1e-3, end_lr=1e-4, warmup_steps=10, decay="polynomial", power=2.0)
    assert optim.budget_lr(cfg, 0, 0.0) == 0.0
    assert optim.budget_lr(cfg, 5, 0.0) == pytest.approx(0.5e-3)
    assert optim.budget_lr(cfg, 50, 0.0) == pytest.approx(1e-3)
    assert optim.budget_lr(cfg, 50, 0.5) == pytest.approx(1e-4 + 0.9e-3 * 0.25)
    assert optim.budget_lr(cfg, 50, 1.0) == pytest.approx(1e-4)
    assert optim.budget_lr(cfg, 50, 1.7) == pytest.approx(1e-4)  # past the budget: the end value
    assert optim.budget_lr(rc.OptimConfig(lr=2e-3, decay="constant", warmup_steps=0), 3, 0.9) == 2e-3
    timed = rc.OptimConfig(lr=1e-3, end_lr=0.0, warmup_fraction=0.2, decay="linear")  # as HF's linear schedule
    assert [optim.budget_lr(timed, 999, p) for p in (0.0, 0.1, 0.2, 0.6, 1.0)] == pytest.approx(
        [0.0, 0.5e-3, 1e-3, 0.5e-3, 0.0])
    with pytest.raises(rc.ConfigError, match="warmup_fraction"):
        rc.load("", ["--optim.warmup_fraction=0.1"])  # a share of a budget that is not set


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_rate_given_by_the_host_equals_the_optimizers_own(name):
    """An optimizer of rate 1 whose updates the step scales by r == the optimizer built with the constant rate r."""
    config = tiny_config()
    mesh = shd.make_mesh(1, 1, 1)
    loss_fn = make_loss_fn(config)
    init = lambda rng: heads.init(config, rng, head="pretraining")  # noqa: E731
    axes = heads.logical_axes(config, "pretraining")
    cfg = rc.OptimConfig(name=name, lr=3e-3, warmup_steps=0, decay="constant", weight_decay=0.05)
    rng = np.random.default_rng(0)
    batches = [shd.to_global(synthetic_batch(rng, 8), mesh) for _ in range(3)]
    finals = []
    for budget in (False, True):
        tx = optim.make_optimizer(cfg, 10, budget=budget)
        state, shardings = init_sharded_state(init, axes, tx, mesh, 0)
        step = st.make_sharded_step(loss_fn, tx, mesh, shardings, host_lr=budget, dropout=False)
        for b in batches:
            state, m = step(state, b, jax.device_put(np.float32(3e-3), shd.replicated(mesh))) if budget else \
                step(state, b)
        finals.append(jax.device_get(state.params))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), *finals))
    assert max(diffs) < 1e-6
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), finals[0],
                                         jax.device_get(init(jax.random.PRNGKey(0)))))
    assert max(moved) > 1e-3  # the steps did change the parameters


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from flaxbert import data, vocab

    root = tmp_path_factory.mktemp("prepared")
    vocab.train_wordpiece(packaged_corpus(), 512, root / "vocab", corpus_format="lines")
    for nsp in (True, False):
        data.prepare(packaged_corpus(), str(root / "vocab"), root / f"train-nsp{int(nsp)}", corpus_format="lines",
                     max_seq_length=32, max_predictions_per_seq=5, model_vocab_size=512, nsp=nsp, progress=False)
    return root


def _overrides(out_dir, prepared_dir, *extra):
    return [f"--run.output_dir={out_dir}", f"--data.prepared_dir={prepared_dir}", "--model.hidden_size=32",
            "--model.num_attention_heads=2", "--model.intermediate_size=64", "--model.vocab_size=512",
            "--model.max_position_embeddings=32", "--data.seq_len=32", "--run.global_batch_size=8",
            "--run.log_every=1", "--run.eval_every=0", "--run.progress=false", *extra]


def _budget_run(out, prepared, budget_s):
    cmd = [sys.executable, "-m", "flaxbert.pretrain",
           *_overrides(out, prepared / "train-nsp1", f"--run.budget_minutes={budget_s / 60}", "--run.steps=1000000",
                       "--checkpoint.every=100000", "--optim.lr=1e-3", "--optim.end_lr=1e-5",
                       "--optim.warmup_fraction=0.2")]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    spent = re.search(r"budget of [\d.]+ min spent: (\d+) steps in ([\d.]+) s of training", done.stdout)
    assert spent, done.stdout[-2000:]
    return int(spent.group(1)), float(spent.group(2))


def test_budget_run_stops_on_time_and_its_rate_reaches_the_end_value(tmp_path, prepared):
    # The budget counts compilation. On a loaded machine (the suite runs two workers on two cores) compiling can
    # take most of 25 s; then the run is redone, in a fresh directory, with a budget more than twice as long, so
    # that the checks below always see a run of many steps.
    for attempt, budget_s in enumerate((25.0, 60.0)):
        out = tmp_path / f"budget{attempt}"
        steps, seconds = _budget_run(out, prepared, budget_s)
        if steps > 20:
            break
    records = latest_by_step(read_jsonl(str(out / "metrics.jsonl")))
    assert max(records) == steps > 20
    lrs = [records[s]["lr"] for s in sorted(records)]
    # The warmup (20% of the budget) starts when the first step has compiled and run: the second step's rate is
    # near 0, where a clock that counted compilation (seconds of a 15 s budget) would have most of the peak.
    assert lrs[0] == 0.0 and lrs[1] < 0.25e-3 and lrs[1] < lrs[2] < lrs[3]
    peak = int(np.argmax(lrs))
    assert lrs[peak] > 0.9e-3 and 0 < peak < len(lrs) - 1
    assert all(b >= a for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # warms up with time
    after_warmup = lrs[peak:]
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:]))  # decays with time, never back up
    step_time = budget_s / steps
    assert budget_s <= seconds <= budget_s + 0.5 + 3 * step_time  # stopped on time
    assert lrs[-1] <= 1e-5 + (1e-3 - 1e-5) * 0.05, lrs[-5:]  # reached the end value (to the last steps' share)
    assert os.path.isdir(out / "checkpoints" / str(steps))


def test_budget_clock_resumes_and_snapshots_come_at_their_points(tmp_path, prepared):
    from flaxbert.train import pretraining

    class Every(loop.Snapshots):
        def __init__(self, seconds):
            self.seconds, self.taken = seconds, []

        def due(self, step, train_seconds):
            return train_seconds >= self.seconds * (len(self.taken) + 1)

        def take(self, step, train_seconds, params):
            self.taken.append((step, train_seconds, params["bert"]["embeddings"]["word_embeddings"]
                               .shape))

    base = _overrides(tmp_path / "run", prepared / "train-nsp0", "--data.nsp=false", "--run.budget_minutes=0.4",
                      "--checkpoint.every=100000")
    cfg, task = pretraining.build_task(rc.load("", base + ["--run.steps=30"]))  # stopped by the step cap
    first = loop.train(cfg, task)
    assert first.step == 30 and first.train_seconds < 24
    hook = Every(2.0)
    cfg, task = pretraining.build_task(rc.load("", base + ["--run.steps=1000000"]))
    second = loop.train(cfg, task, snapshots=hook)
    assert second.step > 30
    # the first run's time counted towards the budget: uncounted, the second run alone would have trained 24 s
    assert 24 <= second.train_seconds < 24 + first.train_seconds
    times = [t for _, t, _ in hook.taken]
    assert times == sorted(times) and hook.taken[-1][0] == second.step  # the last snapshot is the final step
    assert all(shape == (512, 32) for *_, shape in hook.taken)
    expected = int((second.train_seconds - first.train_seconds) // 2)
    assert len(hook.taken) >= expected  # one per 2 s after the resume (plus the final one)
    records = latest_by_step(read_jsonl(str(tmp_path / "run" / "metrics.jsonl")))
    assert "nsp_loss" not in records[max(records)] and "mlm_loss" in records[max(records)]


def test_mlm_only_instances_are_whole_documents_in_single_segments(prepared):
    from flaxbert.data.loader import PreparedData

    pairs, single = PreparedData(str(prepared / "train-nsp1")), PreparedData(str(prepared / "train-nsp0"))
    assert single.manifest["nsp"] is False and pairs.manifest["nsp"] is True
    assert single.manifest["counts"]["random_next"] == 0 and pairs.manifest["counts"]["random_next"] > 0
    tokens = np.concatenate([f["tokens"] for f in single.flat]).astype(np.int64)
    cls_id, sep_id = single.manifest["cls_id"], single.manifest["sep_id"]
    starts, lengths = single.offsets, single.lengths
    assert (lengths == single.a_lengths + 2).all() and lengths.max() == 32
    assert (tokens[starts] == cls_id).all() and (tokens[starts + lengths - 1] == sep_id).all()
    assert np.isin(tokens, [cls_id, sep_id]).sum() == 2 * len(lengths)  # one segment per row
    # every corpus token is in exactly one row (dupe_factor 1): nothing lost, nothing repeated
    assert int(single.a_lengths.sum()) == single.manifest["counts"]["corpus_tokens"]
    assert single.manifest["counts"]["short_target"] > 0  # short_seq_prob 0.1 still applies


def test_nsp_on_mlm_only_data_is_refused_naming_the_setting(tmp_path, prepared):
    from flaxbert.train import pretraining

    with pytest.raises(rc.ConfigError, match="data.nsp=false"):
        pretraining.build_task(rc.load("", _overrides(tmp_path / "x", prepared / "train-nsp0", "--run.steps=2",
                                                      "--data.nsp=true")))
