"""Corpus-scale throughput and peak memory of `flaxbert.data.prepare` on a shuffled concatenation of ../shared/data.

    python -m benchmarks.prepare_corpus [--min-tokens 100_000_000] [--workers 1 2] [--data-root ../shared/data]

`build_corpus(out_path, min_tokens)` writes the corpus in the `bert` format (one sentence per line, a blank line
between documents): the documents of every data set under the data root, shuffled (seeded) and repeated until
they hold `min_tokens` tokens. `measure_prepare(corpus, workers)` runs `prepare` in a fresh process and reports
its throughput and peak resident memory. Prints a table and writes benchmarks/results/prepare-corpus.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
GROUP = 8  # single-sentence records (SST-2, CoLA, emotion) are grouped into documents of this many


def _minilm() -> Path:
    from benchmarks.common import minilm_dir  # imported here: common starts jax, which building a corpus needs not

    return minilm_dir()


def _grouped(sentences: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(sentences), GROUP):
        yield sentences[i:i + GROUP]


def _tsv(path: Path, columns: list, header: bool = True) -> Iterator[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # GLUE text holds bare quotes
        names = next(rows) if header else None
        for row in rows:
            index = [names.index(c) for c in columns] if names else columns
            if len(row) > max(index):
                yield [row[i] for i in index]


def source_documents(data_root: Path = DATA) -> Iterator[list[str]]:
    """Documents (lists of sentences) of every data set under `data_root`, in a fixed order."""
    from flaxbert.data.corpus import read_documents, split_sentences

    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        yield from (list(d.sentences) for d in read_documents(data_root / "wikitext-2" / name, "wikitext"))
    yield from (list(d.sentences) for d in read_documents(data_root / "meditations" / "clean.txt", "lines"))
    for article in json.loads((data_root / "squad" / "dev-v1.1.json").read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            yield split_sentences(paragraph["context"])
    for split in ("train", "valid", "test"):  # CoNLL-2003: a token per line, blank lines end sentences
        doc, words = [], []
        for line in (data_root / "conll2003" / f"{split}.txt").read_text(encoding="utf-8").splitlines() + [""]:
            if line.startswith("-DOCSTART-"):
                if doc:
                    yield doc
                doc = []
            elif line.strip():
                words.append(line.split(" ", 1)[0])
            elif words:
                doc.append(" ".join(words))
                words = []
        if doc:
            yield doc
    glue = data_root / "glue"
    for task, columns in (("MRPC", ["#1 String", "#2 String"]), ("RTE", ["sentence1", "sentence2"]),
                          ("STS-B", ["sentence1", "sentence2"])):
        for split in ("train", "dev"):
            yield from _tsv(glue / task / f"{split}.tsv", columns)
    for split in ("train", "dev"):
        yield from _grouped([r[0] for r in _tsv(glue / "SST-2" / f"{split}.tsv", ["sentence"])])
        yield from _grouped([r[0] for r in _tsv(glue / "CoLA" / f"{split}.tsv", [3], header=False)])
    for split in ("train", "test"):
        lines = (data_root / "emotion" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        yield from _grouped([line.rsplit(";", 1)[0] for line in lines if line.strip()])


def _bert_text(document: list[str]) -> str:
    sentences = [" ".join(s.split()) for s in document]  # one line per sentence: no line breaks inside
    return "".join(s + "\n" for s in sentences if s) + "\n"


def build_corpus(out_path: str | os.PathLike, min_tokens: int, *, data_root: str | os.PathLike = DATA,
                 tokenizer: str | os.PathLike | None = None, seed: int = 0) -> dict:
    """Write >= `min_tokens` tokens (counted with `tokenizer`, default MiniLM's) of ../shared/data documents to
    `out_path` in the `bert` format: passes over all the documents, each pass in a new seeded order, cut off
    once `min_tokens` is reached. Returns a summary."""
    from tokenizers import Tokenizer

    pool = [t for t in map(_bert_text, source_documents(Path(data_root))) if t.strip()]
    backend = Tokenizer.from_file(str(Path(tokenizer or _minilm()) / "tokenizer.json"))
    backend.no_padding()
    backend.no_truncation()
    lines = [t.splitlines() for t in pool]
    encodings = iter(backend.encode_batch_fast([s for doc in lines for s in doc if s], add_special_tokens=False))
    doc_tokens = [sum(len(next(encodings)) for s in doc if s) for doc in lines]
    rng, written, documents, passes = random.Random(seed), 0, 0, 0
    with open(out_path, "w", encoding="utf-8") as f:
        while written < min_tokens:
            order = list(range(len(pool)))
            rng.shuffle(order)
            passes += 1
            for i in order:
                f.write(pool[i])
                written += doc_tokens[i]
                documents += 1
                if written >= min_tokens:
                    break
    return {"path": str(out_path), "tokens": written, "documents": documents, "passes": passes,
            "pool_documents": len(pool), "pool_tokens": sum(doc_tokens), "bytes": os.path.getsize(out_path)}


# Peaks: VmHWM of this process (getrusage's maxrss would keep the launching process's peak across exec) and
# getrusage of the children (the workers, forked from this process).
_RUNNER = """
import json, resource, sys
from flaxbert.data import prepare
m = prepare(sys.argv[1], sys.argv[2], sys.argv[3], workers=int(sys.argv[4]), progress=False, **json.loads(sys.argv[5]))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"counts": m["counts"], "throughput": m["throughput"], "main_peak_rss_bytes": hwm * 1024,
                  "worker_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def _tree_pss(pid: int) -> int:
    """Proportional set size of `pid` and its children (shared pages split between their users)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children", encoding="ascii") as f:
                todo.extend(int(c) for c in f.read().split())
        except (OSError, StopIteration):
            pass
    return total


def measure_prepare(corpus: str | os.PathLike, workers: int, *, tokenizer: str | os.PathLike | None = None,
                    out_dir: str | os.PathLike | None = None, **settings) -> dict:
    """Run `prepare(corpus, ...)` in a fresh process with `workers` workers and report corpus tokens/s, seconds,
    phase seconds, the peak RSS of the main process and of the largest worker (`peak_rss_bytes` is the larger)
    and the peak summed PSS of the process tree (sampled every 0.2 s). `settings` go to `prepare`."""
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        args = [sys.executable, "-c", _RUNNER, str(corpus), str(tokenizer or _minilm()),
                str(Path(tmp) / "prepared"), str(workers), json.dumps({"corpus_format": "bert", **settings})]
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak_pss, done = [0], threading.Event()

        def sample():
            while not done.wait(0.2):
                peak_pss[0] = max(peak_pss[0], _tree_pss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        done.set()
        sampler.join()
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed ({proc.returncode}):\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    throughput = result["throughput"]
    return {"workers": workers, "corpus_tokens": result["counts"]["corpus_tokens"],
            "instances": result["counts"]["instances"], "corpus_tokens_per_s": throughput["corpus_tokens_per_s"],
            "seconds": throughput["seconds"], "wall_s": round(wall, 3),
            "phases": {k: v for k, v in throughput.items() if k.endswith("_s") and k != "corpus_tokens_per_s"},
            "peak_rss_bytes": max(result["main_peak_rss_bytes"], result["worker_peak_rss_bytes"]),
            "main_peak_rss_bytes": result["main_peak_rss_bytes"],
            "worker_peak_rss_bytes": result["worker_peak_rss_bytes"], "peak_tree_pss_bytes": peak_pss[0],
            "load_average_after": os.getloadavg()}  # the machine is shared: how busy it was


def _commit() -> str:
    """The measured code: HEAD, marked when flaxbert/ has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" (modified)" if git("status", "--porcelain", "flaxbert") else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-tokens", type=int, default=100_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data-root", type=Path, default=DATA)
    ap.add_argument("--dupe-factor", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prepare-corpus.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp) / "corpus.txt", args.min_tokens, data_root=args.data_root)
        print(f"corpus: {corpus['tokens']:,} tokens, {corpus['documents']:,} documents, {corpus['bytes']:,} bytes "
              f"({corpus['passes']} shuffled passes over {corpus['pool_documents']:,} documents)")
        runs = [measure_prepare(corpus["path"], w, dupe_factor=args.dupe_factor, out_dir=tmp) for w in args.workers]
    print(f"{'workers':>7} {'tokens/s':>10} {'seconds':>8} {'peak RSS MB':>11} {'tree PSS MB':>11}  phases (s)")
    for r in runs:
        phases = " ".join(f"{k.removesuffix('_s')}={v:.1f}" for k, v in r["phases"].items())
        print(f"{r['workers']:>7} {r['corpus_tokens_per_s']:>10,.0f} {r['seconds']:>8.1f} "
              f"{r['peak_rss_bytes'] / 2**20:>11,.0f} {r['peak_tree_pss_bytes'] / 2**20:>11,.0f}  {phases}")
    corpus.pop("path")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"commit": _commit(), "corpus": corpus, "cores": os.cpu_count(),
                                    "load_average": os.getloadavg(), "dupe_factor": args.dupe_factor,
                                    "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
