"""Prepare a pretraining corpus: read, tokenise, build NSP instances, mask (static), write shards + manifest.

The prepared directory holds `manifest.json`, `tokenizer/` (a copy of the tokenizer used),
`replacement_ids.npy` and `shard-NNNNN/` directories of flat numpy arrays (memory-mapped by the loader).
Output is byte-identical for a given seed whatever the number of workers: every random choice is seeded from
(seed, dupe round, document), and documents are assigned to shards independently of the workers.

Preparation streams, so its memory does not grow with the corpus (beyond the offsets, 8 bytes a sentence):
documents are read in chunks that worker processes tokenise in order, and the tokens go to a file as they arrive;
then every shard is built, masked and written a block of instances at a time, reading only the tokens it needs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from flaxbert.data.corpus import expand, read_documents
from flaxbert.data.instances import (Assembled, InstanceConfig, TokenizedCorpus, assemble, continuation_ids,
                                     document_spans, tokenize_sentences)
from flaxbert.data.masking import MaskingConfig, derive_key, mask_batch
from flaxbert.errors import DataError
from flaxbert.vocab import load_tokenizer, tokenizer_fingerprint

FORMAT_VERSION = 1
SHARD_ARRAYS = ("tokens", "word_starts", "offsets", "a_lengths", "is_random_next", "target_lengths",
                 "mask_offsets", "mask_positions", "mask_inputs")
CHUNK_CHARS = 1 << 20  # text per tokenisation task: a fraction of a second of work, a few MB in flight
BLOCK_INSTANCES = 8192  # instances built, masked and written at once: bounds a worker's memory


def _context():
    """fork (instant workers) unless JAX has started its runtime threads in this process, else spawn."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    jax_running = bridge is not None and bool(getattr(bridge, "_backends", True))
    return multiprocessing.get_context("spawn" if jax_running or sys.platform != "linux" else "fork")


_WORKER: dict = {}  # the tokenizer of this prepare call in a worker (or in-process), set by _worker_init


def _worker_init(tokenizer_file: str, token_dtype: str) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; parallelism comes from workers
    backend = Tokenizer.from_file(tokenizer_file)
    backend.no_padding()  # some saved tokenizers (sentence-transformers) pad/truncate every encoding
    backend.no_truncation()
    _WORKER.update(backend=backend, continuation=continuation_ids(backend), dtype=np.dtype(token_dtype))


def _tokenize_chunk(task):
    sentences, doc_sizes = task
    return tokenize_sentences(_WORKER["backend"], sentences, _WORKER["dtype"], _WORKER["continuation"]), doc_sizes


