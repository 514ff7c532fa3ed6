"""The time-to-accuracy benchmark's shared pieces: the ONE evaluator (HF PyTorch BertForMaskedLM) agrees with
flaxbert's own MLM accuracy on a flaxbert checkpoint, the fixed eval masking is BERT's, run_mlm's grouping, and
the time-to-target interpolation."""

import jax
import numpy as np
import pytest

from benchmarks import hf_mlm_peers as peers
from benchmarks import time_to_accuracy as tta
from flaxbert import heads, hf
from flaxbert.config import BertConfig
from flaxbert.losses import mlm_loss


@pytest.fixture(scope="module")
def tiny_cell():
    return tta.cells()["tiny"]


def test_eval_masking_is_fixed_and_follows_bert(tiny_cell):
    tok = peers.tokenizer_of(tiny_cell)
    blocks = peers.group_blocks(tok, peers.test_texts(tta.DATA), 128)[:200]
    a, la = peers.eval_batch(tok, blocks)
    b, lb = peers.eval_batch(tok, blocks)
    assert (a == b).all() and (la == lb).all()  # seeded: the same positions for every contender
    chosen = la != -100
    special = np.isin(blocks, tok.all_special_ids)
    assert not (chosen & special).any()
    assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.01
    assert (la[chosen] == blocks[chosen]).all()
    masked = (a[chosen] == tok.mask_token_id).mean()
    kept = (a[chosen] == blocks[chosen]).mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02


def test_group_blocks_is_run_mlms_grouping(tiny_cell):
    tok = peers.tokenizer_of(tiny_cell)
    lines = peers.train_texts(tta.DATA)[:50]
    blocks = peers.group_blocks(tok, lines, 16)
    flat = [t for line in lines for t in tok(line)["input_ids"]]  # each line [CLS] ... [SEP], concatenated
    assert blocks.shape == (len(flat) // 16, 16)
    assert blocks.ravel().tolist() == flat[:blocks.size]


def test_shared_evaluator_agrees_with_flaxberts_own_mlm_accuracy(tiny_cell, tmp_path):
    tok = peers.tokenizer_of(tiny_cell)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    params = heads.init(config, jax.random.PRNGKey(3), head="pretraining")
    # a model that has learnt something: the MLM output bias favours frequent tokens
    blocks = peers.group_blocks(tok, peers.test_texts(tta.DATA), 128)[:24]
    counts = np.bincount(blocks.ravel(), minlength=len(tok)).astype(np.float32)
    counts[tok.all_special_ids] = 0
    params["pretraining"]["mlm"]["bias"] = np.log1p(counts) * 2.0  # near the unigram predictor, with ties broken
    ids, labels = peers.eval_batch(tok, blocks)
    hf.save_pretrained(hf.PretrainedModel(config, params, head="pretraining"), str(tmp_path / "ckpt"),
                       tokenizer=tok, flax=False)
    shared = peers.evaluate(str(tmp_path / "ckpt"), ids, labels, batch_size=8)
    # flaxbert's own metric: predictions only at the masked positions, in the batch contract
    rows = [np.flatnonzero(labels[r] != -100) for r in range(len(labels))]
    width = max(len(r) for r in rows)
    positions = np.zeros((len(rows), width), np.int32)
    weights = np.zeros((len(rows), width), np.float32)
    targets = np.zeros((len(rows), width), np.int32)
    for r, cols in enumerate(rows):
        positions[r, :len(cols)], weights[r, :len(cols)], targets[r, :len(cols)] = cols, 1.0, labels[r, cols]
    batch = {"input_ids": ids.astype(np.int32), "token_type_ids": np.zeros_like(ids, np.int32),
             "attention_mask": np.ones_like(ids, np.int32), "masked_lm_positions": positions,
             "masked_lm_ids": targets, "masked_lm_weights": weights,
             "next_sentence_labels": np.zeros(len(ids), np.int32)}
    out = heads.apply_head(params, batch, config, head="pretraining")
    term = mlm_loss(out, batch)
    own = float(term.correct) / float(term.weight)
    assert int(term.weight) == int((labels != -100).sum())
    assert own > 0.02  # the comparison means something: the model gets a share right
    assert abs(shared - own) <= 1.0 / float(term.weight) + 1e-9, (shared, own)


def test_time_to_target_interpolates_between_checkpoints():
    curve = [(60.0, 0.05), (120.0, 0.10), (240.0, 0.20)]
    assert tta.time_to(curve, 0.15) == pytest.approx(180.0)
    assert tta.time_to(curve, 0.025) == pytest.approx(30.0)
    assert tta.time_to(curve, 0.3) is None


@pytest.mark.parametrize("cell", ["tiny", "mini"])
def test_every_ablation_is_a_valid_change_of_the_recipe(cell, tmp_path):
    """Each ablation's overrides load as a run config on top of the recipe's, and each takes effect."""
    from flaxbert import run_config as rc

    c, hp = tta.cells()[cell], tta.SAME[cell]
    base = tta.flaxbert_overrides(c, hp, 60.0, tmp_path / "run", tmp_path / "train.txt", 8192) + tta.RECIPE[cell]
    recipe = rc.load("", base)
    changed = set()
    for name, variant in tta.ablations(cell).items():
        cfg = rc.load("", base + list(variant.overrides))
        for override in variant.overrides:
            key, value = override[2:].split("=")
            section, field = key.split(".")
            assert str(getattr(getattr(cfg, section), field)).lower() == str(type(getattr(getattr(
                recipe, section), field))(value)).lower(), (name, override)
        changed |= {name} if cfg != recipe or variant.documents or variant.short_seq else set()
    assert changed == set(tta.ablations(cell)) - {"recipe"}  # each one changes the recipe's run


def test_documents_corpus_holds_the_same_text_cut_into_documents(tmp_path):
    """The NSP ablation's corpus has run_mlm's text (the same words, headings left out), in documents of sentences."""
    tta.write_corpus(tmp_path / "lines.txt", documents=False)
    tta.write_corpus(tmp_path / "docs.txt", documents=True)
    lines = (tmp_path / "lines.txt").read_text(encoding="utf-8")
    docs = (tmp_path / "docs.txt").read_text(encoding="utf-8")
    assert "\n\n" not in lines.strip() and docs.count("\n\n") >= 60  # 60 WikiText-2 valid articles, and more
    assert lines.split() == docs.split()
    lengths = [len(d.splitlines()) for d in docs.split("\n\n")]
    assert min(lengths) >= 2 and np.median(lengths) > 10  # sentence pairs within a document exist


def test_seed_means_compare_each_seed_with_the_recipe_of_that_seed():
    row = lambda a: {"final_accuracy": a, "steps": 10}  # noqa: E731
    contenders = {"recipe [seed 0]": row(0.10), "recipe [seed 1]": row(0.20),
                  "x [seed 0]": row(0.13), "x [seed 1]": row(0.19)}
    out = tta.seed_means(contenders, ["recipe", "x"], [0, 1])
    assert out["x"]["mean"] == pytest.approx(0.16)
    assert out["x"]["minus_recipe"] == pytest.approx(0.01)
    assert (out["x"]["minus_recipe_min"], out["x"]["minus_recipe_max"]) == pytest.approx((-0.01, 0.03))
    assert out["recipe"]["minus_recipe"] == 0.0
