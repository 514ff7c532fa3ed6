"""Training metrics sinks (metrics.jsonl, TensorBoard via tensorboardX when it is installed, a PNG of the
curves) and throughput/MFU accounting. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterable, Mapping, Optional

log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per *JAX device* (a TPU v2/v3 device is one core; v4 and later one chip).
# Matched as a case-insensitive substring of `device.device_kind`, most specific first.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),  # Trillium / v6e
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 61.5e12),
    ("TPU v2", 22.5e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("V100", 125e12),
)


def peak_flops(device_kind: str, override: float = 0.0) -> Optional[float]:
    """Per-device peak FLOP/s for MFU: the override if given, else the table; None if unknown (CPU)."""
    if override > 0:
        return override
    kind = device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind:
            return flops
    return None


def throughput(step_seconds: float, sequences: int, seq_len: int, flops_per_token: float, devices: int,
               peak: Optional[float]) -> dict:
    """seq/s, tokens/s (all positions) and MFU = achieved model FLOP/s / (peak x devices)."""
    tokens = sequences * seq_len
    out = {"step_time": step_seconds, "seq_per_sec": sequences / step_seconds, "tokens_per_sec": tokens / step_seconds}
    if peak:
        out["mfu"] = flops_per_token * out["tokens_per_sec"] / (peak * devices)
    return out


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            try:  # optional: an accelerator image may lack it, and metrics.jsonl holds every record anyway
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: metrics go to %s only (pip install tensorboardX "
                            "for TensorBoard)", self.path)
            else:
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def rewind(self, step: int) -> int:
        """Start logging after `step` (where the run resumes, 0 for a fresh start): records of later steps, from
        a run that stopped before checkpointing them, move to metrics.dropped.jsonl with a notice, so that
        metrics.jsonl never holds a step twice. Returns how many moved."""
        if not self.enabled or not os.path.isfile(self.path):
            return 0
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        keep, later = [], []
        for line in lines:
            try:
                (keep if json.loads(line).get("step", 0) <= step else later).append(line)
            except ValueError:  # a line torn by a kill: not a record
                later.append(line)
        if not later:
            return 0
        with open(os.path.join(os.path.dirname(self.path), "metrics.dropped.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(later)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        log.warning("%s: %d records after step %d come from a run that stopped before checkpointing them; "
                    "moved to metrics.dropped.jsonl (%s)", self.path, len(later), step,
                    "no checkpoint to resume from: starting at step 0" if step == 0 else f"resuming at step {step}")
        return len(later)

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: float(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if self._tb is not None and math.isfinite(float(v)):
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def latest_by_step(records: Iterable[dict], split: str = "train") -> dict[int, dict]:
    """The last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r for r in records if r.get("split") == split}


def plot(jsonl_path: str, png_path: str) -> str:
    """PNG of loss, MLM/NSP accuracy (train and eval) and the learning rate against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    panels = [("loss", ("loss", "mlm_loss", "nsp_loss")), ("accuracy", ("mlm_accuracy", "nsp_accuracy")),
              ("learning rate", ("lr",))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, keys) in zip(axes, panels):
        for split, style in (("train", "-"), ("eval", "o--")):
            rows = sorted(latest_by_step(records, split).values(), key=lambda r: r["step"])
            for key in keys:
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, label=f"{split} {key}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
