"""Prepare a pretraining corpus: read, tokenise, build NSP instances, mask (static), write shards + manifest.

The prepared directory holds `manifest.json`, `tokenizer/` (a copy of the tokenizer used),
`replacement_ids.npy` and `shard-NNNNN/` directories of flat numpy arrays (memory-mapped by the loader).
Output is byte-identical for a given seed whatever the number of workers: every random choice is seeded from
(seed, dupe round, document), and documents are assigned to shards independently of the workers.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flaxbert.data.corpus import DataError, expand, read_documents
from flaxbert.data.instances import InstanceConfig, TokenizedCorpus, document_instances, tokenize_sentences
from flaxbert.data.masking import MaskingConfig, mask_tokens

FORMAT_VERSION = 1
SHARD_ARRAYS = ("tokens", "word_starts", "offsets", "a_lengths", "is_random_next", "target_lengths",
                 "mask_offsets", "mask_positions", "mask_inputs")
_CHUNK_SENTENCES = 4096


def _context():
    """fork (instant workers) unless JAX has started its runtime threads in this process, else spawn."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    jax_running = bridge is not None and bool(getattr(bridge, "_backends", True))
    return multiprocessing.get_context("spawn" if jax_running or sys.platform != "linux" else "fork")


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; parallelism comes from workers


def _tokenize_chunk(args) -> tuple[list[np.ndarray], list[np.ndarray]]:
    tokenizer_file, sentences = args
    return tokenize_sentences(_cached_backend(tokenizer_file), sentences)


_BACKENDS: dict[str, Any] = {}


def _cached_backend(tokenizer_file: str):
    from tokenizers import Tokenizer

    if tokenizer_file not in _BACKENDS:
        backend = Tokenizer.from_file(tokenizer_file)
        backend.no_padding()  # some saved tokenizers (sentence-transformers) pad/truncate every encoding
        backend.no_truncation()
        _BACKENDS[tokenizer_file] = backend
    return _BACKENDS[tokenizer_file]


def masking_config(manifest: dict, replacement_ids: np.ndarray) -> MaskingConfig:
    """The masking settings of a prepared directory (shared by static masking here and the dynamic loader)."""
    is_special = np.zeros(manifest["vocab_size"], bool)
    is_special[manifest["special_ids"]] = True
    return MaskingConfig(mask_id=manifest["mask_id"], is_special=is_special,
                         replacement_ids=replacement_ids, masked_lm_prob=manifest["masked_lm_prob"],
                         max_predictions_per_seq=manifest["max_predictions_per_seq"],
                         whole_word=manifest["whole_word_masking"])


def _write_shard(args) -> dict:
    """Build, mask and write one shard: every dupe round over documents [doc_lo, doc_hi)."""
    out_dir, shard, doc_lo, doc_hi, manifest = args
    corpus = TokenizedCorpus.load(Path(out_dir) / "_tokenized")
    mcfg = masking_config(manifest, np.load(Path(out_dir) / "replacement_ids.npy"))
    icfg = InstanceConfig(manifest["max_seq_length"], manifest["short_seq_prob"])
    cls_id, sep_id, seed = manifest["cls_id"], manifest["sep_id"], manifest["seed"]
    cols: dict[str, list] = {name: [] for name in SHARD_ARRAYS}
    n_tokens = n_masks = 0
    for dupe in range(manifest["dupe_factor"]):
        for doc in range(doc_lo, doc_hi):
            rng = random.Random(f"{seed}/{dupe}/{doc}")
            mask_rng = np.random.default_rng([seed, dupe, doc])
            for inst in document_instances(corpus, doc, icfg, rng, cls_id, sep_id):
                masked = mask_tokens(inst.tokens, inst.word_starts, mcfg, mask_rng)
                cols["tokens"].append(inst.tokens)
                cols["word_starts"].append(inst.word_starts)
                cols["offsets"].append(n_tokens)
                cols["a_lengths"].append(inst.a_length)
                cols["is_random_next"].append(inst.is_random_next)
                cols["target_lengths"].append(inst.target_length)
                cols["mask_offsets"].append(n_masks)
                cols["mask_positions"].append(masked.positions)
                cols["mask_inputs"].append(masked.input_ids[masked.positions])
                n_tokens += len(inst.tokens)
                n_masks += len(masked.positions)
    cols["offsets"].append(n_tokens)
    cols["mask_offsets"].append(n_masks)
    dtype = np.dtype(manifest["token_dtype"])
    arrays = {
        "tokens": np.concatenate(cols["tokens"] or [np.zeros(0)]).astype(dtype),
        "word_starts": np.concatenate(cols["word_starts"] or [np.zeros(0)]).astype(np.uint8),
        "offsets": np.asarray(cols["offsets"], np.int64),
        "a_lengths": np.asarray(cols["a_lengths"], np.int32),
        "is_random_next": np.asarray(cols["is_random_next"], np.uint8),
        "target_lengths": np.asarray(cols["target_lengths"], np.int32),
        "mask_offsets": np.asarray(cols["mask_offsets"], np.int64),
        "mask_positions": np.concatenate(cols["mask_positions"] or [np.zeros(0)]).astype(np.int32),
        "mask_inputs": np.concatenate(cols["mask_inputs"] or [np.zeros(0)]).astype(dtype),
    }
    name = f"shard-{shard:05d}"
    (Path(out_dir) / name).mkdir()
    for key, value in arrays.items():
        np.save(Path(out_dir) / name / f"{key}.npy", value)
    return {"name": name, "instances": len(arrays["a_lengths"]), "tokens": n_tokens, "predictions": n_masks,
            "random_next": int(arrays["is_random_next"].sum()),
            "short_target": int((arrays["target_lengths"] < manifest["max_seq_length"] - 3).sum()),
            "documents": (doc_hi - doc_lo) * manifest["dupe_factor"]}


