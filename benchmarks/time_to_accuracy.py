"""Pretraining time to accuracy: HF PyTorch, HF Flax and flaxbert on the same corpus and wall-clock budget.

    python -m benchmarks.time_to_accuracy                  # both cells, 10 minutes per contender
    python -m benchmarks.time_to_accuracy --cells tiny --budget-minutes 5
    python -m benchmarks.time_to_accuracy --ablate --cells tiny   # each choice of the recipe on its own

Every contender trains from scratch on WikiText-2 valid plus the packaged Meditations (128-token rows, MLM
only) for the same training wall time, and saves HF-format checkpoints at fixed shares of its budget (saving is
not counted). Afterwards ONE evaluator, HF PyTorch `BertForMaskedLM`, scores every checkpoint on the same
seeded 15% / 80-10-10 masking of WikiText-2 test blocks (benchmarks/hf_mlm_peers.py), beside the unigram baseline
(always the most frequent training token).

Cells: BERT-tiny (2x128) with the 8,192-token WordPiece vocabulary committed in
benchmarks/resources/wordpiece-8192 (trained once on the training text: a vocabulary trained on the spot
differs between processes), and BERT-mini (4x256) with all-MiniLM-L6-v2's 30,522-token uncased vocabulary.

Contenders: HF PyTorch (`BertForMaskedLM`, run_mlm's blocks, `DataCollatorForLanguageModeling`, AdamW, linear
schedule), HF Flax (`FlaxBertForMaskedLM` as run_mlm_flax trains it), flaxbert with exactly the same
hyperparameters, and flaxbert with its recipe (`RECIPE`). Each contender trains in a process of its own.
Writes results/time-to-accuracy.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from benchmarks import hf_mlm_peers as peers
from benchmarks.common import load_average, machine_info, minilm_dir

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
VOCAB_8192 = REPO / "benchmarks" / "resources" / "wordpiece-8192"
POINTS = (0.1, 0.25, 0.5, 0.75, 1.0)  # shares of the budget at which every contender saves a checkpoint


def cells() -> dict[str, peers.Cell]:
    return {"tiny": peers.Cell("tiny", layers=2, hidden=128, heads=2, intermediate=512, vocab_dir=str(VOCAB_8192)),
            "mini": peers.Cell("mini", layers=4, hidden=256, heads=4, intermediate=1024, vocab_dir=str(minilm_dir()))}


# The hyperparameters every "same" contender uses, per cell.
SAME = {"tiny": peers.HParams(batch_size=32, lr=1e-3, warmup_fraction=0.06),
        "mini": peers.HParams(batch_size=32, lr=5e-4, warmup_fraction=0.06)}

# flaxbert's recipe: what it changes from SAME, as config overrides (each measured: docs/benchmarks.md).
RECIPE = {"tiny": ["--optim.lr=2e-3", "--data.masked_lm_prob=0.25", "--data.max_predictions_per_seq=32",
                   "--model.hidden_dropout_prob=0.0", "--model.attention_probs_dropout_prob=0.0"],
          "mini": ["--optim.lr=1e-3", "--data.masked_lm_prob=0.25", "--data.max_predictions_per_seq=32",
                   "--model.hidden_dropout_prob=0.0", "--model.attention_probs_dropout_prob=0.0"]}



def ablations(cell_name: str) -> dict[str, list[str]]:
    """`--ablate`: the recipe with one of its choices undone or pushed further, each as config overrides added
    after RECIPE's, so that each choice's own gain is measured in this benchmark."""
    same = SAME[cell_name]
    return {"recipe": [],
            f"lr {same.lr:g} (HF's)": [f"--optim.lr={same.lr}"],
            "15% masking (HF's)": ["--data.masked_lm_prob=0.15", "--data.max_predictions_per_seq=20"],
            "40% masking": ["--data.masked_lm_prob=0.4", "--data.max_predictions_per_seq=52"],
            "dropout 0.1 (HF's)": ["--model.hidden_dropout_prob=0.1", "--model.attention_probs_dropout_prob=0.1"],
            "warmup 20% of the budget": ["--optim.warmup_fraction=0.2"],
            "packed rows": ["--data.packed=true"]}


CONTENDERS = ("hf_torch", "hf_flax", "flaxbert_same", "flaxbert_recipe")
LABELS = {"hf_torch": "HF PyTorch (BertForMaskedLM, run_mlm)", "hf_flax": "HF Flax (FlaxBertForMaskedLM, run_mlm_flax)",
          "flaxbert_same": "flaxbert, the same hyperparameters", "flaxbert_recipe": "flaxbert, its recipe"}


def build_vocab(out: Path = VOCAB_8192) -> None:
    """Train the tiny cell's 8,192-token vocabulary on the training text (run once; the result is committed)."""
    from flaxbert import vocab

    corpus = out.parent / "_train_text.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(peers.train_texts(DATA)) + "\n", encoding="utf-8")
    try:
        vocab.train_wordpiece(str(corpus), 8192, out, lowercase=True, corpus_format="lines")
    finally:
        corpus.unlink()
    for name in os.listdir(out):  # vocab.txt is the vocabulary; the rest is rebuilt from it when loaded
        if name != "vocab.txt":
            os.remove(out / name)