def ordered_map(pool, fn: Callable, tasks: Iterable, ahead: int) -> Iterator:
    """fn(task) for every task, in order, with at most `ahead` tasks queued: unlike `Pool.imap`, which reads
    all its tasks at once, this holds only a few chunks of the corpus in memory."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class NpyAppender:
    """A 1-D .npy file written piece by piece; the header, which holds the length, is written at close."""

    HEADER = 128  # bytes, room for any length

    def __init__(self, path: Path, dtype):
        self.dtype, self.count = np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.file.write(bytes(self.HEADER))

    def append(self, values) -> None:
        values = np.ascontiguousarray(values, self.dtype)
        values.tofile(self.file)
        self.count += len(values)

    def close(self) -> None:
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                       "shape": (self.count,)}).encode("latin1")
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", self.HEADER - 10)
                        + header.ljust(self.HEADER - 11) + b"\n")
        self.file.close()


@dataclasses.dataclass
class _ReadStats:
    documents: int = 0
    max_sentences: int = 0
    seconds: float = 0.0  # spent reading (in the main process, while the workers tokenise)


def _chunks(documents: Iterator, stats: _ReadStats) -> Iterator[tuple[list[str], list[int]]]:
    """Tokenisation tasks: the sentences of whole documents, about CHUNK_CHARS of text each, with the number of
    sentences of each document. Counts what the corpus checks need on the way."""
    sentences: list[str] = []
    sizes: list[int] = []
    chars = 0
    t0 = time.perf_counter()
    for doc in documents:
        stats.documents += 1
        stats.max_sentences = max(stats.max_sentences, len(doc.sentences))
        sentences.extend(doc.sentences)
        sizes.append(len(doc.sentences))
        chars += sum(map(len, doc.sentences))
        if chars >= CHUNK_CHARS:
            stats.seconds += time.perf_counter() - t0
            yield sentences, sizes
            sentences, sizes, chars = [], [], 0
            t0 = time.perf_counter()
    stats.seconds += time.perf_counter() - t0
    if sizes:
        yield sentences, sizes


def _tokenize(chunks: Iterator, directory: Path, dtype: str, pool, ahead: int, progress: bool) -> TokenizedCorpus:
    """Tokenise the chunks in the pool, in order, appending tokens and word starts to `directory`; sentences
    that tokenise to nothing (control characters only) and documents left empty are dropped."""
    from tqdm.auto import tqdm

    directory.mkdir()
    tokens, word_starts = NpyAppender(directory / "tokens.npy", dtype), NpyAppender(directory / "word_starts.npy",
                                                                                    np.uint8)
    lengths, doc_sizes = [], []
    with tqdm(desc="tokenize", unit="chunk", disable=not progress) as bar:
        for chunk, sizes in ordered_map(pool, _tokenize_chunk, chunks, ahead):
            tokens.append(chunk.tokens)
            word_starts.append(chunk.word_starts)
            keep = chunk.lengths > 0
            lengths.append(chunk.lengths[keep].astype(np.int32))
            kept = np.bincount(np.repeat(np.arange(len(sizes)), sizes)[keep], minlength=len(sizes))
            doc_sizes.append(kept[kept > 0].astype(np.int32))
            bar.update(1)
    tokens.close()
    word_starts.close()
    index = TokenizedCorpus(None, None, _offsets(lengths), _offsets(doc_sizes))  # the tokens stay on disk
    np.save(directory / "sentence_offsets.npy", index.sentence_offsets)
    np.save(directory / "doc_offsets.npy", index.doc_offsets)
    return index


def _offsets(counts: list[np.ndarray]) -> np.ndarray:
    """[0, cumsum...] as int64, with one temporary copy (these are the arrays that grow with the corpus)."""
    flat = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    out = np.zeros(len(flat) + 1, np.int64)
    np.cumsum(flat, out=out[1:])
    return out


class _SpanReader:
    """Runs of the tokenised corpus, read with pread. Not a map: the pages a map touches count as the process's
    memory, and with the kernel's fault-around a block's random B segments would map most of the files."""

    def __init__(self, directory: Path, token_dtype: str):
        self.files = [(os.open(directory / "tokens.npy", os.O_RDONLY), np.dtype(token_dtype)),
                      (os.open(directory / "word_starts.npy", os.O_RDONLY), np.dtype(np.uint8))]

    def read(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, word starts) of the runs [starts[k], starts[k] + lengths[k]), concatenated."""
        out = []
        for fd, dtype in self.files:  # the data start after NpyAppender's fixed-size header
            size = dtype.itemsize
            out.append(np.frombuffer(b"".join(os.pread(fd, int(n) * size, NpyAppender.HEADER + int(a) * size)
                                              for a, n in zip(starts, lengths)), dtype))
        return out[0], out[1]

    def close(self) -> None:
        for fd, _ in self.files:
            os.close(fd)


def _read_block(reader: _SpanReader, spans: np.ndarray) -> tuple[TokenizedCorpus, np.ndarray]:
    """The tokens a block of span rows needs, and the rows pointing into them: one read for the block's own
    documents (A, and B when it follows A), one per random B."""
    random_next = spans[:, 4].astype(bool)
    ends = spans[:, [0, 2]] + spans[:, [1, 3]]
    lo = int(spans[:, 0].min())
    hi = int(max(ends[:, 0].max(), ends[~random_next, 1].max(initial=0)))
    starts = np.concatenate([[lo], spans[random_next, 2]])
    lengths = np.concatenate([[hi - lo], spans[random_next, 3]])
    tokens, word_starts = reader.read(starts, lengths)
    local = spans.copy()
    local[:, 0] -= lo
    local[~random_next, 2] -= lo
    local[random_next, 2] = np.cumsum(lengths)[:-1]
    return TokenizedCorpus(tokens, word_starts, None, None), local


