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
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxbert import run_config as rc
from flaxbert.train import checkpoint as ckpt
from flaxbert.train import writer as mx
from flaxbert.train import optim
from flaxbert.train import step as st
from flaxbert.train.engine import build_engine
from flaxbert.train.phases import PhasedBatches, ShortRows

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything model- and data-specific that the loop trains (a pretraining or fine-tuning job)."""

    init_params: Callable[[jax.Array], Any]  # rng -> fresh float32 params
    logical_axes: Any  # tree of logical PartitionSpecs matching init_params' output
    loss_fn: st.LossFn  # see flaxbert/train/step.py
    train_batches: Iterator[dict]  # host-local numpy batches (this host's share); get_state()/set_state()
    seq_len: float  # tokens per row, for the throughput (fine-tuning passes its mean real length)
    flops_per_token: float = 0.0  # for MFU; 0 = not reported
    eval_batches: Optional[Callable[[], Iterable[dict]]] = None  # a fresh pass over held-out host-local batches
    initial_params: Any = None  # host arrays to start from (e.g. an HF checkpoint) instead of init_params
    mesh_shape: Optional[tuple[int, int, int]] = None  # (data, fsdp, tensor) if the run config was validated
    progress_keys: tuple[tuple[str, str], ...] = (("accuracy", "acc"),)  # (metric, short name) on the bar
    short_rows: Optional[ShortRows] = None  # a first phase on shorter rows, before train_batches (phases.py)


@dataclasses.dataclass(frozen=True)
class Result:
    step: int  # optimizer steps done
    reason: str  # finished | preempted | nonfinite | diverged
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
    clock is stopped meanwhile. `take` may return records {split: metrics}, which the loop writes to its
    metrics.jsonl at that step (an evaluation's scores beside the training records). Subclass it; this base
    takes none."""

    def due(self, step: int, train_seconds: float) -> bool:
        return False

    def take(self, step: int, train_seconds: float, params) -> Optional[Mapping[str, Mapping[str, float]]]:
        return None


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


class _Failure(NamedTuple):
    kind: str  # nonfinite | diverged (the run's reason)
    first_step: int  # where it began
    message: str