# ----- flaxbert, as a user runs it ------------------------------------------------------------------

def flaxbert_overrides(cell: peers.Cell, hp: peers.HParams, budget_s: float, work: Path, corpus: Path,
                       vocab_size: int) -> list[str]:
    """The `python -m flaxbert.pretrain` settings that equal `hp` (MLM only, 128-token rows, dynamic 15%
    masking, AdamW with linear warmup and decay to 0 over the time budget)."""
    return [f"--run.output_dir={work}", f"--data.corpus={corpus}", "--data.format=bert", f"--data.vocab={cell.vocab_dir}",
            "--data.nsp=false", f"--data.seq_len={cell.seq_len}", "--data.short_seq_prob=0", "--data.eval_fraction=0",
            f"--data.masked_lm_prob={hp.mlm_probability}", "--data.max_predictions_per_seq=20",
            "--data.masking=dynamic", f"--data.seed={hp.seed}",
            f"--model.vocab_size={vocab_size}", f"--model.hidden_size={cell.hidden}",
            f"--model.num_hidden_layers={cell.layers}", f"--model.num_attention_heads={cell.heads}",
            f"--model.intermediate_size={cell.intermediate}",
            f"--model.max_position_embeddings={cell.max_position_embeddings}",
            "--optim.name=adamw", f"--optim.lr={hp.lr}", f"--optim.warmup_fraction={hp.warmup_fraction}",
            "--optim.clip_norm=0",  # neither run_mlm_no_trainer nor run_mlm_flax clips gradients
            "--optim.end_lr=0", "--optim.decay=linear", f"--optim.weight_decay={hp.weight_decay}",
            f"--optim.b1={hp.b1}", f"--optim.b2={hp.b2}", f"--optim.eps={hp.eps}",
            f"--run.global_batch_size={hp.batch_size}", f"--run.budget_minutes={budget_s / 60}",
            "--run.steps=100000000", "--run.log_every=10", "--run.eval_every=0", "--run.progress=false",
            f"--run.seed={hp.seed}", "--checkpoint.every=100000000", "--checkpoint.resume=false"]