def _run(pool, fn, tasks, bar):
    results = []
    for result in (pool.imap(fn, tasks) if pool else map(fn, tasks)):
        results.append(result)
        bar.update(1)
    return results


def _check_settings(max_seq_length, max_predictions_per_seq, masked_lm_prob, short_seq_prob, dupe_factor):
    checks = [(max_seq_length >= 5, f"max_seq_length must be at least 5, got {max_seq_length}"),
              (max_predictions_per_seq >= 1,
               f"max_predictions_per_seq must be positive, got {max_predictions_per_seq}"),
              (0.0 < masked_lm_prob < 1.0, f"masked_lm_prob must be in (0, 1), got {masked_lm_prob}"),
              (0.0 <= short_seq_prob <= 1.0, f"short_seq_prob must be in [0, 1], got {short_seq_prob}"),
              (dupe_factor >= 1, f"dupe_factor must be positive, got {dupe_factor}")]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


def prepare(corpus: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, out_dir: str | os.PathLike, *,
            corpus_format: str | None = None, text_column: str = "text", max_seq_length: int = 128,
            max_predictions_per_seq: int = 20, masked_lm_prob: float = 0.15, short_seq_prob: float = 0.1,
            dupe_factor: int = 1, whole_word_masking: bool = False, seed: int = 12345,
            num_shards: int | None = None, workers: int | None = None, model_vocab_size: int | None = None,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Prepare `corpus` for pretraining into `out_dir` and return the manifest (also written as manifest.json).

    `tokenizer` is a tokenizer directory or a loaded fast HF tokenizer. `workers=None` uses every core for
    corpora over ~4 MB (one process below that, where starting workers costs more than it saves).
    `model_vocab_size`, when given, must hold the tokenizer's vocabulary.
    """
    from tqdm.auto import tqdm

    from flaxbert.vocab import load_tokenizer, tokenizer_fingerprint

    _check_settings(max_seq_length, max_predictions_per_seq, masked_lm_prob, short_seq_prob, dupe_factor)
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
    documents = list(read_documents(specs, corpus_format, text_column=text_column))  # in memory, as in BERT
    _check_documents(documents, ", ".join(specs), corpus_format)
    phases = {"read_s": time.perf_counter() - start}
    out = _fresh_output_dir(Path(out_dir), overwrite)
    chars = sum(len(s) for d in documents for s in d.sentences)
    workers = workers or ((os.cpu_count() or 1) if chars > 4_000_000 else 1)
    tokenizer.save_pretrained(out / "tokenizer")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "corpus": specs, "corpus_format": corpus_format,
        "text_column": text_column, "tokenizer": tokenizer_name, "tokenizer_dir": "tokenizer",
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "vocab_size": vocab_size,
        "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
        "token_dtype": "uint16" if vocab_size <= 65535 else "int32",
        "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id, "mask_id": tokenizer.mask_token_id,
        "pad_id": tokenizer.pad_token_id, "special_ids": sorted(set(tokenizer.all_special_ids)),
        "max_seq_length": max_seq_length, "max_predictions_per_seq": max_predictions_per_seq,
        "masked_lm_prob": masked_lm_prob, "short_seq_prob": short_seq_prob, "dupe_factor": dupe_factor,
        "whole_word_masking": whole_word_masking, "seed": seed,
    }
    unused = {i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"\[unused\d+\]", t)}
    replacement = sorted(set(range(vocab_size)) - set(manifest["special_ids"]) - unused)
    np.save(out / "replacement_ids.npy", np.array(replacement, np.int32))

    pool = _context().Pool(workers, initializer=_worker_init) if workers > 1 else None
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        if pool is None:
            _worker_init()
        phases["start_workers_s"] = time.perf_counter() - start - sum(phases.values())
        # 1. tokenise chunks of sentences; the tokens go to disk, where the shard workers map them
        tc = _tokenize(documents, str(out / "tokenizer" / "tokenizer.json"), pool, progress)
        (out / "_tokenized").mkdir()
        tc.save(out / "_tokenized")
        phases["tokenize_s"] = time.perf_counter() - start - sum(phases.values())
        # 2. instances + static masks, one task per shard of contiguous documents with ~equal token counts
        num_shards = min(num_shards or max(8, math.ceil(len(tc.tokens) / 20_000_000)), tc.num_docs)
        doc_tokens = np.concatenate([[0], tc.sentence_offsets[tc.doc_offsets[1:]]])
        bounds = np.searchsorted(doc_tokens, np.linspace(0, doc_tokens[-1], num_shards + 1)).astype(int)
        bounds[0], bounds[-1] = 0, tc.num_docs  # (a shard may be empty when one document outweighs it)
        tasks = [(str(out), k, int(bounds[k]), int(bounds[k + 1]), manifest) for k in range(num_shards)]
        with tqdm(total=num_shards, desc="instances", unit="shard", disable=not progress) as bar:
            shards = _run(pool, _write_shard, tasks, bar)
        phases["instances_s"] = time.perf_counter() - start - sum(phases.values())
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
    shutil.rmtree(out / "_tokenized")
    seconds = time.perf_counter() - start
    manifest["shards"] = [{"name": s["name"], "instances": s["instances"]} for s in shards]
    manifest["counts"] = {
        "documents": tc.num_docs, "sentences": len(tc.sentence_offsets) - 1, "corpus_tokens": len(tc.tokens),
        **{key: sum(s[key] for s in shards) for key in ("instances", "tokens", "predictions", "random_next",
                                                          "short_target")}}
    manifest["throughput"] = {"workers": workers, "seconds": round(seconds, 3),
                              **{k: round(v, 3) for k, v in phases.items()},
                              "corpus_tokens_per_s": round(len(tc.tokens) / seconds, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_documents(documents, where: str, corpus_format) -> None:
    if not documents:
        raise DataError(f"{where}: the corpus holds no text")
    if max(len(d.sentences) for d in documents) < 2:
        raise DataError(f"{where}: no document has two or more sentences, so next-sentence pairs cannot be built "
                        f"(format {corpus_format or 'guessed from the name'}: check --format; 'bert' wants one "
                        f"sentence per line and a blank line between documents)")
    if len(documents) < 2:
        raise DataError(f"{where}: only one document; random next sentences need at least two")


def _fresh_output_dir(out: Path, overwrite: bool) -> Path:
    """An empty `out`; with `overwrite`, an earlier prepared directory there is removed (nothing else is)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out}: directory is not empty (pass overwrite=True / --overwrite)")
        if not ((out / "manifest.json").is_file() or (out / "_tokenized").is_dir()):
            raise DataError(f"{out}: not empty and not a prepared directory; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _tokenize(documents, tokenizer_file: str, pool, progress: bool) -> TokenizedCorpus:
    from tqdm.auto import tqdm

    sentences = [s for d in documents for s in d.sentences]
    chunks = [(tokenizer_file, sentences[i:i + _CHUNK_SENTENCES]) for i in range(0, len(sentences), _CHUNK_SENTENCES)]
    with tqdm(total=len(chunks), desc="tokenize", unit="chunk", disable=not progress) as bar:
        tokenized = _run(pool, _tokenize_chunk, chunks, bar)
    ids = [x for chunk_ids, _ in tokenized for x in chunk_ids]
    starts = [x for _, chunk_starts in tokenized for x in chunk_starts]
    lengths = np.array([len(x) for x in ids], np.int64)
    sentence_doc = np.repeat(np.arange(len(documents)), [len(d.sentences) for d in documents])
    keep = lengths > 0  # sentences that tokenise to nothing (control characters only) are dropped
    docs_kept = np.bincount(sentence_doc[keep], minlength=len(documents))
    return TokenizedCorpus(
        tokens=np.concatenate([x for x, k in zip(ids, keep) if k]).astype(np.int32),
        word_starts=np.concatenate([x for x, k in zip(starts, keep) if k]),
        sentence_offsets=np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64),
        doc_offsets=np.concatenate([[0], np.cumsum(docs_kept[docs_kept > 0])]).astype(np.int64))


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
    if manifest["max_seq_length"] > config.max_position_embeddings:
        raise DataError(f"prepared max_seq_length {manifest['max_seq_length']} exceeds the model's "
                        f"max_position_embeddings {config.max_position_embeddings}")
    if config.type_vocab_size < 2:
        raise DataError(f"NSP pairs need type_vocab_size >= 2, the model has {config.type_vocab_size}")
