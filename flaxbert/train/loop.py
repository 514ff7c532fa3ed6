"""The training loop, shared by pretraining and fine-tuning: mesh and sharded state, resume, the jitted
step, logging/eval/checkpoints, NaN handling and clean preemption (SIGTERM/SIGINT)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxbert import run_config as rc
from flaxbert.train import checkpoint as ckpt
from flaxbert.train import metrics as mx
from flaxbert.train import optim
from flaxbert.train import step as st
from flaxbert.train.engine import build_engine

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything model- and data-specific that the loop trains."""

    init_params: Callable[[jax.Array], Any]  # rng -> fresh float32 params
    logical_axes: Any  # tree of logical PartitionSpecs matching init_params' output
    loss_fn: st.LossFn  # see flaxbert/train/step.py
    train_batches: Iterator[dict]  # host-local numpy batches (this host's share); get_state()/set_state()
    seq_len: int
    flops_per_token: float = 0.0  # for MFU; 0 = not reported
    eval_batches: Optional[Callable[[], Iterable[dict]]] = None  # a fresh pass over held-out host-local batches
    initial_params: Any = None  # host arrays to start from (e.g. an HF checkpoint) instead of init_params
    mesh_shape: Optional[tuple[int, int, int]] = None  # (data, fsdp, tensor) if the run config was validated


@dataclasses.dataclass(frozen=True)
class Result:
    step: int  # optimizer steps done
    reason: str  # finished | preempted | nonfinite
    last_metrics: dict
    message: str = ""
    train_seconds: float = 0.0  # training wall time, resumed runs included, evaluation and snapshots excluded


def initialize_distributed(run: rc.RunSettings) -> None:
    """Multi-host setup before any device is touched: explicit coordinator settings, or jax's own
    detection on TPU pods / SLURM; nothing for a single process."""
    if run.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=run.coordinator_address, num_processes=run.num_processes,
                                   process_id=run.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the current step and exits."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no preemption handling
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal is not polite

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_process(self) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag


def _mean_records(window: list[dict]) -> dict:
    return {k: float(np.mean([w[k] for w in window])) for k in window[0] if k != "finite"}


class DevicePrefetch:
    """Batches already on the devices: `fill()` sends the next `depth` while the current step runs.

    `get_state()` is the wrapped loader's state before the first batch not yet handed out, so a checkpoint
    never skips the batches that were only prefetched."""

    def __init__(self, batches: Iterator[dict], put: Callable[[dict], dict], depth: int):
        self._batches, self._put, self._depth = batches, put, depth
        self._queue: collections.deque = collections.deque()  # (loader state before it, device batch)

    def fill(self) -> None:
        while len(self._queue) < self._depth:
            state = self._batches.get_state()
            batch = next(self._batches, None)
            if batch is None:
                return
            self._queue.append((state, self._put(batch)))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._queue:
            return self._queue.popleft()[1]
        return self._put(next(self._batches))

    def get_state(self):
        return self._queue[0][0] if self._queue else self._batches.get_state()


class Snapshots:
    """A hook for taking the parameters out during training (e.g. to evaluate them elsewhere): `due` is asked
    after every step; when it says yes, and after the last step, `take` gets the host parameters. The training
    clock is stopped meanwhile. Subclass it; this base takes none."""

    def due(self, step: int, train_seconds: float) -> bool:
        return False

    def take(self, step: int, train_seconds: float, params) -> None:
        pass