def run_flaxbert(cell: peers.Cell, hp: peers.HParams, budget_s: float, points: Sequence[float], out_dir: Path,
                 extra: Sequence[str] = ()) -> list[dict]:
    from flaxbert import hf
    from flaxbert import run_config as rc
    from flaxbert.train import loop, pretraining
    from flaxbert.vocab import load_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "train.txt"  # one document, one line per paragraph: rows cut across lines, as run_mlm's
    corpus.write_text("\n".join(peers.train_texts(DATA)) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(cell.vocab_dir)
    cfg = rc.load("", flaxbert_overrides(cell, hp, budget_s, out_dir / "run", corpus, len(tokenizer)) + list(extra))
    cfg, task = pretraining.build_task(cfg)  # preparing the rows is not counted, like the peers' grouping

    class ToHF(loop.Snapshots):
        def __init__(self):
            self.records: list[dict] = []
            self.last_loss = float("nan")

        def due(self, step, seconds):
            return peers.snapshot_due(points, budget_s, len(self.records), seconds)

        def take(self, step, seconds, params):
            k = len(self.records)
            where = out_dir / f"snapshot-{k}"
            head = pretraining.head_name(cfg.data.nsp)
            hf.save_pretrained(hf.PretrainedModel(cfg.model, params, head=head), str(where),
                               tokenizer=tokenizer, flax=False)
            self.records.append({"fraction": points[k] if k < len(points) else 1.0, "wall_s": seconds,
                                 "step": step, "dir": str(where)})

    hook = ToHF()
    result = loop.train(cfg, task, snapshots=hook)
    if hook.records:
        hook.records[-1]["fraction"] = 1.0
    from flaxbert.train.writer import latest_by_step, read_jsonl

    logged = latest_by_step(read_jsonl(os.path.join(cfg.run.output_dir, "metrics.jsonl")))
    for r in hook.records:
        near = [s for s in logged if s <= r["step"]]
        r["train_loss"] = logged[max(near)]["mlm_loss"] if near else float("nan")
    if result.reason != "finished":
        raise RuntimeError(f"flaxbert run ended with {result.reason}: {result.message}")
    return hook.records


# ----- one contender in its own process -----------------------------------------------------------

def train_one(name: str, cell_name: str, budget_s: float, out_dir: Path) -> list[dict]:
    cell, hp = cells()[cell_name], SAME[cell_name]
    if name == "hf_torch":
        blocks = peers.group_blocks(peers.tokenizer_of(cell), peers.train_texts(DATA), cell.seq_len)
        return peers.run_hf_torch(cell, hp, blocks, budget_s, list(POINTS), str(out_dir))
    if name == "hf_flax":
        blocks = peers.group_blocks(peers.tokenizer_of(cell), peers.train_texts(DATA), cell.seq_len)
        return peers.run_hf_flax(cell, hp, blocks, budget_s, list(POINTS), str(out_dir))
    if name.startswith(ABLATION):
        extra = RECIPE[cell_name] + ablations(cell_name)[name[len(ABLATION):]]
    else:
        extra = RECIPE[cell_name] if name == "flaxbert_recipe" else []
    return run_flaxbert(cell, hp, budget_s, POINTS, out_dir, extra)


ABLATION = "ablation:"  # a contender name "ablation:<name>" trains the recipe changed by ablations()[name]


def run_ablations(cell_names: Sequence[str], budget_s: float, work: Path, out: Path, tag: str,
                  eval_blocks: int) -> dict:
    """Every ablation of the recipe, each in its own process for the same budget, scored by the one evaluator."""
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_info(), "load_at_start": load_average(), "budget_minutes": budget_s / 60,
              "points": list(POINTS), "recipe": {c: RECIPE[c] for c in cell_names}, "cells": {}}
    for cell_name in cell_names:
        cell, runs = cells()[cell_name], {}
        for k, (name, extra) in enumerate(ablations(cell_name).items()):
            print(f"[{cell_name}] training the recipe with {name} for {budget_s / 60:g} min", flush=True)
            runs[name] = _spawn(ABLATION + name, cell_name, budget_s, work / cell_name / f"ablation-{k}")
            runs[name][-1]["overrides"] = extra
        report["cells"][cell_name] = _scored(cell, runs, eval_blocks, report)
        recipe = report["cells"][cell_name]["contenders"]["recipe"]
        for row in report["cells"][cell_name]["contenders"].values():
            row["final_minus_recipe"] = row["final_accuracy"] - recipe["final_accuracy"]
            row["time_to_recipe_final_s"] = time_to(row["curve"], recipe["final_accuracy"])
    _write(report, out, tag, ablation_markdown(report))
    return report


def _scored(cell: peers.Cell, runs: dict, eval_blocks: int, report: dict) -> dict:
    """The cell's summary: every snapshot of every run scored by the shared evaluator, beside the unigram."""
    tokenizer = peers.tokenizer_of(cell)
    test = peers.group_blocks(tokenizer, peers.test_texts(DATA), cell.seq_len)[:eval_blocks]
    ids, labels = peers.eval_batch(tokenizer, test)
    report["eval_predictions"] = int((labels != -100).sum())
    train = peers.group_blocks(tokenizer, peers.train_texts(DATA), cell.seq_len)
    unigram = peers.unigram_accuracy(tokenizer, train, labels)
    for name, records in runs.items():
        for r in records:
            r["accuracy"] = peers.evaluate(r["dir"], ids, labels)
            print(f"[{cell.name}] {name} step {r['step']} at {r['wall_s']:.0f} s: {r['accuracy']:.4f}", flush=True)
    c = summarize(runs, unigram)
    c["description"] = f"BERT-{cell.name} ({cell.layers}x{cell.hidden}), {len(tokenizer):,}-token vocabulary"
    c["runs"] = runs
    return c


