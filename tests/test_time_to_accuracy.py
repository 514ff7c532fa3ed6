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
        one_run = variant.schedule.overrides() if variant.schedule is not None and variant.schedule.one_run else []
        cfg = rc.load("", base + list(variant.overrides) + one_run)  # a one-run schedule's settings load too
        for override in variant.overrides:
            key, value = override[2:].split("=")
            section, field = key.split(".")
            assert str(getattr(getattr(cfg, section), field)).lower() == str(type(getattr(getattr(
                recipe, section), field))(value)).lower(), (name, override)
        changed |= {name} if cfg != recipe or variant.documents or variant.schedule is not None else set()
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


def test_chosen_ablations_keep_the_recipe_and_refuse_unknown_names():
    every = tta.ablations("tiny")
    some = tta.chosen_ablations("tiny", ["seq 128 throughout (one run)"])
    assert list(some) == ["recipe", "seq 128 throughout (one run)"]
    assert tta.chosen_ablations("tiny", []) == every
    with pytest.raises(SystemExit, match="unknown.*seq 96"):
        tta.chosen_ablations("tiny", ["seq 96"])


def test_recipe_schedule_phases_cover_the_budget_in_order(tmp_path, monkeypatch):
    """run_phases trains at the short length first, then at the cell's length from phase 1's last snapshot, and
    lays the snapshots of both on the one budget (times and steps continue, fractions are the budget's points)."""
    calls = []

    def fake_run(cell, hp, budget_s, points, out_dir, extra=(), documents=False):
        calls.append({"budget_s": budget_s, "points": list(points), "extra": list(extra), "documents": documents})
        return [{"fraction": p, "wall_s": p * budget_s, "step": int(100 * p), "dir": str(out_dir / f"s{p}")}
                for p in points]

    monkeypatch.setattr(tta, "run_flaxbert", fake_run)
    cell, hp = tta.cells()["tiny"], tta.SAME["tiny"]
    records = tta.run_phases(cell, hp, 600.0, tmp_path, tta.RECIPE["tiny"], tta.Schedule(64, 0.7))
    assert [c["budget_s"] for c in calls] == pytest.approx([420.0, 180.0])
    assert "--data.seq_len=64" in calls[0]["extra"] and "--data.max_predictions_per_seq=10" in calls[0]["extra"]
    assert not any(x.startswith("--data.seq_len") for x in calls[1]["extra"])
    assert calls[1]["extra"][-1] == f"--run.init_from={tmp_path / 'phase-1' / 's1.0'}"
    assert [r["fraction"] for r in records] == pytest.approx([0.1, 0.25, 0.5, 0.7, 0.75, 1.0])
    walls = [r["wall_s"] for r in records]
    assert walls == sorted(walls) and walls[-1] == pytest.approx(600.0)
    assert [r["phase"] for r in records] == [1, 1, 1, 1, 2, 2]


def test_batch_schedule_changes_phase_one_only(tmp_path, monkeypatch):
    """A schedule's short_batch sets phase 1's global batch after every other override, and phase 2 trains at the
    cell's batch again (the batch-size schedule of the ablations)."""
    calls = []

    def fake_run(cell, hp, budget_s, points, out_dir, extra=(), documents=False):
        calls.append(list(extra))
        return [{"fraction": p, "wall_s": p * budget_s, "step": 10, "dir": str(out_dir / f"s{p}")} for p in points]

    monkeypatch.setattr(tta, "run_flaxbert", fake_run)
    variant = tta.ablations("tiny")["batch 16 in phase 1"]
    assert variant.schedule.short_seq == tta.RECIPE_SCHEDULE.short_seq and variant.schedule.short_batch == 16
    tta.run_phases(tta.cells()["tiny"], tta.SAME["tiny"], 100.0, tmp_path, tta.RECIPE["tiny"], variant.schedule)
    batches = [[x for x in extra if x.startswith("--run.global_batch_size")] for extra in calls]
    assert batches == [["--run.global_batch_size=16"], []]
    base = tta.flaxbert_overrides(tta.cells()["tiny"], tta.SAME["tiny"], 100.0, tmp_path, tmp_path / "c.txt", 8192)
    assert "--run.global_batch_size=32" in base  # what phase 2 keeps; phase 1's later override wins
    assert "batch 16" in variant.schedule.describe()
