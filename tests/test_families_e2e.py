"""ELECTRA and RoBERTa end to end, as DistilBERT is in test_distilbert_e2e.py: `python -m flaxbert.finetune` on
slices of emotion, CoNLL-2003 and SQuAD with small random models (ELECTRA with embeddings narrower than its layers
and a WordPiece vocabulary trained here; RoBERTa with a byte-level BPE tokenizer trained here), each best model read
by transformers' own class with the same logits; ELECTRA's `flaxbert.pipeline` against transformers' pipelines;
feature extraction without a pooler."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import flaxbert
from flaxbert import hf
from flaxbert.finetune import __main__ as finetune_cli
from flaxbert.pipelines import pipeline
from family_parity import byte_level_bpe_tokenizer, perturbed_torch, run_finetune_cli, train_wordpiece_vocab

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")
ELECTRA_SIZE = dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128)
ROBERTA_SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=130, type_vocab_size=1)  # positions after <pad> (1): 128 tokens
SENTENCES = ["i feel so happy and loved today", "i am scared of what comes next", "this makes me furious"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
CONTEXT = ("Angela Merkel met Emmanuel Macron in Strasbourg on Tuesday. They talked about the news from Germany and "
           "France, and about the weather in New York City.")


@pytest.fixture(scope="module")
def electra_dir(tmp_path_factory):
    """A random bare ElectraModel (embeddings 16 wide, layers 32) with a WordPiece tokenizer trained here."""
    out = tmp_path_factory.mktemp("electra")
    train_wordpiece_vocab(out, DATA)
    tok = transformers.ElectraTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True,
                                            model_max_length=ELECTRA_SIZE["max_position_embeddings"])
    tok.save_pretrained(out)
    torch.manual_seed(0)
    transformers.ElectraModel(transformers.ElectraConfig(vocab_size=len(tok), **ELECTRA_SIZE)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A random bare RobertaModel with a byte-level BPE tokenizer trained here."""
    out = tmp_path_factory.mktemp("roberta")
    tok = byte_level_bpe_tokenizer(128)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **ROBERTA_SIZE)
    perturbed_torch(transformers.RobertaModel(config), 0).save_pretrained(out)
    return out


def _finetune(args, out: Path) -> dict:
    run_finetune_cli(args, out)
    return json.loads((out / "metrics.json").read_text())


