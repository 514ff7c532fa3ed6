"""Pair building and masking as pure seeded functions, on synthetic corpora whose token ids name their origin."""

import random
from collections import Counter

import numpy as np
import pytest

from flaxbert.data.instances import InstanceConfig, TokenizedCorpus, document_instances
from flaxbert.data.masking import MaskingConfig, mask_tokens, select_positions

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


def test_mask_count_is_exact_in_expectation_and_capped():
    cfg = config(masked_lm_prob=0.15, max_predictions_per_seq=20)
    rng = np.random.default_rng(0)
    tokens = row(3)  # 6 maskable tokens: 0.9 predictions expected, which BERT would round to 1 (17%)
    counts = [len(select_positions(tokens, np.ones_like(tokens), cfg, rng)) for _ in range(4000)]
    assert abs(np.mean(counts) - 0.9) < 0.03 and set(counts) == {0, 1}
    capped = config(masked_lm_prob=0.5, max_predictions_per_seq=7)
    for _ in range(20):
        assert len(select_positions(row(60), np.ones(123, np.uint8), capped, rng)) == 7


def test_specials_never_masked_and_replacements():
    cfg = config(masked_lm_prob=0.9, max_predictions_per_seq=500)
    rng = np.random.default_rng(1)
    tokens = row(50)
    kinds = Counter()
    for _ in range(200):
        out = mask_tokens(tokens, np.ones_like(tokens), cfg, rng)
        assert not np.isin(tokens[out.positions], [CLS, SEP]).any()
        assert (out.labels == tokens[out.positions]).all()
        untouched = np.setdiff1d(np.arange(len(tokens)), out.positions)
        assert (out.input_ids[untouched] == tokens[untouched]).all()
        new = out.input_ids[out.positions]
        assert not cfg.is_special[new[new != MASK]].any()
        kinds.update(np.where(new == MASK, "mask", np.where(new == out.labels, "same", "random")).tolist())
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.01 and abs(kinds["random"] / total - 0.1) < 0.01


@pytest.mark.parametrize("seed", range(5))
def test_whole_word_selection(seed):
    cfg = config(masked_lm_prob=0.3, max_predictions_per_seq=40, whole_word=True)
    rng = np.random.default_rng(seed)
    tokens = row(40)
    starts = (rng.random(len(tokens)) < 0.4).astype(np.uint8)
    starts[1] = 0  # a word cut at the front of A still opens a word after [CLS]
    positions = select_positions(tokens, starts, cfg, rng)
    word = np.cumsum(starts | np.isin(np.roll(tokens, 1), [CLS, SEP]))
    chosen = np.zeros(len(tokens), bool)
    chosen[positions] = True
    for w in np.unique(word[positions]):
        members = (word == w) & ~np.isin(tokens, [CLS, SEP])
        assert chosen[members].all()
    assert 0 < len(positions) <= round(0.3 * 80) + 1
