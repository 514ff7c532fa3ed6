"""The one place that turns a run config and a trainable (parameters' init, their logical axes, a loss) into
what training needs: the mesh, the optimizer and its schedule, the abstract train state and its shardings,
the state itself (fresh, from given weights, or as a restore target), and the compiled step and eval
functions. The training loop, fine-tuning and the benchmarks all build their engine here.

The step runs in one of two layouts, chosen by `run.step_impl` and registered in `LAYOUTS`:

- `sharded`: one jit over the mesh, the state in its shardings (data, FSDP and tensor parallel, multi-host);
- `pmap`: the classic data-parallel layout, the state replicated on every local device.

The checkpoint layout is always the sharded one; a layout converts to and from it (`to_layout`,
`to_checkpoint`), so a run can resume in the other layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Protocol

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxbert import run_config as rc
from flaxbert import sharding as shd
from flaxbert.train import optim
from flaxbert.train import step as st


class Trainable(Protocol):
    """What the engine needs of a model and its task (`loop.Job` is one)."""

    init_params: Callable[[jax.Array], Any]  # rng -> fresh float32 params
    logical_axes: Any  # tree of logical PartitionSpecs matching init_params' output
    loss_fn: st.LossFn


@dataclasses.dataclass(frozen=True)
class Trained:
    """A plain `Trainable`, for callers without a `loop.Job`."""

    init_params: Callable[[jax.Array], Any]
    logical_axes: Any
    loss_fn: st.LossFn


def abstract_state(init_params: Callable[[jax.Array], Any], optimizer, seed: int) -> st.TrainState:
    return jax.eval_shape(lambda: st.create_state(init_params(jax.random.PRNGKey(seed)), optimizer, seed))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The train state's shapes and shardings over a mesh: built once, used to create, place and restore it."""

    mesh: Mesh
    optimizer: optax.GradientTransformation
    seed: int
    init_params: Callable[[jax.Array], Any]
    abstract: st.TrainState  # ShapeDtypeStructs
    params: Any  # NamedShardings of the parameters
    state: st.TrainState  # NamedShardings of every leaf

    @classmethod
    def build(cls, init_params, logical_axes, optimizer, mesh: Mesh, seed: int) -> "StateLayout":
        abstract = abstract_state(init_params, optimizer, seed)
        params = shd.param_shardings(logical_axes, abstract.params, mesh)
        return cls(mesh, optimizer, seed, init_params, abstract, params,
                   st.state_shardings(abstract, params, optimizer, mesh))

    def target(self) -> st.TrainState:
        """ShapeDtypeStructs with shardings: what a checkpoint is restored into."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
                            self.state)

    def create(self, params=None) -> st.TrainState:
        """The state made directly in its shardings (nothing is materialised on one device first): fresh
        parameters from `init_params`, or the given host arrays."""
        make_state = lambda p: st.create_state(p, self.optimizer, self.seed)  # noqa: E731
        if params is None:
            fresh = lambda: make_state(self.init_params(jax.random.PRNGKey(self.seed)))  # noqa: E731
            return jax.jit(fresh, out_shardings=self.state)()
        return jax.jit(make_state, out_shardings=self.state)(shd.place(params, self.params))


def init_sharded_state(init_params, logical_axes, optimizer, mesh: Mesh, seed: int,
                       params=None) -> tuple[st.TrainState, st.TrainState]:
    """(state, its shardings) for a step built by hand (`step.make_sharded_step`): see `StateLayout`."""
    layout = StateLayout.build(init_params, logical_axes, optimizer, mesh, seed)
    return layout.create(params), layout.state


class _Sharded:
    """jit over the mesh; batches become global arrays sharded on the batch axis."""

    def __init__(self, engine: "Engine", loss_fn: st.LossFn, *, dropout: bool, donate: bool):
        self.engine, mesh, shardings = engine, engine.mesh, engine.state_layout.state
        r = engine.cfg.run
        self.fn = st.make_sharded_step(loss_fn, engine.optimizer, mesh, shardings, grad_accum=r.grad_accum,
                                       schedule=engine.schedule, nan_policy=r.nan_policy, host_lr=engine.budget,
                                       dropout=dropout, donate=donate)
        def evaluate(params, batch):
            with shd.activation_sharding(mesh):
                return st.eval_stats(loss_fn, params, batch)

        self.eval_fn = jax.jit(evaluate, in_shardings=(shardings.params, shd.batch_sharding(mesh)),
                               out_shardings=shd.replicated(mesh))

    def to_layout(self, state):
        return state

    def to_checkpoint(self, state):
        return state

    def put(self, batch: dict) -> dict:
        return shd.to_global(batch, self.engine.mesh)

    def step(self, state, device_batch, lr: Optional[float]):
        if lr is None:
            return self.fn(state, device_batch)
        return self.fn(state, device_batch, jax.device_put(np.float32(lr), shd.replicated(self.engine.mesh)))

    def eval_stats(self, params, batch: dict):
        return self.eval_fn(params, self.put(batch))

    def host_params(self, state):
        return jax.tree.map(lambda x: np.asarray(x), multihost_utils.process_allgather(state.params, tiled=True))


class _Pmap:
    """pmap over the local devices; the state replicated, batches split [devices, rows / devices, ...]."""

    def __init__(self, engine: "Engine", loss_fn: st.LossFn, *, dropout: bool, donate: bool):
        self.engine, self.n = engine, jax.local_device_count()
        r = engine.cfg.run
        self.fn = st.make_pmap_step(loss_fn, engine.optimizer, grad_accum=r.grad_accum, schedule=engine.schedule,
                                    nan_policy=r.nan_policy, dropout=dropout, donate=donate)
        self.eval_fn = jax.pmap(lambda p, b: jax.lax.psum(st.eval_stats(loss_fn, p, b), st.PMAP_AXIS),
                                axis_name=st.PMAP_AXIS)
        # a batch's leading [devices] axis split over the local devices (jax.device_put_sharded is gone)
        self.batch_sharding = NamedSharding(jax.make_mesh((self.n,), (st.PMAP_AXIS,), devices=jax.local_devices()),
                                            PartitionSpec(st.PMAP_AXIS))

    def to_layout(self, state):
        return st.replicate(jax.device_get(state), self.n)

    def to_checkpoint(self, state):
        return shd.place(st.unreplicate(state), self.engine.state_layout.state)

    def put(self, batch: dict) -> dict:
        return {k: jax.device_put(v, self.batch_sharding) for k, v in shd.to_pmap(batch, self.n).items()}

    def step(self, state, device_batch, lr: Optional[float]):
        if lr is None:
            state, m = self.fn(state, device_batch)
        else:
            state, m = self.fn(state, device_batch, np.full(self.n, lr, np.float32))
        return state, jax.tree.map(lambda x: x[0], m)

    def eval_stats(self, params, batch: dict):
        return jax.tree.map(lambda x: x[0], self.eval_fn(params, shd.to_pmap(batch, self.n)))

    def host_params(self, state):
        return st.unreplicate(state.params)


LAYOUTS: dict[str, type] = {"sharded": _Sharded, "pmap": _Pmap}  # keyed by run.step_impl


@dataclasses.dataclass
class Engine:
    """A run's mesh, optimizer, state layout and compiled functions (see `build_engine`)."""

    cfg: rc.RunConfig
    mesh: Mesh
    optimizer: optax.GradientTransformation
    schedule: Optional[Callable]  # None with a wall-clock budget
    budget: bool  # the learning rate comes from the host (a wall-clock schedule), not the optimizer
    state_layout: StateLayout
    layout: Any = None  # _Sharded | _Pmap

    @property
    def step_fn(self):
        """The jitted (or pmapped) step itself, `(state, batch[, lr]) -> (state, metrics)`, e.g. to lower it."""
        return self.layout.fn

    def init_state(self, params=None) -> st.TrainState:
        """A fresh state (or one from the given host parameters), in the checkpoint layout."""
        return self.state_layout.create(params)

    def target(self) -> st.TrainState:
        return self.state_layout.target()

    def to_layout(self, state):
        """A checkpoint-layout state -> this engine's step layout."""
        return self.layout.to_layout(state)

    def to_checkpoint(self, state):
        return self.layout.to_checkpoint(state)

    def put(self, batch: dict) -> dict:
        """A host-local batch -> device arrays in the step's input layout (the transfer starts now)."""
        return self.layout.put(batch)

    def step(self, state, device_batch, lr: Optional[float] = None):
        """One step; `lr` is the rate of a wall-clock schedule (None: the optimizer's own schedule)."""
        return self.layout.step(state, device_batch, lr)

    def host_params(self, state):
        """The parameters as host numpy arrays (every process gets all of them)."""
        return self.layout.host_params(state)

    def evaluate(self, state, batches: Iterable[dict], limit: int) -> dict:
        """The loss and metrics summed over up to `limit` host-local batches, then divided by their weights."""
        total = None
        for i, batch in enumerate(batches):
            if i >= limit:
                break
            stats = jax.device_get(self.layout.eval_stats(state.params, batch))
            total = stats if total is None else jax.tree.map(np.add, total, stats)
        return {k: float(v) for k, v in st.summarize(total).items()} if total is not None else {}


