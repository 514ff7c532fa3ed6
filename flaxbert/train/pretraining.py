"""The pretraining task for the generic loop: MLM + NSP loss as (sum, weight) terms, and the data wiring
(vocabulary trained on the spot, corpus split and prepared once under the output dir, the batch loaders)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from importlib import resources
from typing import Callable, Iterable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxbert import heads
from flaxbert import run_config as rc
from flaxbert.config import BertConfig
from flaxbert.errors import DataError
from flaxbert.losses import mlm_loss, pretraining_losses
from flaxbert.train import rundir
from flaxbert.train.loop import Job, Snapshots
from flaxbert.train.phases import ShortRows
from flaxbert.train.step import LossOutput


def head_name(nsp: bool) -> str:
    """The head a pretraining run trains: BERT's MLM + NSP head, or (`nsp=False`, as RoBERTa, DistilBERT and
    Cramming train) the masked-LM head alone, which every family has."""
    return "pretraining" if nsp else "masked_lm"


def make_loss_fn(config: BertConfig, nsp: bool = True):
    """loss = mean MLM cross-entropy + mean NSP cross-entropy (google-research/bert), with accuracies;
    `nsp=False`: the MLM term of the masked-LM head only."""
    head = head_name(nsp)

    def loss_fn(params, batch, dropout_rng):
        out = heads.apply_head(params, batch, config, head=head, dropout_rng=dropout_rng)
        losses = pretraining_losses(out, batch) if nsp else {"mlm": mlm_loss(out, batch)}
        return LossOutput(terms={k: (t.loss_sum, t.weight) for k, t in losses.items()},
                          metrics={f"{k}_accuracy": (t.correct, t.weight) for k, t in losses.items()})
    return loss_fn


log = logging.getLogger(__name__)

# why the demo trains MLM only (configs/tiny.yaml): printed when it does
PACKAGED_CORPUS_NSP = ("most paragraphs of the packaged Meditations are a single sentence, so most of its "
                       "next-sentence pairs would be random ones and NSP would teach little")


def packaged_corpus() -> str:
    """Marcus Aurelius, *Meditations* (public domain), one paragraph per line: the demo corpus."""
    return str(resources.files("flaxbert") / "resources" / "meditations.txt")


def packaged_vocab(vocab_size: int, lowercase: bool) -> Optional[str]:
    """The WordPiece vocabulary of `vocab_size` tokens trained once on the packaged corpus's training split
    (WordPiece training breaks ties in hash order, so a vocabulary trained on the spot differs between
    processes), or None when none of that size ships."""
    path = resources.files("flaxbert") / "resources" / f"meditations-vocab-{vocab_size}.txt"
    return str(path) if lowercase and path.is_file() else None


def _corpus(d: rc.DataConfig) -> tuple[list[str], Optional[str]]:
    if d.corpus:
        return [c for c in d.corpus.split(",") if c], d.format or None
    return [packaged_corpus()], d.format or "lines"


def split_documents(specs, fmt, eval_fraction: float, out_dir: str) -> tuple[str, Optional[str]]:
    """Write every round(1/eval_fraction)-th document to eval.txt and the rest to train.txt (BERT format:
    one sentence per line, a blank line between documents)."""
    from flaxbert.data.corpus import read_documents

    os.makedirs(out_dir, exist_ok=True)
    every = round(1 / eval_fraction) if eval_fraction > 0 else 0
    paths = {"train": os.path.join(out_dir, "train.txt"), "eval": os.path.join(out_dir, "eval.txt")}
    files = {k: open(p, "w", encoding="utf-8") for k, p in paths.items()}
    try:
        for i, doc in enumerate(read_documents(specs, fmt)):
            split = "eval" if every and i % every == every - 1 else "train"
            files[split].write("\n".join(doc.sentences) + "\n\n")
    finally:
        for f in files.values():
            f.close()
    return paths["train"], (paths["eval"] if every else None)


def data_dirs(cfg: rc.RunConfig) -> tuple[str, str]:
    """Where a run's prepared train and held-out data are: the given directories, or under output_dir."""
    if cfg.data.prepared_dir:
        return cfg.data.prepared_dir, cfg.data.eval_prepared_dir
    return tuple(os.path.join(cfg.run.output_dir, "prepared", split) for split in ("train", "eval"))


