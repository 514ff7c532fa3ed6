"""The pretraining benchmark: a grid of model size x sequence length x batch, flaxbert against HF
PyTorch and HF Flax on the same config, weights and batch, after a loss-parity check.

    python -m benchmarks                      # the default grid for this platform (CPU: tiny/base x 128/512)
    python -m benchmarks --quick              # one tiny cell, for development
    python -m benchmarks --cells base:128:8 --rounds 7

For every cell: compile time, median step time, tokens/s and sequences/s, MFU against the matmul ceiling
measured in the same rounds and against the datasheet peak (GPU/TPU), and memory. Writes JSON, a
markdown table and a PNG chart to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import jax

from benchmarks import common, peers
from flaxbert.config import BertConfig

PEERS = tuple(peers.PRETRAINING_PEERS)


@dataclasses.dataclass(frozen=True)
class Cell:
    size: str
    seq: int
    batch: int
    dtype: str = "float32"
    attention_impl: str = "xla"

    @property
    def predictions(self) -> int:
        return max(1, self.seq * 20 // 128)  # BERT: 20 masked positions at 128, 80 at 512

    @property
    def label(self) -> str:
        return f"{self.size} s{self.seq} b{self.batch} {self.dtype}"

    @classmethod
    def parse(cls, text: str, dtype: str, attention_impl: str) -> "Cell":
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--cells entry {text!r}: expected size:seq:batch[:dtype]")
        return cls(parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) == 4 else dtype, attention_impl)


def default_attention(platform: str) -> str:
    return "cudnn" if platform == "gpu" else "xla"


def default_grid(platform: str) -> list[Cell]:
    if platform == "cpu":
        return [Cell("tiny", 128, 32), Cell("tiny", 512, 8), Cell("base", 128, 8), Cell("base", 512, 2)]
    attn = default_attention(platform)
    return [Cell(size, seq, batch, "bfloat16", attn)
            for size, seq, batch in (("base", 128, 128), ("base", 512, 32), ("large", 128, 64), ("large", 512, 16))]


def model_config(cell: Cell) -> BertConfig:
    return BertConfig.preset(cell.size, dtype=cell.dtype, attention_impl=cell.attention_impl,
                             max_position_embeddings=max(512, cell.seq))


def run_cell(cell: Cell, peer_names: Sequence[str], *, warmup: int, rounds: int, log=print) -> dict:
    config = model_config(cell)
    batch = common.pretraining_batch(config, cell.batch, cell.seq, cell.predictions)
    params = peers.init_params(config)
    runners = [peers.flaxbert_runner(config, params, batch)]
    log(f"[{cell.label}] flaxbert compiled in {runners[0].compile_seconds:.1f} s")
    available, skipped = peers.available(peer_names)
    for name, why in skipped.items():
        log(f"[{cell.label}] {name} skipped: {why}")
    hf_dir = common.hf_copy(params, config, "pretraining") if available else None
    try:
        for name in available:
            runners.append(peers.PRETRAINING_PEERS[name].make(hf_dir.name, config, batch))
            if runners[-1].compile_seconds is not None:
                log(f"[{cell.label}] {runners[-1].name} compiled in {runners[-1].compile_seconds:.1f} s")
    finally:
        if hf_dir is not None:
            hf_dir.cleanup()
    losses = {r.name: r.loss() for r in runners}
    diffs = peers.check_parity(losses["flaxbert"], {k: v for k, v in losses.items() if k != "flaxbert"},
                               peers.parity_rtol(config))
    log(f"[{cell.label}] parity ok: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    contenders = [common.Contender(r.name, r.step) for r in runners]
    ceiling = common.matmul_ceiling_contenders(cell.dtype)
    load_before = common.load_average()
    common.interleaved(contenders + ceiling, warmup=warmup, rounds=rounds)
    ceiling_flops = common.ceiling_flops(ceiling)
    peak = common.machine_info()["datasheet_peak_flops"]
    tokens = cell.batch * cell.seq
    flops_per_token = config.flops_per_token(cell.seq, masked_fraction=cell.predictions / cell.seq)
    rows = []
    for r, c in zip(runners, contenders):
        tps = tokens / c.median
        rows.append({"contender": r.name, "compile_seconds": r.compile_seconds, "step_seconds": c.median,
                     "step_seconds_all": c.times, "tokens_per_sec": tps, "sequences_per_sec": cell.batch / c.median,
                     "model_flops_per_sec": flops_per_token * tps,
                     "mfu_vs_ceiling": flops_per_token * tps / ceiling_flops,
                     "mfu_vs_datasheet": flops_per_token * tps / (peak * jax.device_count()) if peak else None,
                     "peak_rss_bytes": c.peak_rss, "peak_device_bytes": r.peak_device_bytes(),
                     "xla_step_bytes": common.compiled_bytes(r.compiled),
                     "parity_loss": losses[r.name], "parity_rel_diff": diffs.get(r.name, 0.0)})
    base = rows[0]["tokens_per_sec"]
    for row in rows:
        row["flaxbert_speedup_over_this"] = base / row["tokens_per_sec"]
    device_peak = common.device_peak_bytes()
    result = {"cell": dataclasses.asdict(cell), "label": cell.label, "predictions": cell.predictions,
              "model_flops_per_token": flops_per_token, "ceiling_flops": ceiling_flops,
              "ceiling_shapes": {c.name: c.flops / c.median for c in ceiling}, "datasheet_peak_flops": peak,
              "device_peak_bytes_process": device_peak, "load_average_before": load_before,
              "load_average_after": common.load_average(), "rows": rows, "skipped_peers": skipped}
    for row in rows:
        log(f"[{cell.label}] {row['contender']:<22} {row['step_seconds']:.3f} s/step  {row['tokens_per_sec']:9.1f} tok/s  "
            f"MFU {row['mfu_vs_ceiling']:.1%} of {ceiling_flops / 1e9:.0f} GFLOP/s  "
            f"flaxbert x{row['flaxbert_speedup_over_this']:.2f}")
    return result


# ----- output -----------------------------------------------------------------------------------

def _gib(n: Optional[int]) -> str:
    return "–" if not n else f"{n / 2**30:.2f} GiB"


def markdown(report: dict) -> str:
    m = report["machine"]
    load = report.get("load_average_end", m["load_average_start"])
    lines = [f"Machine: {m['device_count']}x {m['device_kind']} ({m['platform']}), host {m['host_cpu']}, "
             f"{m['host_cores']} cores; load average {m['load_average_start'][0]:.1f} at start, {load[0]:.1f} at end; "
             f"jax {m['jax']}, torch {m['torch']}, transformers {m['transformers']}; host malloc "
             f"{m.get('host_malloc', 'system').split(' ')[0]}; {report['date']}.",
             "",
             "| cell | contender | compile (s) | step (s, median) | tokens/s | seq/s | flaxbert × | MFU vs matmul ceiling "
             "| MFU vs datasheet | memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for cell in report["cells"]:
        skipped += [f"{name} on {cell['label']}: {why}" for name, why in cell.get("skipped_peers", {}).items()]
        on_device = cell.get("device_peak_bytes_process") is not None
        for row in cell["rows"]:
            mem = [f"RSS {_gib(row['peak_rss_bytes'])}"] if not on_device else []
            if row["peak_device_bytes"]:
                mem = [_gib(row["peak_device_bytes"])]
            if row.get("xla_step_bytes"):
                mem.append(f"step {_gib(row['xla_step_bytes'])}")
            mem = "; ".join(mem) or "–"
            compile_s = "eager" if row["compile_seconds"] is None else f"{row['compile_seconds']:.1f}"
            dsheet = "–" if row["mfu_vs_datasheet"] is None else f"{row['mfu_vs_datasheet']:.1%}"
            lines.append(f"| {cell['label']} | {row['contender']} | {compile_s} | {row['step_seconds']:.3f} | "
                         f"{row['tokens_per_sec']:.0f} | {row['sequences_per_sec']:.2f} | "
                         f"{row['flaxbert_speedup_over_this']:.2f} | {row['mfu_vs_ceiling']:.1%} of "
                         f"{cell['ceiling_flops'] / 1e9:.0f} GFLOP/s | {dsheet} | {mem} |")
    lines += ["", "flaxbert × = flaxbert's tokens/s divided by the row's. MFU counts the FLOPs the model needs "
              "(encoder, pooler, MLM head at the masked positions only), forward + backward = 3 × forward; "
              "the ceiling is the best fp32/bf16 matmul rate measured in the same rounds. CPU memory is the "
              "process RSS while the contender ran (all contenders share the process); `step` is XLA's own "
              "account of the compiled step (arguments + outputs + temporaries, less donated aliases); on "
              "GPU/TPU HF PyTorch's figure is PyTorch's peak allocation, and the process's device peak (all JAX "
              "contenders so far) is in the JSON as `device_peak_bytes_process`."]
    lines += [f"Skipped: {s}." for s in skipped]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = report["cells"]
    names = sorted({r["contender"] for c in cells for r in c["rows"]}, key=lambda n: (n != "flaxbert", n))
    x = np.arange(len(cells))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(cells)), 4))
    for i, name in enumerate(names):
        values = [next((r["tokens_per_sec"] for r in c["rows"] if r["contender"] == name), 0) for c in cells]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, [c["label"] for c in cells], fontsize=8)
    ax.set_ylabel("training tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"BERT pretraining step, {report['machine']['device_kind']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out_dir: str, tag: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{tag}.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(report))
    chart(report, paths[2])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="", help="comma-separated size:seq:batch[:dtype] (default: the platform grid)")
    ap.add_argument("--quick", action="store_true", help="one tiny cell, 3 rounds: a development run")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {PEERS}, or 'none'")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention-impl", default="", help="xla | dot_product_attention | cudnn (default per platform)")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per contender (interleaved)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default="", help="output file stem (default: pretrain-<platform>[-quick])")
    common.add_host_malloc_flag(ap)
    args = ap.parse_args(argv)
    common.setup_host(args.host_malloc)
    platform = jax.devices()[0].platform
    attn = args.attention_impl or default_attention(platform)
    if args.quick:
        cells = [Cell("tiny", 128, 16, args.dtype, attn)]
        args.rounds = min(args.rounds, 3)
    elif args.cells:
        cells = [Cell.parse(c, args.dtype, attn) for c in args.cells.split(",") if c]
    else:
        cells = default_grid(platform)
    peer_names = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    unknown = set(peer_names) - set(PEERS)
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    t0 = time.time()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": common.machine_info(),
              "settings": {"warmup": args.warmup, "rounds": args.rounds, "peers": peer_names}, "cells": []}
    for cell in cells:
        report["cells"].append(run_cell(cell, peer_names, warmup=args.warmup, rounds=args.rounds))
    report["load_average_end"] = common.load_average()
    report["wall_seconds"] = time.time() - t0
    tag = args.tag or f"pretrain-{platform}{'-quick' if args.quick else ''}"
    for p in write_outputs(report, args.out, tag):
        print("wrote", p)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
