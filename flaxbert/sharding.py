"""Device mesh ('data', 'fsdp', 'tensor'), the logical-axis rules table, and host-local -> global arrays.

The model names every parameter dimension with a logical axis; `RULES` maps those names to mesh axes.
Changing the mesh (not the code) switches between data parallel, FSDP and tensor parallel.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both; FSDP shards only parameters

# logical axis -> mesh axis or axes (None = replicated). Parameters are sharded over `fsdp` on their hidden
# dimension and over `tensor` on heads / FFN / vocabulary; everything else is replicated. Activations at block
# boundaries (the embeddings' output and every layer's) have their batch split over data x fsdp and their
# hidden dimension whole, as Megatron-style tensor parallelism wants it between blocks.
RULES: tuple[tuple[str, Union[str, tuple[str, ...], None]], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("labels", None),
    ("layers", None),
    ("pos", None),
    ("type", None),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
)
ACTIVATION = P("activation_batch", "activation_length", "activation_embed")  # [batch, seq, hidden]
_activation_mesh: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("activation_mesh", default=None)


def make_mesh(data: int, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh over all (global) devices; `jax.make_mesh` orders them for the physical topology."""
    devices = list(jax.devices()) if devices is None else list(devices)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {len(devices)} devices")
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_spec(logical: P, shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """Map one logical PartitionSpec to mesh axes. A dimension that the mesh axis does not divide,
    or a mesh axis already used by an earlier dimension, stays replicated."""
    table = dict(rules)
    out, used = [], set()
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in flaxbert.sharding.RULES ({sorted(table)})")
        axis = table[name]
        axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        if not axes or used & set(axes) or size % int(np.prod([mesh.shape[a] for a in axes])):
            out.append(None)
            continue
        used.update(axes)
        out.append(axis)
    return P(*out)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """While a step is traced for `mesh`, `constrain` pins activations to their logical layout there."""
    token = _activation_mesh.set(mesh)
    try:
        yield
    finally:
        _activation_mesh.reset(token)


def constrain(x, logical: P = ACTIVATION):
    """`x` constrained to the mesh layout of its logical axes inside `activation_sharding`; unchanged outside
    it (one device, pmap, or the model called on its own)."""
    mesh = _activation_mesh.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_spec(logical, x.shape, mesh)))


def param_shardings(logical_specs, shapes, mesh: Mesh, rules=RULES):
    """NamedShardings for a parameter tree, from its logical specs and shapes (ShapeDtypeStructs)."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return jax.tree.map(lambda spec, s: NamedSharding(mesh, mesh_spec(spec, s.shape, mesh, rules)),
                        logical_specs, shapes, is_leaf=is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def place(tree, shardings):
    """Host arrays (every process holds all of each) -> global jax.Arrays laid out as `shardings`."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                        tree, shardings)


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Host-local numpy batch (this host's share of the global batch) -> global jax.Arrays.

    Each host passes only its own rows; the global batch is their concatenation in process order."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def to_pmap(batch: Mapping[str, np.ndarray], local_devices: int) -> dict:
    """Host-local batch [B, ...] -> [local_devices, B / local_devices, ...] for a pmapped step."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % local_devices:
            raise ValueError(f"batch[{k!r}] has {v.shape[0]} rows, not divisible by {local_devices} local devices")
        out[k] = v.reshape((local_devices, v.shape[0] // local_devices) + v.shape[1:])
    return out
