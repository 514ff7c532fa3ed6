"""`python -m flaxbert.data prepare --corpus ... --tokenizer ... --out DIR`: the preparation CLI."""

from __future__ import annotations

import argparse
import json
import sys

from flaxbert.data.corpus import FORMATS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flaxbert.data")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise a corpus into NSP/MLM instance shards plus a manifest")
    p.add_argument("--corpus", required=True, nargs="+", help="files, globs, directories, hf:NAME or tfds:NAME")
    p.add_argument("--format", choices=FORMATS, default=None, help="corpus format (default: from the name)")
    p.add_argument("--text-column", default="text", help="text column of jsonl/csv/parquet/hf/tfds corpora")
    p.add_argument("--tokenizer", required=True, help="directory with vocab.txt and/or tokenizer.json")
    p.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--max-predictions-per-seq", type=int, default=20)
    p.add_argument("--masked-lm-prob", type=float, default=0.15)
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--dupe-factor", type=int, default=1, help="instance/mask rounds over the corpus (BERT: 10)")
    p.add_argument("--whole-word-masking", action="store_true")
    p.add_argument("--no-nsp", action="store_true", help="single-segment instances for MLM-only pretraining")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores for large corpora)")
    p.add_argument("--model-vocab-size", type=int, default=None, help="fail if the tokenizer is larger")
    p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from flaxbert import cli

    return cli.run("flaxbert.data", lambda: _prepare(args))  # the traceback: not into the output dir


def _prepare(args) -> int:
    from flaxbert.data.shards import prepare

    manifest = prepare(args.corpus, args.tokenizer, args.out, corpus_format=args.format,
                       text_column=args.text_column, max_seq_length=args.max_seq_length,
                       max_predictions_per_seq=args.max_predictions_per_seq, masked_lm_prob=args.masked_lm_prob,
                       short_seq_prob=args.short_seq_prob, dupe_factor=args.dupe_factor,
                       whole_word_masking=args.whole_word_masking, seed=args.seed, nsp=not args.no_nsp,
                       num_shards=args.num_shards,
                       workers=args.workers, model_vocab_size=args.model_vocab_size, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, **manifest["counts"], **manifest["throughput"]}))
    return 0


if __name__ == "__main__":
    from flaxbert.cli import program_environment

    program_environment()  # before anything imports transformers
    sys.exit(main())
