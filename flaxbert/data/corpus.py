"""Corpus readers: turn text files, tables, HF `datasets` and TFDS into documents made of sentences.

Formats (`--format`, guessed from the name when omitted):
  bert      one sentence per line, a blank line between documents (google-research/bert's input format; *.txt)
  lines     one document per line, split into sentences by `split_sentences`
  wikitext  WikiText `*.tokens`/`*.raw`: an article starts at a ` = Title = ` line, section headings are dropped,
            every paragraph line is split into sentences
  jsonl / csv / tsv / parquet   one document per record, taken from the text column (`text_column`)
  hf:NAME[:CONFIG][@SPLIT]      a `datasets` dataset: hub name, local data file or dir, `save_to_disk` dir
                                (split: train)
  tfds:NAME[/CONFIG][@SPLIT]    a TFDS dataset already in the TFDS data dir (needs tensorflow-datasets)
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from flaxbert.errors import DataError

_EXTENSIONS = {".txt": "bert", ".tokens": "wikitext", ".raw": "wikitext", ".jsonl": "jsonl", ".json": "jsonl",
               ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Document:
    source: str  # file or dataset the document came from
    line: int  # 1-based line (or record) where it starts
    sentences: tuple[str, ...]


# ----- sentence splitting -------------------------------------------------------------------------------------
# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) when whitespace and an upper-case
# letter, digit or opening quote/bracket follow, unless the word before the period is a known abbreviation, a
# single letter (an initial, "H. americanus") or contains an inner period ("U.S."). Line breaks always end one.
_CANDIDATE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9\u00c0-\u024f])")
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e no nos fig figs cf al inc ltd co corp gen col lt sgt capt mt "
    "rev hon gov sen rep jan feb mar apr jun jul aug sep sept oct nov dec approx ca c vol pp ed eds".split())


def _ends_abbreviation(text: str) -> bool:
    word = text.rsplit(None, 1)[-1] if text.strip() else ""
    word = word.lstrip("\"'(\u201c\u2018[").lower()
    return len(word) == 1 or "." in word or word in ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences with the rule above; empty pieces are dropped."""
    sentences = []
    for paragraph in text.splitlines():
        start = 0
        for m in _CANDIDATE_END.finditer(paragraph):
            punct = m.group(0).rstrip()
            if punct.startswith(".") and len(punct) == 1 and _ends_abbreviation(paragraph[start:m.start()]):
                continue
            sentences.append(paragraph[start:m.end()].strip())
            start = m.end()
        sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]


# ----- reading ------------------------------------------------------------------------------------------------
def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline); undecodable bytes raise a DataError naming file and line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: bytes that are not UTF-8 at column {e.start + 1} "
                                f"({raw[e.start:e.start + 4]!r}); re-encode the file as UTF-8") from None
            yield number, text.rstrip("\r\n")


def _read_bert(path: Path) -> Iterator[Document]:
    sentences, first = [], 0
    for number, line in _decoded_lines(path):
        if line.strip():
            first = first or number
            sentences.append(line.strip())
        elif sentences:
            yield Document(str(path), first, tuple(sentences))
            sentences, first = [], 0
    if sentences:
        yield Document(str(path), first, tuple(sentences))


def _read_lines(path: Path) -> Iterator[Document]:
    for number, line in _decoded_lines(path):
        sentences = split_sentences(line)
        if sentences:
            yield Document(str(path), number, tuple(sentences))


_WIKI_TITLE = re.compile(r"^ ?= [^=].* = ?$")
_WIKI_HEADING = re.compile(r"^ ?(= ){2,}.*( =){2,} ?$")


def _read_wikitext(path: Path) -> Iterator[Document]:
    sentences, first = [], 0
    for number, line in _decoded_lines(path):
        if _WIKI_TITLE.match(line):
            if sentences:
                yield Document(str(path), first, tuple(sentences))
            sentences, first = [], number
        elif line.strip() and not _WIKI_HEADING.match(line):
            first = first or number
            sentences.extend(split_sentences(line))
    if sentences:
        yield Document(str(path), first, tuple(sentences))


