"""What a pretraining run directory holds, and whether a rerun may use it.

`fingerprint.json` in `run.output_dir` records what made the derived artifacts there:
- "data": the corpus files (path, size, mtime, sha256), the corpus format, the vocabulary's source and the
  data settings that made the vocabulary (trained on the spot) and the prepared data under `prepared/`;
- "state": the model's shape, the optimizer and the prepared train data (its manifest's hash) that the
  checkpoints were trained with.
A rerun compares. What matches is reused. Data that differs is rebuilt when nothing has trained on it yet (no
checkpoint, no metrics); otherwise the run is refused with one line saying what differs. `run.overwrite` deletes
the derived artifacts and starts again. The fingerprint is written only after what it describes is complete,
so an artifact of a failed step never looks valid to a later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Optional

from etils import epath

from flaxbert.errors import ConfigError

log = logging.getLogger(__name__)

FILE = "fingerprint.json"
DERIVED = ("prepared", "vocab", "metrics.jsonl", "metrics.dropped.jsonl", "metrics.png", "tensorboard", FILE,
           "config.yaml")
_MODEL_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "model_type", "embedding_size", "tie_word_embeddings")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: str, known: Optional[dict] = None) -> dict:
    """{path, size, mtime_ns, sha256} of a corpus file. The hash is read again only when size or mtime moved
    (so an unchanged 10 GB corpus costs a stat); equality is judged on size and content."""
    st = os.stat(path)
    path = os.path.abspath(path)
    if known and known.get("path") == path and known.get("size") == st.st_size \
            and known.get("mtime_ns") == st.st_mtime_ns:
        return known
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _content(identity: dict) -> dict:
    """What makes two corpus files the same data: size and content (a moved or copied file is the same)."""
    return {k: v for k, v in identity.items() if k not in ("mtime_ns", "path")}


def load(output_dir: str) -> dict:
    path = os.path.join(output_dir, FILE)
    if not os.path.isfile(path):
        return {}
    try:
        return json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError):
        log.warning("%s is unreadable; treating the run directory as unfingerprinted", path)
        return {"unreadable": True}


def _write(output_dir: str, record: dict) -> None:
    tmp = os.path.join(output_dir, FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, os.path.join(output_dir, FILE))


def data_fingerprint(specs: list[str], fmt: Optional[str], settings: dict, vocab: dict,
                     known: Optional[dict] = None) -> dict:
    """The data section: corpus identities (hf:/tfds: specs by name), format, vocabulary source, settings."""
    from flaxbert.data.corpus import expand

    old = {c.get("path"): c for c in (known or {}).get("corpus", [])}
    corpus = [{"spec": f} if f.startswith(("hf:", "tfds:")) else file_identity(f, old.get(os.path.abspath(f)))
              for f in expand(specs)]
    return {"corpus": corpus, "format": fmt, "vocab": vocab, "settings": settings}


def data_differences(old: dict, new: dict) -> list[str]:
    """What differs between two data sections, in words ([] when they match)."""
    if not old:
        return ["no fingerprint (made by an older flaxbert, or by a run that failed)"]
    out = []
    oc, nc = [_content(c) for c in old.get("corpus", [])], [_content(c) for c in new["corpus"]]
    if oc != nc:
        names = lambda cs: ", ".join(str(c.get("path", c.get("spec"))) for c in cs)  # noqa: E731
        op, np_ = names(old.get("corpus", [])), names(new["corpus"])
        out.append(f"corpus {op} -> {np_}" if op != np_ else f"the content of corpus {np_} changed")
    for key in ("format", "vocab"):
        if old.get(key) != new[key]:
            out.append(f"data {key} {old.get(key)} -> {new[key]}")
    os_, ns = old.get("settings", {}), new["settings"]
    out += [f"{k} {os_.get(k)!r} -> {ns[k]!r}" for k in sorted(ns) if os_.get(k) != ns[k]]
    return out


def state_fingerprint(model, optim_name: str, train_manifest: dict) -> dict:
    manifest = {k: v for k, v in train_manifest.items() if k != "throughput"}  # timings differ between builds
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return {"model": {k: getattr(model, k) for k in _MODEL_SHAPE}, "optim": optim_name, "train_data": digest}


def state_differences(old: dict, new: dict) -> list[str]:
    if not old:
        return []  # checkpoints from before fingerprints: the checkpoint restore checks shapes itself
    # a key the old record lacks was not fingerprinted yet (records written before it was added)
    out = [f"model.{k} {old['model'][k]} -> {v}" for k, v in new["model"].items()
           if k in old["model"] and old["model"][k] != v]
    if old.get("optim") != new["optim"]:
        out.append(f"optim.name {old.get('optim')} -> {new['optim']}")
    if old.get("train_data") != new["train_data"]:
        out.append("the prepared train data (its manifest.json) differs from the one the checkpoints trained on")
    return out


class RunDir:
    """The derived artifacts of one run directory (process 0 decides and writes)."""

    def __init__(self, output_dir: str, checkpoint_dir: str):
        self.dir, self.checkpoint_dir = output_dir, checkpoint_dir
        self.record = load(output_dir)

    def has_checkpoints(self) -> bool:
        """A checkpoint step in the checkpoint directory (local or gs://)."""
        path = epath.Path(self.checkpoint_dir)
        return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())

    def trained(self) -> bool:
        """Has anything trained here: a checkpoint step, or logged metrics."""
        steps = self.has_checkpoints()
        metrics = os.path.join(self.dir, "metrics.jsonl")
        return bool(steps) or (os.path.isfile(metrics) and os.path.getsize(metrics) > 0)

    def refuse(self, what: str, differences: list[str]) -> ConfigError:
        return ConfigError(f"{self.dir} holds {what} made differently ({'; '.join(differences)}); use a new "
                           f"--run.output_dir, or --run.overwrite=true to delete its prepared data, vocabulary, "
                           f"checkpoints and metrics and start again")

    def check_data(self, want: dict, has_artifacts: bool) -> bool:
        """True when the data artifacts here can be reused as they are; False when they must be (re)built.
        Raises ConfigError when they differ and something has trained on them."""
        differences = data_differences(self.record.get("data", {}), want)
        if not differences:
            return True
        if has_artifacts and self.trained():
            raise self.refuse("checkpoints or metrics trained on data", differences)
        if has_artifacts:
            log.warning("%s: rebuilding the vocabulary and prepared data (nothing has trained on them): %s",
                        self.dir, "; ".join(differences))
        return False

    def data_cleared(self) -> None:
        """Before a rebuild: the old record goes first, so a rebuild that fails leaves nothing that looks valid."""
        if os.path.exists(os.path.join(self.dir, FILE)):
            os.remove(os.path.join(self.dir, FILE))
        self.record = {}

    def data_built(self, want: dict) -> None:
        self.record = {"format": 1, "data": want}  # new data: any earlier state record is void
        _write(self.dir, self.record)

    def check_state(self, want: dict, write: bool = True) -> None:
        """Refuse checkpoints of another model, optimizer or train data; record `want` when none exist."""
        if self.has_checkpoints():
            differences = state_differences(self.record.get("state", {}), want)
            if differences:
                raise self.refuse("checkpoints of a run", differences)
        if write and self.record.get("state") != want and os.path.isdir(self.dir):
            self.record = {**self.record, "format": 1, "state": want}
            _write(self.dir, self.record)


def overwrite(output_dir: str, checkpoint_dir: str) -> list[str]:
    """Delete a run directory's derived artifacts (never anything else in it); the names deleted."""
    gone = []
    for name in DERIVED:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        gone.append(name)
    for path in (checkpoint_dir, checkpoint_dir.rstrip("/") + "_data_state", checkpoint_dir.rstrip("/") + "_corrupt"):
        if epath.Path(path).is_dir():  # local or gs://
            epath.Path(path).rmtree()
            gone.append(path if "://" in path else os.path.relpath(path, output_dir))
    if gone:
        log.warning("run.overwrite: deleted %s from %s", ", ".join(gone), output_dir)
    return gone