def masking_config(manifest: dict, replacement_ids: np.ndarray) -> MaskingConfig:
    """The masking settings of a prepared directory (shared by static masking here and the dynamic loader)."""
    is_special = np.zeros(manifest["vocab_size"], bool)
    is_special[manifest["special_ids"]] = True
    return MaskingConfig(mask_id=manifest["mask_id"], is_special=is_special,
                         replacement_ids=replacement_ids, masked_lm_prob=manifest["masked_lm_prob"],
                         max_predictions_per_seq=manifest["max_predictions_per_seq"],
                         whole_word=manifest["whole_word_masking"])


class _ShardWriter:
    """The SHARD_ARRAYS of one shard, appended a block of instances at a time."""

    def __init__(self, directory: Path, manifest: dict):
        directory.mkdir()
        dtypes = {"tokens": manifest["token_dtype"], "word_starts": np.uint8, "offsets": np.int64,
                  "a_lengths": np.int32, "is_random_next": np.uint8, "target_lengths": np.int32,
                  "mask_offsets": np.int64, "mask_positions": np.int32, "mask_inputs": manifest["token_dtype"]}
        self.files = {name: NpyAppender(directory / f"{name}.npy", dtypes[name]) for name in SHARD_ARRAYS}
        self.short = manifest["max_seq_length"] - (3 if manifest.get("nsp", True) else 2)  # the full target
        self.stats = dict.fromkeys(("instances", "tokens", "predictions", "random_next", "short_target"), 0)

    def append(self, spans: np.ndarray, built: Assembled, masks: "_Masks") -> None:
        f, s = self.files, self.stats
        f["tokens"].append(built.tokens)
        f["word_starts"].append(built.word_starts)
        f["offsets"].append(built.offsets[:-1] + s["tokens"])
        f["a_lengths"].append(spans[:, 1])
        f["is_random_next"].append(spans[:, 4])
        f["target_lengths"].append(spans[:, 5])
        f["mask_offsets"].append(_offsets([masks.counts])[:-1] + s["predictions"])
        f["mask_positions"].append(masks.positions)
        f["mask_inputs"].append(masks.inputs)
        s["instances"] += len(spans)
        s["tokens"] += int(built.offsets[-1])
        s["predictions"] += int(masks.counts.sum())
        s["random_next"] += int(spans[:, 4].sum())
        s["short_target"] += int((spans[:, 5] < self.short).sum())

    def close(self) -> dict:
        self.files["offsets"].append([self.stats["tokens"]])
        self.files["mask_offsets"].append([self.stats["predictions"]])
        for f in self.files.values():
            f.close()
        return self.stats


class _Masks(NamedTuple):
    positions: np.ndarray  # [predictions] every instance's masked positions, flat
    inputs: np.ndarray  # [predictions] the input ids there ([MASK], random or unchanged)
    counts: np.ndarray  # [instances] predictions per instance


def _static_masks(built: Assembled, spans: np.ndarray, mcfg: MaskingConfig, seq_len: int, key: int) -> _Masks:
    """Masks of a block of instances in one `mask_batch` call. A row's id is A's first token offset, which no two
    instances of a round share, and rows are padded to `seq_len`, so an instance's masks do not depend on the
    block it is in (nor on the workers)."""
    lengths = np.diff(built.offsets)
    valid = np.arange(seq_len) < lengths[:, None]  # [n, seq_len]
    tokens = np.zeros(valid.shape, np.int32)
    tokens[valid] = built.tokens
    word_starts = None
    if mcfg.whole_word:
        word_starts = np.zeros(valid.shape, np.uint8)
        word_starts[valid] = built.word_starts
    masked = mask_batch(tokens, valid, word_starts, mcfg, key, spans[:, 0])
    real = masked.weights > 0
    positions = masked.positions[real]
    return _Masks(positions, masked.input_ids[np.nonzero(real)[0], positions], real.sum(axis=1))


