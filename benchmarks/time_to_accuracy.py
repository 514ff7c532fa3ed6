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

# flaxbert's recipe: what it changes from SAME, as config overrides, and its sequence-length schedule (each
# choice measured by --ablate: docs/benchmarks.md; lr and masking rate stay HF's, which the runs did not beat).
RECIPE_WARMUP = 0.2
RECIPE = {cell: [f"--optim.warmup_fraction={RECIPE_WARMUP}",
                 "--model.hidden_dropout_prob=0.0", "--model.attention_probs_dropout_prob=0.0"]
          for cell in ("tiny", "mini")}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A sequence-length schedule as BERT's phases 1 and 2: a run at `short_seq` tokens for `short_share` of the
    budget, then one at the cell's length started from its weights (`run.init_from`), each with its own warmup
    and decay over its share of the budget. `short_seq` 0: one run at the cell's length. `short_batch`: phase 1's
    batch size (0: the cell's), a batch-size schedule in the same two runs (small batches first). `one_run`: the
    same two phases in one run instead (`data.short_seq_len`): one warmup and decay, one optimizer state."""

    short_seq: int = 0
    short_share: float = 0.0
    short_batch: int = 0
    one_run: bool = False

    def describe(self) -> str:
        if not self.short_seq:
            return "one run at the cell's sequence length"
        if self.one_run:
            return (f"seq {self.short_seq} for {self.short_share:.0%} of the budget, then the cell's length, in one "
                    f"run (--data.short_seq_len={self.short_seq} --data.short_share={self.short_share:g})")
        batch = f" at batch {self.short_batch}" if self.short_batch else ""
        return (f"seq {self.short_seq}{batch} for {self.short_share:.0%} of the budget, then the cell's length"
                f"{' and batch' if batch else ''} from its weights (two runs)")

    def overrides(self) -> list[str]:
        """The flaxbert.pretrain settings of a one-run schedule."""
        return [f"--data.short_seq_len={self.short_seq}", f"--data.short_share={self.short_share}"]


RECIPE_SCHEDULE = Schedule(short_seq=64, short_share=0.7)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ablation of the recipe: config overrides added after RECIPE's; `documents`: the training text cut into
    documents of sentences (WikiText-2 articles, Meditations in runs of paragraphs), which next-sentence pairs need;
    `schedule`: a sequence-length schedule in place of the recipe's (None: the recipe's)."""

    overrides: tuple[str, ...] = ()
    documents: bool = False
    schedule: Optional[Schedule] = None


def ablations(cell_name: str) -> dict[str, Variant]:
    """`--ablate`: the recipe with one of its choices undone or changed, so that each choice's own gain is measured
    in this benchmark (docs/benchmarks.md has what each was predicted to do)."""
    same = SAME[cell_name]
    return {"recipe": Variant(),
            f"lr {2 * same.lr:g} (2x HF's)": Variant((f"--optim.lr={2 * same.lr}",)),
            f"warmup {same.warmup_fraction:.0%} of the budget (HF's)": Variant(
                (f"--optim.warmup_fraction={same.warmup_fraction}",)),
            "25% masking": Variant(("--data.masked_lm_prob=0.25", "--data.max_predictions_per_seq=32")),
            "dropout 0.1 (HF's)": Variant(("--model.hidden_dropout_prob=0.1",
                                           "--model.attention_probs_dropout_prob=0.1")),
            "packed rows": Variant(("--data.packed=true",)),
            "MLM + NSP (sentence pairs)": Variant(("--data.nsp=true",), documents=True),
            "seq 128 throughout (one run)": Variant(schedule=Schedule()),
            # the control for the schedule: the same two runs and restart, both at the cell's 128 tokens
            "seq 128 in the same two runs": Variant(schedule=Schedule(128, RECIPE_SCHEDULE.short_share)),
            f"batch {same.batch_size // 2} in phase 1": Variant(schedule=dataclasses.replace(
                RECIPE_SCHEDULE, short_batch=same.batch_size // 2, one_run=False)),
            "the seq schedule in two runs": Variant(schedule=dataclasses.replace(RECIPE_SCHEDULE, one_run=False)),
            "the seq schedule in one run": Variant(schedule=dataclasses.replace(RECIPE_SCHEDULE, one_run=True))}


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


def train_documents() -> list[list[str]]:
    """The training text as documents of sentences, for next-sentence pairs: the WikiText-2 valid articles, and
    Meditations in runs of MEDITATIONS_PARAGRAPHS paragraphs (its file marks no books). Headings are left out,
    as train_texts() leaves them out."""
    from flaxbert.data.corpus import read_documents, split_sentences
    from flaxbert.train.pretraining import packaged_corpus

    docs = [list(d.sentences) for d in read_documents([str(DATA / "wikitext-2" / "wiki.valid.tokens")], "wikitext")]
    paragraphs = [s.strip() for s in Path(packaged_corpus()).read_text(encoding="utf-8").splitlines() if s.strip()]
    for i in range(0, len(paragraphs), MEDITATIONS_PARAGRAPHS):
        docs.append([x for p in paragraphs[i:i + MEDITATIONS_PARAGRAPHS] for x in split_sentences(p)])
    return docs


MEDITATIONS_PARAGRAPHS = 20


def write_corpus(path: Path, documents: bool) -> None:
    """flaxbert's copy of the training text (BERT format). By default one document, one line per paragraph, so
    that rows are cut across lines as run_mlm's blocks are; `documents`: train_documents(), a blank line between."""
    if documents:
        text = "\n\n".join("\n".join(d) for d in train_documents())
    else:
        text = "\n".join(peers.train_texts(DATA))
    path.write_text(text + "\n", encoding="utf-8")


def run_flaxbert(cell: peers.Cell, hp: peers.HParams, budget_s: float, points: Sequence[float], out_dir: Path,
                 extra: Sequence[str] = (), documents: bool = False) -> list[dict]:
    from flaxbert import hf
    from flaxbert import run_config as rc
    from flaxbert.train import loop, pretraining
    from flaxbert.vocab import load_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "train.txt"
    write_corpus(corpus, documents)
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


def run_phases(cell: peers.Cell, hp: peers.HParams, budget_s: float, out_dir: Path, extra: Sequence[str],
               schedule: Schedule, documents: bool = False) -> list[dict]:
    """A short-then-long sequence schedule in two runs, as BERT's phases: `schedule.short_seq` tokens for
    `schedule.short_share` of the budget (at batch `schedule.short_batch` when set), then the cell's length and batch
    from phase 1's final weights. The snapshots keep
    the budget's points; phase 2's times count from the end of phase 1 (its start-up and data preparation are not
    counted, as no contender's preparation is; its compilation is)."""
    split = schedule.short_share
    predictions = max(1, round(schedule.short_seq * _masked_share(extra, hp)))
    batch = [f"--run.global_batch_size={schedule.short_batch}"] if schedule.short_batch else []
    phases = [(0.0, split, [f"--data.seq_len={schedule.short_seq}", f"--data.max_predictions_per_seq={predictions}"]
               + batch), (split, 1.0, [])]
    records: list[dict] = []
    for k, (lo, hi, own) in enumerate(phases):
        local = [(p - lo) / (hi - lo) for p in POINTS if lo < p < hi] + [1.0]
        start = [f"--run.init_from={records[-1]['dir']}"] if records else []
        phase = run_flaxbert(cell, hp, budget_s * (hi - lo), local, out_dir / f"phase-{k + 1}",
                             list(extra) + own + start, documents=documents)
        offset = records[-1]["wall_s"] if records else 0.0
        steps = records[-1]["step"] if records else 0
        for r in phase:
            r.update(fraction=lo + r["fraction"] * (hi - lo), wall_s=r["wall_s"] + offset, step=r["step"] + steps,
                     phase=k + 1)
        records += phase
    return records


def _masked_share(extra: Sequence[str], hp: peers.HParams) -> float:
    """The masking rate the last `--data.masked_lm_prob` override of `extra` sets (HParams' when none does)."""
    rates = [float(x.split("=", 1)[1]) for x in extra if x.startswith("--data.masked_lm_prob=")]
    return rates[-1] if rates else hp.mlm_probability


# ----- one contender in its own process -----------------------------------------------------------

def train_one(name: str, cell_name: str, budget_s: float, out_dir: Path, seed: int = 0) -> list[dict]:
    cell, hp = cells()[cell_name], dataclasses.replace(SAME[cell_name], seed=seed)
    if name == "hf_torch":
        blocks = peers.group_blocks(peers.tokenizer_of(cell), peers.train_texts(DATA), cell.seq_len)
        return peers.run_hf_torch(cell, hp, blocks, budget_s, list(POINTS), str(out_dir))
    if name == "hf_flax":
        blocks = peers.group_blocks(peers.tokenizer_of(cell), peers.train_texts(DATA), cell.seq_len)
        return peers.run_hf_flax(cell, hp, blocks, budget_s, list(POINTS), str(out_dir))
    if name.startswith(ABLATION):
        variant = ablations(cell_name)[name[len(ABLATION):]]
        return run_recipe(cell, hp, budget_s, out_dir, RECIPE[cell_name] + list(variant.overrides),
                          RECIPE_SCHEDULE if variant.schedule is None else variant.schedule, variant.documents)
    if name == "flaxbert_recipe":
        return run_recipe(cell, hp, budget_s, out_dir, RECIPE[cell_name], RECIPE_SCHEDULE)
    return run_flaxbert(cell, hp, budget_s, POINTS, out_dir)


def run_recipe(cell: peers.Cell, hp: peers.HParams, budget_s: float, out_dir: Path, extra: Sequence[str],
               schedule: Schedule, documents: bool = False) -> list[dict]:
    if schedule.short_seq and schedule.one_run:
        return run_flaxbert(cell, hp, budget_s, POINTS, out_dir, list(extra) + schedule.overrides(),
                            documents=documents)
    if schedule.short_seq:
        return run_phases(cell, hp, budget_s, out_dir, extra, schedule, documents)
    return run_flaxbert(cell, hp, budget_s, POINTS, out_dir, extra, documents=documents)


ABLATION = "ablation:"  # a contender name "ablation:<name>" trains the recipe changed by ablations()[name]


def run_ablations(cell_names: Sequence[str], budget_s: float, work: Path, out: Path, tag: str,
                  eval_blocks: int, seeds: Sequence[int] = (0,), changes: Sequence[str] = ()) -> dict:
    """Every ablation of the recipe, each in its own process for the same budget, once per seed (the data order,
    masks and initialisation), scored by the one evaluator. Runs go seed by seed, so that a drift of the
    machine's speed during the hours this takes spreads over every ablation alike."""
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_info(), "load_at_start": load_average(), "budget_minutes": budget_s / 60,
              "points": list(POINTS), "seeds": list(seeds), "recipe": {c: RECIPE[c] for c in cell_names},
              "recipe_schedule": dataclasses.asdict(RECIPE_SCHEDULE),
              "cells": {}}
    for cell_name in cell_names:
        cell, variants, runs = cells()[cell_name], chosen_ablations(cell_name, changes), {}
        for seed in seeds:
            for k, (name, variant) in enumerate(variants.items()):
                print(f"[{cell_name}] seed {seed}: the recipe with {name}, {budget_s / 60:g} min", flush=True)
                key = _seeded(name, seed, seeds)
                runs[key] = _spawn(ABLATION + name, cell_name, budget_s, work / cell_name / f"ablation-{k}-{seed}",
                                   seed)
                runs[key][-1]["overrides"] = dataclasses.asdict(variant)
        scored = _scored(cell, runs, eval_blocks, report)
        scored["by_change"] = seed_means(scored["contenders"], variants, seeds)
        report["cells"][cell_name] = scored
    _write(report, out, tag, ablation_markdown(report))
    return report


def chosen_ablations(cell_name: str, changes: Sequence[str] = ()) -> dict[str, Variant]:
    """ablations() restricted to the names in `changes` (all when empty); the recipe is always run, since every
    change is reported against it. An unknown name is refused with the list of known ones."""
    every = ablations(cell_name)
    unknown = [c for c in changes if c not in every]
    if unknown:
        raise SystemExit(f"--changes: unknown {unknown}; the changes are: {'; '.join(every)}")
    return {name: v for name, v in every.items() if name == "recipe" or not changes or name in changes}


def _seeded(name: str, seed: int, seeds: Sequence[int]) -> str:
    return name if len(seeds) == 1 else f"{name} [seed {seed}]"


def seed_means(contenders: dict, variants: Sequence[str], seeds: Sequence[int]) -> dict:
    """Per change: the final accuracy of each seed, their mean, and the mean's difference from the recipe's mean
    with the spread of that difference over the seeds (each seed's run against the recipe's run of that seed)."""
    out = {}
    recipe = [contenders[_seeded("recipe", s, seeds)]["final_accuracy"] for s in seeds]
    for name in variants:
        finals = [contenders[_seeded(name, s, seeds)]["final_accuracy"] for s in seeds]
        diffs = [f - r for f, r in zip(finals, recipe)]
        steps = [contenders[_seeded(name, s, seeds)]["steps"] for s in seeds]
        out[name] = {"finals": finals, "mean": float(np.mean(finals)), "minus_recipe": float(np.mean(diffs)),
                     "minus_recipe_min": min(diffs), "minus_recipe_max": max(diffs), "mean_steps": float(np.mean(steps))}
    return out


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


def mean_curves(cell: dict, seeds: Sequence[int]) -> dict[str, list[tuple[float, float]]]:
    """An ablation cell's curves averaged over the seeds: (mean wall time, mean accuracy) at each point that every
    seed's run of the change has."""
    out = {}
    for name in cell["by_change"]:
        runs = [cell["runs"][_seeded(name, s, seeds)] for s in seeds]
        common = sorted(set.intersection(*[{round(r["fraction"], 6) for r in recs} for recs in runs]))
        out[name] = [(float(np.mean([r["wall_s"] for recs in runs for r in recs if round(r["fraction"], 6) == f])),
                      float(np.mean([r["accuracy"] for recs in runs for r in recs if round(r["fraction"], 6) == f])))
                     for f in common]
    return out


def _spawn(name: str, cell: str, budget_s: float, out_dir: Path, seed: int = 0) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / "snapshots.json"
    cmd = [sys.executable, "-m", "benchmarks.time_to_accuracy", "--contender", name, "--cells", cell,
           "--budget-minutes", str(budget_s / 60), "--work", str(out_dir), "--seeds", str(seed)]
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


def by_fraction(row: dict, records: Sequence[dict]) -> dict[float, tuple[float, float]]:
    """A contender's (wall seconds, accuracy) by the budget fraction its snapshot was taken at; a phase schedule
    adds the end of each phase to the budget's points."""
    return {round(rec["fraction"], 6): (t, a) for (t, a), rec in zip(row["curve"], records)}


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
        between = []
        for name, row in c["contenders"].items():
            at = by_fraction(row, c["runs"][name])
            accs = " | ".join(f"{at[p][1]:.4f} ({at[p][0]:.0f} s)" if p in at else "—" for p in POINTS)
            between += [f"{LABELS.get(name, name)} at {f:.0%} of the budget (the end of phase 1): {a:.4f} ({t:.0f} s)"
                        for f, (t, a) in at.items() if f not in POINTS]
            t_pt, t_fx = row.get("time_to_hf_torch_final_s"), row.get("time_to_hf_flax_final_s")
            fmt = lambda t: "never" if t is None else f"{t:.0f} s ({t / 60:.1f} min)"  # noqa: E731
            lines.append(f"| {LABELS.get(name, name)} | {row['steps']:,} | {accs} | {fmt(t_pt)} | {fmt(t_fx)} |")
        lines += [""] + ([". ".join(between) + ".", ""] if between else [])
    lines += ["Wall time is training time: from the first step (compilation included) to the checkpoint, without "
              "the time spent saving checkpoints or evaluating. flaxbert's recipe: "
              + "; ".join(f"{cell}: {' '.join(report['recipe'][cell])}" for cell in report["cells"])
              + f"; {_schedule_of(report).describe()} (phase 2's wall time counts from the end of phase 1; its "
              "start-up and data preparation are not counted, its compilation is).", ""]
    return "\n".join(lines)


def _schedule_of(report: dict) -> Schedule:
    """The recipe's sequence-length schedule a report was made with (reports before schedules: one run)."""
    return Schedule(**report.get("recipe_schedule", {}))


def ablation_markdown(report: dict) -> str:
    seeds = report.get("seeds", [0])
    lines = [f"# The recipe's choices, one at a time ({report['date']}, {report['machine']['host_cpu']}, "
             f"{report['machine']['host_cores']} cores, load {report['load_at_start'][0]:.1f} at the start)", "",
             f"Each row trains flaxbert's recipe with one change for {report['budget_minutes']:g} min of training wall "
             f"time, once per seed ({', '.join(map(str, seeds))}); held-out MLM accuracy on "
             f"{report['eval_predictions']:,} masked positions of WikiText-2 test, scored by the same evaluator as "
             "the main benchmark.", ""]
    for cell, c in report["cells"].items():
        lines += [f"## {cell}: {c['description']}", "",
                  f"Unigram baseline: **{c['unigram_accuracy']:.4f}**. "
                  f"Recipe: `{' '.join(report['recipe'][cell])}`, {_schedule_of(report).describe()}", "",
                  "| change to the recipe | mean steps | final accuracy per seed | mean | mean − recipe's "
                  "(range over seeds) |", "|---|---:|---|---:|---:|"]
        for name, row in c["by_change"].items():
            lines.append(f"| {name} | {row['mean_steps']:,.0f} | {' / '.join(f'{a:.4f}' for a in row['finals'])} | "
                         f"{row['mean']:.4f} | {row['minus_recipe']:+.4f} ({row['minus_recipe_min']:+.4f} to "
                         f"{row['minus_recipe_max']:+.4f}) |")
        lines += ["", "Every run:", "",
                  "| run | steps | " + " | ".join(f"acc @ {int(p * 100)}%" for p in POINTS) + " |",
                  "|---|---:|" + "---:|" * len(POINTS)]
        for name, row in c["contenders"].items():
            at = by_fraction(row, c["runs"][name])
            accs = " | ".join(f"{at[p][1]:.4f}" if p in at else "—" for p in POINTS)
            lines.append(f"| {name} | {row['steps']:,} | {accs} |")
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
        if "by_change" in c:  # an ablation report: one line per change, the mean over its seeds
            curves = mean_curves(c, report["seeds"])
        else:
            curves = {LABELS.get(name, name): row["curve"] for name, row in c["contenders"].items()}
        for name, curve in curves.items():
            t, a = zip(*[(0.0, 0.0)] + [tuple(p) for p in curve])
            ax.plot(np.array(t) / 60, a, marker="o", label=name)
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
              "recipe": {c: RECIPE[c] for c in cell_names},
              "recipe_schedule": dataclasses.asdict(RECIPE_SCHEDULE), "cells": {}}
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
    ap.add_argument("--seeds", default="0", help="--ablate: the seeds each change is run with, e.g. 0,1")
    ap.add_argument("--changes", default="", help="--ablate: only these changes, separated by ';' (names as "
                    "in ablations(); the recipe always runs)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)  # one contender, in this process
    args = ap.parse_args(argv)
    if args.build_vocab:
        build_vocab()
        return None
    budget_s = args.budget_minutes * 60
    if args.contender:
        records = train_one(args.contender, args.cells, budget_s, Path(args.work), int(args.seeds))
        (Path(args.work) / "snapshots.json").write_text(json.dumps(records, indent=2))
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        chosen = [c for c in args.cells.split(",") if c]
        if args.ablate:
            tag = args.tag if args.tag != "time-to-accuracy" else "time-to-accuracy-ablations"
            seeds = [int(x) for x in args.seeds.split(",") if x]
            changes = [c.strip() for c in args.changes.split(";") if c.strip()]
            report = run_ablations(chosen, budget_s, work, Path(args.out), tag, args.eval_blocks, seeds, changes)
            print(ablation_markdown(report))
        else:
            report = run(chosen, budget_s, work, Path(args.out), args.tag, args.eval_blocks)
            print(markdown(report))
    return report


if __name__ == "__main__":
    main()
