"""The train step: layout parity (1 device, data/fsdp/tensor meshes, pmap), exact gradient accumulation,
multi-host parity with two real processes, the optimizer recipe, freezing and non-finite steps."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxbert import heads, sharding
from flaxbert.run_config import OptimConfig
from flaxbert.train import optim, pretraining, step as train_step
from flaxbert.train.engine import init_sharded_state
from train_helpers import synthetic_batch, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_parity_script.py")


def _parity(args, devices, timeout=600):
    # compiled afresh (no cache), so that the compiler's own warnings below are seen
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + f" --xla_force_host_platform_device_count={devices}",
           "JAX_ENABLE_COMPILATION_CACHE": "false"}
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the embedding lookup and the block outputs keep their layout on every mesh (data, FSDP, tensor, 2x2x2):
    # XLA never has to re-partition a tensor at full cost
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("LOSSES ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[0][len("LOSSES "):])


def _max_rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_layouts_pmap_and_accumulation_give_the_same_losses():
    """Acceptance 1 and 3: 5 steps on 1 device, data=8, fsdp=8, 2x2x2, pmap; 4 microbatches of 8 == 32.
    With dropout on, the per-step key gives the same masks on one device and on a 2x2x2 mesh."""
    losses = _parity(["single", "8,1,1", "1,8,1", "2,2,2", "pmap", "accum:4", "single+dropout", "2,2,2+dropout"],
                     devices=8)
    ref, ref_dropout = losses.pop("single"), losses.pop("single+dropout")
    assert len(ref) == 5 and len(set(ref)) > 1, ref  # the model is actually training
    assert _max_rel(ref_dropout, ref) > 1e-4  # dropout really is on
    assert _max_rel(losses.pop("2,2,2+dropout"), ref_dropout) <= 1e-5
    for layout, values in losses.items():
        assert _max_rel(values, ref) <= 1e-5, (layout, values, ref)
    print("max relative difference to 1 device:", {k: _max_rel(v, ref) for k, v in losses.items()})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices():
    """Acceptance 2: 2 processes x 2 CPU devices (gloo), each feeding its own rows, == 1 process x 4 devices."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--multihost", str(i), "2", str(port), "2,2,1+dropout"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    multi = json.loads([l for l in outs[0][0].splitlines() if l.startswith("LOSSES ")][0][7:])["2,2,1+dropout"]
    single = _parity(["2,2,1+dropout"], devices=4)["2,2,1+dropout"]
    assert _max_rel(multi, single) <= 1e-5, (multi, single)


# ----- optimizer recipe -------------------------------------------------------------------------------

