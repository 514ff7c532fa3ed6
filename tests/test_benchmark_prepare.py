"""The preparation benchmark's pieces on a small corpus: the corpus builder and the subprocess measurement."""

from benchmarks.prepare_corpus import build_corpus, measure_prepare
from flaxbert.data import read_documents


def test_build_corpus_and_measure_prepare(data_dir, minilm_dir, tmp_path):
    corpus = build_corpus(tmp_path / "corpus.txt", 30_000, data_root=data_dir, tokenizer=minilm_dir)
    assert 30_000 <= corpus["tokens"] < 40_000 and corpus["passes"] == 1 and corpus["pool_tokens"] > 3_000_000
    documents = list(read_documents(tmp_path / "corpus.txt", "bert"))
    assert len(documents) == corpus["documents"] and max(len(d.sentences) for d in documents) > 1
    again = build_corpus(tmp_path / "again.txt", 30_000, data_root=data_dir, tokenizer=minilm_dir)
    assert (tmp_path / "again.txt").read_bytes() == (tmp_path / "corpus.txt").read_bytes()  # seeded
    result = measure_prepare(tmp_path / "corpus.txt", 2, tokenizer=minilm_dir, out_dir=tmp_path)
    assert result["corpus_tokens"] == corpus["tokens"] == again["tokens"]  # counted as prepare counts
    assert result["workers"] == 2 and result["instances"] > 100 and result["corpus_tokens_per_s"] > 0
    assert set(result["phases"]) == {"start_workers_s", "tokenize_s", "instances_s", "read_s"}
    assert 100e6 < result["peak_rss_bytes"] < 8e9 and result["worker_peak_rss_bytes"] > 0
