"""The RoBERTa family (and XLM-R, the same model under another model_type): HF PyTorch and Flax checkpoints of
every head class load with logit parity on padded batches (positions count after the padding id, as in
fairseq), flaxbert saves what transformers loads with no missing or unexpected keys, and what RoBERTa lacks is
refused."""

import json

import jax
import numpy as np
import pytest

import flaxbert
from flaxbert import BertConfig, families
from flaxbert.errors import ConfigError
from flaxbert.hf import load_pretrained, save_pretrained
from flaxbert.model import InputError, default_positions
from family_parity import (HEADS, byte_level_bpe_tokenizer, check_flax_class, check_torch_class, perturbed_torch,
                           round_trip_from)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

# (HF class prefix, config class, its settings)
CONFIGS = {
    "roberta": ("Roberta", "RobertaConfig", dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 max_position_embeddings=40, type_vocab_size=1)),
    "xlm-roberta": ("XLMRoberta", "XLMRobertaConfig", dict(vocab_size=120, hidden_size=48, num_hidden_layers=3,
                                                           num_attention_heads=4, intermediate_size=80,
                                                           max_position_embeddings=34, type_vocab_size=1,
                                                           layer_norm_eps=1e-5, hidden_act="gelu_new")),
}
SEQ = 12
PAD = 1  # RoBERTa's <pad>


def _hf_config(name, head):
    _, cls, settings = CONFIGS[name]
    return getattr(transformers, cls)(**settings, num_labels=2 if head == "question_answering" else 3)


def _hf_class(name, suffix, flax=False):
    return getattr(transformers, ("Flax" if flax else "") + CONFIGS[name][0] + suffix)


def _inputs(head, seed=0):
    """Rows padded at the end with the <pad> id (which RoBERTa's positions depend on), more in the first."""
    shape = (3, 2, SEQ) if head == "multiple_choice" else (3, SEQ)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 100, shape).astype(np.int32)
    ids[..., 0] = 0  # <s>
    mask = np.ones(shape, np.int32)
    mask[..., -3:] = 0
    mask[0, ..., -6:] = 0
    ids[mask == 0] = PAD
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("suffix", list(HEADS))
def test_pytorch_checkpoint_matches_transformers(tmp_path, suffix, name):
    head = HEADS[suffix]
    diff = check_torch_class(_hf_class(name, suffix), _hf_config(name, head), tmp_path, name, head, _inputs(head))
    print(f"pytorch {name} {suffix}: max abs diff {diff:.2e}")


@pytest.mark.parametrize("suffix", list(HEADS))
def test_flax_checkpoint_matches_transformers(tmp_path, suffix):
    head = HEADS[suffix]
    diff = check_flax_class(_hf_class("roberta", suffix, flax=True), _hf_config("roberta", head), tmp_path, "roberta",
                            head, _inputs(head))
    print(f"flax {suffix}: max abs diff {diff:.2e}")


@pytest.mark.parametrize("suffix", list(HEADS))
def test_round_trip_through_transformers(tmp_path, suffix):
    head, name = HEADS[suffix], "xlm-roberta"
    hf = round_trip_from(_hf_class(name, suffix), _hf_class(name, suffix, flax=True), _hf_config(name, head),
                         tmp_path, name, head, _inputs(head, seed=1))
    assert hf["model_type"] == name and hf["architectures"] == [CONFIGS[name][0] + suffix]
    assert (hf["pad_token_id"], hf["bos_token_id"], hf["eos_token_id"], hf["type_vocab_size"]) == (1, 0, 2, 1)


def test_positions_follow_the_padding_id_as_transformers_counts_them():
    from transformers.models.roberta.modeling_roberta import create_position_ids_from_input_ids

    cfg = BertConfig.from_hf_config(_hf_config("roberta", None).to_dict())
    ids = _inputs(None)["input_ids"]
    ids[1, 4] = PAD  # a <pad> inside a row is skipped too, as HF does
    theirs = create_position_ids_from_input_ids(torch.tensor(ids, dtype=torch.long), PAD).numpy()
    np.testing.assert_array_equal(np.asarray(default_positions(ids, cfg)), theirs)
    assert theirs[0, 0] == PAD + 1 and theirs[0, -1] == PAD
    bert = BertConfig.tiny()  # BERT's are 0, 1, ... whatever the tokens
    np.testing.assert_array_equal(np.asarray(default_positions(ids, bert))[0], np.arange(SEQ))


