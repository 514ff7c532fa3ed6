"""flaxbert.pipeline against transformers' pipelines on the same weights (PyTorch, read from the
directory flaxbert writes): labels and scores, NER entity spans, QA answers and offsets; and the CLI."""

import json

import jax
import numpy as np
import pytest

import flaxbert
from flaxbert import hf
from flaxbert.pipelines import main as pipeline_cli
from flaxbert.pipelines import pipeline

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _model_dir(tmp_path, minilm_dir, head, labels=None, scale=60.0, seed=0):
    """A tiny random BERT with `head`, its classifier scaled up so that arg-maxes are not near-ties."""
    from flaxbert.vocab import load_tokenizer

    tok = load_tokenizer(minilm_dir)
    cfg = flaxbert.BertConfig.tiny(vocab_size=tok.vocab_size, num_hidden_layers=1, hidden_size=64,
                                   num_attention_heads=2, intermediate_size=128, max_position_embeddings=128)
    n = len(labels) if labels else 2
    params = flaxbert.init(cfg, jax.random.key(seed), head=head, num_labels=n)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if "kernel" in str(path[-1]) and str(path[0].key) == head else x, params)
    extra = {"id2label": {str(i): l for i, l in enumerate(labels)}, "label2id": {l: i for i, l in enumerate(labels)}} \
        if labels else {}
    out = tmp_path / head
    hf.save_pretrained(hf.PretrainedModel(cfg, params, tok, head, hf_extra=extra), str(out))
    return out


def test_text_classification_matches_transformers(tmp_path, minilm_dir):
    d = _model_dir(tmp_path, minilm_dir, "sequence_classification", ["negative", "positive"], scale=20.0)
    ours = pipeline("text-classification", str(d))
    texts = ["a gripping, beautifully made film", "dull and far too long", "it is a film"]
    ref = transformers.pipeline("text-classification", model=str(d), tokenizer=str(d), top_k=None, device="cpu")
    for got, want in zip(ours(texts, top_k=2), ref(texts)):
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-4)
    single = ours("dull and far too long")
    assert single["label"] in ("negative", "positive") and 0.5 <= single["score"] <= 1


def test_ner_entities_match_transformers_first_aggregation(tmp_path, minilm_dir):
    d = _model_dir(tmp_path, minilm_dir, "token_classification", NER_LABELS, seed=3)
    ours = pipeline("ner", str(d))
    ref = transformers.pipeline("token-classification", model=str(d), tokenizer=str(d), aggregation_strategy="first",
                                device="cpu")
    texts = ["Angela Merkel met Emmanuel Macron in Strasbourg on Tuesday.",
             "The Wojciechowski family moved from Szczebrzeszyn to New York City."]
    n_entities = 0
    for text in texts:
        got, want = ours(text), ref(text)
        assert [(e["entity"], e["start"], e["end"]) for e in got] == \
            [(w["entity_group"], w["start"], w["end"]) for w in want]
        for e in got:
            assert text[e["start"]:e["end"]] == e["word"]
        n_entities += len(got)
    assert n_entities > 0  # the random head must tag something for the comparison to mean anything


def test_question_answering_matches_transformers(tmp_path, minilm_dir):
    d = _model_dir(tmp_path, minilm_dir, "question_answering", seed=5, scale=30.0)
    ours = pipeline("question-answering", str(d))
    ref = transformers.pipeline("question-answering", model=str(d), tokenizer=str(d), device="cpu")
    context = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
               "a region in France. They were descended from Norse raiders and pirates from Denmark.")
    for question in ["In what country is Normandy located?", "When were the Normans in Normandy?"]:
        got = ours(question=question, context=context)
        want = ref(question=question, context=context, max_answer_len=30)
        assert (got["start"], got["end"], got["answer"]) == (want["start"], want["end"], want["answer"])
        assert context[got["start"]:got["end"]] == got["answer"]


def test_pipeline_cli_and_untrained_head(tmp_path, minilm_dir, capsys):
    d = _model_dir(tmp_path, minilm_dir, "sequence_classification", ["neg", "pos"])
    assert pipeline_cli(["text-classification", str(d), "good film", "bad film"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(r["label"] in ("neg", "pos") for r in lines)
    # a directory without a QA head cannot answer questions: a clear error, not random answers
    assert pipeline_cli(["question-answering", str(d), "--question", "q?", "--context", "c"]) == 2
    assert "error" in capsys.readouterr().err


def test_top_level_pipeline_and_cli_module():
    import subprocess
    import sys

    import flaxbert

    assert flaxbert.pipeline.__doc__ and callable(flaxbert.pipeline)
    with pytest.raises(Exception, match="task"):
        flaxbert.pipeline("summarization", ".")
    proc = subprocess.run([sys.executable, "-m", "flaxbert.pipelines", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: python -m flaxbert.pipelines" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr
