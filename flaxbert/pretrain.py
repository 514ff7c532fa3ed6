"""`python -m flaxbert.pretrain [--config NAME|PATH] [--section.key=value ...]`: BERT pretraining.

With no arguments it pretrains the tiny model on the corpus shipped in the package (a few minutes on a
laptop CPU) and writes checkpoints, metrics.jsonl, TensorBoard events and metrics.png to runs/tiny.
Rerunning the same command resumes from the latest good checkpoint.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

USAGE = """usage: python -m flaxbert.pretrain [--config NAME|PATH] [--init_from HF_DIR] [--section.key=value ...]

  --config       a YAML file, or a name in configs/ (tiny, bert_base_phase1, bert_large_phase2, ...)
  --init_from    continue pretraining from a Hugging Face checkpoint dir (same as --run.init_from): BERT, or
                 MLM only from DistilBERT, RoBERTa, XLM-R or ELECTRA; its tokenizer is used
  --run.export_hf=DIR   when the run finishes, write the model as a Hugging Face directory to DIR
  --section.key  override any field, e.g. --optim.lr=1e-4 --mesh.fsdp=8 --run.steps=1000

sections: model, data, optim, mesh, run, checkpoint (see flaxbert/run_config.py and docs/training.md)
"""


def parse_args(argv: Sequence[str]):
    """(config name, overrides) from argv; `--init_from X` is shorthand for `--run.init_from=X`."""
    config, overrides, args = "", [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in ("--config", "--init_from", "--init-from"):
            if not eq:
                if i + 1 >= len(args):
                    raise SystemExit(f"{name} needs a value\n\n{USAGE}")
                value, i = args[i + 1], i + 1
            if name == "--config":
                config = value
            else:
                overrides.append(f"--run.init_from={value}")
        elif arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        else:
            overrides.append(arg)
        i += 1
    return config, overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    from flaxbert import cli, host

    # transformers (used here for tokenizers only) advises at import that it found no PyTorch: not for this run
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    host.configure_logging()
    where: dict = {}
    return cli.run("flaxbert.pretrain", lambda: _pretrain(argv, where), lambda: where.get("output_dir"))


def _pretrain(argv: Optional[Sequence[str]], where: dict) -> int:
    from flaxbert import cli, host
    from flaxbert import run_config as rc

    cfg = rc.load(*parse_args(sys.argv[1:] if argv is None else argv))
    where["output_dir"] = cfg.run.output_dir
    host.reuse_freed_memory()  # before XLA starts its threads: see flaxbert/host.py
    from flaxbert.train import loop  # imports jax: after the config is known to be good

    loop.initialize_distributed(cfg.run)
    from flaxbert.train import pretraining

    cfg, task = pretraining.build_task(cfg)  # validates everything before writing anything
    import jax

    if jax.process_index() == 0:
        cli.log_to(cfg.run.output_dir)
    export = pretraining.ExportHF(cfg, cfg.run.export_hf) if cfg.run.export_hf else None
    result = loop.train(cfg, task, snapshots=export)
    if jax.process_index() != 0:  # logging from process 0 only
        return 1 if result.reason in ("nonfinite", "diverged") else 0
    m = result.last_metrics
    summary = ", ".join(f"{k} {m[k]:.4f}" for k in ("loss", "mlm_accuracy", "nsp_accuracy", "eval_mlm_accuracy")
                        if k in m)
    if "eval_mlm_accuracy" in m and task.eval_batches is not None:  # what "learned" means: beside a guess
        base = pretraining.unigram_baseline(pretraining.data_dirs(cfg)[0], task.eval_batches, cfg.run.eval_batches)
        if base:
            summary += (f" (always guessing the most frequent token {base[0]}: {base[1]:.4f}; "
                        f"{m['eval_mlm_accuracy'] / max(base[1], 1e-9):.1f}x that)")
    print(f"{result.reason} at step {result.step}: {summary}. Outputs in {cfg.run.output_dir}"
          + (f"\n{result.message}" if result.message else ""))
    return 1 if result.reason in ("nonfinite", "diverged") else 0


if __name__ == "__main__":
    from flaxbert.cli import program_environment

    program_environment()  # before anything imports transformers
    sys.exit(main())
