"""The train step: one pure function `(state, batch) -> (state, metrics)`, built by a factory and jitted
once with explicit shardings and donated state (`make_sharded_step`), or pmapped (`make_pmap_step`).

Loss interface (pretraining, classification, NER, QA all plug in here)::

    loss_fn(params, batch, dropout_rng) -> LossOutput(terms={name: (sum, weight)},
                                                     metrics={name: (sum, weight)})

- `batch` is a dict of arrays with the batch on axis 0 (a microbatch when accumulating).
- `dropout_rng` is a fresh key per step, microbatch and (pmap) device; `None` means deterministic.
- The objective is  sum_k  terms[k].sum / W_k,  where W_k is terms[k].weight summed over the *global*
  batch (every device, host and microbatch). So accumulation and multi-host averaging are exact:
  4 microbatches of 8 give the gradient of one batch of 32. Weights must depend only on the batch
  (e.g. the number of masked tokens or of labelled examples), never on params or the rng: the step
  computes them first with a weights-only call that XLA prunes down to the batch arithmetic.
- `metrics` are reported only, as sum / weight over the global batch (e.g. accuracy = (correct, count)).

Reported per step: `loss`, `<term>_loss` per term, each metric, `grad_norm`, `lr`, `finite`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from flaxbert import sharding as shd

Array = jax.Array
PMAP_AXIS = "batch"


class LossOutput(NamedTuple):
    terms: Mapping[str, tuple[Array, Array]]  # summed into the objective as sum / global weight
    metrics: Mapping[str, tuple[Array, Array]] = {}  # reported as sum / global weight


LossFn = Callable[[Any, Mapping[str, Array], Optional[Array]], LossOutput]


class TrainState(flax.struct.PyTreeNode):
    step: Array  # int32 scalar: optimizer steps taken
    params: Any  # float32 master weights
    opt_state: Any  # float32
    rng: Array  # uint32[2] raw key; the dropout key of step t is fold_in(rng, t)


def create_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


def state_shardings(abstract_state: TrainState, param_shardings, optimizer, mesh: Mesh) -> TrainState:
    """Shardings for every leaf of the state: optimizer moments follow their parameter, the rest is
    replicated."""
    rep = shd.replicated(mesh)
    masked = optax.MaskedNode  # the frozen part of a masked / multi_transform state: no array
    opt = optax.tree_map_params(optimizer, lambda p, s: p if isinstance(p, masked) else s,
                                abstract_state.opt_state, param_shardings, transform_non_params=lambda _: rep,
                                is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))
    return TrainState(step=rep, params=param_shardings, opt_state=opt, rng=rep)


def _split_microbatches(batch: Mapping[str, Array], n: int) -> dict:
    """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, i+2n, ... so that every device's shard
    of the batch contributes equally to every microbatch (no data movement under sharding)."""
    def split(x):
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return {k: split(v) for k, v in batch.items()}


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _stats(out: LossOutput) -> dict:
    """Flatten a LossOutput to {'term/x': (sum, weight), 'metric/y': (sum, weight)} in float32."""
    f32 = lambda sw: (jnp.asarray(sw[0], jnp.float32), jnp.asarray(sw[1], jnp.float32))  # noqa: E731
    stats = {f"term/{k}": f32(v) for k, v in out.terms.items()}
    stats.update({f"metric/{k}": f32(v) for k, v in out.metrics.items()})
    return stats


def gradients(loss_fn: LossFn, params, batch, rng, *, grad_accum: int, reduce=lambda x: x,
              constrain=lambda x: x, grad_constrain=lambda g: g):
    """Exact gradient of sum_k S_k / W_k over the (global) batch, accumulated over `grad_accum`
    microbatches. `reduce` sums over devices (psum under pmap, identity under jit+GSPMD).
    Returns (grads, stats) where stats[name] = (sum, weight) over the global batch."""
    # Weights only depend on the batch, so XLA prunes this call to the weight arithmetic.
    totals = {k: reduce(jnp.asarray(w, jnp.float32))
              for k, (_, w) in loss_fn(params, batch, None).terms.items()}

    def objective(p, micro, micro_rng):
        out = loss_fn(p, micro, micro_rng)
        value = sum(jnp.asarray(s, jnp.float32) / jnp.maximum(totals[k], 1e-12) for k, (s, _) in out.terms.items())
        return value, _stats(out)

    grad_fn = jax.grad(objective, has_aux=True)
    if grad_accum == 1:
        grads, stats = grad_fn(params, constrain(batch), None if rng is None else jax.random.fold_in(rng, 0))
    else:
        micro = _split_microbatches(batch, grad_accum)

        def body(carry, xs):
            g_acc, s_acc = carry
            mb, i = xs
            g, s = grad_fn(params, constrain(mb), None if rng is None else jax.random.fold_in(rng, i))
            return (grad_constrain(_tree_add(g_acc, g)), _tree_add(s_acc, s)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros_s = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: objective(params, first, rng)[1]))
        zeros_g = grad_constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (grads, stats), _ = jax.lax.scan(body, (zeros_g, zeros_s), (micro, jnp.arange(grad_accum)))
    return reduce(grads), reduce(stats)


def summarize(stats) -> dict:
    """(sum, weight) statistics -> {'loss', '<term>_loss', '<metric>'}."""
    ratio = lambda sw: sw[0] / jnp.maximum(sw[1], 1e-12)  # noqa: E731
    terms = {k[5:]: ratio(v) for k, v in stats.items() if k.startswith("term/")}
    metrics = {f"{k}_loss": v for k, v in terms.items()}
    metrics["loss"] = sum(terms.values())
    metrics.update({k[7:]: ratio(v) for k, v in stats.items() if k.startswith("metric/")})
    return metrics


def eval_stats(loss_fn: LossFn, params, batch) -> dict:
    """Deterministic (sum, weight) statistics of one batch, to be added up over an evaluation set."""
    return _stats(loss_fn(params, batch, None))


def _apply(state: TrainState, grads, stats, optimizer, schedule, nan_policy: str, lr=None):
    metrics = summarize(stats)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    if lr is not None:  # an optimizer built with rate 1, given the rate by the host (a wall-clock schedule)
        updates = jax.tree.map(lambda u: u * lr.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    if nan_policy == "skip":
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics.update(grad_norm=grad_norm, finite=finite)
    if lr is not None:
        metrics["lr"] = jnp.asarray(lr, jnp.float32)
    elif schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def make_sharded_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                      shardings: TrainState, *, grad_accum: int = 1, schedule=None, nan_policy: str = "stop",
                      dropout: bool = True, donate: bool = True, host_lr: bool = False):
    """jit(step) over `mesh` with explicit in/out shardings and the state donated. The batch is a dict
    of global arrays sharded on axis 0 over ('data', 'fsdp'). `host_lr=True`: the step is
    `(state, batch, lr)`, with a float32 scalar learning rate that scales the updates."""
    batch_sh = shd.batch_sharding(mesh)
    grad_constrain = lambda g: jax.lax.with_sharding_constraint(g, shardings.params)  # noqa: E731

    def constrain(b):
        return jax.lax.with_sharding_constraint(b, {k: batch_sh for k in b})

    def step(state: TrainState, batch, lr=None):
        rng = jax.random.fold_in(state.rng, state.step) if dropout else None
        with shd.activation_sharding(mesh):  # the model's block outputs keep their logical layout on the mesh
            grads, stats = gradients(loss_fn, state.params, batch, rng, grad_accum=grad_accum,
                                     constrain=constrain, grad_constrain=grad_constrain)
        return _apply(state, grads, stats, optimizer, schedule, nan_policy, lr)

    in_shardings = (shardings, batch_sh) + ((shd.replicated(mesh),) if host_lr else ())
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, shd.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def make_pmap_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, grad_accum: int = 1,
                   schedule=None, nan_policy: str = "stop", dropout: bool = True, donate: bool = True):
    """The classic data-parallel step: state replicated on every device, batch [devices, B/devices, ...],
    gradients and (sum, weight) statistics psum'd. Same objective as the sharded step. Called as
    `(state, batch, lr)` with `lr` [devices] (the same rate on each), the rate scales the updates."""
    reduce = lambda x: jax.lax.psum(x, PMAP_AXIS)  # noqa: E731

    def step(state: TrainState, batch, lr=None):
        rng = None
        if dropout:
            rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(PMAP_AXIS))
        grads, stats = gradients(loss_fn, state.params, batch, rng, grad_accum=grad_accum, reduce=reduce)
        return _apply(state, grads, stats, optimizer, schedule, nan_policy, lr)

    return jax.pmap(step, axis_name=PMAP_AXIS, donate_argnums=(0,) if donate else ())


def replicate(tree, local_devices: int):
    """A host tree -> stacked copies for a pmapped step."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (local_devices,) + np.shape(x)).copy(), tree)


def unreplicate(tree):
    """The first device's copy of a pmapped tree, as numpy."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x[0])), tree)
