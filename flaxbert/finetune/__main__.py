"""`python -m flaxbert.finetune --task TASK --model DIR --data DATA [--config NAME] [--section.key=value ...]`"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


# short flags -> dotted config keys
FLAGS = {"task": "task.name", "model": "task.model", "data": "task.data", "output_dir": "run.output_dir",
         "epochs": "task.epochs", "lr": "optim.lr", "batch_size": "run.global_batch_size",
         "max_length": "task.max_length", "max_train_examples": "task.max_train_examples",
         "max_eval_examples": "task.max_eval_examples", "seed": "run.seed"}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flaxbert.finetune", description=__doc__,
                                epilog="Any config key can be overridden as --section.key=value "
                                       "(sections: task, optim, run, checkpoint, mesh).")
    p.add_argument("--config", default="", help="YAML in configs/finetune/ (name) or a path")
    for flag in FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None)
    p.add_argument("--freeze-encoder", action="store_true", help="train only the head (encoder frozen)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--features", action="store_true",
                   help="feature extraction: frozen encoder -> embeddings -> scikit-learn logistic regression")
    p.add_argument("--pooling", default="mean", choices=("mean", "pooled", "cls"),
                   help="with --features; 'pooled' needs a model with a pooler (BERT, not DistilBERT)")
    p.add_argument("--eval-only", action="store_true", help="evaluate a fine-tuned model (no training)")
    args, rest = p.parse_known_args(argv)
    from flaxbert import host

    host.configure_logging()  # progress and notices on stderr; the results below on stdout

    host.reuse_freed_memory()  # before XLA starts its threads: see flaxbert/host.py
    overrides = [f"--{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag) is not None]
    if args.freeze_encoder:
        overrides.append("--optim.freeze_encoder=true")
    if args.no_progress:
        overrides.append("--run.progress=false")
    from flaxbert import cli

    where: dict = {}
    return cli.run("flaxbert.finetune", lambda: _run(args, list(rest) + overrides, where),
                   lambda: where.get("output_dir"))


def _run(args, overrides: list[str], where: dict) -> int:
    from flaxbert.finetune.run import finetune, load_config

    cfg = load_config(args.config, overrides)
    where["output_dir"] = cfg.run.run.output_dir
    if args.eval_only:
        from flaxbert.finetune.run import evaluate_model

        print(json.dumps(evaluate_model(cfg), indent=2))
        return 0
    if args.features:
        from flaxbert.finetune.linear_probe import extract_and_fit

        report = extract_and_fit(cfg, pooling=args.pooling)
        print(json.dumps(report["metrics"], indent=2))
        return 0
    result = finetune(cfg)
    print(json.dumps({"best_step": result.best_step, "eval": result.metrics,
                      "real_tokens_per_sec": round(result.real_tokens_per_sec, 1),
                      "output_dir": result.output_dir}, indent=2))
    return 0


if __name__ == "__main__":
    from flaxbert.cli import program_environment

    program_environment()  # before anything imports transformers
    sys.exit(main())