def build_engine(cfg: rc.RunConfig, trainable: Trainable, *, mesh_shape: Optional[tuple[int, int, int]] = None,
                 dropout: bool = True, donate: bool = True, compile_step: bool = True) -> Engine:
    """The engine of a run: validates the config against the devices (unless the caller did and passes the
    resolved `mesh_shape`), makes the mesh, the optimizer (a wall-clock schedule when `run.budget_minutes` > 0),
    the state layout and, unless `compile_step` is False (restoring only), the step and eval functions of
    `run.step_impl`'s layout."""
    r = cfg.run
    if mesh_shape is None:
        mesh_shape = rc.validate_for_run(cfg, jax.device_count(), process_count=jax.process_count())
    mesh = shd.make_mesh(*mesh_shape)
    budget = r.budget_minutes > 0
    optimizer = optim.make_optimizer(cfg.optim, r.steps, budget=budget)
    schedule = None if budget else optim.schedule(cfg.optim, r.steps)
    layout = StateLayout.build(trainable.init_params, trainable.logical_axes, optimizer, mesh, r.seed)
    engine = Engine(cfg, mesh, optimizer, schedule, budget, layout)
    if compile_step:
        engine.layout = LAYOUTS[r.step_impl](engine, trainable.loss_fn, dropout=dropout, donate=donate)
    return engine
