"""Checkpoints with orbax: async saves of the sharded train state, keep the last K, and resume from the
latest *good* one.

A step directory is only visible to orbax once it is fully written (it writes to a temporary name and
renames), so a save interrupted by kill -9 is never picked up. On top of that each checkpoint stores a
fingerprint of every array (a wrap-around sum of its bits); a checkpoint that fails to read or whose
restored arrays do not match it is reported with a warning naming it and skipped for the previous one.
The data iterator state is a small JSON file per process next to the step (each host has its own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flaxbert.errors import CheckpointError, CheckpointWarning

log = logging.getLogger(__name__)


@jax.jit
def _fingerprint(tree) -> jax.Array:
    """uint32 [leaves]: the wrap-around sum of each leaf's bits (cheap, sharding-independent)."""
    def leaf(x):
        x = jnp.asarray(x)
        if x.dtype.itemsize != 4:
            x = x.astype(jnp.float32)
        return jnp.sum(jax.lax.bitcast_convert_type(x, jnp.uint32).ravel(), dtype=jnp.uint32)
    return jnp.stack([leaf(x) for x in jax.tree.leaves(tree)])


def fingerprint(tree) -> list[int]:
    return [int(v) for v in np.asarray(jax.device_get(_fingerprint(tree)))]


class Checkpointer:
    """Save/restore `(state, data_state, extra)` under `directory/<step>/`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if "://" not in directory:  # orbax wants absolute paths (gs://... already are)
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self.data_dir = self.directory.parent / (self.directory.name + "_data_state")
        for path in (self.directory, self.data_dir):  # refused before the first step, not at the first save
            if path.exists() and not path.is_dir():
                raise CheckpointError(f"checkpoint directory {path} exists but is a file, not a directory; "
                                      f"choose another --checkpoint.directory or move the file away")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._pending: Optional[int] = None  # the step of the latest save started

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: Any = None, extra: Optional[dict] = None) -> None:
        """Start an (async) save of `state` at `step`. `data_state` is this process's iterator state."""
        path = self.data_dir / str(step)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"process_{jax.process_index()}.json").write_text(json.dumps(data_state))
        meta = {"step": int(step), "fingerprint": fingerprint(state), **(extra or {})}
        with self._saving():  # an earlier async save's failure surfaces here
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
        self._pending = int(step)
        self._prune_data_states()

    @contextlib.contextmanager
    def _saving(self):
        """A failed save (a full disk, a lost mount) as one CheckpointError that names the step and says what
        is kept; orbax only ever commits a step by renaming its finished temporary directory."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:
            kept = [s for s in self.all_steps() if s != self._pending]
            raise CheckpointError(f"saving the checkpoint of step {self._pending} in {self.directory} failed "
                                  f"({type(e).__name__}: {e}); the run stops; the checkpoints kept: "
                                  f"{kept or 'none'}") from e

    def _prune_data_states(self) -> None:
        """Drop the data states of checkpoints that orbax has deleted (older than the newest kept)."""
        kept = set(self.all_steps())
        if jax.process_index() != 0 or not kept or not self.data_dir.exists():
            return
        for d in self.data_dir.iterdir():
            if d.name.isdigit() and int(d.name) not in kept and int(d.name) < max(kept):
                d.rmtree()

    def wait(self) -> None:
        with self._saving():
            self.manager.wait_until_finished()
        self._prune_data_states()

    def restore(self, step: int, target) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of checkpoint `step`, checked against its fingerprint. `target` is the
        abstract state (ShapeDtypeStructs with shardings); see `restore_latest` for falling back on corruption."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        if meta.get("fingerprint") != fingerprint(restored["state"]):
            raise ValueError("restored arrays do not match the fingerprint saved with them")
        data_file = self.data_dir / str(step) / f"process_{jax.process_index()}.json"
        if not data_file.exists() and (self.data_dir / str(step) / "process_0.json").exists():
            # a job resumed on more processes than saved it: loader states that are the same in every
            # process (the pretraining loader's) carry over; the loader refuses any other kind
            data_file = self.data_dir / str(step) / "process_0.json"
        if not data_file.exists():
            raise ValueError(f"data iterator state {data_file} is missing")
        return restored["state"], json.loads(data_file.read_text()), meta

    def restore_latest(self, target) -> Optional[tuple[Any, Any, dict]]:
        """(state, data_state, meta) from the newest checkpoint that restores cleanly, or None if the
        directory has none. `target` is the abstract state (ShapeDtypeStructs with shardings)."""
        steps = self.all_steps()
        failures = []
        for step in reversed(steps):
            try:
                result = self.restore(step, target)
            except Exception as e:  # any unreadable/corrupt checkpoint: fall back to the previous one
                failures.append(f"{self.directory / str(step)}: {type(e).__name__}: {str(e)[:300]}")
                msg = (f"checkpoint {self.directory / str(step)} is unreadable or corrupt "
                       f"({type(e).__name__}: {str(e)[:200]}); trying the previous one")
                warnings.warn(msg, CheckpointWarning, stacklevel=2)
                log.warning(msg)
                continue
            for bad in steps[steps.index(step) + 1:]:
                self._quarantine(bad)
            if failures:
                msg = f"resumed from checkpoint {self.directory / str(step)} (newer ones were corrupt)"
                warnings.warn(msg, CheckpointWarning, stacklevel=2)
                log.warning(msg)
            return result
        if failures:
            raise CheckpointError("no checkpoint could be restored (a changed model or optimizer config?):\n  "
                                  + "\n  ".join(failures))
        return None

    def _quarantine(self, step: int) -> None:
        """Move a corrupt step aside (so a later save at the same step can proceed) without deleting it."""
        multihost_utils.sync_global_devices("flaxbert_quarantine_start")
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory.parent / f"{self.directory.name}_corrupt" / str(step)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                dst.rmtree()
            src.rename(dst)
        multihost_utils.sync_global_devices("flaxbert_quarantine_done")
        self.manager.reload()

    def close(self) -> None:
        try:
            with self._saving():
                self.manager.wait_until_finished()
        finally:
            self.manager.close()