def test_a_sequence_longer_than_the_positions_after_the_pad_is_refused(tmp_path):
    transformers.RobertaModel(_hf_config("roberta", None)).save_pretrained(tmp_path)  # 40 positions
    model = load_pretrained(str(tmp_path), head=None)
    ok = np.full((1, 38), 5, np.int32)
    assert flaxbert.encode(model.params, {"input_ids": ok}, model.config).last_hidden_state.shape == (1, 38, 32)
    with pytest.raises(InputError, match=r"sequence length 39 is longer than max_position_embeddings \(40\) minus "
                                         r"the first position 2"):
        flaxbert.encode(model.params, {"input_ids": np.full((1, 39), 5, np.int32)}, model.config)


def test_fresh_flaxbert_model_saves_as_roberta(tmp_path):
    cfg = BertConfig.tiny(vocab_size=100, max_position_embeddings=66, model_type="roberta", type_vocab_size=1,
                          pad_token_id=1)
    params = flaxbert.init(cfg, jax.random.key(0), head="sequence_classification", num_labels=4)
    axes = flaxbert.logical_axes(cfg, head="sequence_classification", num_labels=4)
    assert tuple(axes["sequence_classification"]["dense"]["kernel"]) == ("embed", "embed_out")
    assert tuple(axes["sequence_classification"]["classifier"]["kernel"]) == ("embed", "labels")
    save_pretrained(flaxbert.hf.PretrainedModel(cfg, params, head="sequence_classification"), str(tmp_path))
    _, info = transformers.RobertaForSequenceClassification.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info


def test_no_pretraining_head_and_the_supported_types_are_listed():
    cfg = BertConfig.from_hf_config(_hf_config("roberta", None).to_dict())
    with pytest.raises(ConfigError, match="RoBERTa is trained without next-sentence prediction; use 'masked_lm'"):
        flaxbert.init(cfg, jax.random.key(0), head="pretraining")
    with pytest.raises(ConfigError, match=r"model_type is 'albert'.*supported model types: bert, distilbert, "
                                          r"electra, roberta, xlm-roberta"):
        families.family_for("albert")


def test_packed_rows_give_each_instance_its_unpacked_states(tmp_path):
    """Packed rows pass positions from 0 per instance; RoBERTa's start after the padding id, as unpacked ones."""
    torch.manual_seed(0)
    perturbed_torch(transformers.RobertaModel(_hf_config("roberta", None)), 0).save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path), head=None)
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, 100, 5).astype(np.int32), rng.integers(3, 100, 4).astype(np.int32)
    row = np.concatenate([a, b, np.full(3, PAD, np.int32)])[None]
    instance = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    positions = np.array([list(range(5)) + list(range(4)) + [0] * 3], np.int32)
    packed = flaxbert.encode(model.params, {"input_ids": row, "instance_ids": instance, "position_ids": positions},
                             model.config).last_hidden_state[0]
    for ids, sl in ((a, slice(0, 5)), (b, slice(5, 9))):
        alone = flaxbert.encode(model.params, {"input_ids": ids[None]}, model.config).last_hidden_state[0]
        np.testing.assert_allclose(np.asarray(packed[sl]), np.asarray(alone), atol=1e-5)


NER_TEXTS = ["Angela Merkel met Emmanuel Macron in Strasbourg on Tuesday.",
             "The Wojciechowski family moved from Szczebrzeszyn to New York City."]


