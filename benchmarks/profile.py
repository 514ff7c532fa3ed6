"""Where the flaxbert pretraining step's time goes: a profiler trace of a few steps, each XLA op put in
a bucket by the source location XLA kept in its metadata (attention, FFN, MLM/NSP head, embeddings,
optimizer, forward vs backward), and the host share = wall time not covered by device ops.

    python -m benchmarks.profile [--cell base:128:8] [--steps 3]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Optional, Sequence

import jax

from benchmarks import common, peers
from benchmarks.run import Cell, default_attention, model_config

CONTAINERS = ("while", "call", "conditional")  # events that enclose other ops' events
NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "Thunk", "XlaModule", "jit_")


def op_metadata(hlo_text: str) -> dict[str, str]:
    """instruction name -> op_name metadata (the JAX source path of the op), from optimized HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = op.group(1) if op else ""
    return out


def category(op_name: str, instr: str) -> str:
    """(component, pass) of one op. Ops without metadata are XLA's own: layout copies, the zero
    buffers and slices that stack the scanned layers' activations and gradients."""
    if not op_name:
        return "XLA bookkeeping (copies, zero buffers, scan stacking)"
    backward = "transpose(" in op_name
    in_model = "jvp(" in op_name or backward
    if not in_model:
        return "optimizer (clip + AdamW)" if not re.search(r"cross_entropy|log_softmax|logsumexp", op_name) else \
            "loss (forward)"
    if "/attention" in op_name:
        part = "attention"
    elif re.search(r"/intermediate|/layers/output|output_norm|gelu|erf", op_name):
        part = "FFN"
    elif re.search(r"pretraining/(mlm|nsp)|attend", op_name):
        part = "MLM + NSP head"
    elif "embeddings" in op_name:
        part = "embeddings"
    else:
        part = "other model ops (loss, masks, pooler, scan glue)"
    return f"{part} ({'backward' if backward else 'forward'})"


def breakdown(trace_file: str, metadata: dict[str, str], steps: int) -> dict[str, float]:
    trace = json.load(gzip.open(trace_file))
    totals: collections.Counter = collections.Counter()
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        name = e.get("args", {}).get("hlo_op", e["name"])
        if name.startswith(NOT_OPS) or re.sub(r"\.\d+$", "", name) in CONTAINERS:
            continue
        if name not in metadata and e["name"] not in metadata:
            continue
        totals[category(metadata.get(name, metadata.get(e["name"], "")), name)] += e["dur"] / 1e6
    return {k: v / steps for k, v in totals.items()}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", default="base:128:8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default="")
    common.add_host_malloc_flag(ap)
    args = ap.parse_args(argv)
    common.setup_host(args.host_malloc)
    platform = jax.devices()[0].platform
    cell = Cell.parse(args.cell, "float32" if platform == "cpu" else "bfloat16", default_attention(platform))
    config = model_config(cell)
    batch = common.pretraining_batch(config, cell.batch, cell.seq, cell.predictions)
    runner = peers.flaxbert_runner(config, peers.init_params(config), batch)
    metadata = op_metadata(runner.compiled.as_text())
    for _ in range(2):
        runner.step()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            runner.step()
        wall = (time.perf_counter() - t0) / args.steps
        jax.profiler.stop_trace()
        files = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))
        parts = breakdown(files[-1], metadata, args.steps)
    device = sum(parts.values())
    parts["host (wall time not covered by device ops)"] = max(wall - device, 0.0)
    rows = sorted(parts.items(), key=lambda kv: -kv[1])
    lines = [f"flaxbert pretraining step, {cell.label}, {jax.devices()[0].device_kind}; {wall:.3f} s/step under the "
             f"profiler (load average {common.load_average()[0]:.1f})", "",
             "| where | ms/step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e3:.1f} | {v / wall:.1%} |" for k, v in rows]
    md = "\n".join(lines) + "\n"
    print(md)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": common.machine_info(),
              "cell": args.cell, "wall_seconds_per_step": wall, "seconds_per_step": dict(rows)}
    tag = args.tag or f"profile-{platform}"
    common.write_report(args.out, tag, report, md)
    return report


if __name__ == "__main__":
    main()
