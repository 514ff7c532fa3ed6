"""Pair building and masking as pure seeded functions, on synthetic corpora whose token ids name their origin."""

import random
from collections import Counter

import numpy as np
import pytest

from flaxbert.data.instances import InstanceConfig, TokenizedCorpus, document_instances
from flaxbert.data.masking import MaskingConfig, mask_batch, uniform

CLS, SEP, MASK, PAD = 2, 3, 4, 0


def synthetic_corpus(sentence_counts, rng, min_len=3, max_len=12):
    """Token id = 100_000 + 1000 * doc + 10 * sentence + k % 10: every token tells its document and sentence."""
    tokens, sentence_offsets, doc_offsets = [], [0], [0]
    for d, count in enumerate(sentence_counts):
        for s in range(count):
            n = rng.randint(min_len, max_len)
            tokens.extend(100_000 + 1000 * d + 10 * s + k % 10 for k in range(n))
            sentence_offsets.append(len(tokens))
        doc_offsets.append(len(sentence_offsets) - 1)
    tokens = np.array(tokens, np.int32)
    return TokenizedCorpus(tokens, np.ones(len(tokens), np.uint8), np.array(sentence_offsets, np.int64),
                           np.array(doc_offsets, np.int64))


def origin(tokens):
    return (tokens - 100_000) // 1000, ((tokens - 100_000) % 1000) // 10  # document, sentence


def split(inst):
    a = inst.tokens[1:1 + inst.a_length]
    b = inst.tokens[2 + inst.a_length:-1]
    return a, b


def test_pairs_follow_bert_semantics_and_use_every_sentence_once():
    rng = random.Random(0)
    counts = [rng.randint(1, 30) for _ in range(80)]
    corpus = synthetic_corpus(counts, rng)
    cfg = InstanceConfig(max_seq_length=512, short_seq_prob=0.0)  # no truncation: whole sentences only
    labels = []
    for d in range(len(counts)):
        used = Counter()
        for inst in document_instances(corpus, d, cfg, random.Random(d), CLS, SEP):
            assert inst.tokens[0] == CLS and inst.tokens[1 + inst.a_length] == SEP and inst.tokens[-1] == SEP
            a, b = split(inst)
            assert len(a) and len(b)
            a_doc, a_sent = origin(a)
            b_doc, b_sent = origin(b)
            assert (a_doc == d).all() and (np.diff(a_sent) >= 0).all() and np.all(np.diff(np.unique(a_sent)) == 1)
            used.update(np.unique(a_sent).tolist())
            if inst.is_random_next:
                assert (b_doc != d).all() and (b_doc == b_doc[0]).all()  # one other document
            else:
                assert (b_doc == d).all() and b_sent[0] == a_sent[-1] + 1  # B is A's continuation
                assert np.all(np.diff(np.unique(b_sent)) == 1)
                used.update(np.unique(b_sent).tolist())
            labels.append(inst.is_random_next)
        # unused sentences of a random-next chunk are put back: every sentence is used exactly once
        assert used == Counter(range(counts[d])), d
    assert 0.4 < np.mean(labels) < 0.6


def test_truncation_and_short_targets():
    rng = random.Random(1)
    corpus = synthetic_corpus([rng.randint(5, 40) for _ in range(40)], rng, 5, 60)
    cfg = InstanceConfig(max_seq_length=64, short_seq_prob=0.3)
    instances = [i for d in range(40) for i in document_instances(corpus, d, cfg, random.Random(d), CLS, SEP)]
    targets = np.array([i.target_length for i in instances])
    lengths = np.array([len(i.tokens) for i in instances])
    assert (lengths <= np.minimum(targets + 3, 64)).all() and (targets >= 2).all() and (targets <= 61).all()
    assert 0.2 < np.mean(targets < 61) < 0.4
    fronts = backs = 0
    for inst in instances:  # truncation cuts tokens at the front or the back, never in the middle
        for seg in split(inst):
            doc, sent = origin(seg)
            k = (seg - 100_000) % 10
            inside = (sent[1:] == sent[:-1])
            assert ((k[1:] - k[:-1])[inside] % 10 == 1).all()
            first, last = corpus.sentence(int(corpus.doc_offsets[doc[-1]] + sent[-1]))
            fronts += k[0] != 0
            backs += k[-1] != (last - first - 1) % 10
    assert fronts > 20 and backs > 20


def config(**kw):
    is_special = np.zeros(1000, bool)
    is_special[[PAD, 1, CLS, SEP, MASK]] = True
    return MaskingConfig(mask_id=MASK, is_special=is_special, replacement_ids=np.arange(5, 1000, dtype=np.int32),
                         **kw)