def _bpe_model_dir(tmp_path, cls_name, labels, scale):
    """A RoBERTa directory with a byte-level BPE tokenizer trained here and a random head of `cls_name`."""
    tok = byte_level_bpe_tokenizer(32)
    config = transformers.RobertaConfig(**{**CONFIGS["roberta"][2], "vocab_size": len(tok)}, id2label=dict(
        enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(3)
    model = perturbed_torch(getattr(transformers, cls_name)(config), 3)
    with torch.no_grad():
        layer = model.classifier.out_proj if cls_name.endswith("SequenceClassification") else model.classifier
        layer.weight.mul_(scale)
    out = tmp_path / cls_name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_ner_pipeline_offsets_slice_the_text_with_byte_level_bpe(tmp_path):
    """Entities of a byte-level BPE model are whole, non-empty words of the text. (transformers' own pipeline is
    not the reference here: on this tokenizer it returns empty spans such as (7, 7) for a lone "Ġ" token.)"""
    from flaxbert.pipelines import pipeline

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    d = _bpe_model_dir(tmp_path, "RobertaForTokenClassification", labels, 30.0)
    ours = pipeline("ner", str(d))
    found = 0
    for text in NER_TEXTS:
        for e in ours(text):
            span = text[e["start"]:e["end"]]
            assert span and span == span.strip(), (text, e)  # no byte-level space in the offsets
            assert e["start"] == 0 or not text[e["start"] - 1].isalnum(), (text, e)  # starts at a word
            assert e["end"] == len(text) or not text[e["end"]].isalnum(), (text, e)  # ends at one
            found += 1
    assert found > 0


def test_text_classification_pipeline_with_byte_level_bpe_matches_transformers(tmp_path):
    from flaxbert.pipelines import pipeline

    d = _bpe_model_dir(tmp_path, "RobertaForSequenceClassification", ["negative", "positive"], 20.0)
    sentences = ["i feel so happy and loved today", "this makes me furious", "Nature is change."]
    ours = pipeline("text-classification", str(d))
    ref = transformers.pipeline("text-classification", model=str(d), tokenizer=str(d), top_k=None, device="cpu")
    for got, want in zip(ours(sentences, top_k=2), ref(sentences)):
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-4)


def test_question_answering_pipeline_with_byte_level_bpe(tmp_path):
    """QA answers of a byte-level BPE model are the context's own characters at [start, end), whole words with no
    byte-level space, chosen and scored as transformers' pipeline does: widened to words, where spans that widen
    to the same words add their scores (a word here is many pieces), or the tokens' own spans; top 3 and with
    the null answer too."""
    from flaxbert.pipelines import pipeline

    tok = byte_level_bpe_tokenizer(128)
    config = transformers.RobertaConfig(**{**CONFIGS["roberta"][2], "vocab_size": len(tok),
                                           "max_position_embeddings": 130}, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    model = perturbed_torch(transformers.RobertaForQuestionAnswering(config), 3)
    with torch.no_grad():
        model.qa_outputs.weight.mul_(30.0)  # arg-maxes that are not ties
    d = tmp_path / "qa"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    ours = pipeline("question-answering", str(d), max_length=128)
    ref = transformers.pipeline("question-answering", model=str(d), tokenizer=str(d), device="cpu")
    context = NER_TEXTS[0] + " They talked about the news from Germany and France."
    for question in ["Who met Macron?", "Where did they meet?", "What did they talk about?"]:
        for align, null in ((True, False), (False, False), (True, True)):
            got = ours(question=question, context=context, align_to_words=align, top_k=3,
                       handle_impossible_answer=null)
            want = ref(question=question, context=context, max_answer_len=30, align_to_words=align, top_k=3,
                       handle_impossible_answer=null)
            assert [(g["start"], g["end"], g["answer"]) for g in got] == \
                [(w["start"], w["end"], w["answer"]) for w in want]
            assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], rel=1e-4, abs=1e-7)
            for g in got:
                assert g["answer"] and context[g["start"]:g["end"]] == g["answer"]
                if align:
                    assert g["answer"] == g["answer"].strip(), g  # no byte-level space at either end


def test_finetune_cli_on_emotion_with_byte_level_bpe(tmp_path):
    """`python -m flaxbert.finetune` on a slice of emotion with a random RoBERTa and its byte-level BPE tokenizer
    (packed rows, the default); the best model loads in transformers with the same logits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    base = _bpe_model_dir(tmp_path, "RobertaForSequenceClassification", ["a", "b"], 1.0)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "flaxbert.finetune", "--task", "emotion", "--model", str(base),
                           "--data", str(repo.parent / "shared" / "data" / "emotion"), "--max-length", "30",
                           "--output-dir", str(out), "--epochs", "1", "--max-train-examples", "64",
                           "--max-eval-examples", "32", "--no-progress", "--run.global_batch_size=16",
                           "--optim.lr=1e-3"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["anger", "fear", "joy", "love", "sadness", "surprise"]
    assert 0 <= metrics["eval"]["test"]["accuracy"] <= 1
    best = out / "best_model"
    pt_model, info = transformers.RobertaForSequenceClassification.from_pretrained(best, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    tok = transformers.AutoTokenizer.from_pretrained(best)
    enc = dict(tok(["i feel so happy and loved today", "this makes me furious"], padding=True, return_tensors="np"))
    ours = load_pretrained(str(best), head="auto")
    logits = np.asarray(flaxbert.apply_head(ours.params, enc, ours.config).logits)
    with torch.no_grad():
        ref = pt_model.eval()(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-4