class _Clock:
    """Training wall time: from the loop's start (compilation included) plus what a resumed run had spent,
    without the time spent in evaluation and snapshots."""

    def __init__(self, spent: float = 0.0):
        self._start, self._paused = time.perf_counter() - spent, 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def pause(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t


def train(cfg: rc.RunConfig, task: Task, snapshots: Optional[Snapshots] = None) -> Result:
    """Train `task` under `cfg`: resume, step, log, evaluate, checkpoint. With `run.budget_minutes` the run
    stops when that much training time is spent (or at `run.steps`) and the learning rate follows the time."""
    r, c = cfg.run, cfg.checkpoint
    engine = build_engine(cfg, task, mesh_shape=task.mesh_shape)
    is_main = jax.process_index() == 0
    budget_s = r.budget_minutes * 60.0
    checkpointer = ckpt.Checkpointer(c.directory or os.path.join(r.output_dir, "checkpoints"), keep=c.keep,
                                     async_save=c.async_save)
    restored = checkpointer.restore_latest(engine.target()) if c.resume else None
    spent = 0.0
    if restored is not None:
        state, data_state, meta = restored
        task.train_batches.set_state(data_state)
        spent = float(meta.get("train_seconds", 0.0))
        log.info("resumed from step %d", int(state.step))
    else:
        state = engine.init_state(task.initial_params)
    if is_main:
        rc.save(cfg, os.path.join(r.output_dir, "config.yaml"))

    writer = mx.MetricsWriter(r.output_dir, enabled=is_main)
    peak = mx.peak_flops(jax.devices()[0].device_kind, r.peak_flops)
    start = int(state.step)
    state = engine.to_layout(state)
    bar = None
    if is_main and r.progress:
        from tqdm import tqdm

        bar = tqdm(total=None if budget_s else r.steps, initial=start, desc="train", dynamic_ncols=True)

    pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet fetched
    last: dict = {}
    timer = {"t": time.perf_counter(), "steps": 0, "compiled": False}
    skipped = 0

    def flush() -> Optional[str]:
        """Fetch pending metrics, log them; returns a diagnostic if a step was non-finite."""
        nonlocal last, skipped
        if not pending:
            return None
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        now = time.perf_counter()
        window = []
        for s, m in fetched:
            if not bool(m["finite"]):
                if r.nan_policy == "stop":
                    return (f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}, "
                            f"grad_norm={float(m['grad_norm'])})")
                skipped += 1
                log.warning("step %d: non-finite loss/gradient; update skipped (%d so far)", s, skipped)
                continue
            window.append(m)
        if window:
            record = _mean_records(window)
            if timer["compiled"] and timer["steps"]:
                record.update(mx.throughput((now - timer["t"]) / timer["steps"], r.global_batch_size, task.seq_len,
                                            task.flops_per_token, jax.device_count(), peak))
            last = record
            writer.write(fetched[-1][0], record)
            if bar is not None:
                post = {"loss": f"{record['loss']:.3f}"}
                for key, short in (("mlm_accuracy", "mlm_acc"), ("nsp_accuracy", "nsp_acc")):
                    if key in record:
                        post[short] = f"{record[key]:.3f}"
                if "tokens_per_sec" in record:
                    post["tok/s"] = f"{record['tokens_per_sec']:.0f}"
                bar.set_postfix(post, refresh=False)
        timer.update(t=now, steps=0, compiled=True)
        return None

    batches = DevicePrefetch(task.train_batches, engine.put, r.prefetch)

    clock = _Clock(spent)

    def save(step_now: int) -> None:
        checkpointer.save(step_now, engine.to_checkpoint(state), batches.get_state(),
                          extra={"train_seconds": clock.seconds()})

    def snapshot(step_now: int) -> None:
        with clock.pause():
            snapshots.take(step_now, clock.seconds(), engine.host_params(state))

    timed = budget_s > 0 or snapshots is not None  # keep one step in flight, so that the clock is the device's
    reason, message = "finished", ""
    with _StopFlag() as stop:
        def over(step: int) -> bool:
            return step >= r.steps or (budget_s > 0 and clock.seconds() >= budget_s)

        step_now, in_flight, stopped_at = start, None, clock.seconds()
        done = over(step_now)
        while not done:
            lr = optim.budget_lr(cfg.optim, step_now, clock.seconds() / budget_s) if budget_s else None
            batch = next(batches)
            state, m = engine.step(state, batch, lr)  # dispatched; the device works while the host goes on
            batches.fill()
            step_now += 1
            pending.append((step_now, m))
            timer["steps"] += 1
            if timed:
                jax.block_until_ready(in_flight if in_flight is not None else m)
                in_flight = m
            done = over(step_now)
            if done:
                stopped_at = clock.seconds()  # before the final checkpoint and evaluation
            if bar is not None:
                bar.update(1)
            at_log = step_now % r.log_every == 0 or done or not timer["compiled"]
            at_save = step_now % c.every == 0 or done
            preempt = stop.signal is not None if jax.process_count() == 1 else (at_log and stop.any_process())
            if at_log or at_save or preempt:
                if not timer["compiled"]:
                    jax.block_until_ready(m)
                problem = flush()
                if problem:
                    reason = "nonfinite"
                    good = checkpointer.all_steps()
                    message = (f"{problem}; stopping. The last good checkpoint is "
                               f"{'step ' + str(good[-1]) if good else 'none'} in {checkpointer.directory}")
                    break
            if preempt:
                save(step_now)
                reason = "preempted"
                message = f"signal received: saved a checkpoint at step {step_now}"
                break
            if at_save:
                save(step_now)
            if task.eval_batches is not None and r.eval_every and (step_now % r.eval_every == 0 or done):
                with clock.pause():
                    ev = engine.evaluate(state, task.eval_batches(), r.eval_batches)
                if ev:
                    writer.write(step_now, ev, split="eval")
                    last = {**last, **{f"eval_{k}": v for k, v in ev.items()}}
                timer["t"] = time.perf_counter()  # keep eval time out of the throughput
            if snapshots is not None and (done or snapshots.due(step_now, clock.seconds())):
                snapshot(step_now)
                timer["t"] = time.perf_counter()
    if bar is not None:
        bar.close()
    checkpointer.close()
    writer.close()
    if is_main and os.path.exists(writer.path):
        mx.plot(writer.path, os.path.join(r.output_dir, "metrics.png"))
    if message:
        (log.error if reason == "nonfinite" else log.warning)(message)
    if budget_s and reason == "finished":
        message = (f"budget of {r.budget_minutes:g} min spent: {step_now} steps in {stopped_at:.1f} s of training "
                   f"({clock.seconds():.1f} s with the final checkpoint)")
        log.info(message)
    return Result(step=step_now, reason=reason, last_metrics=last, message=message, train_seconds=clock.seconds())