def _write_shard(args) -> dict:
    """Build, mask and write one shard: every dupe round over documents [doc_lo, doc_hi)."""
    out_dir, shard, doc_lo, doc_hi, manifest = args
    tokenized = Path(out_dir) / "_tokenized"
    index = TokenizedCorpus(None, None, np.load(tokenized / "sentence_offsets.npy"),
                            np.load(tokenized / "doc_offsets.npy"))  # the tokens are read per block
    reader = _SpanReader(tokenized, manifest["token_dtype"])
    mcfg = masking_config(manifest, np.load(Path(out_dir) / "replacement_ids.npy"))
    icfg = InstanceConfig(manifest["max_seq_length"], manifest["short_seq_prob"], nsp=manifest.get("nsp", True))
    cls_id, sep_id, seed = manifest["cls_id"], manifest["sep_id"], manifest["seed"]
    name = f"shard-{shard:05d}"
    writer = _ShardWriter(Path(out_dir) / name, manifest)

    def flush(rows: list, key: int) -> None:
        if not rows:
            return
        spans = np.array(rows, np.int64)
        rows.clear()
        built = assemble(*_read_block(reader, spans), cls_id, sep_id, pair=icfg.nsp)
        writer.append(spans, built, _static_masks(built, spans, mcfg, manifest["max_seq_length"], key))

    for dupe in range(manifest["dupe_factor"]):
        rows: list = []
        key = derive_key(seed, 3, dupe)  # 3: static masks (the loader uses 1 for order, 2 for dynamic masks)
        for doc in range(doc_lo, doc_hi):
            document_spans(index, doc, icfg, random.Random(f"{seed}/{dupe}/{doc}"), rows)
            if len(rows) >= BLOCK_INSTANCES:
                flush(rows, key)
        flush(rows, key)
    reader.close()
    return {"name": name, **writer.close(), "documents": (doc_hi - doc_lo) * manifest["dupe_factor"]}


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """What shapes the prepared instances (and goes into the manifest); checked when made."""

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 1
    whole_word_masking: bool = False
    seed: int = 12345
    nsp: bool = True  # False: single-segment instances for MLM-only pretraining (no random-next pairs)

    def __post_init__(self):
        checks = [(self.max_seq_length >= 5, f"max_seq_length must be at least 5, got {self.max_seq_length}"),
                  (self.max_predictions_per_seq >= 1,
                   f"max_predictions_per_seq must be positive, got {self.max_predictions_per_seq}"),
                  (0.0 < self.masked_lm_prob < 1.0, f"masked_lm_prob must be in (0, 1), got {self.masked_lm_prob}"),
                  (0.0 <= self.short_seq_prob <= 1.0,
                   f"short_seq_prob must be in [0, 1], got {self.short_seq_prob}"),
                  (self.dupe_factor >= 1, f"dupe_factor must be positive, got {self.dupe_factor}")]
        for ok, message in checks:
            if not ok:
                raise DataError(message)


def _corpus_bytes(specs: Sequence[str]) -> float:
    """Size of the corpus files (hf:/tfds: datasets count as large), to choose the default worker count."""
    return sum(math.inf if s.startswith(("hf:", "tfds:")) else os.path.getsize(s) for s in specs)


