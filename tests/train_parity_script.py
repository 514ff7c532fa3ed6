"""Run 5 train steps of a tiny model under several layouts and print the losses as JSON.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_train_step.py).
usage: python tests/train_parity_script.py [--multihost PROCESS_ID NUM_PROCESSES PORT] LAYOUT [LAYOUT...]
  LAYOUT: single | pmap | D,F,T (mesh data,fsdp,tensor) | accum:N (one device, N microbatches)
With --multihost every process feeds only its own rows of each global batch (gloo collectives on CPU).
A "+dropout" suffix (e.g. 2,2,2+dropout) turns dropout on (its rng depends only on the step, not the layout).
"""

import json
import os
import sys

import jax
import numpy as np

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from train_helpers import synthetic_batch, tiny_config  # noqa: E402

from flaxbert import heads, sharding  # noqa: E402
from flaxbert.run_config import OptimConfig  # noqa: E402
from flaxbert.train import optim, pretraining, step as train_step  # noqa: E402
from flaxbert.train.engine import init_sharded_state  # noqa: E402

STEPS, BATCH = 5, 32


def run(layout: str, dropout: bool) -> list[float]:
    rate = 0.1 if dropout else 0.0
    config = tiny_config(hidden_dropout_prob=rate, attention_probs_dropout_prob=rate)
    cfg = OptimConfig(lr=1e-3, warmup_steps=2)
    tx = optim.make_optimizer(cfg, STEPS)
    sched = optim.schedule(cfg, STEPS)
    loss_fn = pretraining.make_loss_fn(config)
    init_params = lambda rng: heads.init(config, rng, head="pretraining")  # noqa: E731
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, BATCH, vocab=config.vocab_size) for _ in range(STEPS)]
    losses = []
    if layout == "pmap":
        n = jax.local_device_count()
        state = train_step.create_state(init_params(jax.random.PRNGKey(0)), tx, 0)
        state = train_step.replicate(jax.device_get(state), n)
        fn = train_step.make_pmap_step(loss_fn, tx, schedule=sched, dropout=dropout)
        for b in batches:
            state, m = fn(state, sharding.to_pmap(b, n))
            losses.append(float(m["loss"][0]))
        return losses
    accum = 1
    if layout == "single":
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    elif layout.startswith("accum:"):
        accum = int(layout.split(":")[1])
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    else:
        d, f, t = (int(x) for x in layout.split(","))
        mesh = sharding.make_mesh(d, f, t, devices=jax.devices()[: d * f * t])  # all devices of all processes
    logical = heads.logical_axes(config, "pretraining")
    state, shardings = init_sharded_state(init_params, logical, tx, mesh, seed=0)
    fn = train_step.make_sharded_step(loss_fn, tx, mesh, shardings, grad_accum=accum, schedule=sched, dropout=dropout)
    pid, nproc = jax.process_index(), jax.process_count()
    for b in batches:
        local = {k: v[pid * BATCH // nproc:(pid + 1) * BATCH // nproc] for k, v in b.items()}
        state, m = fn(state, sharding.to_global(local, mesh))
        losses.append(float(m["loss"]))
    return losses


if __name__ == "__main__":
    layouts = sys.argv[1:]
    if layouts[0] == "--multihost":
        pid, nproc, port = (int(x) for x in layouts[1:4])
        layouts = layouts[4:]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    result = {layout: run(layout.removesuffix("+dropout"), layout.endswith("+dropout")) for layout in layouts}
    if jax.process_index() == 0:
        print("LOSSES " + json.dumps(result))
