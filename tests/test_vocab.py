"""Tokenizer loading (checked against transformers' own loader) and WordPiece training (acceptance 5)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, BertTokenizerFast

import flaxbert
from flaxbert.vocab import SPECIAL_TOKENS, VocabError, load_tokenizer, round_trip, train_wordpiece

MEDITATIONS = Path(flaxbert.__file__).parent / "resources" / "meditations.txt"
REPO = Path(__file__).resolve().parents[1]
TEXT = "Homarus gammarus, known as the European lobster, is a species of clawed lobster. Ça coûte 6 €!"


@pytest.mark.parametrize("files", [("vocab.txt",), ("tokenizer.json",), None])
def test_load_tokenizer_matches_transformers(minilm_dir, tmp_path, files):
    reference = BertTokenizerFast.from_pretrained(minilm_dir)
    if files is None:
        path = minilm_dir
    else:
        path = tmp_path / "tok"
        path.mkdir()
        for f in files:
            shutil.copy(minilm_dir / f, path / f)
    tokenizer = load_tokenizer(path)
    assert tokenizer.is_fast
    assert tokenizer(TEXT)["input_ids"] == reference(TEXT)["input_ids"]
    assert tokenizer("a", "b")["token_type_ids"] == reference("a", "b")["token_type_ids"]


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(VocabError, match="missing-dir: tokenizer directory not found"):
        load_tokenizer(tmp_path / "missing-dir")
    with pytest.raises(VocabError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(VocabError, match=f"{tmp_path.name}: cannot load tokenizer"):
        load_tokenizer(tmp_path)


def test_train_wordpiece_round_trips_wikitext(data_dir, tmp_path):
    wiki = data_dir / "wikitext-2" / "wiki.valid.tokens"
    tokenizer = train_wordpiece([wiki], 8000, tmp_path / "vocab", corpus_format="lines")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "vocab" / name).is_file()
    assert len(tokenizer) == 8000
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    # transformers loads the directory by itself, and so does a bare vocab.txt
    auto = AutoTokenizer.from_pretrained(tmp_path / "vocab")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "vocab" / "vocab.txt", bare / "vocab.txt")
    for other in (auto, BertTokenizerFast(vocab_file=str(bare / "vocab.txt")), load_tokenizer(bare)):
        assert other(TEXT, "second")["input_ids"] == tokenizer(TEXT, "second")["input_ids"]
    lines = wiki.read_text(encoding="utf-8").splitlines()
    report = round_trip(tokenizer, lines)
    print(f"round trip: {report.words} words, {report.unk_words} mapped to [UNK] ({report.unk_examples[:5]})")
    assert report.words > 200_000
    assert report.mismatches == []
    assert report.unk_words < 0.001 * report.words
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_round_trip_counts_unknown_characters(data_dir, tmp_path):
    # a tiny alphabet leaves characters out: their words must be counted as [UNK], not as mismatches
    tokenizer = train_wordpiece(MEDITATIONS, 300, tmp_path / "tiny", corpus_format="lines", limit_alphabet=30)
    report = round_trip(tokenizer, MEDITATIONS.read_text(encoding="utf-8").splitlines())
    assert report.unk_words > 0 and report.mismatches == []


def test_cased_vocab_and_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flaxbert.vocab", "--corpus", str(MEDITATIONS), "--format", "lines",
                           "--vocab-size", "3000", "--cased", "--out", str(tmp_path / "cased")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "round trip" in proc.stdout and "0 other mismatches" in proc.stdout
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "cased")
    assert "Antoninus" in tokenizer.decode(tokenizer("Antoninus")["input_ids"], skip_special_tokens=True)
    assert any(t[:1].isupper() for t in tokenizer.get_vocab())
    for name in ("tokenizer.json", "vocab.txt"):  # a bare file keeps the case too
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "cased" / name, tmp_path / name / name)
        assert load_tokenizer(tmp_path / name).tokenize("Antoninus") == tokenizer.tokenize("Antoninus"), name
    bad = subprocess.run([sys.executable, "-m", "flaxbert.vocab", "--corpus", str(tmp_path / "nope.txt"),
                          "--vocab-size", "100", "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "nope.txt: corpus file not found" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_empty_corpus_writes_no_vocabulary(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "flaxbert.vocab", "--corpus", str(tmp_path / "empty.txt"),
                           "--vocab-size", "100", "--out", str(tmp_path / "v")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "empty.txt: the corpus holds no text to train a vocabulary on" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "v").exists()
