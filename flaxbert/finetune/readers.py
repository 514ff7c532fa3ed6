"""Readers for fine-tuning data as distributed: GLUE TSV, CoNLL, SQuAD JSON, SWAG CSV, custom
CSV/TSV/JSONL, `text;label` lines, and datasets saved with HF `datasets`.

Every reader returns plain example records that remember where they came from (`file:line`), so that
a bad label or a malformed row is reported with its file and line. Nothing here tokenises.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from flaxbert.data.corpus import iter_jsonl
from flaxbert.errors import DataError
from flaxbert.infer.examples import ChoiceExample, Label, QAExample, TextExample, TokenExample

csv.field_size_limit(sys.maxsize)  # SQuAD-like contexts and long GLUE sentences exceed the default

def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


# ------------------------------------------------------------------------------------------------
# Delimited text (GLUE TSV, custom CSV/TSV)
# ------------------------------------------------------------------------------------------------


def read_rows(path: Path, delimiter: str, quoting: int, header: bool,
              skip_malformed: bool = False) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """(header, iterator of (line number, fields)). Opened as utf-8-sig so MRPC's BOM is not part of
    the first column name. Each row must have as many fields as the first row; with `skip_malformed`
    other rows are skipped with a notice naming their lines (GLUE's QQP has a few such rows)."""
    _check_file(path)
    f = open(path, encoding="utf-8-sig", newline="")
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    try:
        first = next(reader)
    except StopIteration:
        f.close()
        raise DataError(f"{path}: file is empty") from None
    width = len(first)

    def rows():
        skipped = []
        with f:
            if not header:
                yield 1, first
            for fields in reader:
                line = reader.line_num
                if not fields or fields == [""]:
                    continue  # blank line (e.g. a trailing newline)
                if len(fields) != width:
                    if skip_malformed:
                        skipped.append(line)
                        continue
                    raise DataError(f"{path}:{line}: expected {width} fields like line 1, found {len(fields)}")
                yield line, fields
        if skipped:
            print(f"notice: {path}: skipped {len(skipped)} rows without {width} fields (lines "
                  f"{', '.join(map(str, skipped[:10]))}{' ...' if len(skipped) > 10 else ''})", flush=True)

    return (first if header else []), rows()


def column_index(path: Path, header: Sequence[str], name: Union[str, int]) -> int:
    if isinstance(name, int):
        return name
    if name not in header:
        raise DataError(f"{path}:1: missing column {name!r}; the header has {list(header)}")
    return header.index(name)


def class_name(value) -> str:
    """One spelling per class: numbers and booleans in any form (1, 1.0, "1", "1.0", true) are the integer or
    shortest float they equal ("1"); any other text is kept as it is (stripped)."""
    if isinstance(value, bool):
        return str(int(value))
    number = value
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return text
        if not math.isfinite(number):
            return text  # "nan" / "inf" are names here, not numbers
    if isinstance(number, (int, float)):
        return str(int(number)) if float(number).is_integer() else repr(float(number))
    return str(value)


def _coerce_label(value, regression: bool, where: str) -> Label:
    """A class name (`class_name`), or a float for regression; `where` ("file:line") names a bad value."""
    if value is None:
        return None
    if not regression:
        return class_name(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not a number") from None


def read_delimited(path: Union[str, os.PathLike], text: Union[str, int], text_pair: Union[str, int, None] = None,
                   label: Union[str, int, None] = None, *, delimiter: str = "\t", quoting: int = csv.QUOTE_NONE,
                   header: bool = True, regression: bool = False, require_label: bool = False,
                   skip_malformed: bool = False) -> list[TextExample]:
    """Text examples from a delimited file. Columns are header names or 0-based indices (for files
    without a header, such as CoLA). A missing label column is fine (test files) unless required."""
    path = Path(path)
    head, rows = read_rows(path, delimiter, quoting, header, skip_malformed)
    ti = column_index(path, head, text)
    pi = None if text_pair is None else column_index(path, head, text_pair)
    li = None
    if label is not None:
        if isinstance(label, str) and label not in head and not require_label:
            li = None  # an unlabeled (test) file
        else:
            li = column_index(path, head, label)
    out = []
    for line, fields in rows:
        value = None if li is None else _coerce_label(fields[li].strip(), regression, f"{path}:{line}")
        out.append(TextExample(fields[ti].strip(), None if pi is None else fields[pi].strip(), value,
                               f"{path}:{line}"))
    if not out:
        raise DataError(f"{path}: no examples (only a header)")
    return out


def read_jsonl(path: Union[str, os.PathLike], text: str = "text", text_pair: Optional[str] = None,
               label: Optional[str] = "label", *, regression: bool = False) -> list[TextExample]:
    path = Path(path)
    _check_file(path)
    out = []
    for line_no, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, found {type(row).__name__}")
        for col in (text, text_pair):
            if col is not None and col not in row:
                raise DataError(f"{path}:{line_no}: missing column {col!r}; the object has {sorted(row)}")
        value = _coerce_label(row.get(label) if label is not None else None, regression, f"{path}:{line_no}")
        out.append(TextExample(str(row[text]), None if text_pair is None else str(row[text_pair]), value,
                               f"{path}:{line_no}"))
    if not out:
        raise DataError(f"{path}: file has no examples")
    return out


def read_semicolon_lines(path: Union[str, os.PathLike]) -> list[TextExample]:
    """`text;label` lines (the emotion data set). The label is after the last semicolon."""
    path = Path(path)
    _check_file(path)
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if ";" not in line:
                raise DataError(f"{path}:{line_no}: expected 'text;label', found no ';'")
            text, label = line.rsplit(";", 1)
            out.append(TextExample(text.strip(), None, class_name(label), f"{path}:{line_no}"))
    if not out:
        raise DataError(f"{path}: file has no examples")
    return out


def read_text_file(path: Union[str, os.PathLike], text: str = "text", text_pair: Optional[str] = None,
                   label: Optional[str] = "label", regression: bool = False) -> list[TextExample]:
    """A custom-task file, by extension: .csv (quoted CSV), .tsv, .jsonl/.json (one object a line),
    .txt (`text;label` lines)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, text, text_pair, label, regression=regression)
    if suffix == ".txt":
        return read_semicolon_lines(path)
    if suffix in (".csv", ".tsv"):
        delimiter, quoting = (",", csv.QUOTE_MINIMAL) if suffix == ".csv" else ("\t", csv.QUOTE_NONE)
        return read_delimited(path, text, text_pair, label, delimiter=delimiter, quoting=quoting,
                              regression=regression)
    raise DataError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv, .jsonl or .txt (text;label)")


# ------------------------------------------------------------------------------------------------
# CoNLL
# ------------------------------------------------------------------------------------------------


def read_conll(path: Union[str, os.PathLike], tag_column: int = -1) -> list[TokenExample]:
    """Sentences from a CoNLL file: one `word ... tag` line per word, blank lines between sentences,
    `-DOCSTART-` lines skipped. A file with a single column is read as unlabeled words."""
    path = Path(path)
    _check_file(path)
    out, words, tags, start, width = [], [], [], 0, None

    def flush():
        if words:
            out.append(TokenExample(list(words), list(tags) if width and width > 1 else None, f"{path}:{start}"))
        words.clear()
        tags.clear()

    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                flush()
                continue
            if fields[0] == "-DOCSTART-":
                flush()
                continue
            if width is None:
                width = len(fields)
            elif len(fields) != width:
                raise DataError(f"{path}:{line_no}: expected {width} columns like the first word line, "
                                f"found {len(fields)}")
            if not words:
                start = line_no
            words.append(fields[0])
            if width > 1:
                tags.append(fields[tag_column])
    flush()
    if not out:
        raise DataError(f"{path}: no sentences found")
    return out


# ------------------------------------------------------------------------------------------------
# SQuAD
# ------------------------------------------------------------------------------------------------


def read_squad(path: Union[str, os.PathLike]) -> list[QAExample]:
    """Questions from a SQuAD v1.1 or v2.0 JSON file. Gold answers must sit at their `answer_start`."""
    path = Path(path)
    _check_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or "data" not in data:
        raise DataError(f"{path}: not a SQuAD file (no top-level 'data' list)")
    out = []
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            context = para["context"]
            for qa in para.get("qas", []):
                where = f"{path}: question {qa.get('id', '?')} (data[{a}].paragraphs[{p}])"
                impossible = bool(qa.get("is_impossible", False))
                answers = []
                for ans in ([] if impossible else qa.get("answers", [])):
                    text, start = ans["text"], int(ans["answer_start"])
                    if context[start:start + len(text)] != text:
                        raise DataError(f"{where}: answer {text!r} is not at answer_start {start} of the context")
                    answers.append((text, start))
                out.append(QAExample(qa["id"], article.get("title", ""), context, qa["question"], answers,
                                     impossible, where))
    if not out:
        raise DataError(f"{path}: no questions found")
    return out


# ------------------------------------------------------------------------------------------------
# SWAG
# ------------------------------------------------------------------------------------------------


def read_swag(path: Union[str, os.PathLike], num_choices: int = 4) -> list[ChoiceExample]:
    """SWAG CSV (`sent1`, `sent2`, `ending0..N`, `label`): the continuation is `sent2 + ' ' + ending`."""
    path = Path(path)
    head, rows = read_rows(path, ",", csv.QUOTE_MINIMAL, header=True)
    ctx_i, start_i = column_index(path, head, "sent1"), column_index(path, head, "sent2")
    end_is = [column_index(path, head, f"ending{i}") for i in range(num_choices)]
    label_i = head.index("label") if "label" in head else None
    out = []
    for line, fields in rows:
        label = None
        if label_i is not None and fields[label_i] != "":
            try:
                label = int(fields[label_i])
            except ValueError:
                raise DataError(f"{path}:{line}: label {fields[label_i]!r} is not an integer") from None
            if not 0 <= label < num_choices:
                raise DataError(f"{path}:{line}: label {label} is outside 0..{num_choices - 1}")
        out.append(ChoiceExample(fields[ctx_i], fields[start_i], [fields[i] for i in end_is], label,
                                 f"{path}:{line}"))
    if not out:
        raise DataError(f"{path}: no examples (only a header)")
    return out


# ------------------------------------------------------------------------------------------------
# HF datasets (saved to disk, or by hub name when cached)
# ------------------------------------------------------------------------------------------------


def load_hf_split(name_or_dir: str, split: str, config_name: Optional[str] = None):
    """A `datasets.Dataset` split from a `save_to_disk` directory or a dataset name (which needs the
    dataset to be in the local HF cache when there is no network)."""
    import datasets

    path = Path(name_or_dir)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(name_or_dir, config_name)
    except Exception as e:  # noqa: BLE001 - re-raised with the name the user gave
        raise DataError(f"{name_or_dir}: cannot load as a HF dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name_or_dir}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    return ds


def hf_text_examples(ds, source: str, text: str, text_pair: Optional[str], label: Optional[str],
                     regression: bool = False) -> tuple[list[TextExample], Optional[list[str]]]:
    """TextExamples from a HF dataset split and the label names of a ClassLabel column (if any).
    Integer class labels become their names; -1 (GLUE test splits) becomes no label."""
    for col in (text, text_pair, label):
        if col is not None and col not in ds.column_names:
            raise DataError(f"{source}: missing column {col!r}; the data set has {ds.column_names}")
    names = None
    if label is not None and hasattr(ds.features[label], "names"):
        names = list(ds.features[label].names)
    out = []
    for i, row in enumerate(ds):
        value: Label = None
        if label is not None:
            raw = row[label]
            if regression:
                value = float(raw)
            elif names is not None:
                value = None if raw == -1 else names[raw]
            else:
                value = str(raw)
        out.append(TextExample(row[text], row[text_pair] if text_pair else None, value, f"{source}:row {i}"))
    return out, names