def short_data_dir(cfg: rc.RunConfig) -> Optional[str]:
    """Where the short rows of a sequence-length schedule are prepared (None: the run has no schedule)."""
    if not cfg.data.short_seq_len:
        return None
    if cfg.data.prepared_dir:
        return cfg.data.short_prepared_dir
    return os.path.join(cfg.run.output_dir, "prepared", "train-short")


def _prepare_data(cfg: rc.RunConfig, model: BertConfig) -> tuple[str, Optional[str]]:
    """Prepared train/eval dirs: given ones, or built under output_dir (process 0) and reused while their
    fingerprint matches (see train/rundir.py)."""
    train_dir, eval_dir = data_dirs(cfg)
    if cfg.data.prepared_dir:
        return train_dir, eval_dir or None
    failure: Optional[BaseException] = None
    if jax.process_index() == 0:
        try:
            _ensure_data(cfg, model, train_dir, eval_dir)
        except Exception as e:  # the others must hear of it, or they would wait for the data forever
            failure = e
    if jax.process_count() > 1:
        failed = int(multihost_utils.broadcast_one_to_all(np.int32(failure is not None)))
        if failed and failure is None:
            raise DataError(f"process 0 could not prepare the data in {os.path.dirname(train_dir)}; "
                            "its error is on its stderr")
    if failure is not None:
        raise failure
    return train_dir, (eval_dir if os.path.exists(os.path.join(eval_dir, "manifest.json")) else None)


def _wanted_data(cfg: rc.RunConfig, model: BertConfig, known: Optional[dict]) -> dict:
    """The data fingerprint this run asks for: corpus files, format, vocabulary source and data settings."""
    from flaxbert import vocab

    d = cfg.data
    specs, fmt = _corpus(d)
    if d.vocab:
        source = {"from": os.path.abspath(d.vocab), "sha256": vocab.tokenizer_fingerprint(vocab.load_tokenizer(d.vocab))}
    else:
        shipped = packaged_vocab(model.vocab_size, d.lowercase) if not d.corpus else None
        source = {"from": "shipped" if shipped else "trained here", "vocab_size": model.vocab_size,
                  "lowercase": d.lowercase}
    settings = {**dataclasses.asdict(d.prepare_settings()), "eval_fraction": d.eval_fraction}
    if d.short_seq_len:  # only then, so that the data of runs without a schedule keep their fingerprint
        settings["short_rows"] = dataclasses.asdict(d.short_prepare_settings())
    return rundir.data_fingerprint(specs, fmt, settings, source, known)


def _ensure_data(cfg: rc.RunConfig, model: BertConfig, train_dir: str, eval_dir: str) -> None:
    """Reuse the prepared data (and the vocabulary trained here) when their fingerprint matches this run's;
    else rebuild them when nothing has trained on them, or refuse (rundir.RunDir.check_data)."""
    d, out = cfg.data, cfg.run.output_dir
    run_dir = rundir.RunDir(out, cfg.checkpoint_dir())
    want = _wanted_data(cfg, model, run_dir.record.get("data"))
    own_vocab = os.path.join(out, "vocab")
    prepared = os.path.exists(os.path.join(train_dir, "manifest.json"))
    has = prepared or (not d.vocab and os.path.isdir(own_vocab))
    matches = run_dir.check_data(want, has)
    if matches and prepared:
        return
    run_dir.data_cleared()
    if not matches:
        for stale in [os.path.join(out, "prepared")] + ([own_vocab] if not d.vocab else []):
            shutil.rmtree(stale, ignore_errors=True)
    made_vocab = not d.vocab and not os.path.exists(os.path.join(own_vocab, "vocab.txt"))
    try:
        _build_data(cfg, model, train_dir, eval_dir)
    except BaseException:  # no artifact of a failed build is left where a later run would take it
        shutil.rmtree(os.path.join(out, "prepared"), ignore_errors=True)
        if made_vocab:
            shutil.rmtree(own_vocab, ignore_errors=True)
        raise
    run_dir.data_built(want)


