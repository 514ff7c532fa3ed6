"""The task registry: GLUE (all nine), CoNLL NER, SQuAD v1.1/v2.0, SWAG and custom text tasks.

A `Task` names its kind (which says how it is read, featurized, trained and scored: flaxbert.finetune.kinds),
where its files and columns are, its label set, its scores, and which metric picks the best checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from flaxbert.errors import ConfigError
from flaxbert.finetune.kinds import Kind, get_kind

Column = Union[str, int]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # a key of flaxbert.finetune.kinds.KINDS
    labels: Optional[tuple[str, ...]] = None  # None = read the label names from the training data
    main_metric: str = "accuracy"  # dev metric that selects the best checkpoint
    # files as distributed (GLUE) and their columns; header=False means columns are indices
    train_file: str = "train.tsv"
    eval_files: tuple[tuple[str, str], ...] = (("dev", "dev.tsv"),)  # (name, file)
    text: Column = "sentence"
    text_pair: Optional[Column] = None
    label: Optional[Column] = "label"
    header: bool = True
    # the same task in HF `datasets` (`glue/<config>`): columns and split names
    hf_name: Optional[tuple[str, str]] = None
    hf_text: tuple[str, Optional[str]] = ("sentence", None)
    hf_eval_splits: tuple[tuple[str, str], ...] = (("dev", "validation"),)
    skip_malformed_rows: bool = False  # skip (with a notice) TSV rows with the wrong number of fields
    scores: tuple[str, ...] = ()  # classification scores beside accuracy (kinds.classification.SCORES)
    glue_layout: bool = False  # its .tsv files are read with the columns above (GLUE's own files)

    def __post_init__(self):
        get_kind(self.kind)  # a clear error for an unknown kind

    @property
    def spec(self) -> Kind:
        """The task's kind: how it is read, featurized, trained and scored."""
        return get_kind(self.kind)

    @property
    def head(self) -> str:
        return self.spec.head

    @property
    def num_labels(self) -> int:
        if self.spec.fixed_num_labels is not None:
            return self.spec.fixed_num_labels
        if self.labels is None:
            raise ValueError(f"task {self.name!r} takes its labels from the data; resolve them first")
        return len(self.labels)

    def with_labels(self, labels: Sequence[str]) -> "Task":
        return dataclasses.replace(self, labels=tuple(labels))


def _glue(name, labels, text, text_pair=None, label="label", main="accuracy", header=True,
          eval_files=(("dev", "dev.tsv"),), hf_text=None, hf_eval=(("dev", "validation"),), kind="classification",
          scores=()):
    return Task(name, kind, labels, main, "train.tsv", eval_files, text, text_pair, label, header,
                ("glue", name.replace("-", "").lower()), hf_text or ("sentence", None), hf_eval, scores=scores,
                glue_layout=True)


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {t.name: t for t in [
    # CoLA has no header: source, label, author's mark, sentence
    _glue("cola", BINARY, text=3, label=1, header=False, main="mcc", scores=("mcc",)),
    _glue("sst2", BINARY, text="sentence"),
    _glue("mrpc", BINARY, text="#1 String", text_pair="#2 String", label="Quality", main="f1",
          hf_text=("sentence1", "sentence2"), scores=("f1",)),
    dataclasses.replace(_glue("qqp", BINARY, text="question1", text_pair="question2", label="is_duplicate",
                              main="f1", hf_text=("question1", "question2"), scores=("f1",)),
                        skip_malformed_rows=True),
    _glue("stsb", None, text="sentence1", text_pair="sentence2", label="score", main="pearson",
          hf_text=("sentence1", "sentence2"), kind="regression"),
    _glue("mnli", ("contradiction", "entailment", "neutral"), text="sentence1", text_pair="sentence2",
          label="gold_label", main="matched_accuracy",
          eval_files=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
          hf_text=("premise", "hypothesis"),
          hf_eval=(("matched", "validation_matched"), ("mismatched", "validation_mismatched"))),
    _glue("qnli", NLI2, text="question", text_pair="sentence", hf_text=("question", "sentence")),
    _glue("rte", NLI2, text="sentence1", text_pair="sentence2", hf_text=("sentence1", "sentence2")),
    _glue("wnli", BINARY, text="sentence1", text_pair="sentence2", hf_text=("sentence1", "sentence2")),
    Task("conll2003", "ner", None, "f1", "train.txt", (("valid", "valid.txt"), ("test", "test.txt"))),
    Task("squad", "qa", None, "f1", "train-v1.1.json", (("dev", "dev-v1.1.json"),)),
    Task("squad_v2", "qa", None, "best_f1", "train-v2.0.json", (("dev", "dev-v2.0.json"),)),
    Task("swag", "multiple_choice", None, "accuracy", "train.csv", (("dev", "val.csv"),)),
    # custom tasks: files given on the command line; columns `text`, `text_pair`, `label`
    Task("text_classification", "classification", None, "accuracy", "", (), "text", None, "label",
         scores=("macro_f1",)),
    Task("text_pair_classification", "classification", None, "accuracy", "", (), "text", "text_pair", "label",
         scores=("macro_f1",)),
    Task("text_regression", "regression", None, "pearson", "", (), "text", None, "label"),
    Task("ner", "ner", None, "f1", "", ()),
]}
# the GLUE spellings people type
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "squad1": "squad", "squad_v1": "squad",
           "squad2": "squad_v2", "conll": "conll2003", "emotion": "text_classification"}
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (or aliases {sorted(ALIASES)})")
    return TASKS[key]