def prepare(corpus: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, out_dir: str | os.PathLike,
            settings: PrepareSettings | None = None, *, corpus_format: str | None = None, text_column: str = "text",
            num_shards: int | None = None, workers: int | None = None, model_vocab_size: int | None = None,
            overwrite: bool = False, progress: bool = True, **instance_settings) -> dict:
    """Prepare `corpus` for pretraining into `out_dir` and return the manifest (also written as manifest.json).

    `settings` (a `PrepareSettings`), or its fields as keywords (`max_seq_length=128, nsp=False, ...`), shape the
    instances. `tokenizer` is a tokenizer directory or a loaded fast HF tokenizer. `workers=None` uses every core
    for corpora over ~4 MB (one process below that, where starting workers costs more than it saves).
    `model_vocab_size`, when given, must hold the tokenizer's vocabulary.
    """
    if settings is not None and instance_settings:
        raise TypeError("give prepare() a PrepareSettings or its fields as keywords, not both")
    try:
        settings = settings or PrepareSettings(**instance_settings)
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(PrepareSettings)]
        raise TypeError(f"prepare(): {e}; the instance settings are {fields}") from None
    tokenizer_name = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else getattr(
        tokenizer, "name_or_path", "tokenizer")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    vocab_size = len(tokenizer)
    if model_vocab_size is not None and vocab_size > model_vocab_size:
        raise DataError(f"{tokenizer_name}: the tokenizer has {vocab_size} tokens but the model's embedding table "
                        f"has only {model_vocab_size} rows; use a model with vocab_size >= {vocab_size}")
    start = time.perf_counter()  # throughput counts from here: importing transformers is not preparation
    specs = expand(corpus)
    documents = read_documents(specs, corpus_format, text_column=text_column)  # a generator: read as consumed
    workers = workers or ((os.cpu_count() or 1) if _corpus_bytes(specs) > 4_000_000 else 1)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "corpus": specs, "corpus_format": corpus_format,
        "text_column": text_column, "tokenizer": tokenizer_name, "tokenizer_dir": "tokenizer",
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "vocab_size": vocab_size,
        "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
        "token_dtype": "uint16" if vocab_size <= 65535 else "int32",
        "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id, "mask_id": tokenizer.mask_token_id,
        "pad_id": tokenizer.pad_token_id, "special_ids": sorted(set(tokenizer.all_special_ids)),
        **dataclasses.asdict(settings),
    }
    out = Path(out_dir)
    partial = _partial_output_dir(out, overwrite)
    try:
        _write(documents, tokenizer, partial, manifest, workers, num_shards, progress, start)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():  # checked by _partial_output_dir: empty, or an earlier prepared directory to overwrite
        shutil.rmtree(out)
    partial.rename(out)
    return manifest