def _build_data(cfg: rc.RunConfig, model: BertConfig, train_dir: str, eval_dir: str) -> None:
    from flaxbert import data, vocab

    d, out = cfg.data, cfg.run.output_dir
    specs, fmt = _corpus(d)
    train_txt, eval_txt = split_documents(specs, fmt, d.eval_fraction, os.path.join(out, "prepared", "text"))
    if not os.path.getsize(train_txt):  # name the user's corpus, not the split file made from it
        raise data.DataError(f"{', '.join(specs)}: the corpus holds no text")
    if eval_txt and not os.path.getsize(eval_txt):
        log.warning("%s: too few documents to hold out data.eval_fraction=%g of them; no held-out evaluation",
                    ", ".join(specs), d.eval_fraction)
        eval_txt = None
    tokenizer = d.vocab or os.path.join(out, "vocab")
    if not d.vocab and not os.path.exists(os.path.join(tokenizer, "vocab.txt")):
        shipped = packaged_vocab(model.vocab_size, d.lowercase) if not d.corpus else None
        if shipped:  # the demo: the vocabulary trained once on the same split (training one is not repeatable)
            os.makedirs(tokenizer, exist_ok=True)
            shutil.copy(shipped, os.path.join(tokenizer, "vocab.txt"))
            vocab.load_tokenizer(tokenizer).save_pretrained(tokenizer)
        else:
            vocab.train_wordpiece(train_txt, model.vocab_size, tokenizer, lowercase=d.lowercase,
                                  corpus_format="bert")
    kw = dict(model_vocab_size=model.vocab_size, overwrite=True, progress=False, corpus_format="bert")
    if eval_txt:
        data.prepare(eval_txt, tokenizer, eval_dir, d.prepare_settings(), **kw)
    if d.short_seq_len:
        data.prepare(train_txt, tokenizer, short_data_dir(cfg), d.short_prepare_settings(), **kw)
    data.prepare(train_txt, tokenizer, train_dir, d.prepare_settings(), **kw)  # last: its manifest marks "done"


def continued(cfg: rc.RunConfig) -> rc.RunConfig:
    """`cfg` for a run that continues from `run.init_from`: MLM only when the checkpoint's family has no
    next-sentence head (DistilBERT, RoBERTa, XLM-R, ELECTRA), and the checkpoint's own tokenizer when no
    `data.vocab` is given (a vocabulary trained here would not match its embedding rows)."""
    where = cfg.run.init_from
    if not where:
        return cfg
    from flaxbert import hf

    family, d = hf.load_config(where).family, cfg.data
    if d.nsp and not family.has_nsp:
        log.info("%s: model_type %r has no next-sentence prediction head; continuing MLM pretraining only "
                 "(data.nsp=false)", where, family.model_type)
        d = dataclasses.replace(d, nsp=False)
    if not d.vocab and not d.prepared_dir:
        if not any(os.path.isfile(os.path.join(where, f)) for f in hf.TOKENIZER_FILES):
            raise rc.ConfigError(f"{where} holds no tokenizer ({' or '.join(hf.TOKENIZER_FILES)}), and a vocabulary "
                                 f"trained here would not match its embeddings: pass data.vocab=<its tokenizer dir>")
        d = dataclasses.replace(d, vocab=where)
    return dataclasses.replace(cfg, data=d)


def model_config(cfg: rc.RunConfig):
    """(BertConfig, initial params or None): from `run.init_from` (an HF checkpoint dir, keeping this run's
    flaxbert-only settings such as dtype and remat) or from the `model` section."""
    if not cfg.run.init_from:
        return cfg.model, None
    from flaxbert import hf

    keep = {k: getattr(cfg.model, k) for k in ("dtype", "attention_impl", "scan_layers", "remat_policy")}
    loaded = hf.load_pretrained(cfg.run.init_from, head=head_name(cfg.data.nsp), config_overrides=keep,
                                load_tokenizer=False)
    return loaded.config, loaded.params