def _same_outputs(best: Path, cls, texts, pairs=None) -> float:
    """transformers loads `best` as `cls` with no missing, unexpected or mismatched keys; the largest difference
    between its outputs and flaxbert's on a padded batch."""
    pt_model, info = cls.from_pretrained(best, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    tok = transformers.AutoTokenizer.from_pretrained(best)
    enc = dict(tok(texts, pairs, padding=True, return_tensors="np"))
    ours = hf.load_pretrained(str(best), head="auto")
    assert ours.report.missing == [] and ours.report.initialized == [] and ours.report.unexpected == []
    out = flaxbert.apply_head(ours.params, enc, ours.config)
    with torch.no_grad():
        ref = pt_model.eval()(**{k: torch.tensor(v) for k, v in enc.items()})
    if hasattr(out, "start_logits"):
        pairs_ = [(out.start_logits, ref.start_logits), (out.end_logits, ref.end_logits)]
    else:
        pairs_ = [(out.logits, ref.logits)]
    return max(float(np.abs(np.asarray(a) - b.numpy()).max()) for a, b in pairs_)


FAMILIES = {"electra": ("electra_dir", "Electra"), "roberta": ("roberta_dir", "Roberta")}
# ELECTRA's NER and QA runs are in scripts/slow_tests.sh (CI time); its heads' parity with transformers, its
# emotion run and its pipelines stay in the default run, as do RoBERTa's (the byte-level BPE offsets) NER and QA
BY_FAMILY = [pytest.param("electra", marks=pytest.mark.slow), "roberta"]


@pytest.mark.parametrize("family", BY_FAMILY)
def test_conll_ner_through_the_cli(family, request, tmp_path):
    fixture, prefix = FAMILIES[family]
    base = request.getfixturevalue(fixture)
    metrics = _finetune(["--task", "conll2003", "--model", str(base), "--data", str(DATA / "conll2003"),
                         "--max-length", "64", "--task.bucket_min=64"], tmp_path / "out")
    assert set(metrics["eval"]) == {"valid", "test"} and math.isfinite(metrics["eval"]["valid"]["f1"])
    diff = _same_outputs(tmp_path / "out" / "best_model", getattr(transformers, prefix + "ForTokenClassification"),
                         ["Angela Merkel met Emmanuel Macron.", "The family moved to New York City."])
    print(f"{family} conll best_model: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("family", BY_FAMILY)
def test_squad_qa_through_the_cli(family, request, tmp_path):
    fixture, prefix = FAMILIES[family]
    base = request.getfixturevalue(fixture)
    squad = DATA / "squad" / "dev-v1.1.json"
    metrics = _finetune(["--task", "squad", "--model", str(base), "--data", f"train={squad},dev={squad}",
                         "--max-length", "96", "--task.bucket_min=96", "--task.doc_stride=32",
                         "--task.max_query_length=32"], tmp_path / "out")
    assert math.isfinite(metrics["eval"]["dev"]["f1"]) and 0 <= metrics["eval"]["dev"]["exact"] <= 100
    diff = _same_outputs(tmp_path / "out" / "best_model", getattr(transformers, prefix + "ForQuestionAnswering"),
                         ["Who met Macron?", "Where?"], [CONTEXT, CONTEXT])
    print(f"{family} squad best_model: max abs start/end logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_electra_emotion_through_the_cli(electra_dir, tmp_path):
    metrics = _finetune(["--task", "emotion", "--model", str(electra_dir), "--data", str(DATA / "emotion"),
                         "--max-length", "32", "--task.bucket_min=32"], tmp_path / "out")  # one shape to compile
    assert metrics["labels"] == ["anger", "fear", "joy", "love", "sadness", "surprise"]
    best = tmp_path / "out" / "best_model"
    saved = json.loads((best / "config.json").read_text())
    assert saved["model_type"] == "electra" and saved["architectures"] == ["ElectraForSequenceClassification"]
    assert (saved["embedding_size"], saved["hidden_size"]) == (16, 32)
    diff = _same_outputs(best, transformers.ElectraForSequenceClassification, SENTENCES)
    print(f"electra emotion best_model: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def _electra_head_dir(tmp_path, base: Path, cls_name: str, labels, scale: float, output: str):
    """`base` with a transformers head class of random weights, its output layer scaled so arg-maxes are not ties."""
    labels = {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}} if labels else {}
    config = transformers.ElectraConfig.from_pretrained(base, **labels)
    torch.manual_seed(3)
    model = perturbed_torch(getattr(transformers, cls_name)(config), 3)
    with torch.no_grad():
        model.get_submodule(output).weight.mul_(scale)
    out = tmp_path / cls_name
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def test_electra_pipelines_match_transformers(electra_dir, tmp_path):
    d = _electra_head_dir(tmp_path, electra_dir, "ElectraForSequenceClassification", ["negative", "positive"], 20.0,
                          "classifier.out_proj")
    ref = transformers.pipeline("text-classification", model=str(d), tokenizer=str(d), top_k=None, device="cpu")
    for got, want in zip(pipeline("text-classification", str(d))(SENTENCES, top_k=2), ref(SENTENCES)):
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-4)

    d = _electra_head_dir(tmp_path, electra_dir, "ElectraForTokenClassification", NER_LABELS, 60.0, "classifier")
    ours = pipeline("ner", str(d))
    ref = transformers.pipeline("token-classification", model=str(d), tokenizer=str(d), aggregation_strategy="first",
                                device="cpu")
    found = 0
    for text in [CONTEXT, "The Wojciechowski family moved from Szczebrzeszyn to New York City."]:
        got, want = ours(text), ref(text)
        assert [(e["entity"], e["start"], e["end"]) for e in got] == \
            [(w["entity_group"], w["start"], w["end"]) for w in want]
        found += len(got)
    assert found > 0

    d = _electra_head_dir(tmp_path, electra_dir, "ElectraForQuestionAnswering", None, 30.0, "qa_outputs")
    ours = pipeline("question-answering", str(d), max_length=128)
    ref = transformers.pipeline("question-answering", model=str(d), tokenizer=str(d), device="cpu")
    for question in ["Who met Macron?", "Where did they meet?", "What did they talk about?"]:
        got = ours(question=question, context=CONTEXT)
        want = ref(question=question, context=CONTEXT, max_answer_len=30)
        assert (got["start"], got["end"], got["answer"]) == (want["start"], want["end"], want["answer"])


def test_electra_feature_extraction_without_a_pooler(electra_dir, tmp_path, capsys):
    common = ["--task", "emotion", "--model", str(electra_dir), "--data", str(DATA / "emotion"), "--max-length", "32",
              "--max-train-examples", "48", "--max-eval-examples", "24", "--features", "--no-progress"]
    assert finetune_cli.main(common + ["--pooling", "pooled", "--output-dir", str(tmp_path / "pooled")]) == 2
    assert "'electra' has none" in capsys.readouterr().err
    assert finetune_cli.main(common + ["--pooling", "mean", "--output-dir", str(tmp_path / "mean")]) == 0
    report = json.loads((tmp_path / "mean" / "metrics.json").read_text())
    assert report["pooling"] == "mean" and math.isfinite(report["metrics"]["test"]["accuracy"])


def test_qa_windows_too_short_for_the_stride_are_refused_in_one_line(electra_dir, tmp_path, capsys):
    squad = DATA / "squad" / "dev-v1.1.json"
    code = finetune_cli.main(["--task", "squad", "--model", str(electra_dir), "--data", f"train={squad},dev={squad}",
                              "--max-length", "96", "--max-train-examples", "16", "--max-eval-examples", "8",
                              "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "doc_stride=128" in err and "task.doc_stride" in err and "Traceback" not in err


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_before_training(electra_dir, tmp_path, capsys):
    """A model directory whose tokenizer has ids past the embedding rows: one line naming both sizes, exit 2,
    before anything is fine-tuned (and a pipeline refuses it too)."""
    small = tmp_path / "small"
    config = transformers.ElectraConfig.from_pretrained(electra_dir, vocab_size=500)
    transformers.ElectraModel(config).save_pretrained(small)
    transformers.AutoTokenizer.from_pretrained(electra_dir).save_pretrained(small)
    code = finetune_cli.main(["--task", "emotion", "--model", str(small), "--data", str(DATA / "emotion"),
                              "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer has 1000 tokens" in err and "only 500 rows" in err and str(small) in err
    assert not (tmp_path / "out" / "best_model").exists()
    with pytest.raises(hf.HFLoadError, match="tokenizer has 1000 tokens"):
        pipeline("text-classification", str(small))
