"""What every family's heads read from config.json beyond their shapes, checked against transformers' own classes:
each head's dropout rate in training (classifier_dropout, summary_last_dropout, DistilBERT's own rates), and MLM
decoders that are weights of their own (tie_word_embeddings false), which load, predict and save as HF's."""

import jax
import numpy as np
import pytest

import flaxbert
from flaxbert import BertConfig, heads
from family_parity import check_flax_class, check_torch_class, loaded_clean, round_trip_from

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SIZE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40)
DISTIL_SIZE = dict(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=40)
# family -> (transformers class prefix, config class, config sizes, the base model's attribute name)
FAMILIES = {
    "bert": ("Bert", "BertConfig", SIZE, "bert"),
    "roberta": ("Roberta", "RobertaConfig", dict(SIZE, pad_token_id=1), "roberta"),
    "xlm-roberta": ("XLMRoberta", "XLMRobertaConfig", dict(SIZE, pad_token_id=1), "roberta"),
    "electra": ("Electra", "ElectraConfig", dict(SIZE, embedding_size=16), "electra"),
    "distilbert": ("DistilBert", "DistilBertConfig", DISTIL_SIZE, "distilbert"),
}
HEAD_CLASSES = {"ForSequenceClassification": "sequence_classification", "ForTokenClassification":
                "token_classification", "ForQuestionAnswering": "question_answering",
                "ForMultipleChoice": "multiple_choice"}
# distinct rates, so that the one a head reads is known by its value
RATES = dict(hidden_dropout_prob=0.11, attention_probs_dropout_prob=0.13, classifier_dropout=0.37,
             summary_last_dropout=0.23, seq_classif_dropout=0.29, qa_dropout=0.17)
DISTIL_RATES = dict(dropout=0.11, attention_dropout=0.13, seq_classif_dropout=0.29, qa_dropout=0.17)


def _hf_config(family, **rates):
    prefix, config_class, size, _ = FAMILIES[family]
    rates = rates or (DISTIL_RATES if family == "distilbert" else RATES)
    return getattr(transformers, config_class)(**size, **rates)


def _head_rates(model, base: str) -> set:
    """The dropout rates of a transformers model's modules outside its encoder (its head's)."""
    return {round(m.p, 6) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Dropout) and not name.startswith(base + ".")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("suffix", sorted(HEAD_CLASSES))
@pytest.mark.parametrize("classifier_dropout", [0.37, None])
def test_each_heads_dropout_is_the_rate_transformers_uses(family, suffix, classifier_dropout):
    prefix, _, _, base = FAMILIES[family]
    if family == "distilbert":
        if classifier_dropout is None:
            pytest.skip("DistilBERT has no classifier_dropout")
        hf_config = _hf_config(family)
    else:
        hf_config = _hf_config(family, **dict(RATES, classifier_dropout=classifier_dropout))
    theirs = _head_rates(getattr(transformers, prefix + suffix)(hf_config), base)
    config = BertConfig.from_hf_config(hf_config.to_dict())
    ours = heads.head_spec(config, HEAD_CLASSES[suffix]).dropout_rate(config)
    assert theirs == ({round(ours, 6)} if ours else set()), (family, suffix, theirs, ours)


