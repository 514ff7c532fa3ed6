"""The logical-axis rules table, the state's shardings and dtypes, and donation (no devices needed
beyond one: the rules are checked on an abstract 2x4x2 mesh)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from flaxbert import heads, sharding
from flaxbert.run_config import OptimConfig
from flaxbert.train import optim, pretraining, step as train_step
from flaxbert.train.engine import init_sharded_state
from train_helpers import synthetic_batch, tiny_config

MESH = AbstractMesh((2, 4, 2), sharding.MESH_AXES)


def test_rules_map_logical_axes_to_the_mesh():
    assert sharding.mesh_spec(P("vocab", "embed"), (2048, 128), MESH) == P("tensor", "fsdp")
    assert sharding.mesh_spec(P("layers", "embed", "mlp"), (2, 128, 512), MESH) == P(None, "fsdp", "tensor")
    assert sharding.mesh_spec(P("embed", "embed_out"), (128, 128), MESH) == P("fsdp", "tensor")


def test_indivisible_or_repeated_axes_stay_replicated():
    assert sharding.mesh_spec(P("layers", "embed", "heads", "kv"), (2, 128, 3, 64), MESH) == P(None, "fsdp", None, None)
    assert sharding.mesh_spec(P("vocab", "embed"), (2047, 130), MESH) == P(None, None)
    assert sharding.mesh_spec(P("heads", "mlp"), (4, 8), MESH) == P("tensor", None)  # tensor already used


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
        sharding.mesh_spec(P("experts",), (8,), MESH)


def test_every_model_axis_has_a_rule():
    table = dict(sharding.RULES)
    specs = jax.tree.leaves(heads.logical_axes(tiny_config(), "pretraining"), is_leaf=lambda x: isinstance(x, P))
    names = {name for spec in specs for name in spec if name is not None}
    assert names and names <= set(table), names - set(table)


def test_bf16_compute_keeps_float32_master_weights_and_donates_the_state():
    config = tiny_config(dtype="bfloat16")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = optim.make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
    init = lambda rng: heads.init(config, rng, head="pretraining")  # noqa: E731
    state, shardings = init_sharded_state(init, heads.logical_axes(config, "pretraining"), tx, mesh, 0)
    fn = train_step.make_sharded_step(pretraining.make_loss_fn(config), tx, mesh, shardings)
    batch = sharding.to_global(synthetic_batch(np.random.default_rng(0), 8, vocab=config.vocab_size), mesh)
    old_leaf = jax.tree.leaves(state.params)[0]
    new, metrics = fn(state, batch)
    assert old_leaf.is_deleted()  # donated
    floats = [x for x in jax.tree.leaves((new.params, new.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
