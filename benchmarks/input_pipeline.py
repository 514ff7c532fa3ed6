"""Input pipeline benchmark: flaxbert's loader in every mode beside a bare numpy gather (the limit) and HF's MLM
input path, loader time per batch / step time, and `prepare` at corpus scale, all in one run.

    python -m benchmarks.input_pipeline [--batch 256] [--seqs 128,512] [--prepare-tokens 100000000]

Data: WikiText-2 valid + test (../shared/data/wikitext-2), prepared with the all-MiniLM-L6-v2 WordPiece
vocabulary, plain and with whole-word masking. HF's path is what run_mlm / run_mlm_flax do: `datasets`
tokenisation, concatenation into `seq`-token blocks, then `DataCollatorForLanguageModeling` (15%, 80/10/10) with
NumPy output over per-example rows (run_mlm_flax), and torch's `DataLoader` over the same dataset with the
PyTorch collator. Writes benchmarks/results/input-pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wikitext-2"
# Accelerator rates the loader must keep up with (BERT-base, seq 128, sequences/s). Issue 10's estimates: MLPerf
# Training v3.1 reaches ~940 BERT-large seq-512 samples/s per H100; BERT-base at 128 needs ~1/10 of the FLOPs
# per sequence, so ~9k sequences/s per H100; a TPU v4 host (4 chips) needs ~6k/s.
ACCELERATOR_SEQ_PER_S = {"H100 (BERT-base s128)": 9000.0, "TPU v4 host, 4 chips (BERT-base s128)": 6000.0}
MODES = (("static", False, False), ("dynamic", False, False), ("dynamic", False, True), ("static", True, False),
         ("dynamic", True, False), ("dynamic", True, True))


def mode_name(masking: str, packed: bool, whole_word: bool) -> str:
    return f"{masking}{' whole-word' if whole_word else ''}{' packed' if packed else ''}"


def rate(fn: Callable[[], dict], *, seconds: float, min_batches: int = 5) -> tuple[float, dict]:
    """Mean seconds per call over >= `min_batches` calls and at least `seconds` of work, after one warm-up call.
    (A mean, not a median: with a prefetch queue most calls return at once and a few wait for the work.)"""
    last = fn()
    n, start = 0, time.perf_counter()
    while n < min_batches or time.perf_counter() - start < seconds:
        last = fn()
        n += 1
    return (time.perf_counter() - start) / n, last


def prepare_dirs(work: Path, seq: int, tokenizer: Path, quick: bool = False) -> dict[bool, Path]:
    from flaxbert.data import prepare

    corpus = [str(WIKI / "wiki.valid.tokens")] + ([] if quick else [str(WIKI / "wiki.test.tokens")])
    out = {}
    for whole_word in (False, True):
        out[whole_word] = work / f"wiki-s{seq}{'-wwm' if whole_word else ''}"
        prepare(corpus, tokenizer, out[whole_word], corpus_format="wikitext", max_seq_length=seq,
                max_predictions_per_seq={128: 20, 512: 80}.get(seq, int(np.ceil(0.15 * seq)) + 1),
                dupe_factor=1 if quick else 2 if seq <= 128 else 4, whole_word_masking=whole_word, progress=False)
    return out


# host-parallel settings of the loader, each timed: made on demand in the consumer's thread, in two worker
# threads, in two worker processes (GIL-free, shared-memory blocks)
PARALLEL = (("threads0", {"prefetch_threads": 0}, "1 thread"), ("threads2", {"prefetch_threads": 2}, "2 threads"),
            ("processes2", {"prefetch_processes": 2}, "2 processes"))


def flaxbert_modes(dirs: dict[bool, Path], batch: int, seconds: float) -> list[dict]:
    from flaxbert.data import make_loader

    rows = []
    for masking, packed, whole_word in MODES:
        row = {"mode": mode_name(masking, packed, whole_word)}
        for name, kwargs, _ in PARALLEL:
            loader = make_loader(dirs[whole_word], batch_size=batch, seed=0, masking=masking, packed=packed,
                                 **kwargs)
            if "prefetch_processes" in kwargs:  # the first batch waits for the spawned workers' start; a few more
                for _ in range(8):  # and every worker is busy
                    next(loader)
            s, b = rate(lambda: next(loader), seconds=seconds)
            loader.close()
            row[f"{name}_s_per_batch"] = s
        # one thread's work per batch (no overlap): the cost a training step must hide
        row["s_per_batch"] = row["threads0_s_per_batch"]
        row["best"] = min(("threads2", "processes2"), key=lambda k: row[f"{k}_s_per_batch"])
        row["rows_per_s"] = batch / row[f"{row['best']}_s_per_batch"]
        row["real_tokens_per_row"] = float(b["attention_mask"].sum() / batch)
        row["real_tokens_per_s"] = row["rows_per_s"] * row["real_tokens_per_row"]
        row["bytes_per_row"] = int(sum(v.nbytes for v in b.values()) // batch)
        rows.append(row)
    return rows


def bare_gather(bytes_per_row: int, batch: int, seconds: float, rows: int = 200_000) -> dict:
    """The memory-bound limit: random rows of an in-memory table holding as many bytes per row as a batch."""
    table = np.random.default_rng(0).integers(0, 2**31, size=(rows, -(-bytes_per_row // 4)), dtype=np.int32)
    rng = np.random.default_rng(1)
    s, _ = rate(lambda: {"x": table[rng.integers(0, rows, batch)]}, seconds=seconds)
    return {"s_per_batch": s, "rows_per_s": batch / s, "bytes_per_row": bytes_per_row}


def hf_paths(tokenizer: Path, seq: int, batch: int, seconds: float, quick: bool = False) -> list[dict]:
    """HF's MLM input path as users run it (run_mlm's grouping into blocks; run_mlm_flax's NumPy collation)."""
    import datasets
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    lines = [line for name in ("wiki.valid.tokens",) + (() if quick else ("wiki.test.tokens",))
             for line in (WIKI / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    ds = datasets.Dataset.from_dict({"text": lines})
    ds = ds.map(lambda b: tok(b["text"], return_special_tokens_mask=True), batched=True, remove_columns=["text"])

    def group(examples):
        joined = {k: sum(examples[k], []) for k in examples}
        n = len(joined["input_ids"]) // seq * seq
        return {k: [v[i:i + seq] for i in range(0, n, seq)] for k, v in joined.items()}

    ds = ds.map(group, batched=True, batch_size=1000)
    out = []
    np_collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="np")
    rng = np.random.default_rng(0)

    def numpy_batch():
        idx = rng.integers(0, len(ds), batch)
        return np_collator([ds[int(i)] for i in idx])  # run_mlm_flax: a list of rows, then the collator

    s, _ = rate(numpy_batch, seconds=seconds)
    out.append({"path": "HF datasets + DataCollatorForLanguageModeling (NumPy), run_mlm_flax", "s_per_batch": s,
                "rows_per_s": batch / s, "real_tokens_per_s": batch * seq / s})
    pt_collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    torch.manual_seed(0)
    for workers in (0,) if quick else (0, 2):
        dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=pt_collator,
                                         num_workers=workers, persistent_workers=workers > 0)
        it = iter(dl)

        def torch_batch():
            nonlocal it
            try:
                return next(it)
            except StopIteration:
                it = iter(dl)
                return next(it)

        s, _ = rate(torch_batch, seconds=seconds)
        out.append({"path": f"HF datasets + torch DataLoader (num_workers={workers}) + PyTorch collator",
                    "s_per_batch": s, "rows_per_s": batch / s, "real_tokens_per_s": batch * seq / s})
        del it, dl
    return out