def _write(documents, tokenizer, out: Path, manifest: dict, workers: int, num_shards: int | None,
           progress: bool, start: float) -> None:
    """The two stages of `prepare` into the empty directory `out`; completes `manifest` and writes it."""
    from tqdm.auto import tqdm

    tokenizer.save_pretrained(out / "tokenizer")
    unused = {i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"\[unused\d+\]", t)}
    replacement = sorted(set(range(manifest["vocab_size"])) - set(manifest["special_ids"]) - unused)
    np.save(out / "replacement_ids.npy", np.array(replacement, np.int32))
    init_args = (str(out / "tokenizer" / "tokenizer.json"), manifest["token_dtype"])
    pool = _context().Pool(workers, _worker_init, init_args) if workers > 1 else None
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    phases: dict[str, float] = {}
    try:
        if pool is None:
            _worker_init(*init_args)
        phases["start_workers_s"] = time.perf_counter() - start
        # 1. read and tokenise chunks, streamed: the tokens go to disk, where the shard workers read them
        read = _ReadStats()
        chunks = _chunks(documents, read)
        tc = _tokenize(chunks, out / "_tokenized", manifest["token_dtype"], pool, 2 * workers, progress)
        _check_documents(read, tc, ", ".join(manifest["corpus"]), manifest["corpus_format"], manifest["nsp"])
        phases["tokenize_s"] = time.perf_counter() - start - sum(phases.values())
        # 2. instances + static masks, one task per shard of contiguous documents with ~equal token counts
        corpus_tokens = int(tc.sentence_offsets[-1])
        num_shards = min(num_shards or max(8, math.ceil(corpus_tokens / 20_000_000)), tc.num_docs)
        doc_tokens = tc.sentence_offsets[tc.doc_offsets]
        bounds = np.searchsorted(doc_tokens, np.linspace(0, doc_tokens[-1], num_shards + 1)).astype(int)
        bounds[0], bounds[-1] = 0, tc.num_docs  # (a shard may be empty when one document outweighs it)
        tasks = [(str(out), k, int(bounds[k]), int(bounds[k + 1]), manifest) for k in range(num_shards)]
        shards = []
        with tqdm(total=num_shards, desc="instances", unit="shard", disable=not progress) as bar:
            for shard in ordered_map(pool, _write_shard, tasks, 2 * workers):
                shards.append(shard)
                bar.update(1)
        phases["instances_s"] = time.perf_counter() - start - sum(phases.values())
    finally:
        if pool is not None:
            pool.terminate()  # all tasks are done, unless preparation failed
            pool.join()
        _WORKER.clear()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
    shutil.rmtree(out / "_tokenized")
    seconds = time.perf_counter() - start
    manifest["shards"] = [{"name": s["name"], "instances": s["instances"]} for s in shards]
    manifest["counts"] = {
        "documents": tc.num_docs, "sentences": len(tc.sentence_offsets) - 1, "corpus_tokens": corpus_tokens,
        **{key: sum(s[key] for s in shards) for key in ("instances", "tokens", "predictions", "random_next",
                                                          "short_target")}}
    manifest["throughput"] = {"workers": workers, "seconds": round(seconds, 3),
                              **{k: round(v, 3) for k, v in phases.items()},
                              "read_s": round(read.seconds, 3),  # inside tokenize_s: reading overlaps it
                              "corpus_tokens_per_s": round(corpus_tokens / seconds, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _check_documents(read: _ReadStats, tc: TokenizedCorpus, where: str, corpus_format, nsp: bool = True) -> None:
    """The corpus checks, on what was read (and tokenised): NSP needs two documents and a two-sentence one."""
    if not read.documents or not tc.num_docs:
        raise DataError(f"{where}: the corpus holds no text")
    if not nsp:  # single segments: any text will do
        return
    if read.max_sentences < 2:
        raise DataError(f"{where}: no document has two or more sentences, so next-sentence pairs cannot be built "
                        f"(format {corpus_format or 'guessed from the name'}: check --format; 'bert' wants one "
                        f"sentence per line and a blank line between documents)")
    if read.documents < 2:
        raise DataError(f"{where}: only one document; random next sentences need at least two")
    if tc.num_docs < 2:
        raise DataError(f"{where}: only {tc.num_docs} document(s) hold any tokens after tokenisation; random next "
                        f"sentences need at least two")


def _partial_output_dir(out: Path, overwrite: bool) -> Path:
    """The empty directory beside `out` that preparation writes and, when it succeeds, renames to `out`, so a run
    that fails (a corpus check, a bad line at the end) leaves `out` as it was. `out` must be empty or, with
    `overwrite`, an earlier prepared directory (nothing else is ever removed)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out}: directory is not empty (pass overwrite=True / --overwrite)")
        if not ((out / "manifest.json").is_file() or (out / "_tokenized").is_dir()):
            raise DataError(f"{out}: not empty and not a prepared directory; refusing to delete it")
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a run that was killed
    partial.mkdir(parents=True)
    return partial


def load_manifest(prepared_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared directory (vocab_size, max_seq_length, max_predictions_per_seq, counts...)."""
    path = Path(prepared_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; is {prepared_dir} a directory written by `flaxbert.data prepare`?") \
            from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r}, this flaxbert reads "
                        f"{FORMAT_VERSION}; prepare the corpus again")
    return manifest


def check_model(manifest: dict, config) -> None:
    """Raise DataError if prepared data does not fit a `BertConfig` (vocabulary, positions, token types)."""
    if manifest["vocab_size"] > config.vocab_size:
        raise DataError(f"{manifest['tokenizer']}: the tokenizer has {manifest['vocab_size']} tokens but the "
                        f"model's embedding table has only {config.vocab_size} rows")
    if manifest["max_seq_length"] > config.max_sequence_length:
        raise DataError(f"prepared max_seq_length {manifest['max_seq_length']} exceeds the model's "
                        f"max_position_embeddings {config.max_position_embeddings}")
    if config.type_vocab_size < 2:
        raise DataError(f"NSP pairs need type_vocab_size >= 2, the model has {config.type_vocab_size}")