def _record_document(source: str, number: int, record, text_column: str) -> Document | None:
    if not isinstance(record, dict) or text_column not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{source}:{number}: no text column {text_column!r} (found {keys}); "
                        f"pass --text-column")
    text = record[text_column]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source}:{number}: column {text_column!r} holds bytes that are not UTF-8 "
                            f"at offset {e.start}") from None
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(f"{source}:{number}: column {text_column!r} is {type(text).__name__}, not text")
    sentences = split_sentences(text)
    return Document(source, number, tuple(sentences)) if sentences else None


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file; bad JSON and bytes that
    are not UTF-8 raise a DataError naming file and line. Shared with the fine-tuning readers."""
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_jsonl(path: Path, text_column: str) -> Iterator[Document]:
    for number, record in iter_jsonl(path):
        doc = _record_document(str(path), number, record, text_column)
        if doc:
            yield doc


def _read_csv(path: Path, text_column: str, delimiter: str) -> Iterator[Document]:
    lines = _decoded_lines(path)
    reader = csv.reader((text + "\n" for _, text in lines), delimiter=delimiter)  # keeps quoted line breaks
    try:
        header = next(reader)
    except StopIteration:
        return
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}")
        doc = _record_document(str(path), reader.line_num, dict(zip(header, row)), text_column)
        if doc:
            yield doc


def _read_parquet(path: Path, text_column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if text_column not in table.schema_arrow.names:
        raise DataError(f"{path}: no text column {text_column!r} (found {table.schema_arrow.names}); "
                        f"pass --text-column")
    number = 0
    for batch in table.iter_batches(columns=[text_column]):
        for text in batch.column(0).to_pylist():
            number += 1
            doc = _record_document(str(path), number, {text_column: text}, text_column)
            if doc:
                yield doc


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hf(spec: str):
    """The `datasets` split named by NAME[:CONFIG][@SPLIT]; offline and not cached is a DataError at once."""
    import datasets

    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    split = split or "train"
    if Path(name).is_dir() and ((Path(name) / "state.json").is_file()
                                or (Path(name) / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(name)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    if Path(name).is_file() and Path(name).suffix in builder:  # a local data file: the matching builder
        try:
            return datasets.load_dataset(builder[Path(name).suffix], data_files={split: name}, split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot read this file"
            raise DataError(f"hf:{spec}: cannot load the file ({type(e).__name__}: {e})") from None
    offline = not Path(name).exists() and not _hub_reachable()
    saved = datasets.config.HF_HUB_OFFLINE
    if offline:  # without this, `datasets` retries the unreachable Hub for half a minute before failing
        import huggingface_hub.constants as hub_constants

        saved_hub = hub_constants.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this spec"
        why = "the Hub is unreachable and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise DataError(f"hf:{spec}: cannot load the dataset ({why})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
        if offline:
            hub_constants.HF_HUB_OFFLINE = saved_hub


def _read_hf(spec: str, text_column: str) -> Iterator[Document]:
    ds = _load_hf(spec)
    if text_column not in ds.column_names:
        raise DataError(f"hf:{spec}: no text column {text_column!r} (found {ds.column_names}); pass --text-column")
    for number, record in enumerate(ds.select_columns([text_column]), 1):
        doc = _record_document(f"hf:{spec}", number, record, text_column)
        if doc:
            yield doc


def _read_tfds(spec: str, text_column: str) -> Iterator[Document]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"tfds:{spec}: tensorflow-datasets is not installed (pip install 'flaxbert[tfds]')") from None
    name, _, split = spec.partition("@")
    try:  # download=False: never reach for the network; a dataset not yet prepared fails here at once
        records = tfds.data_source(name, split=split or "train", download=False)  # array_record, no TensorFlow
    except Exception as e:  # noqa: BLE001 - tfds raises many types; all mean "not available this way"
        try:  # datasets prepared as tfrecord are read through tf.data (needs TensorFlow)
            records = tfds.as_numpy(tfds.load(name, split=split or "train", download=False))
        except Exception as e2:  # noqa: BLE001
            raise DataError(f"tfds:{spec}: not available in the local TFDS data dir ({type(e).__name__}: {e}; "
                            f"{type(e2).__name__}: {e2})") from None
    for number, record in enumerate(records, 1):
        doc = _record_document(f"tfds:{spec}", number, dict(record), text_column)
        if doc:
            yield doc


def expand(specs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Corpus specs with globs and directories expanded to sorted file lists (hf:/tfds: pass through)."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    out = []
    for spec in map(str, specs):
        if spec.startswith(("hf:", "tfds:")):
            out.append(spec)
        elif Path(spec).is_dir():
            files = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and p.suffix in _EXTENSIONS)
            if not files:
                raise DataError(f"{spec}: directory holds no corpus files ({', '.join(_EXTENSIONS)})")
            out.extend(files)
        elif any(c in spec for c in "*?["):
            files = sorted(glob.glob(spec, recursive=True))
            if not files:
                raise DataError(f"{spec}: no file matches this pattern")
            out.extend(files)
        elif not Path(spec).is_file():
            raise DataError(f"{spec}: corpus file not found")
        else:
            out.append(spec)
    return out


def guess_format(spec: str) -> str:
    if spec.startswith("hf:"):
        return "hf"
    if spec.startswith("tfds:"):
        return "tfds"
    return _EXTENSIONS.get(Path(spec).suffix.lower(), "bert")


def read_documents(specs, fmt: str | None = None, *, text_column: str = "text") -> Iterator[Document]:
    """Documents from every corpus spec in order; `fmt=None` guesses each one's format from its name."""
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown corpus format {fmt!r}; choose one of {FORMATS}")
    for spec in expand(specs):
        yield from READERS[fmt or guess_format(spec)](spec, text_column)


# format -> reader(spec, text_column): the one table that says how each corpus format is read
READERS: dict[str, Callable[[str, str], Iterator[Document]]] = {
    "bert": lambda spec, col: _read_bert(Path(spec)),
    "lines": lambda spec, col: _read_lines(Path(spec)),
    "wikitext": lambda spec, col: _read_wikitext(Path(spec)),
    "jsonl": lambda spec, col: _read_jsonl(Path(spec), col),
    "csv": lambda spec, col: _read_csv(Path(spec), col, ","),
    "tsv": lambda spec, col: _read_csv(Path(spec), col, "\t"),
    "parquet": lambda spec, col: _read_parquet(Path(spec), col),
    "hf": lambda spec, col: _read_hf(spec.removeprefix("hf:"), col),
    "tfds": lambda spec, col: _read_tfds(spec.removeprefix("tfds:"), col),
}
FORMATS = tuple(READERS)


def iter_texts(specs, fmt: str | None = None, *, text_column: str = "text") -> Iterable[str]:
    """Every sentence of the corpus, in order (what vocabulary training and round-trip checks read)."""
    for doc in read_documents(specs, fmt, text_column=text_column):
        yield from doc.sentences