class ExportHF(Snapshots):
    """Writes the model (with the run's tokenizer) as a Hugging Face directory when the run finishes: one
    that transformers and `flaxbert.load_pretrained` load, e.g. to fine-tune or to start phase 2 from."""

    def __init__(self, cfg: rc.RunConfig, out_dir: str):
        self.cfg, self.out_dir = cfg, out_dir

    def due(self, step: int, train_seconds: float) -> bool:
        return False  # the loop takes a snapshot when the run is done

    def take(self, step: int, train_seconds: float, params):
        from flaxbert import hf, vocab

        if jax.process_index() == 0:
            tokenizer = vocab.load_tokenizer(os.path.join(data_dirs(self.cfg)[0], "tokenizer"))  # the data's own
            hf.save_pretrained(hf.PretrainedModel(self.cfg.model, params, head=head_name(self.cfg.data.nsp)),
                               self.out_dir, tokenizer=tokenizer)
            log.info("step %d: wrote the model as a Hugging Face directory to %s", step, self.out_dir)
        return None


def _model_tokenizer_sha256(cfg: rc.RunConfig, manifest: dict) -> str:
    """The fingerprint prepared data must have: that of the tokenizer shipped with `run.init_from`, else of
    `data.vocab`, else (the run's own vocabulary) the train data's own."""
    from flaxbert import vocab

    for where in (cfg.run.init_from, cfg.data.vocab):
        if where and any(os.path.isfile(os.path.join(where, f)) for f in ("tokenizer.json", "vocab.txt")):
            return vocab.tokenizer_fingerprint(vocab.load_tokenizer(where))
    return manifest["tokenizer_sha256"]


def unigram_baseline(train_dir: str, eval_batches: Callable[[], Iterable[dict]], limit: int,
                     max_tokens: int = 100_000_000) -> Optional[tuple[int, float]]:
    """(token id, held-out MLM accuracy) of always predicting the most frequent token of the train data (over
    its first `max_tokens` tokens), scored on the same held-out batches and masks as the run's evaluation."""
    from flaxbert.data.loader import PreparedData

    prepared, seen = PreparedData(train_dir), 0
    counts = np.zeros(int(prepared.manifest["vocab_size"]), np.int64)
    for shard in prepared.flat:
        tokens = np.asarray(shard["tokens"][:max(0, max_tokens - seen)])
        seen += len(tokens)
        counts += np.bincount(tokens, minlength=len(counts))
    if not counts.any():
        return None
    top, hits, weight = int(np.argmax(counts)), 0.0, 0.0
    for i, batch in enumerate(eval_batches()):
        if i >= limit:
            break
        w = np.asarray(batch["masked_lm_weights"], np.float64)
        hits += float(((np.asarray(batch["masked_lm_ids"]) == top) * w).sum())
        weight += float(w.sum())
    return (top, hits / weight) if weight else None


def _note_nsp(cfg: rc.RunConfig, manifest: dict, train_dir: str) -> None:
    """Say when next-sentence prediction is off, and why; warn when the pairs it would learn from are mostly
    random ones (a corpus of one-sentence documents), where its accuracy says little."""
    if jax.process_index() != 0:
        return
    counts = manifest["counts"]
    if not cfg.data.nsp:
        log.info("next-sentence prediction is off (data.nsp=false): MLM only%s",
                 "" if cfg.data.corpus or cfg.data.prepared_dir else f", because {PACKAGED_CORPUS_NSP}")
    elif counts["instances"] and counts["random_next"] / counts["instances"] > 0.6:
        log.warning("%s: %.0f%% of the next-sentence pairs are random ones (the corpus's documents are mostly a "
                    "single sentence), so NSP accuracy says little; data.nsp=false trains MLM only", train_dir,
                    100 * counts["random_next"] / counts["instances"])


