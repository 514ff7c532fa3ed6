"""Streaming preparation: appended .npy files, bounded task queues, output independent of chunk and block sizes,
the fast word-start path equal to the tokenizer's word ids, and no half-written directory after an error."""

import multiprocessing
import random
from pathlib import Path

import numpy as np
import pytest

import flaxbert
from flaxbert.data import DataError, prepare, shards
from flaxbert.data.instances import continuation_ids, tokenize_sentences, truncate_pair

MEDITATIONS = Path(flaxbert.__file__).parent / "resources" / "meditations.txt"


def test_npy_appender_writes_what_numpy_reads(tmp_path):
    for dtype, parts in ((np.uint16, [[1, 2], [], [65535]]), (np.int64, [[]]), (np.uint8, [np.arange(300) % 7])):
        writer = shards.NpyAppender(tmp_path / "a.npy", dtype)
        for part in parts:
            writer.append(part)
        writer.close()
        expected = np.concatenate([np.asarray(p, dtype) for p in parts])
        for mode in (None, "r"):
            got = np.load(tmp_path / "a.npy", mmap_mode=mode)
            assert got.dtype == dtype and got.shape == expected.shape and (got == expected).all()


def _square(x):
    return x * x


def test_ordered_map_keeps_order_and_reads_tasks_lazily():
    pulled = []

    def tasks():
        for i in range(40):
            pulled.append(i)
            yield i

    with multiprocessing.get_context("fork").Pool(2) as pool:
        for k, result in enumerate(shards.ordered_map(pool, _square, tasks(), ahead=3)):
            assert result == k * k
            assert len(pulled) <= k + 3  # never more than `ahead` tasks (chunks of the corpus) in flight
    assert list(shards.ordered_map(None, _square, range(5), ahead=3)) == [0, 1, 4, 9, 16]


def test_truncation_matches_token_at_a_time_trimming():
    def reference(len_a, len_b, max_tokens):
        while len_a + len_b > max_tokens:
            if len_a >= len_b:
                len_a -= 1
            else:
                len_b -= 1
        return len_a, len_b

    rng = random.Random(0)
    for len_a in range(30):
        for len_b in range(30):
            for max_tokens in range(2, 50):
                cut_a, new_a, cut_b, new_b = truncate_pair(len_a, len_b, max_tokens, rng)
                assert (new_a, new_b) == reference(len_a, len_b, max_tokens)
                assert 0 <= cut_a <= len_a - new_a and 0 <= cut_b <= len_b - new_b
    cuts = [truncate_pair(100, 10, 50, rng)[0] for _ in range(4000)]  # 60 trims of A, each a fair coin
    assert abs(np.mean(cuts) - 30) < 0.5 and abs(np.var(cuts) - 15) < 2


def test_word_starts_from_the_vocabulary_equal_word_ids(minilm_dir, data_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    backend.no_padding()
    backend.no_truncation()
    table = continuation_ids(backend)
    assert table is not None and table[backend.token_to_id("##s")] and not table[backend.token_to_id("the")]
    lines = (data_dir / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
    sentences = ["##abc a##b ###", "[MASK] here [CLS]", "a" * 150 + " b", "naïve café 北京 😀", "\u200b", "x"]
    sentences += [line for line in lines if line.strip()][:3000]
    slow = tokenize_sentences(backend, sentences)
    fast = tokenize_sentences(backend, sentences, np.uint16, table)
    assert (slow.lengths == fast.lengths).all() and slow.lengths[4] == 0
    assert (slow.tokens == fast.tokens).all() and (slow.word_starts == fast.word_starts).all()
    assert 0.05 < 1 - slow.word_starts.mean() < 0.5  # the corpus has word pieces
    other = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    assert continuation_ids(other) is None  # not WordPiece: word ids decide
    assert tokenize_sentences(other, ["a b", "b"]).word_starts.tolist() == [1, 1, 1]


def test_output_does_not_depend_on_chunk_or_block_size(minilm_dir, tmp_path, monkeypatch):
    kw = dict(corpus_format="lines", max_seq_length=64, dupe_factor=2, whole_word_masking=True, num_shards=3,
              progress=False)
    prepare(MEDITATIONS, minilm_dir, tmp_path / "default", **kw)
    monkeypatch.setattr(shards, "CHUNK_CHARS", 3000)  # ~80 tokenisation tasks
    monkeypatch.setattr(shards, "BLOCK_INSTANCES", 7)  # blocks end inside documents' runs of instances
    manifest = prepare(MEDITATIONS, minilm_dir, tmp_path / "small", workers=2, **kw)
    assert manifest["counts"]["instances"] > 1000
    files = sorted(p.relative_to(tmp_path / "default") for p in (tmp_path / "default").rglob("*.npy"))
    assert len(files) == 1 + 3 * len(shards.SHARD_ARRAYS)
    for f in files:
        assert (tmp_path / "default" / f).read_bytes() == (tmp_path / "small" / f).read_bytes(), f


def test_an_error_late_in_the_corpus_leaves_the_output_directory_as_it_was(minilm_dir, tmp_path, monkeypatch):
    corpus = tmp_path / "late.txt"
    good = "".join(f"Sentence {i} of a document.\nAnother sentence here.\n\n" for i in range(3000))
    corpus.write_bytes(good.encode() + b"Caf\xe9.\n")
    monkeypatch.setattr(shards, "CHUNK_CHARS", 10_000)  # tokenisation is under way when the bad line is read
    with pytest.raises(DataError, match=r"late.txt:9001: bytes that are not UTF-8"):
        prepare(corpus, minilm_dir, tmp_path / "out", workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.txt"]  # no output, no partial directory
    earlier = prepare(MEDITATIONS, minilm_dir, tmp_path / "out", corpus_format="lines", progress=False)
    one_each = tmp_path / "one_each.txt"
    one_each.write_text("Only one sentence here\nAnd one more line here\n")
    with pytest.raises(DataError, match=r"one_each.txt: no document has two or more sentences"):
        prepare(one_each, minilm_dir, tmp_path / "out", corpus_format="lines", overwrite=True, progress=False)
    assert shards.load_manifest(tmp_path / "out") == earlier  # the earlier preparation is still there
