"""NER on CoNLL-2003 with all-MiniLM-L6-v2: the softmax token classifier against the same classifier with a
linear-chain CRF (`task.crf=true`, BIO-constrained Viterbi), on the same budget.

    python -m benchmarks.conll_crf [--epochs 1] [--max-train-examples 0] [--lr 1e-4]

Both runs are `flaxbert.finetune.run.finetune` with the same train examples, steps, batch, learning rate,
warmup, seed and buckets; each scores valid and test once, after its last step (entity F1, conlleval micro),
and writes benchmarks/results/conll-crf.{json,md}. A third run, `crf_unconstrained`, decodes the CRF
without the BIO constraints (its training is the constrained run's: the constraints act at decoding only).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/conll2003"  # relative to the repository root
HEADS = {"softmax": {"crf": False}, "crf": {"crf": True},  # head name -> task settings
         "crf_unconstrained": {"crf": True, "crf_constraints": False}}  # an ablation: the constraints


def run_head(name: str, head_settings: dict, args, out_dir: str) -> dict:
    from flaxbert.finetune.run import finetune, load_config

    tree = {"task": {"name": "conll2003", "model": str(common.minilm_dir()), "data": args.data, **head_settings,
                     "epochs": args.epochs, "max_length": args.max_length,
                     "max_train_examples": args.max_train_examples,
                     "max_eval_examples": args.max_eval_examples, "evals_per_epoch": 1, "warmup_ratio": 0.1,
                     "eval_batch_size": 64, "save_model": False},
            "run": {"output_dir": os.path.join(out_dir, name), "global_batch_size": args.batch_size,
                    "seed": args.seed, "progress": False, "log_every": 50},
            "optim": {"lr": args.lr}}
    t0 = time.perf_counter()
    result = finetune(load_config(tree=tree))
    wall = time.perf_counter() - t0
    with open(os.path.join(out_dir, name, "metrics.json"), encoding="utf-8") as f:
        steps = json.load(f)["train"]["steps"]
    return {"head": name, "steps": steps, "best_step": result.best_step, "train_seconds": result.train_seconds,
            "wall_seconds": wall, "eval": result.metrics}


def markdown(report: dict) -> str:
    b = report["budget"]
    lines = ["# CoNLL-2003 NER, all-MiniLM-L6-v2: softmax vs CRF head", "",
             f"{b['train_examples'] or 'all'} train sentences, {b['epochs']} epoch(s) = {report['runs'][0]['steps']} "
             f"steps of batch {b['batch_size']}, lr {b['lr']} (10% warmup, linear decay), max length "
             f"{b['max_length']}, seed {b['seed']}; {report['machine']['host_cpu']} "
             f"({report['machine']['host_cores']} cores).", "",
             "| head | valid F1 | test F1 | valid P / R | test P / R | steps | train s | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        v, t = r["eval"]["valid"], r["eval"]["test"]
        lines.append(f"| {r['head']} | {100 * v['f1']:.2f} | {100 * t['f1']:.2f} | {100 * v['precision']:.1f} / "
                     f"{100 * v['recall']:.1f} | {100 * t['precision']:.1f} / {100 * t['recall']:.1f} | {r['steps']} | "
                     f"{r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |")
    lines += ["", "Entity F1 is conlleval's micro average (flaxbert.scores.entity_report, checked against seqeval); "
              "`crf` decodes with BIO-constrained Viterbi over each word's first sub-token (`crf_unconstrained`: "
              "plain Viterbi); both train on the CRF likelihood, the softmax head on per-token cross-entropy."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conll_crf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str((REPO / DEFAULT_DATA).resolve()))
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-train-examples", type=int, default=0, help="0 = all of train")
    ap.add_argument("--max-eval-examples", type=int, default=0, help="0 = all of valid and test")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", default="softmax,crf,crf_unconstrained")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="conll-crf")
    args = ap.parse_args(argv)
    common.setup_host()
    machine = common.machine_info()
    runs = []
    with tempfile.TemporaryDirectory(prefix="conll-crf-") as tmp:
        for name in args.heads.split(","):
            runs.append(run_head(name, HEADS[name], args, tmp))
            print(json.dumps(runs[-1]), flush=True)
    report = {"benchmark": "conll_crf", "machine": machine,
              "budget": {"epochs": args.epochs, "train_examples": args.max_train_examples,
                         "eval_examples": args.max_eval_examples, "batch_size": args.batch_size, "lr": args.lr,
                         "max_length": args.max_length, "seed": args.seed},
              "runs": runs, "load_average_end": common.load_average()}
    md = markdown(report)
    print(md)
    common.write_report(args.out, args.tag, report, md)
    return report


if __name__ == "__main__":
    main()