def test_the_rate_is_the_one_the_head_applies():
    """With the encoder's dropout at 0, a head changes under a dropout rng exactly when its own rate is above 0."""
    base = BertConfig.tiny(vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    electra = base.replace(model_type="electra", embedding_size=64)
    ids = np.random.default_rng(0).integers(5, 100, (3, 2, 12)).astype(np.int32)
    cases = [(base, "sequence_classification", "classifier_dropout", ids[:, 0]),
             (base, "token_classification", "classifier_dropout", ids[:, 0]),
             (electra, "multiple_choice", "summary_last_dropout", ids),
             (electra, "sequence_classification", "classifier_dropout", ids[:, 0])]
    for config, head, field, batch_ids in cases:
        params = flaxbert.init(config, jax.random.key(0), head=head, num_labels=3)
        batch = {"input_ids": batch_ids, "attention_mask": np.ones_like(batch_ids)}

        def changed(rate):
            c = config.replace(**{field: rate})
            plain, dropped = (flaxbert.apply_head(params, batch, c, dropout_rng=r).logits
                              for r in (None, jax.random.key(1)))
            return not np.allclose(np.asarray(plain), np.asarray(dropped))

        assert changed(0.5) and not changed(0.0), (head, field)


def test_classifier_dropout_round_trips_and_belongs_to_its_families():
    config = BertConfig.from_hf_config(_hf_config("electra").to_dict())
    assert (config.classifier_dropout, config.summary_last_dropout) == (0.37, 0.23)
    back = config.to_hf_config()
    assert (back["classifier_dropout"], back["summary_last_dropout"]) == (0.37, 0.23)
    assert BertConfig.from_hf_config(transformers.BertConfig(**SIZE).to_dict()).classifier_dropout is None
    with pytest.raises(flaxbert.ConfigError, match="classifier_dropout is not a setting of model_type 'distilbert'"):
        BertConfig.tiny(model_type="distilbert", type_vocab_size=0, classifier_dropout=0.2)
    with pytest.raises(flaxbert.ConfigError, match=r"classifier_dropout must be in \[0, 1\)"):
        BertConfig.tiny(classifier_dropout=1.0)


# ----- MLM decoders of their own ------------------------------------------------------------------------

MLM_CLASSES = {"bert": "BertForMaskedLM", "distilbert": "DistilBertForMaskedLM", "roberta": "RobertaForMaskedLM",
               "electra": "ElectraForMaskedLM"}


def _mlm_batch(pad: int, token_types: bool = True):
    ids = np.random.default_rng(0).integers(5, 99, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, -4:] = 0
    ids[mask == 0] = pad
    # given explicitly: without them transformers' Flax ELECTRA takes token type 1 everywhere, its PyTorch class 0
    types = {"token_type_ids": np.zeros_like(ids)} if token_types else {}
    return {"input_ids": ids, "attention_mask": mask, **types}


@pytest.mark.parametrize("family", sorted(MLM_CLASSES))
def test_untied_decoder_loads_predicts_and_saves_as_transformers(family, tmp_path):
    hf_config = _hf_config(family)
    hf_config.tie_word_embeddings = False
    cls = getattr(transformers, MLM_CLASSES[family])
    batch = _mlm_batch(hf_config.pad_token_id, token_types=family != "distilbert")
    diff = check_torch_class(cls, hf_config, tmp_path / "pt", family, "masked_lm", batch)
    model = loaded_clean(tmp_path / "pt", family, "masked_lm")
    assert model.config.tie_word_embeddings is False
    decoder = np.asarray(model.params["masked_lm"]["mlm"]["decoder"]["kernel"])
    words = np.asarray(model.params["bert"]["embeddings"]["word_embeddings"])
    assert decoder.shape == words.T.shape and not np.allclose(decoder, words.T)  # its own weights, not a copy
    saved = round_trip_from(cls, getattr(transformers, "Flax" + MLM_CLASSES[family]), hf_config, tmp_path / "rt",
                            family, "masked_lm", batch)
    assert saved["tie_word_embeddings"] is False
    print(f"{family} untied decoder: max abs logit diff {diff:.2e}")


def test_untied_decoder_from_a_flax_checkpoint_and_in_bert_pretraining(tmp_path):
    hf_config = _hf_config("bert")
    hf_config.tie_word_embeddings = False
    batch = _mlm_batch(0)
    check_flax_class(transformers.FlaxBertForMaskedLM, hf_config, tmp_path / "flax", "bert", "masked_lm", batch)
    torch.manual_seed(0)
    pt = transformers.BertForPreTraining(hf_config)
    pt.save_pretrained(tmp_path / "pre")
    model = loaded_clean(tmp_path / "pre", "bert", "pretraining")
    with torch.no_grad():
        want = pt.eval()(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).prediction_logits.numpy()
    got = np.asarray(flaxbert.apply_head(model.params, batch, model.config).mlm_logits)
    assert float(np.abs(got - want).max()) <= 1e-4


def test_a_fresh_untied_model_has_a_decoder_of_its_own():
    config = BertConfig.tiny(vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    params = flaxbert.init(config, jax.random.key(0), head="masked_lm")
    assert params["masked_lm"]["mlm"]["decoder"]["kernel"].shape == (128, 64)
    axes = flaxbert.logical_axes(config, "masked_lm")
    assert tuple(axes["masked_lm"]["mlm"]["decoder"]["kernel"]) == ("embed", "vocab")
    tied = flaxbert.init(config.replace(tie_word_embeddings=True), jax.random.key(0), head="masked_lm")
    assert "decoder" not in tied["masked_lm"]["mlm"]