def step_times(seconds: float) -> list[dict]:
    """flaxbert's pretraining step on this CPU (fp32, AdamW, dropout), per sequence, at seq 128."""
    from benchmarks import common, peers
    from flaxbert.config import BertConfig

    out = []
    for size, batch in (("base", 8), ("large", 4)):
        config = getattr(BertConfig, size)(max_position_embeddings=512)
        runner = peers.flaxbert_runner(config, peers.init_params(config),
                                       common.pretraining_batch(config, batch, 128, 20))
        s, _ = rate(lambda: runner.step() or {}, seconds=seconds, min_batches=3)
        out.append({"model": f"BERT-{size}", "seq": 128, "batch": batch, "s_per_step": s, "s_per_row": s / batch,
                    "compile_s": runner.compile_seconds})
        del runner
    return out


def loop_vs_bare(prepared: Path, *, batch: int = 32, steps: int = 60, log_every: int = 10,
                 rounds: int = 2) -> dict:
    """A tiny model's pretraining step through the training loop (real loader, dynamic masking, device prefetch
    on and off) against the bare jitted step on one batch already on the device: the loader is hidden when the
    loop's step time is no longer than the bare step's."""
    import dataclasses

    from benchmarks import common, peers
    from flaxbert import run_config as rc
    from flaxbert.config import BertConfig
    from flaxbert.data import load_manifest
    from flaxbert.train import loop, pretraining

    manifest = load_manifest(prepared)
    seq = manifest["max_seq_length"]
    model = BertConfig.tiny(vocab_size=manifest["vocab_size"], max_position_embeddings=seq)
    optim = dataclasses.replace(peers.OPTIM, warmup_steps=0)
    out = {"model": "tiny", "seq": seq, "batch": batch, "rounds": rounds}
    runner = peers.flaxbert_runner(model, peers.init_params(model),
                                   common.pretraining_batch(model, batch, seq, manifest["max_predictions_per_seq"]),
                                   optim_cfg=optim)

    def through_loop(depth: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = rc.RunConfig(model=model, optim=optim,
                               data=rc.DataConfig(prepared_dir=str(prepared), seq_len=seq, masking="dynamic",
                                                  max_predictions_per_seq=manifest["max_predictions_per_seq"]),
                               run=rc.RunSettings(output_dir=tmp, steps=steps, global_batch_size=batch,
                                                  log_every=log_every, eval_every=0, progress=False,
                                                  prefetch=depth),
                               checkpoint=rc.CheckpointConfig(every=10 * steps, async_save=False))
            cfg, task = pretraining.build_task(cfg)
            loop.train(cfg, task)
            records = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"), encoding="utf-8")]
        windows = [r["step_time"] for r in records if r.get("split") == "train" and "step_time" in r]
        return float(np.median(windows[1:]))  # the first window holds the compile

    times = {"bare": [], "loop_prefetch2": [], "loop_prefetch0": []}
    for _ in range(rounds):  # interleaved, so that a change in the machine's load hits every variant alike
        times["bare"].append(rate(lambda: runner.step() or {}, seconds=5.0, min_batches=10)[0])
        times["loop_prefetch2"].append(through_loop(2))
        times["loop_prefetch0"].append(through_loop(0))
    out.update({f"{k}_step_s": float(np.median(v)) for k, v in times.items()}, times=times)
    out["loop_over_bare"] = out["loop_prefetch2_step_s"] / out["bare_step_s"]
    out["loop_no_prefetch_over_bare"] = out["loop_prefetch0_step_s"] / out["bare_step_s"]
    return out


def markdown(report: dict) -> str:
    b = report["settings"]["batch"]
    lines = [f"# Input pipeline, batch {b} ({report['date']}, {report['machine']['host_cores']} cores, load "
             f"{report['machine']['load_average_start'][0]:.1f} at the start)", ""]
    for cell in report["cells"]:
        S = cell["seq"]
        lines += [f"## seq {S}", "", "| path | rows/s | real tokens/s | ms/batch | × HF NumPy collator | "
                  "% of bare gather |", "|---|---:|---:|---:|---:|---:|"]
        hf = cell["hf"][0]["rows_per_s"]
        bare = cell["bare_gather"]["rows_per_s"]
        for m in cell["flaxbert"]:
            best = m.get("best", "threads2")
            others = "; ".join(f"{label}: {b / m[name + '_s_per_batch']:,.0f}" for name, _, label in PARALLEL
                               if name != best and name + "_s_per_batch" in m)
            label = dict((name, label) for name, _, label in PARALLEL)[best]
            lines.append(f"| flaxbert {m['mode']} ({label}; {others}) | "
                         f"{m['rows_per_s']:,.0f} | {m['real_tokens_per_s']:,.0f} | "
                         f"{1e3 * m[best + '_s_per_batch']:.2f} | {m['rows_per_s'] / hf:.1f} | "
                         f"{100 * m['rows_per_s'] / bare:.1f}% |")
        for h in cell["hf"]:
            lines.append(f"| {h['path']} | {h['rows_per_s']:,.0f} | {h['real_tokens_per_s']:,.0f} | "
                         f"{1e3 * h['s_per_batch']:.2f} | {h['rows_per_s'] / hf:.2f} | {100 * h['rows_per_s'] / bare:.2f}% |")
        lines += [f"| bare numpy gather of the same bytes ({cell['bare_gather']['bytes_per_row']} B/row) | "
                  f"{bare:,.0f} | | {1e3 * cell['bare_gather']['s_per_batch']:.2f} | | 100% |", ""]
    if report.get("headroom"):
        lines += ["## Loader time per batch ÷ step time (one loader thread, seq 128; < 1 means the loader keeps up)",
                  "", "| step | step s/row | " + " | ".join(m["mode"] for m in report["cells"][0]["flaxbert"]) + " |",
                  "|---|---:|" + "---:|" * len(report["cells"][0]["flaxbert"])]
        for h in report["headroom"]:
            lines.append(f"| {h['step']} | {h['s_per_row'] * 1e3:.3g} ms | "
                         + " | ".join(f"{r:.2g}" for r in h["ratios"]) + " |")
        lines.append("")
    if report.get("loop"):
        lp = report["loop"]
        lines += [f"## Training loop vs bare step (BERT-tiny, seq {lp['seq']}, batch {lp['batch']}, dynamic masking)", "",
                  "| | s/step | × bare step |", "|---|---:|---:|",
                  f"| bare jitted step, batch already on the device | {lp['bare_step_s']:.4f} | 1.00 |",
                  f"| loop, loader + device prefetch 2 | {lp['loop_prefetch2_step_s']:.4f} | {lp['loop_over_bare']:.3f} |",
                  f"| loop, loader, no prefetch | {lp['loop_prefetch0_step_s']:.4f} | "
                  f"{lp['loop_no_prefetch_over_bare']:.3f} |", ""]
    if report.get("prepare"):
        p = report["prepare"]
        lines += [f"## prepare: {p['corpus']['tokens']:,} corpus tokens ({p['corpus']['how']})", "",
                  "| workers | corpus tokens/s | seconds | peak RSS (largest process) | peak PSS (all processes) |",
                  "|---:|---:|---:|---:|---:|"]
        for r in p["runs"]:
            lines.append(f"| {r['workers']} | {r['corpus_tokens_per_s']:,.0f} | {r['seconds']:.0f} | "
                         f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_tree_pss_bytes'] / 2**30:.2f} GiB |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seqs", default="128,512")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed work per contender")
    ap.add_argument("--no-steps", action="store_true", help="skip the BERT-base/large step timing")
    ap.add_argument("--prepare-tokens", type=int, default=100_000_000, help="0 skips the prepare measurement")
    ap.add_argument("--prepare-workers", default="1,2")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="input-pipeline")
    ap.add_argument("--quick", action="store_true", help="less data and time, no steps or prepare: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.no_steps, args.prepare_tokens = min(args.seconds, 0.05), True, 0
    from benchmarks import common
    from benchmarks.prepare_corpus import build_corpus, measure_prepare

    common.setup_host("auto")
    tokenizer = common.minilm_dir()
    t0 = time.time()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": common.machine_info(),
              "settings": {"batch": args.batch, "seconds": args.seconds}, "cells": [],
              "accelerator_seq_per_s": ACCELERATOR_SEQ_PER_S}

    def save() -> None:  # after every section, so that a failure later keeps what was measured
        report["load_average_end"] = common.load_average()
        report["wall_seconds"] = time.time() - t0
        common.write_report(args.out, args.tag, report, markdown(report))

    with tempfile.TemporaryDirectory() as tmp:
        for seq in [int(s) for s in args.seqs.split(",") if s]:
            dirs = prepare_dirs(Path(tmp), seq, tokenizer, quick=args.quick)
            cell = {"seq": seq, "flaxbert": flaxbert_modes(dirs, args.batch, args.seconds)}
            cell["bare_gather"] = bare_gather(max(m["bytes_per_row"] for m in cell["flaxbert"]), args.batch,
                                              args.seconds)
            cell["hf"] = hf_paths(tokenizer, seq, args.batch, args.seconds, quick=args.quick)
            report["cells"].append(cell)
            if seq == 128 and not args.no_steps:
                report["loop"] = loop_vs_bare(dirs[False])
            save()
            print(markdown(report).split(f"## seq {seq}")[-1], flush=True)
        if not args.no_steps:
            modes = report["cells"][0]["flaxbert"]
            steps = step_times(args.seconds)
            report["steps"] = steps
            report["headroom"] = [
                {"step": f"{s['model']} s128 on this CPU (fp32)", "s_per_row": s["s_per_row"],
                 "ratios": [m["s_per_batch"] / args.batch / s["s_per_row"] for m in modes]} for s in steps] + [
                {"step": f"{name}, {rate_:,.0f} seq/s (constant)", "s_per_row": 1 / rate_,
                 "ratios": [m["s_per_batch"] / args.batch * rate_ for m in modes]}
                for name, rate_ in ACCELERATOR_SEQ_PER_S.items()]
            save()
        if args.prepare_tokens:
            corpus = build_corpus(Path(tmp) / "corpus.txt", args.prepare_tokens)
            corpus["how"] = (f"{corpus['passes']} seeded shuffles of {corpus['pool_documents']:,} documents from "
                             "../shared/data (WikiText-2, Meditations, SQuAD, CoNLL-2003, GLUE, emotion), bert format")
            corpus.pop("path")
            runs = [measure_prepare(Path(tmp) / "corpus.txt", int(w), out_dir=tmp)
                    for w in args.prepare_workers.split(",")]
            report["prepare"] = {"corpus": corpus, "runs": runs}
    save()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
