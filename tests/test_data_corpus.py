"""Corpus readers, the sentence splitter, and acceptance 4: bad input is a clear error naming file and line."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flaxbert
from flaxbert.data import DataError, prepare, read_documents, split_sentences

MEDITATIONS = Path(flaxbert.__file__).parent / "resources" / "meditations.txt"
REPO = Path(__file__).resolve().parents[1]
DOCS = [["The first sentence.", "A second one."], ["Another document here.", "It has two.", "Or three!"]]


def sentences(docs):
    return [list(d.sentences) for d in docs]


def test_split_sentences():
    assert split_sentences("It is closely related to the American lobster , H. americanus . It may grow .") == [
        "It is closely related to the American lobster , H. americanus .", "It may grow ."]
    assert split_sentences('Mr. Smith met Dr. Who in the U.S. Army. "Why?" he asked. 3 left.') == [
        "Mr. Smith met Dr. Who in the U.S. Army.", '"Why?" he asked.', "3 left."]
    assert split_sentences("no capital. after this\nbut a line break splits") == [
        "no capital. after this", "but a line break splits"]


def test_text_formats(tmp_path, data_dir):
    bert = tmp_path / "bert.txt"
    bert.write_text("\n".join(DOCS[0]) + "\n\n\n" + "\n".join(DOCS[1]) + "\n")
    assert sentences(read_documents(bert)) == DOCS
    lines = tmp_path / "docs.txt"
    lines.write_text(" ".join(DOCS[0]) + "\n\n" + " ".join(DOCS[1]) + "\n")
    docs = list(read_documents(lines, "lines"))
    assert sentences(docs) == DOCS and [d.line for d in docs] == [1, 3]
    wiki = list(read_documents(data_dir / "wikitext-2" / "wiki.valid.tokens"))  # format guessed from .tokens
    titles = [line for line in (data_dir / "wikitext-2" / "wiki.valid.tokens").read_text().splitlines()
              if line.startswith(" = ") and not line.startswith(" = = ")]
    assert len(wiki) == len(titles) == 60
    assert not any(s.startswith("= =") for d in wiki for s in d.sentences)  # headings dropped
    assert sum(len(d.sentences) for d in wiki) > 5000


def test_table_formats(tmp_path):
    texts = [" ".join(d) for d in DOCS]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "c.csv").write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)))
    (tmp_path / "c.tsv").write_text("id\tbody\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [0, 1], "body": texts}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.csv", "c.tsv", "c.parquet"):
        assert sentences(read_documents(tmp_path / name, text_column="body")) == DOCS, name
    with pytest.raises(DataError, match=r"c.jsonl:1: no text column 'text' \(found \['body', 'id'\]\)"):
        list(read_documents(tmp_path / "c.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok."}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_documents(tmp_path / "bad.jsonl"))


def test_hf_datasets_local_and_offline_hub(tmp_path):
    import datasets

    texts = [" ".join(d) for d in DOCS]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    assert sentences(read_documents(f"hf:{tmp_path / 'saved'}")) == DOCS
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert sentences(read_documents(f"hf:{tmp_path / 'files'}")) == DOCS
    assert sentences(read_documents(f"hf:{tmp_path / 'files' / 'train.jsonl'}")) == DOCS
    start = time.perf_counter()
    with pytest.raises(DataError, match="hf:flaxbert-test/surely-not-cached:cfg@train: cannot load the dataset"):
        list(read_documents("hf:flaxbert-test/surely-not-cached:cfg@train"))
    assert time.perf_counter() - start < 15  # at once, not after the Hub client's retries


def test_tfds_without_tensorflow_datasets_is_a_clear_error():
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"tfds:wikipedia: tensorflow-datasets is not installed"):
            list(read_documents("tfds:wikipedia"))
    else:
        with pytest.raises(DataError, match=r"tfds:surely_not_a_dataset_xyz: not available"):
            list(read_documents("tfds:surely_not_a_dataset_xyz"))


# ----- acceptance 4: bad input ------------------------------------------------------------------------------
def test_undecodable_bytes_name_file_and_line(tmp_path, minilm_dir):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Good line.\nSecond line.\n\nCaf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:4: bytes that are not UTF-8 at column 4"):
        prepare(bad, minilm_dir, tmp_path / "out", progress=False)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_bytes(b'{"text": "fine."}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: bytes that are not UTF-8"):
        list(read_documents(bad_json))


def test_empty_corpus(tmp_path, minilm_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"empty.txt: the corpus holds no text"):
        prepare(empty, minilm_dir, tmp_path / "out", progress=False)


def test_no_document_with_two_sentences(tmp_path, minilm_dir):
    one_each = tmp_path / "one_each.txt"
    one_each.write_text("Only one sentence here\nAnd one more line here\n")
    with pytest.raises(DataError, match=r"one_each.txt: no document has two or more sentences"):
        prepare(one_each, minilm_dir, tmp_path / "out", corpus_format="lines", progress=False)


def test_tokenizer_larger_than_model(tmp_path, minilm_dir):
    with pytest.raises(DataError, match=r"the tokenizer has 30522 tokens but the model's embedding table has only "
                                        r"1000 rows"):
        prepare(MEDITATIONS, minilm_dir, tmp_path / "out", corpus_format="lines", model_vocab_size=1000,
                progress=False)


def test_cli_prepares_with_two_workers(tmp_path, minilm_dir):
    proc = subprocess.run([sys.executable, "-m", "flaxbert.data", "prepare", "--corpus", str(MEDITATIONS),
                           "--format", "lines", "--tokenizer", str(minilm_dir), "--out", str(tmp_path / "out"),
                           "--workers", "2", "--max-seq-length", "64", "--whole-word-masking"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "instances" in proc.stderr  # the progress bars
    summary = json.loads(proc.stdout)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["instances"] == manifest["counts"]["instances"] > 0 and summary["workers"] == 2
    assert manifest["whole_word_masking"] and manifest["max_seq_length"] == 64
    assert len(manifest["tokenizer_sha256"]) == 64 and (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()


def test_cli_reports_errors_without_traceback(tmp_path, minilm_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    proc = subprocess.run([sys.executable, "-m", "flaxbert.data", "prepare", "--corpus", str(bad), "--tokenizer",
                           str(minilm_dir), "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "bad.txt:2: bytes that are not UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_directory_is_never_clobbered(tmp_path, minilm_dir):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for overwrite, message in ((False, "directory is not empty"), (True, "not empty and not a prepared directory")):
        with pytest.raises(DataError, match=f"precious: {message}"):
            prepare(MEDITATIONS, minilm_dir, precious, corpus_format="lines", overwrite=overwrite, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    first = prepare(MEDITATIONS, minilm_dir, tmp_path / "prep", corpus_format="lines", progress=False)
    again = prepare(MEDITATIONS, minilm_dir, tmp_path / "prep", corpus_format="lines", overwrite=True, progress=False)
    assert again["counts"] == first["counts"]