def build_task(cfg: rc.RunConfig) -> tuple[rc.RunConfig, Job]:
    """Everything the loop needs for MLM+NSP pretraining; errors in the config or data surface here,
    before anything compiles."""
    from flaxbert import data

    cfg = continued(cfg)
    model, initial = model_config(cfg)
    cfg = dataclasses.replace(cfg, model=model)  # re-runs the static checks against the loaded model
    mesh_shape = rc.validate_for_run(cfg, jax.device_count(), process_count=jax.process_count())  # before preparing
    if cfg.run.overwrite and jax.process_index() == 0:
        rundir.overwrite(cfg.run.output_dir, cfg.checkpoint_dir())
    train_dir, eval_dir = _prepare_data(cfg, model)
    manifest = data.load_manifest(train_dir)
    rc.check_vocab_size(cfg, manifest["vocab_size"])
    if manifest["max_seq_length"] > model.max_sequence_length:
        raise rc.ConfigError(f"{train_dir} was prepared with seq length {manifest['max_seq_length']}, longer than "
                             f"model.max_position_embeddings={model.max_position_embeddings}")
    if cfg.data.nsp and not manifest.get("nsp", True):
        raise rc.ConfigError(f"{train_dir} holds single-segment (MLM-only) instances, which have no next-sentence "
                             f"labels; set data.nsp=false, or prepare the corpus with sentence pairs")
    _note_nsp(cfg, manifest, train_dir)
    # checkpoints of another model, optimizer or train data are refused here, in one line, by every process
    rundir.RunDir(cfg.run.output_dir, cfg.checkpoint_dir()).check_state(
        rundir.state_fingerprint(model, cfg.optim.name, manifest), write=jax.process_index() == 0)
    d, per_host = cfg.data, cfg.run.global_batch_size // jax.process_count()
    common = dict(batch_size=per_host, process_index=jax.process_index(), process_count=jax.process_count(),
                  masking=d.masking, packed=d.packed, tokenizer_sha256=_model_tokenizer_sha256(cfg, manifest))
    loader = data.make_loader(train_dir, seed=d.seed, prefetch_processes=d.loader_processes, **common)
    eval_batches = None
    if eval_dir:
        eval_manifest = data.load_manifest(eval_dir)
        if eval_manifest["counts"]["instances"] >= cfg.run.global_batch_size:
            eval_batches = lambda: data.make_loader(eval_dir, seed=0, shuffle=False, num_epochs=1,  # noqa: E731
                                                    **{**common, "masking": "static"})
    seq = manifest["max_seq_length"]
    head = head_name(d.nsp)
    task = Job(init_params=lambda rng: heads.init(model, rng, head=head),
                logical_axes=heads.logical_axes(model, head), loss_fn=make_loss_fn(model, d.nsp),
                train_batches=loader, seq_len=seq, eval_batches=eval_batches, initial_params=initial,
                mesh_shape=mesh_shape, progress_keys=(("mlm_accuracy", "mlm_acc"), ("nsp_accuracy", "nsp_acc")),
                flops_per_token=_flops_per_token(model, manifest),
                short_rows=_short_rows(cfg, model, manifest, common))
    return cfg, task


def _flops_per_token(model: BertConfig, manifest: dict) -> float:
    seq = manifest["max_seq_length"]
    return model.flops_per_token(seq, masked_fraction=manifest["max_predictions_per_seq"] / seq)


def _short_rows(cfg: rc.RunConfig, model: BertConfig, train_manifest: dict, common: dict) -> Optional[ShortRows]:
    """The first phase of a sequence-length schedule: a loader over the short rows, after checking that they were
    made from the same tokenizer and instance kind as the full rows and are shorter."""
    where = short_data_dir(cfg)
    if where is None:
        return None
    from flaxbert import data

    manifest = data.load_manifest(where)
    if manifest["max_seq_length"] >= train_manifest["max_seq_length"]:
        raise rc.ConfigError(f"{where} holds rows of {manifest['max_seq_length']} tokens, not shorter than the "
                             f"{train_manifest['max_seq_length']} of the run's second phase (data.short_seq_len)")
    for key in ("tokenizer_sha256", "vocab_size", "nsp"):
        if manifest.get(key) != train_manifest.get(key):
            raise rc.ConfigError(f"{where} (the short rows) and the full rows were prepared differently: {key} "
                                 f"{manifest.get(key)!r} against {train_manifest.get(key)!r}")
    loader = data.make_loader(where, seed=cfg.data.seed, prefetch_processes=cfg.data.loader_processes, **common)
    return ShortRows(batches=loader, seq_len=manifest["max_seq_length"],
                     flops_per_token=_flops_per_token(model, manifest), share=cfg.data.short_share)