def test_weight_decay_skips_layernorm_and_biases():
    params = heads.init(tiny_config(), jax.random.PRNGKey(0), head="pretraining")
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat and all(not v for k, v in flat.items() if k.endswith("['bias']") or k.endswith("['scale']"))
    assert all(v for k, v in flat.items() if k.endswith("['kernel']") or k.endswith("_embeddings']"))
    # one AdamW step with a zero gradient: only decayed leaves move, by lr * wd * value
    cfg = OptimConfig(lr=0.1, warmup_steps=0, decay="constant", weight_decay=0.01, clip_norm=0)
    tx = optim.make_optimizer(cfg, 10)
    params = jax.tree.map(lambda x: jnp.ones_like(x), params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for (path, u), decayed in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(mask)):
        expected = -0.1 * 0.01 if decayed else 0.0
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_schedule_warmup_then_linear_decay():
    cfg = OptimConfig(lr=1e-3, end_lr=0.0, warmup_steps=10, decay="linear")
    s = optim.schedule(cfg, 110)
    np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10)), float(s(60)), float(s(110))],
                               [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
    poly = optim.schedule(OptimConfig(lr=1.0, warmup_steps=0, decay="polynomial", power=2.0), 100)
    np.testing.assert_allclose(float(poly(50)), 0.25, rtol=1e-6)


def test_lamb_and_clipping():
    cfg = OptimConfig(name="lamb", lr=1e-2, warmup_steps=0, decay="constant", clip_norm=1.0)
    tx = optim.make_optimizer(cfg, 10)
    params = {"w": {"kernel": jnp.full((4, 4), 2.0)}}
    grads = {"w": {"kernel": jnp.full((4, 4), 100.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # LAMB scales the update to trust_ratio * ||w||: the step is lr * ||w|| / ||adam update|| per layer
    ratio = float(optax.tree.norm(updates) / optax.tree.norm(params))
    np.testing.assert_allclose(ratio, 1e-2, rtol=1e-3)


def _one_device_step(config, cfg, loss_fn=None, nan_policy="stop"):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = optim.make_optimizer(cfg, 10)
    init = lambda rng: heads.init(config, rng, head="pretraining")  # noqa: E731
    state, shardings = init_sharded_state(init, heads.logical_axes(config, "pretraining"), tx, mesh, 0)
    fn = train_step.make_sharded_step(loss_fn or pretraining.make_loss_fn(config), tx, mesh, shardings,
                                      nan_policy=nan_policy, donate=False)
    batch = sharding.to_global(synthetic_batch(np.random.default_rng(0), 8, vocab=config.vocab_size), mesh)
    return state, fn(state, batch)


def test_freeze_encoder_trains_only_the_head():
    config = tiny_config()
    before, (after, metrics) = _one_device_step(config, OptimConfig(lr=1e-2, warmup_steps=0, freeze_encoder=True))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before.params, after.params)
    assert not any(jax.tree.leaves(changed["bert"]))
    assert any(jax.tree.leaves(changed["pretraining"]))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_step_is_flagged_and_skip_keeps_the_state(policy):
    config = tiny_config()
    base = pretraining.make_loss_fn(config)

    def nan_loss(params, batch, rng):
        out = base(params, batch, rng)
        return out._replace(terms={k: (s * jnp.nan, w) for k, (s, w) in out.terms.items()})

    before, (after, metrics) = _one_device_step(config, OptimConfig(lr=1e-2, warmup_steps=0), nan_loss, policy)
    assert not bool(metrics["finite"])
    same = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), before.params, after.params)))
    assert same == (policy == "skip")
    assert int(after.step) == 1


def test_weights_prepass_is_pruned_by_xla():
    """The weights-only call in `gradients` must cost (almost) nothing: the compiled step's FLOPs are
    within 5% of a plain value_and_grad of the same loss."""
    config = tiny_config()
    loss_fn = pretraining.make_loss_fn(config)
    params = heads.init(config, jax.random.PRNGKey(0), head="pretraining")
    batch = synthetic_batch(np.random.default_rng(0), 8, vocab=config.vocab_size)

    def plain(p, b):
        out = loss_fn(p, b, None)
        return sum(s / w for s, w in out.terms.values())

    ours = jax.jit(lambda p, b: train_step.gradients(loss_fn, p, b, None, grad_accum=1))
    flops = lambda f: f.lower(params, batch).compile().cost_analysis()["flops"]  # noqa: E731
    assert flops(ours) <= 1.05 * flops(jax.jit(jax.grad(plain)))


@pytest.mark.slow  # scripts/slow_tests.sh (CI time); the pmap step's losses stay in the layouts test above
def test_the_loop_runs_checkpoints_and_resumes_with_the_pmap_layout(tmp_path):
    """`run.step_impl=pmap` through the whole loop on 2 devices: steps, held-out eval, a checkpoint, and a
    resumed second run (the batches go to the devices through the pmap layout's own sharding)."""
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.path.dirname(HERE)}
    args = [sys.executable, "-m", "flaxbert.pretrain", "--run.step_impl=pmap", "--checkpoint.every=2",
            "--run.eval_every=2", "--run.progress=false", "--run.log_every=2", f"--run.output_dir={tmp_path / 'run'}"]
    first = subprocess.run(args + ["--run.steps=4"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0 and "finished at step 4" in first.stdout, first.stderr[-3000:]
    second = subprocess.run(args + ["--run.steps=6"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0 and "finished at step 6" in second.stdout, second.stderr[-3000:]
    assert "resumed from step 4" in second.stderr