def row(n):
    return np.concatenate([[CLS], np.arange(10, 10 + n), [SEP], np.arange(500, 500 + n), [SEP]]).astype(np.int32)


def masked(tokens, starts, cfg, n, key=0):
    """`n` independent maskings of one row: mask_batch over n copies with row ids 0..n-1."""
    batch = np.tile(tokens, (n, 1))
    return mask_batch(batch, np.ones_like(batch, bool), np.tile(starts, (n, 1)), cfg, key, np.arange(n))


def test_mask_count_is_exact_in_expectation_and_capped():
    cfg = config(masked_lm_prob=0.15, max_predictions_per_seq=20)
    tokens = row(3)  # 6 maskable tokens: 0.9 predictions expected, which BERT would round to 1 (17%)
    counts = masked(tokens, np.ones_like(tokens), cfg, 4000).weights.sum(axis=1)
    assert abs(np.mean(counts) - 0.9) < 0.03 and set(counts.tolist()) == {0, 1}
    capped = config(masked_lm_prob=0.5, max_predictions_per_seq=7)
    assert (masked(row(60), np.ones(123, np.uint8), capped, 20).weights.sum(axis=1) == 7).all()


def test_specials_never_masked_and_replacements():
    cfg = config(masked_lm_prob=0.9, max_predictions_per_seq=128)
    tokens = row(50)
    out = masked(tokens, np.ones_like(tokens), cfg, 200, key=1)
    kinds = Counter()
    for r in range(200):
        real = out.weights[r] > 0
        positions, labels = out.positions[r, real], out.labels[r, real]
        assert (np.diff(positions) > 0).all() and not out.positions[r, ~real].any()
        assert not np.isin(tokens[positions], [CLS, SEP]).any()
        assert (labels == tokens[positions]).all()
        untouched = np.setdiff1d(np.arange(len(tokens)), positions)
        assert (out.input_ids[r, untouched] == tokens[untouched]).all()
        new = out.input_ids[r, positions]
        assert not cfg.is_special[new[new != MASK]].any()
        kinds.update(np.where(new == MASK, "mask", np.where(new == labels, "same", "random")).tolist())
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.01 and abs(kinds["random"] / total - 0.1) < 0.01


def test_draws_depend_only_on_key_row_and_column():
    a = uniform(7, np.array([5, 9, 2**40]), 41)
    assert a.dtype == np.float32 and a.shape == (3, 41) and 0 <= a.min() and a.max() < 1
    assert (uniform(7, np.array([9]), 41) == a[1]).all()  # the same row alone, or among others
    assert not np.isin(uniform(8, np.array([5]), 41), a[0]).any()
    big = uniform(3, np.arange(2000), 64)
    assert abs(big.mean() - 0.5) < 0.002 and abs(np.corrcoef(big[:, 0], big[:, 1])[0, 1]) < 0.05


def sequential_whole_words(tokens, starts, cfg, keys, count):
    """google-research/bert's loop, one row: words (a maskable run opened by a word start or a special token
    before it) in the order of their first token's key; a word that would overshoot `count` is skipped."""
    maskable = ~cfg.is_special[tokens]
    words, current = [], None
    for i in range(len(tokens)):
        if not maskable[i]:
            current = None
            continue
        if current is None or starts[i]:
            current = [i]
            words.append(current)
        else:
            current.append(i)
    chosen = []
    for w in sorted(words, key=lambda w: keys[w[0]]):
        if len(chosen) >= count:
            break
        if len(chosen) + len(w) <= count:
            chosen.extend(w)
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(5))
def test_whole_word_selection_equals_the_sequential_rule(seed):
    cfg = config(masked_lm_prob=0.3, max_predictions_per_seq=40, whole_word=True)
    rng = np.random.default_rng(seed)
    tokens = row(40)
    n = 300
    starts = (rng.random((n, len(tokens))) < 0.4).astype(np.uint8)
    starts[:, 1] = 0  # a word cut at the front of A still opens a word after [CLS]
    batch = np.tile(tokens, (n, 1))
    out = mask_batch(batch, np.ones_like(batch, bool), starts, cfg, seed, np.arange(n))
    draws = uniform(seed, np.arange(n), len(tokens) + 1 + 2 * cfg.max_predictions_per_seq)
    for r in range(n):
        maskable = int((~cfg.is_special[tokens]).sum())
        expected = 0.3 * maskable
        u = draws[r, len(tokens)]
        count = min(int(expected) + int(u < expected - int(expected)), cfg.max_predictions_per_seq)
        reference = sequential_whole_words(tokens, starts[r], cfg, draws[r, :len(tokens)], count)
        assert out.positions[r, out.weights[r] > 0].tolist() == reference, r
