"""Real (non-pad) tokens per second of fine-tuning steps: length buckets vs every sentence padded to 128
(as HF's Flax GLUE example does). all-MiniLM-L6-v2 on SST-2 training sentences, the shared train step.

    python benchmarks/finetune_batching.py [--steps 30] [--batch-size 32] [--data-root ../shared/data]

Each shape is compiled (one warm-up step per bucket) before the clock starts; the same sentences are
used in both modes. Prints a table and writes benchmarks/results/finetune_batching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax

from benchmarks import common
from flaxbert import hf
from flaxbert.infer import batching
from flaxbert.finetune.task_data import FeatureSettings, load_task_data, make_features
from flaxbert.finetune.run import load_config, make_loss_fn
from flaxbert.heads import init, logical_axes

REPO = Path(__file__).resolve().parents[1]


def measure(model, task, features, boundaries, steps: int, batch_size: int) -> dict:
    cfg = load_config()
    config = model.config
    engine = common.flaxbert_engine(config, cfg.run.optim, batch_size,
                                    lambda r: init(config, r, task.head, task.num_labels),
                                    logical_axes(config, task.head, task.num_labels), make_loss_fn(task, config),
                                    steps=steps + 8)
    state = engine.init_state(model.params)
    step = engine.step_fn
    batches = [{k: v for k, v in b.items() if k != "index"}
               for b in batching.make_batches(features, batch_size, boundaries, shuffle=True, seed=0)]
    warm = {}
    for b in batches:  # compile every shape first
        warm.setdefault(b["input_ids"].shape, b)
    for b in warm.values():
        state, m = step(state, engine.put(b))
        jax.block_until_ready(m)
    timed = batches[:steps]
    real = sum(batching.real_tokens(b) for b in timed)
    padded = sum(b["input_ids"].size for b in timed)
    t0 = time.perf_counter()
    for b in timed:
        state, m = step(state, engine.put(b))
    jax.block_until_ready(m)
    seconds = time.perf_counter() - t0
    return {"steps": len(timed), "shapes": sorted(warm), "seconds": seconds, "real_tokens": real,
            "padded_tokens": padded, "real_tokens_per_sec": real / seconds, "pad_fraction": 1 - real / padded,
            "sec_per_step": seconds / len(timed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    args = p.parse_args()
    from benchmarks.common import minilm_dir
    from flaxbert.finetune.tasks import get_task

    model_dir = minilm_dir()
    td = load_task_data(get_task("sst2"), str(Path(args.data_root) / "glue"), max_train=args.steps * args.batch_size)
    task = td.task
    model = hf.load_pretrained(str(model_dir), head=task.head, num_labels=task.num_labels)
    features = make_features(task, model.tokenizer, td.train, FeatureSettings(max_length=args.max_length), True)
    results = {}
    for name, bounds in (("buckets", batching.bucket_boundaries(args.max_length)),
                         ("pad_to_max", batching.fixed_length_boundaries(args.max_length))):
        results[name] = measure(model, task, features, bounds, args.steps, args.batch_size)
    speedup = results["buckets"]["real_tokens_per_sec"] / results["pad_to_max"]["real_tokens_per_sec"]
    print(f"{'mode':<12}{'shapes':>28}{'s/step':>10}{'pad %':>8}{'real tok/s':>12}")
    for name, r in results.items():
        shapes = ",".join(str(s[1]) for s in r["shapes"])
        print(f"{name:<12}{shapes:>28}{r['sec_per_step']:>10.3f}{100 * r['pad_fraction']:>8.1f}"
              f"{r['real_tokens_per_sec']:>12.1f}")
    print(f"buckets / pad_to_max real-token throughput: {speedup:.2f}x  (load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs)")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "finetune_batching.json", "w") as f:
        json.dump({"results": results, "speedup": speedup, "device": jax.devices()[0].device_kind,
                   "load_average": os.getloadavg(), "batch_size": args.batch_size}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