class _Progress:
    """The logged side of a run: pending device metrics fetched at log points, the metrics file, the progress
    bar (with the task's own keys) and the throughput of the steps since the last fetch."""

    def __init__(self, cfg: rc.RunConfig, task: Job, is_main: bool, start: int, budget: bool):
        r = cfg.run
        self.cfg, self.task = cfg, task
        self.writer = mx.MetricsWriter(r.output_dir, enabled=is_main)
        self.writer.rewind(start)  # steps logged after the restored checkpoint are retrained: never twice
        self.peak = mx.peak_flops(jax.devices()[0].device_kind, r.peak_flops)
        self.bar = None
        if is_main and r.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=None if budget else r.steps, initial=start, desc="train", dynamic_ncols=True)
        self.pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet fetched
        self.last: dict = {}
        self.t, self.steps, self.compiled, self.skipped = time.perf_counter(), 0, False, 0
        self.spikes = _SpikeWatch(cfg.run.spike_factor, cfg.run.spike_steps)
        self.seq_len, self.flops_per_token = task.seq_len, task.flops_per_token  # of the phase being trained

    def new_phase(self, seq_len: float, flops_per_token: float) -> None:
        """Rows of another length from the next step on: its first window compiles, so it reports no speed."""
        self.seq_len, self.flops_per_token, self.compiled = seq_len, flops_per_token, False

    def flush(self) -> Optional[_Failure]:
        """Fetch pending metrics and log them; a `_Failure` if a step was non-finite or the loss diverged."""
        if not self.pending:
            return None
        r = self.cfg.run
        fetched = [(s, jax.device_get(m)) for s, m in self.pending]
        self.pending.clear()
        now = time.perf_counter()
        window = []
        for s, m in fetched:
            if not bool(m["finite"]):
                if r.nan_policy == "stop":
                    return _Failure("nonfinite", s, f"non-finite loss or gradient at step {s} "
                                                    f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])})")
                self.skipped += 1
                log.warning("step %d: non-finite loss/gradient; update skipped (%d so far)", s, self.skipped)
                continue
            diverged = self.spikes.see(s, float(m["loss"]))
            if diverged:
                if r.nan_policy == "stop":
                    return _Failure("diverged", self.spikes.first, diverged)
                log.warning("%s (nan_policy=skip: the updates were applied; training goes on)", diverged)
            window.append(m)
        if window:
            record = _mean_records(window)
            if self.compiled and self.steps:
                record.update(mx.throughput((now - self.t) / self.steps, r.global_batch_size, self.seq_len,
                                            self.flops_per_token, jax.device_count(), self.peak))
            if self.task.short_rows is not None:
                record["seq_len"] = float(self.seq_len)
            self.last = record
            self.writer.write(fetched[-1][0], record)
            self._show(record)
        self.t, self.steps, self.compiled = now, 0, True
        return None

    def _show(self, record: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{record['loss']:.3f}"}
        post.update({short: f"{record[key]:.3f}" for key, short in self.task.progress_keys if key in record})
        if "tokens_per_sec" in record:
            post["tok/s"] = f"{record['tokens_per_sec']:.0f}"
        self.bar.set_postfix(post, refresh=False)

    def evaluated(self, step: int, ev: dict) -> None:
        if ev:
            self.writer.write(step, ev, split="eval")
            self.last = {**self.last, **{f"eval_{k}": v for k, v in ev.items()}}
        self.t = time.perf_counter()  # keep eval time out of the throughput

    def close(self, is_main: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        if is_main and os.path.exists(self.writer.path):
            mx.plot(self.writer.path, os.path.join(self.cfg.run.output_dir, "metrics.png"))


class _SpikeWatch:
    """Divergence short of NaN: a loss above `factor` x the median of the last 100 normal steps for `steps`
    steps in a row (off when factor is 0). Spiking losses do not enter the median."""

    def __init__(self, factor: float, steps: int, window: int = 100, warm: int = 20):
        self.factor, self.steps, self.window, self.warm = factor, steps, window, warm
        self.history: collections.deque = collections.deque(maxlen=window)
        self.run, self.first = 0, None

    def see(self, step: int, loss: float) -> Optional[str]:
        if not self.factor:
            return None
        if len(self.history) >= self.warm:
            median = float(np.median(self.history))
            if loss > self.factor * median:
                self.run, self.first = self.run + 1, self.first if self.run else step
                if self.run >= self.steps:
                    return (f"the loss diverged: {loss:.4g} at step {step}, above {self.factor:g} x the median "
                            f"{median:.4g} of the last {len(self.history)} steps for {self.run} steps in a row "
                            f"(since step {self.first})")
                return None
        self.run, self.first = 0, None
        self.history.append(loss)
        return None


class _Resumed(NamedTuple):
    state: Any  # in the checkpoint layout
    train_seconds: float  # training time already spent
    lr_origin_s: Optional[float]  # where a budget run's schedule clock starts (None: not yet known)


def _restore(cfg: rc.RunConfig, task: Job, engine, checkpointer, batches) -> _Resumed:
    """The latest good checkpoint with the `batches` put back to their position, or a fresh state."""
    restored = checkpointer.restore_latest(engine.target()) if cfg.checkpoint.resume else None
    if restored is None:
        return _Resumed(engine.init_state(task.initial_params), 0.0, None)
    state, data_state, meta = restored
    batches.set_state(data_state)
    log.info("resumed from step %d", int(state.step))
    origin = meta.get("lr_origin_s")
    return _Resumed(state, float(meta.get("train_seconds", 0.0)), None if origin is None else float(origin))


def train(cfg: rc.RunConfig, task: Job, snapshots: Optional[Snapshots] = None) -> Result:
    """Train `task` under `cfg`: resume, step, log, evaluate, checkpoint. With `run.budget_minutes` the run
    stops when that much training time is spent (or at `run.steps`) and the learning rate follows the time."""
    r, c = cfg.run, cfg.checkpoint
    engine = build_engine(cfg, task, mesh_shape=task.mesh_shape)
    is_main = jax.process_index() == 0
    checkpointer = ckpt.Checkpointer(cfg.checkpoint_dir(), keep=c.keep, async_save=c.async_save)
    batches = task.train_batches if task.short_rows is None else PhasedBatches(task.short_rows.batches,
                                                                                 task.train_batches)
    resumed = _restore(cfg, task, engine, checkpointer, batches)
    if is_main:
        rc.save(cfg, os.path.join(r.output_dir, "config.yaml"))
    run = _Run(cfg, task, engine, checkpointer, snapshots, resumed, batches)
    progress = _Progress(cfg, task, is_main, run.step, run.budget_s > 0)
    if isinstance(batches, PhasedBatches) and batches.phase == 0:
        progress.new_phase(task.short_rows.seq_len, task.short_rows.flops_per_token)
    try:
        reason, message = run.loop(progress)
    finally:
        progress.close(is_main)
        checkpointer.close()
    if message:
        (log.error if reason in ("nonfinite", "diverged") else log.warning)(message)
    if run.budget_s and reason == "finished":
        message = (f"budget of {r.budget_minutes:g} min spent: {run.step} steps in {run.stopped_at:.1f} s of "
                   f"training ({run.clock.seconds():.1f} s with the final checkpoint)")
        log.info(message)
    return Result(step=run.step, reason=reason, last_metrics=progress.last, message=message,
                  train_seconds=run.clock.seconds())


class _Run:
    """The stepping side of a run: the state, its clock, the prefetched batches, and what happens after each
    step (fetch and log, checkpoint, preemption, held-out evaluation, snapshots)."""

    def __init__(self, cfg: rc.RunConfig, task: Job, engine, checkpointer, snapshots, resumed: _Resumed, batches):
        self.cfg, self.task, self.engine, self.checkpointer, self.snapshots = cfg, task, engine, checkpointer, snapshots
        self.budget_s = cfg.run.budget_minutes * 60.0
        self.step = int(resumed.state.step)
        self.state = engine.to_layout(resumed.state)
        self.phased = batches if isinstance(batches, PhasedBatches) else None
        self.batches = DevicePrefetch(batches, engine.put, cfg.run.prefetch)
        self.clock = _Clock(resumed.train_seconds)
        # A budget run's schedule runs on the time after its first step has compiled and run: compilation
        # (10 s or more) would otherwise use up a short warmup before any step had seen a warm rate.
        self.lr_origin_s = resumed.lr_origin_s
        self.stopped_at = self.clock.seconds()
        # keep one step in flight when the clock matters, so that it measures the device's time
        self.timed = self.budget_s > 0 or snapshots is not None

    def over(self) -> bool:
        return self.step >= self.cfg.run.steps or (self.budget_s > 0 and self.clock.seconds() >= self.budget_s)

    def save(self) -> None:
        extra = {"train_seconds": self.clock.seconds()}
        if self.lr_origin_s is not None:
            extra["lr_origin_s"] = self.lr_origin_s
        self.checkpointer.save(self.step, self.engine.to_checkpoint(self.state), self.batches.get_state(), extra=extra)

    def phase_due(self) -> bool:
        """Whether the next step belongs to phase 2 of a sequence-length schedule while phase 1's rows are still
        being fed: the share of run.steps done, or of a budget run's schedule time, has reached the short share."""
        if self.phased is None or self.phased.phase == 1:
            return False
        done = self.budget_progress() if self.budget_s else self.step / self.cfg.run.steps
        return done >= self.task.short_rows.share

    def next_phase(self, progress: _Progress) -> None:
        """From the next step on, the full rows (the short rows already on the devices are dropped)."""
        self.phased.advance()
        self.batches = DevicePrefetch(self.phased, self.engine.put, self.cfg.run.prefetch)
        progress.new_phase(self.task.seq_len, self.task.flops_per_token)
        log.info("step %d: the sequence-length schedule's second phase starts: rows of %d tokens from here on",
                 self.step, self.task.seq_len)

    def budget_progress(self) -> float:
        """The share of a budget run's schedule spent: 0 until the first step has run, then the time since
        then over the budget left after it."""
        if self.lr_origin_s is None:
            return 0.0
        return (self.clock.seconds() - self.lr_origin_s) / max(self.budget_s - self.lr_origin_s, 1e-9)

    def one_step(self, progress: _Progress, in_flight):
        lr = optim.budget_lr(self.cfg.optim, self.step, self.budget_progress()) if self.budget_s else None
        self.state, m = self.engine.step(self.state, next(self.batches), lr)  # dispatched; the host goes on
        self.batches.fill()
        self.step += 1
        progress.pending.append((self.step, m))
        progress.steps += 1
        if self.timed:
            jax.block_until_ready(in_flight if in_flight is not None else m)
        if self.budget_s and self.lr_origin_s is None:
            jax.block_until_ready(m)
            self.lr_origin_s = self.clock.seconds()
        if progress.bar is not None:
            progress.bar.update(1)
        return m

    def loop(self, progress: _Progress) -> tuple[str, str]:
        """Steps until the end, a non-finite step or a signal: (reason, message)."""
        r, c = self.cfg.run, self.cfg.checkpoint
        with _StopFlag() as stop:
            in_flight, done = None, self.over()
            switch = self.phase_due()
            while not done:
                if switch:
                    self.next_phase(progress)
                in_flight = m = self.one_step(progress, in_flight)
                done = self.over()
                if done:
                    self.stopped_at = self.clock.seconds()  # before the final checkpoint and evaluation
                switch = not done and self.phase_due()  # a phase's last step ends a logging window
                at_log = self.step % r.log_every == 0 or done or not progress.compiled or switch
                at_save = self.step % c.every == 0 or done
                preempt = stop.signal is not None if jax.process_count() == 1 else (at_log and stop.any_process())
                if at_log or at_save or preempt:
                    if not progress.compiled:
                        jax.block_until_ready(m)
                    failure = progress.flush()
                    if failure:  # the last good checkpoint was written before the first bad step
                        good = [s for s in self.checkpointer.all_steps() if s < failure.first_step]
                        return failure.kind, (f"{failure.message}; stopping. The last good checkpoint is "
                                             f"{'step ' + str(good[-1]) if good else 'none'} in "
                                             f"{self.checkpointer.directory}")
                if preempt:
                    self.save()
                    return "preempted", f"signal received: saved a checkpoint at step {self.step}"
                if at_save:
                    self.save()
                self.evaluate(progress, done)
        return "finished", ""

    def evaluate(self, progress: _Progress, done: bool) -> None:
        """Held-out evaluation and snapshots when due, with the training clock stopped."""
        r, task, snapshots = self.cfg.run, self.task, self.snapshots
        if task.eval_batches is not None and r.eval_every and (self.step % r.eval_every == 0 or done):
            with self.clock.pause():
                ev = self.engine.evaluate(self.state, task.eval_batches(), r.eval_batches)
            progress.evaluated(self.step, ev)
        if snapshots is not None and (done or snapshots.due(self.step, self.clock.seconds())):
            with self.clock.pause():
                records = snapshots.take(self.step, self.clock.seconds(), self.engine.host_params(self.state))
            for split, metrics in (records or {}).items():
                progress.writer.write(self.step, metrics, split=split)
            progress.t = time.perf_counter()
