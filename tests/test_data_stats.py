"""Acceptance 1: statistics of WikiText-2 valid prepared with the BERT defaults, read back through the loader.

The properties are checked against the definitions in google-research/bert (15% of maskable tokens, 80/10/10,
50% random next, short_seq_prob) and against the vocabulary's own "##" word-piece convention for whole words.
"""

import numpy as np
import pytest

from flaxbert.data import make_loader, prepare
from flaxbert.vocab import load_tokenizer

WIKI = "wikitext-2/wiki.valid.tokens"
SEQ, MAX_PRED = 128, 20


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def wiki_prepared(data_dir, tokenizer, tmp_path_factory):
    # dupe_factor 5 (~12k instances): the binomial s.d. of a 50% share is then ~0.5 points
    out = tmp_path_factory.mktemp("wiki") / "prepared"
    manifest = prepare(data_dir / WIKI, tokenizer, out, corpus_format="wikitext", max_seq_length=SEQ,
                       max_predictions_per_seq=MAX_PRED, dupe_factor=5, progress=False)
    return out, manifest


def one_epoch(prepared, masking="static"):
    """Every instance once, in prepared order, as a dict of stacked arrays (the last partial batch kept)."""
    batches = list(make_loader(prepared, batch_size=512, seed=0, shuffle=False, num_epochs=1, masking=masking,
                               drop_remainder=False))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def originals(rows):
    """Input ids with the masked positions restored to their labels ([B, S])."""
    tokens = rows["input_ids"].copy()
    real = rows["masked_lm_weights"] > 0
    b = np.nonzero(real)[0]
    tokens[b, rows["masked_lm_positions"][real]] = rows["masked_lm_ids"][real]
    return tokens


def masking_stats(rows, tokenizer):
    specials = np.array(tokenizer.all_special_ids)
    tokens = originals(rows)
    real = rows["masked_lm_weights"] > 0
    b = np.nonzero(real)[0]
    pos = rows["masked_lm_positions"][real]
    labels = rows["masked_lm_ids"][real]
    inputs = rows["input_ids"][b, pos]
    maskable = (rows["attention_mask"] > 0) & ~np.isin(tokens, specials)
    return {"share": real.sum() / maskable.sum(),
            "mask": np.mean(inputs == tokenizer.mask_token_id),
            "same": np.mean(inputs == labels),
            "random": np.mean((inputs != tokenizer.mask_token_id) & (inputs != labels)),
            "labels": labels, "count": real.sum(axis=1), "maskable": maskable.sum(axis=1)}


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_masking_statistics(wiki_prepared, tokenizer, masking):
    prepared, manifest = wiki_prepared
    rows = one_epoch(prepared, masking)
    assert len(rows["input_ids"]) == manifest["counts"]["instances"] > 10_000
    stats = masking_stats(rows, tokenizer)
    print(f"{masking}: masked share {stats['share']:.4f}, [MASK] {stats['mask']:.4f}, "
          f"random {stats['random']:.4f}, unchanged {stats['same']:.4f}")
    assert (np.ceil(0.15 * stats["maskable"]) < MAX_PRED).all()  # max_predictions never caps a row here
    assert abs(stats["share"] - 0.15) <= 0.005
    assert abs(stats["mask"] - 0.80) <= 0.015
    assert abs(stats["random"] - 0.10) <= 0.015
    assert abs(stats["same"] - 0.10) <= 0.015
    never = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    assert not np.isin(stats["labels"], never).any()
    assert (stats["count"] <= MAX_PRED).all()


def test_rows_pairs_and_token_types(wiki_prepared, tokenizer):
    prepared, manifest = wiki_prepared
    rows = one_epoch(prepared)
    tokens, types, attn = originals(rows), rows["token_type_ids"], rows["attention_mask"]
    lengths = attn.sum(axis=1)
    assert rows["input_ids"].shape[1] == SEQ and (lengths <= SEQ).all()
    assert (attn == (np.arange(SEQ) < lengths[:, None])).all()  # real tokens first, then padding
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert (tokens[:, 0] == cls).all()
    for row, typ, n in zip(tokens, types, lengths):
        seps = np.flatnonzero(row[:n] == sep)
        assert len(seps) == 2 and seps[1] == n - 1 and 1 < seps[0] < n - 2  # [CLS] A [SEP] B [SEP], A, B non-empty
        assert (typ[:seps[0] + 1] == 0).all() and (typ[seps[0] + 1:n] == 1).all() and (typ[n:] == 0).all()
        assert (row[n:] == pad).all()
    random_share = rows["next_sentence_labels"].mean()
    print(f"random-next share {random_share:.4f}")
    assert abs(random_share - 0.5) <= 0.02


def test_short_sequence_share(wiki_prepared):
    prepared, manifest = wiki_prepared
    targets, lengths = [], []
    for shard in manifest["shards"]:
        targets.append(np.load(prepared / shard["name"] / "target_lengths.npy"))
        lengths.append(np.diff(np.load(prepared / shard["name"] / "offsets.npy")))
    targets, lengths = np.concatenate(targets), np.concatenate(lengths)
    short = targets < SEQ - 3
    print(f"short-target share {short.mean():.4f}")
    assert abs(short.mean() - 0.1) <= 0.015
    assert short.sum() == manifest["counts"]["short_target"]
    assert (lengths <= np.minimum(targets + 3, SEQ)).all()  # a short target is a hard limit
    assert np.median(lengths[short]) < np.median(lengths[~short]) == SEQ
    assert np.mean(lengths[short] == targets[short] + 3) > 0.8  # sentences are added until the target is met


def test_whole_word_masking_never_splits_a_word(data_dir, tokenizer, tmp_path):
    lines = (data_dir / WIKI).read_text(encoding="utf-8").splitlines(keepends=True)[:1200]
    corpus = tmp_path / "slice.tokens"
    corpus.write_text("".join(lines), encoding="utf-8")
    prepare(corpus, tokenizer, tmp_path / "wwm", corpus_format="wikitext", whole_word_masking=True,
            dupe_factor=2, progress=False)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    is_piece = np.array([t.startswith("##") for t in vocab])  # the WordPiece definition of "inside a word"
    for masking in ("static", "dynamic"):
        rows = one_epoch(tmp_path / "wwm", masking)
        tokens = originals(rows)
        masked = np.zeros_like(tokens, bool)
        real = rows["masked_lm_weights"] > 0
        masked[np.nonzero(real)[0], rows["masked_lm_positions"][real]] = True
        inside = is_piece[tokens] & (rows["attention_mask"] > 0)
        inside[:, 0] = False
        # a piece and the token before it belong to one word unless that token is [CLS]/[SEP]
        prev_special = np.isin(np.roll(tokens, 1, axis=1), [tokenizer.cls_token_id, tokenizer.sep_token_id])
        joined = inside & ~prev_special
        assert joined.any() and masked.any()
        assert (masked[joined] == np.roll(masked, 1, axis=1)[joined]).all(), masking
        share = real.sum() / ((rows["attention_mask"] > 0) & ~np.isin(tokens, tokenizer.all_special_ids)).sum()
        assert 0.13 <= share <= 0.155, (masking, share)  # whole words that would overshoot are skipped
