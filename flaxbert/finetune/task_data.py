"""A task's data: find its files (a directory, explicit files, a saved or named HF dataset, a tfds name),
read them with the right reader, resolve the label set, and turn examples into features."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from flaxbert.errors import DataError
from flaxbert.infer import features as F
from flaxbert.finetune import readers
from flaxbert.finetune.tasks import Task

GLUE_DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
             "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
EVAL_STEMS = ("dev", "validation", "val", "valid", "test")  # eval files of a custom task, in this order
CUSTOM_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt")


@dataclasses.dataclass
class TaskData:
    task: Task  # with its label set resolved
    train: Optional[list]  # examples, or None when only evaluating
    evals: dict[str, list]  # eval set name -> examples


@dataclasses.dataclass(frozen=True)
class Columns:
    """Column names of a custom task (CSV/TSV header names or JSONL keys)."""
    text: str = "text"
    text_pair: str = ""  # "" = single sentences
    label: str = "label"


def _custom_files(directory: Path) -> tuple[Optional[Path], list[tuple[str, Path]]]:
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in CUSTOM_SUFFIXES)
    train = next((p for p in files if p.stem == "train"), None)
    evals = [(p.stem, p) for stem in EVAL_STEMS for p in files if p.stem == stem]
    return train, evals


def locate_files(task: Task, data: str) -> tuple[Optional[Path], list[tuple[str, Path]]]:
    """(train file, [(eval name, file)]) from `--data`: a directory (GLUE layout, also its parent holding
    `SST-2/` etc., or train.* / dev.* files), or comma-separated files `train.csv,dev.csv` (the first
    trains unless it is the only one, names are file stems), or `name=path` items (`train=a.csv,dev=b.csv`)."""
    items = [s for s in data.split(",") if s]
    if len(items) == 1 and "=" not in items[0] and Path(items[0]).is_dir():
        d = Path(items[0])
        if task.name in GLUE_DIRS and not (d / task.train_file).exists() and (d / GLUE_DIRS[task.name]).is_dir():
            d = d / GLUE_DIRS[task.name]
        if task.train_file and ((d / task.train_file).exists() or any((d / f).exists() for _, f in task.eval_files)):
            train = d / task.train_file
            evals = [(n, d / f) for n, f in task.eval_files if (d / f).exists()]
            return (train if train.exists() else None), evals
        train, evals = _custom_files(d)
        if train is None and not evals:
            raise DataError(f"{d}: no data files found (expected {task.train_file or 'train.*'} and dev/test files)")
        return train, evals
    named = [s.partition("=") for s in items]
    if all(eq for _, eq, _ in named):
        pairs = [(name, Path(p)) for name, _, p in named]
        train = next((p for n, p in pairs if n == "train"), None)
        return train, [(n, p) for n, p in pairs if n != "train"]
    paths = [Path(s) for s in items]
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: file not found")
    if len(paths) == 1:
        return None, [(paths[0].stem, paths[0])]
    return paths[0], [(p.stem, p) for p in paths[1:]]


def _hf_data(task: Task, data: str, columns: Columns, with_train: bool) -> TaskData:
    """A HF dataset (saved directory or name); GLUE tasks use their `glue/<task>` columns and splits."""
    if task.hf_name is not None:
        text, pair = task.hf_text
        config_name = task.hf_name[1]
        eval_splits = task.hf_eval_splits
    else:
        text, pair, config_name = columns.text, columns.text_pair or None, None
        eval_splits = (("dev", "validation"),)
    regression = task.spec.regression
    train, names = None, None
    if with_train:
        train, names = readers.hf_text_examples(readers.load_hf_split(data, "train", config_name), data, text, pair,
                                                columns.label, regression)
    evals = {}
    for name, split in eval_splits:
        evals[name], split_names = readers.hf_text_examples(readers.load_hf_split(data, split, config_name),
                                                            f"{data}[{split}]", text, pair, columns.label, regression)
        names = names or split_names
    if task.labels is not None and names is not None and set(names) != set(task.labels):
        # GLUE files say 0/1 where HF's ClassLabel says e.g. negative/positive: use the class index
        index = {name: str(i) for i, name in enumerate(names)}
        for ex in (train or []) + [ex for exs in evals.values() for ex in exs]:
            ex.label = None if ex.label is None else index[ex.label]
        names = None
    return _finish(task, train, evals, names)


def _tfds_data(task: Task, name: str, columns: Columns, with_train: bool) -> TaskData:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"tfds:{name}: tensorflow-datasets is not installed (pip install 'flaxbert[tfds]')") from None
    text, pair = task.hf_text if task.hf_name else (columns.text, columns.text_pair or None)
    splits = (("train", "train"),) if with_train else ()
    splits += task.hf_eval_splits if task.hf_name else (("dev", "validation"),)
    out, names = {}, None
    for key, split in splits:
        ds, info = tfds.load(name, split=split, with_info=True)
        feature = info.features[columns.label] if columns.label in info.features else None
        names = names or (list(feature.names) if hasattr(feature, "names") else None)
        rows = []
        for i, row in enumerate(tfds.as_numpy(ds)):
            decode = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
            raw = row[columns.label]
            label = float(raw) if task.spec.regression else (
                None if int(raw) == -1 else (names[int(raw)] if names else str(raw)))
            rows.append(readers.TextExample(decode(row[text]), decode(row[pair]) if pair else None, label,
                                            f"tfds:{name}[{split}]:row {i}"))
        out[key] = rows
    train = out.pop("train", None)
    return _finish(task, train, out, names)


def _finish(task: Task, train, evals, names=None) -> TaskData:
    if task.spec.labels_from_data and task.labels is None:
        if names is not None:
            task = task.with_labels(names)
        else:
            source = train if train else [ex for exs in evals.values() for ex in exs]
            labels = task.spec.labels_of(source)
            if not labels:
                raise DataError(f"task {task.name}: no labels found in the training data")
            task = task.with_labels(labels)
    return TaskData(task, train, evals)


def load_task_data(task: Task, data: str, *, columns: Columns = Columns(), with_train: bool = True,
                   max_train: int = 0, max_eval: int = 0) -> TaskData:
    """Read a task's train and eval sets. `max_*` > 0 keeps the first N examples (for quick runs)."""
    if data.startswith("tfds:"):
        td = _tfds_data(task, data[5:], columns, with_train)
    else:
        first = Path(data.split(",")[0].partition("=")[2] or data.split(",")[0])
        is_saved_hf = first.is_dir() and ((first / "dataset_dict.json").is_file()
                                          or (first / "dataset_info.json").is_file())
        if is_saved_hf or (not first.exists() and "=" not in data and "," not in data):
            td = _hf_data(task, data, columns, with_train)
        else:
            train_path, eval_paths = locate_files(task, data)
            if with_train and train_path is None:
                raise DataError(f"{data}: no training file found for task {task.name}")
            train = task.spec.read(task, train_path, columns) if with_train else None
            evals = {name: task.spec.read(task, p, columns) for name, p in eval_paths}
            td = _finish(task, train, evals)
    if max_train and td.train is not None:
        td.train = td.train[:max_train]
    if max_eval:
        td.evals = {k: v[:max_eval] for k, v in td.evals.items()}
    return td


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    max_length: int = 128
    label_all_tokens: bool = False  # NER: label every sub-token, not only the first of a word
    qa: F.QASettings = F.QASettings()


def make_features(task: Task, tokenizer, examples: Sequence, settings: FeatureSettings, training: bool) -> list[dict]:
    """Features for `examples`; labels are checked against the task's label set (file:line on error)."""
    return task.spec.features(task, tokenizer, examples, settings, training)