def _write(report: dict, out: Path, tag: str, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{tag}.md").write_text(md)
    plot(report, out / f"{tag}.png")


def _spawn(name: str, cell: str, budget_s: float, out_dir: Path) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / "snapshots.json"
    cmd = [sys.executable, "-m", "benchmarks.time_to_accuracy", "--contender", name, "--cells", cell,
           "--budget-minutes", str(budget_s / 60), "--work", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget_s * 3 + 900)
    if done.returncode != 0:
        raise RuntimeError(f"{name} on {cell} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    records = json.loads(result.read_text())
    for r in records:
        r["process_s"] = time.perf_counter() - start
    return records


# ----- the report ---------------------------------------------------------------------------------

def time_to(curve: Sequence[tuple[float, float]], target: float) -> Optional[float]:
    """The first wall time at which a curve of (seconds, accuracy) points reaches `target`, linearly
    interpolated between checkpoints (from (0, 0)); None if it never does."""
    prev_t, prev_a = 0.0, 0.0
    for t, a in curve:
        if a >= target:
            if a == prev_a:
                return t
            return prev_t + (t - prev_t) * (target - prev_a) / (a - prev_a)
        prev_t, prev_a = t, a
    return None


def summarize(runs: dict, unigram: float) -> dict:
    curves = {n: [(r["wall_s"], r["accuracy"]) for r in recs] for n, recs in runs.items()}
    out = {"unigram_accuracy": unigram, "contenders": {}}
    targets = {peer: curves[peer][-1][1] for peer in ("hf_torch", "hf_flax") if peer in curves}
    for name, curve in curves.items():
        row = {"final_accuracy": curve[-1][1], "final_wall_s": curve[-1][0], "steps": runs[name][-1]["step"],
               "curve": curve}
        for peer, target in targets.items():
            reached = time_to(curve, target)
            row[f"time_to_{peer}_final_s"] = reached
        out["contenders"][name] = row
    return out


def markdown(report: dict) -> str:
    lines = [f"# Pretraining time to accuracy ({report['date']}, {report['machine']['host_cpu']}, "
             f"{report['machine']['host_cores']} cores, load {report['load_at_start'][0]:.1f} at the start)", "",
             f"Budget: {report['budget_minutes']:g} min of training wall time per contender; held-out MLM accuracy on "
             f"{report['eval_predictions']:,} masked positions of WikiText-2 test (one evaluator: HF PyTorch "
             f"BertForMaskedLM, seeded 15% 80/10/10 masks of 128-token blocks).", ""]
    for cell, c in report["cells"].items():
        lines += [f"## {cell}: {c['description']}", "",
                  f"Unigram baseline (always the most frequent training token): **{c['unigram_accuracy']:.4f}**", "",
                  "| contender | steps | " + " | ".join(f"acc @ {int(p * 100)}%" for p in POINTS)
                  + " | time to HF PyTorch's final | time to HF Flax's final |",
                  "|---|---:|" + "---:|" * len(POINTS) + "---:|---:|"]
        for name, row in c["contenders"].items():
            missing = ["—"] * (len(POINTS) - len(row["curve"]))
            accs = " | ".join([f"{a:.4f} ({t:.0f} s)" for t, a in row["curve"]] + missing)
            t_pt, t_fx = row.get("time_to_hf_torch_final_s"), row.get("time_to_hf_flax_final_s")
            fmt = lambda t: "never" if t is None else f"{t:.0f} s ({t / 60:.1f} min)"  # noqa: E731
            lines.append(f"| {LABELS.get(name, name)} | {row['steps']:,} | {accs} | {fmt(t_pt)} | {fmt(t_fx)} |")
        lines.append("")
    lines += ["Wall time is training time: from the first step (compilation included) to the checkpoint, without "
              "the time spent saving checkpoints or evaluating. flaxbert's recipe: "
              + "; ".join(f"{cell}: {' '.join(RECIPE[cell])}" for cell in report["cells"]) + ".", ""]
    return "\n".join(lines)


def ablation_markdown(report: dict) -> str:
    lines = [f"# The recipe's choices, one at a time ({report['date']}, {report['machine']['host_cpu']}, "
             f"{report['machine']['host_cores']} cores, load {report['load_at_start'][0]:.1f} at the start)", "",
             f"Each row trains flaxbert's recipe with one change for {report['budget_minutes']:g} min of training wall "
             f"time; held-out MLM accuracy on {report['eval_predictions']:,} masked positions of WikiText-2 test, "
             "scored by the same evaluator as the main benchmark.", ""]
    for cell, c in report["cells"].items():
        lines += [f"## {cell}: {c['description']}", "",
                  f"Unigram baseline: **{c['unigram_accuracy']:.4f}**. "
                  f"Recipe: `{' '.join(report['recipe'][cell])}`", "",
                  "| change to the recipe | steps | " + " | ".join(f"acc @ {int(p * 100)}%" for p in POINTS)
                  + " | final − recipe's | time to the recipe's final |",
                  "|---|---:|" + "---:|" * len(POINTS) + "---:|---:|"]
        for name, row in c["contenders"].items():
            missing = ["—"] * (len(POINTS) - len(row["curve"]))
            accs = " | ".join([f"{a:.4f}" for _, a in row["curve"]] + missing)
            t = row["time_to_recipe_final_s"]
            lines.append(f"| {name} | {row['steps']:,} | {accs} | {row['final_minus_recipe']:+.4f} | "
                         f"{'never' if t is None else f'{t:.0f} s'} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells_ = list(report["cells"])
    fig, axes = plt.subplots(1, len(cells_), figsize=(6.5 * len(cells_), 4.5), squeeze=False)
    for ax, cell in zip(axes[0], cells_):
        c = report["cells"][cell]
        for name, row in c["contenders"].items():
            t, a = zip(*[(0.0, 0.0)] + [tuple(p) for p in row["curve"]])
            ax.plot(np.array(t) / 60, a, marker="o", label=LABELS.get(name, name))
        ax.axhline(c["unigram_accuracy"], color="grey", linestyle="--", label="unigram baseline")
        ax.set_title(f"{cell}: {c['description']}")
        ax.set_xlabel("training wall time (min)")
        ax.set_ylabel("held-out MLM accuracy (WikiText-2 test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cell_names: Sequence[str], budget_s: float, work: Path, out: Path, tag: str, eval_blocks: int) -> dict:
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_info(), "load_at_start": load_average(), "budget_minutes": budget_s / 60,
              "points": list(POINTS), "same_hparams": {c: dataclasses.asdict(SAME[c]) for c in cell_names},
              "recipe": {c: RECIPE[c] for c in cell_names}, "cells": {}}
    for cell_name in cell_names:
        runs = {}
        for name in CONTENDERS:
            print(f"[{cell_name}] training {name} for {budget_s / 60:g} min", flush=True)
            runs[name] = _spawn(name, cell_name, budget_s, work / cell_name / name)
        report["cells"][cell_name] = _scored(cells()[cell_name], runs, eval_blocks, report)
    _write(report, out, tag, markdown(report))
    return report


def main(argv: Optional[Sequence[str]] = None) -> dict | None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy")
    ap.add_argument("--cells", default="tiny,mini")
    ap.add_argument("--budget-minutes", type=float, default=10.0, help="training wall time per contender")
    ap.add_argument("--eval-blocks", type=int, default=1024, help="WikiText-2 test blocks of 128 tokens scored")
    ap.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="time-to-accuracy")
    ap.add_argument("--build-vocab", action="store_true", help="retrain the committed 8,192-token vocabulary")
    ap.add_argument("--ablate", action="store_true",
                    help="train the recipe with each of its choices changed (ablations()), instead of the contenders")
    ap.add_argument("--contender", help=argparse.SUPPRESS)  # one contender, in this process
    args = ap.parse_args(argv)
    if args.build_vocab:
        build_vocab()
        return None
    budget_s = args.budget_minutes * 60
    if args.contender:
        records = train_one(args.contender, args.cells, budget_s, Path(args.work))
        (Path(args.work) / "snapshots.json").write_text(json.dumps(records, indent=2))
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        chosen = [c for c in args.cells.split(",") if c]
        if args.ablate:
            tag = args.tag if args.tag != "time-to-accuracy" else "time-to-accuracy-ablations"
            report = run_ablations(chosen, budget_s, work, Path(args.out), tag, args.eval_blocks)
            print(ablation_markdown(report))
        else:
            report = run(chosen, budget_s, work, Path(args.out), args.tag, args.eval_blocks)
            print(markdown(report))
    return report


if __name__ == "__main__":
    main()
