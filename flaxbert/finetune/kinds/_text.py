"""What classification and regression share: their files are sentences (or pairs) with one label each."""

from __future__ import annotations

from pathlib import Path

from flaxbert.infer import features as F
from flaxbert.finetune import readers
from flaxbert.finetune.kinds.base import Kind


class TextKind(Kind):
    packs = True

    def read(self, task, path: Path, columns) -> list:
        if task.glue_layout and path.suffix == ".tsv":
            return readers.read_delimited(path, task.text, task.text_pair, task.label, header=task.header,
                                          regression=self.regression, skip_malformed=task.skip_malformed_rows)
        return readers.read_text_file(path, columns.text, columns.text_pair or None, columns.label,
                                      regression=self.regression)

    def features(self, task, tokenizer, examples, settings, training: bool) -> list[dict]:
        label_to_id = {label: i for i, label in enumerate(task.labels)} if task.labels else None
        has_labels = training or all(ex.label is not None for ex in examples)
        return F.text_features(tokenizer, examples, settings.max_length, label_to_id, regression=self.regression,
                               with_labels=has_labels)
