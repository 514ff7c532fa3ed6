"""A/B measurements of speed techniques: each variant against its baseline in the same process,
interleaved, median step times, with the gain predicted before measuring.

    python -m benchmarks.techniques [--only scan,remat_dots] [--rounds 5] [--cell base:128:8]

Pretraining variants run on the `--cell` config (default BERT-base, seq 128, batch 8, fp32); fine-tuning
variants on all-MiniLM-L6-v2 with SST-2 batches (see benchmarks/finetune_sst2.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from benchmarks import common, peers
from benchmarks.run import Cell, model_config


def _flops_ratio(config, seq, predictions) -> float:
    full = config.flops_per_token(seq, masked_fraction=1.0)
    return full / config.flops_per_token(seq, masked_fraction=predictions / seq)


def pretraining_variants(cell: Cell) -> dict[str, tuple[str, Callable]]:
    """name -> (prediction, build() -> (baseline Runner, variant Runner))."""
    config = model_config(cell)
    batch = common.pretraining_batch(config, cell.batch, cell.seq, cell.predictions)
    params = peers.init_params(config)

    def pair(variant_config=None, variant_batch=None, baseline_kw=None, **variant_kw):
        def build():
            base = peers.flaxbert_runner(config, params, batch, name="baseline", **(baseline_kw or {}))
            var = peers.flaxbert_runner(variant_config or config, params, variant_batch or batch, name="variant",
                                        **variant_kw)
            return base, var
        return build

    every = dict(batch)  # MLM logits at every position: what HF computes
    every["masked_lm_positions"] = np.broadcast_to(np.arange(cell.seq, dtype=np.int32), batch["input_ids"].shape).copy()
    every["masked_lm_ids"] = batch["input_ids"]
    every["masked_lm_weights"] = np.ones(batch["input_ids"].shape, np.float32)
    r = _flops_ratio(config, cell.seq, cell.predictions)
    return {
        "a_a_noise_floor": ("the baseline against itself: 1.00x; the measured spread is this run's noise floor",
                            pair()),
        "mlm_masked_only": (f"logits at {cell.predictions} masked positions instead of all {cell.seq}: model FLOPs "
                            f"ratio {r:.2f}, so the variant (all positions) should take ~{r:.2f}x the time",
                            pair(variant_batch=every)),
        "unrolled_layers": ("scan_layers=False: same FLOPs; XLA sees every layer (maybe better fusion, no "
                            "stacking copies) but compiles ~L times more code: step ~1.0x, compile slower",
                            pair(config.replace(scan_layers=False))),
        "remat_dots": ("remat 'dots': saves matmul outputs, recomputes elementwise ops in the backward: "
                       "~5-10% slower on CPU (no memory pressure to relieve)", pair(config.replace(remat_policy="dots"))),
        "remat_full": ("remat 'full': recomputes each layer's forward in the backward: +~33% FLOPs, ~1.3x slower",
                       pair(config.replace(remat_policy="full"))),
        "host_sync_every_step": ("read the loss back every step: on CPU the step is synchronous anyway, ~1.0x; "
                                 "on an accelerator it stalls the dispatch queue", pair(host_sync=True)),
        "no_donation": ("no buffer donation: params and optimizer state are copied instead of updated in place: "
                        "a few % slower, 2x state memory", pair(donate=False)),
        "no_dropout": ("dropout off (deterministic): saves the threefry random bits for ~60M dropout mask "
                       "elements: ~5% faster (information only: real training keeps dropout)", pair(dropout=False)),
        "attention_dot_product": ("attention through jax.nn.dot_product_attention (XLA implementation on CPU): "
                                  "~1.0x; on GPU this is the cuDNN flash path",
                                  pair(config.replace(attention_impl="dot_product_attention"), dropout=True)),
    }


def finetune_variants(rounds_batches: int = 16) -> dict[str, tuple[str, Callable]]:
    from benchmarks import finetune_sst2 as ft
    from flaxbert import hf
    from flaxbert.infer import batching
    from flaxbert.finetune.task_data import FeatureSettings, load_task_data, make_features
    from flaxbert.finetune.tasks import get_task

    state = {}

    def setup():
        if not state:
            model = hf.load_pretrained(str(common.minilm_dir()), head="sequence_classification", num_labels=2)
            task = get_task("sst2")
            train = load_task_data(task, str(ft.REPO / ft.DEFAULT_DATA)).train
            idx = np.random.default_rng(0).choice(len(train), 32 * rounds_batches, replace=False)
            feats = make_features(task, model.tokenizer, [train[i] for i in idx], FeatureSettings(ft.MAX_LENGTH), True)
            state.update(model=model, task=task, feats=feats)
        return state

    def buckets(smallest):
        s = setup()
        return list(batching.make_batches(s["feats"], 32, batching.bucket_boundaries(ft.MAX_LENGTH, smallest),
                                          shuffle=True, seed=0))

    def pair(base_smallest=16, var_smallest=16, var_config=None, host_sync=False):
        def build():
            s = setup()
            base, _ = ft.flaxbert_pass("baseline", s["task"], s["model"].config, s["model"].params, buckets(base_smallest))
            var, _ = ft.flaxbert_pass("variant", s["task"], var_config(s["model"].config) if var_config else
                                      s["model"].config, s["model"].params, buckets(var_smallest), host_sync=host_sync)
            base.compile_seconds = var.compile_seconds = None
            for p in (base, var):  # warm-up compiles every bucket shape
                p.run(p.batches)
            return _as_runner(base), _as_runner(var)
        return build

    return {
        "sst2_buckets_from_8": ("length buckets from 8 instead of 16 tokens (8,16,...,128): real-token fraction "
                                "0.60 -> 0.70 on SST-2 train, one more shape to compile: ~1.15x",
                                pair(var_smallest=8)),
        "sst2_host_sync_every_step": ("the fine-tuning loop's jax.device_get(metrics) every step: the host cannot "
                                      "build the next batch while the device runs: ~1.0x on a 2-core CPU",
                                      pair(host_sync=True)),
        "sst2_unrolled_layers": ("scan_layers=False for the 6-layer MiniLM at small shapes: no while-loop and "
                                 "stacking overhead: ~1.05x", pair(var_config=lambda c: c.replace(scan_layers=False))),
    }


def _as_runner(p) -> peers.Runner:
    return peers.Runner(p.name, lambda: float("nan"), lambda: p.run(p.batches))


def measure(name: str, prediction: str, build, rounds: int, log=print) -> dict:
    base, var = build()
    cb, cv = common.Contender("baseline", base.step), common.Contender("variant", var.step)
    common.interleaved([cb, cv], warmup=1, rounds=rounds)
    speedup = cb.median / cv.median  # > 1: the variant is faster
    out = {"technique": name, "prediction": prediction, "baseline_seconds": cb.median, "variant_seconds": cv.median,
           "variant_speedup": speedup, "baseline_compile_seconds": base.compile_seconds,
           "variant_compile_seconds": var.compile_seconds, "load_average": common.load_average(),
           "baseline_times": cb.times, "variant_times": cv.times}
    log(f"{name}: baseline {cb.median:.3f} s, variant {cv.median:.3f} s -> variant speedup x{speedup:.2f} "
        f"(compile {base.compile_seconds or 0:.1f} s vs {var.compile_seconds or 0:.1f} s); predicted: {prediction}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> list:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.techniques", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", default="base:128:8")
    ap.add_argument("--only", default="", help="comma-separated technique names (default: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default="techniques-cpu")
    common.add_host_malloc_flag(ap)
    args = ap.parse_args(argv)
    common.setup_host(args.host_malloc)
    cell = Cell.parse(args.cell, "float32", "xla")
    variants = {**pretraining_variants(cell), **finetune_variants()}
    names = [n for n in args.only.split(",") if n] or list(variants)
    unknown = set(names) - set(variants)
    if unknown:
        raise SystemExit(f"unknown techniques {sorted(unknown)}; choose from {sorted(variants)}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.json")
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": common.machine_info(),
              "cell": args.cell, "rounds": args.rounds, "results": []}
    for n in names:
        prediction, build = variants[n]
        report["results"].append(measure(n, prediction, build, args.rounds))
        with open(path, "w", encoding="utf-8") as f:  # after every technique: a long run keeps what it measured
            json.dump(report, f, indent=1)
    print("wrote", path)
    return report["results"]


if __name__ == "__main__":
    main()
