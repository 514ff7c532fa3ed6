"""The linear-chain CRF against brute-force enumeration of every tag path on tiny cases: the log-likelihood,
log Z and Viterbi's best path, with scored positions that are not contiguous (NER's first sub-tokens); finite
gradients; unscored positions change nothing; BIO constraints forbid what they should."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert import crf


def _params(rng, k):
    return crf.CRFParams(jnp.asarray(rng.normal(size=(k, k)), jnp.float32),
                         jnp.asarray(rng.normal(size=k), jnp.float32), jnp.asarray(rng.normal(size=k), jnp.float32))


def _brute(emissions, mask, params):
    """(log Z, best path over the scored positions, its score, {path: score}) by enumeration, for one row."""
    e, tr, st, en = (np.asarray(x, np.float64) for x in (emissions, params.transitions, params.start, params.end))
    where = np.flatnonzero(mask)
    k = e.shape[-1]
    scores = {}
    for path in itertools.product(range(k), repeat=len(where)):
        s = 0.0
        for i, (t, y) in enumerate(zip(where, path)):
            s += e[t, y] + (st[y] if i == 0 else tr[path[i - 1], y])
        if path:
            s += en[path[-1]]
        scores[path] = s
    values = np.array(list(scores.values()))
    log_z = float(np.log(np.sum(np.exp(values - values.max()))) + values.max())
    best = max(scores, key=scores.get)
    return log_z, best, scores[best], scores


@pytest.mark.parametrize("seed", range(6))
def test_likelihood_partition_and_viterbi_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    batch, steps, k = 4, 5, 3
    emissions = jnp.asarray(rng.normal(size=(batch, steps, k)) * 2, jnp.float32)
    mask = rng.random((batch, steps)) < 0.7
    mask[0] = [True, False, True, False, True]  # scored positions with gaps
    mask[1] = False  # nothing scored
    tags = rng.integers(0, k, (batch, steps))
    params = _params(rng, k)
    ll = np.asarray(crf.log_likelihood(emissions, tags, mask, params))
    log_z = np.asarray(crf.log_partition(emissions, mask, params))
    best, best_score = (np.asarray(x) for x in crf.viterbi(emissions, mask, params))
    for b in range(batch):
        ref_z, ref_best, ref_score, scores = _brute(emissions[b], mask[b], params)
        where = np.flatnonzero(mask[b])
        gold = tuple(int(t) for t in tags[b, where])
        np.testing.assert_allclose(log_z[b], ref_z if len(where) else 0.0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ll[b], scores[gold] - ref_z if len(where) else 0.0, rtol=1e-5, atol=1e-5)
        assert tuple(int(t) for t in best[b, where]) == ref_best
        assert np.all(best[b, ~mask[b]] == 0)
        np.testing.assert_allclose(best_score[b], ref_score if len(where) else 0.0, rtol=1e-5, atol=1e-5)
    # the probabilities of every path of a row sum to one
    _, _, _, scores = _brute(emissions[0], mask[0], params)
    assert np.isclose(sum(np.exp(s - log_z[0]) for s in scores.values()), 1.0, atol=1e-5)


def test_unscored_positions_change_nothing_and_gradients_are_finite():
    rng = np.random.default_rng(7)
    emissions = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    mask = np.array([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 1, 0]], bool)
    tags = rng.integers(0, 4, (2, 6))
    params = _params(rng, 4)
    noisy = emissions + jnp.asarray(~mask[..., None] * rng.normal(size=(2, 6, 4)) * 100, jnp.float32)
    other_tags = np.where(mask, tags, (tags + 1) % 4)
    np.testing.assert_array_equal(crf.log_likelihood(emissions, tags, mask, params),
                                  crf.log_likelihood(noisy, other_tags, mask, params))
    np.testing.assert_array_equal(crf.viterbi(emissions, mask, params)[0], crf.viterbi(noisy, mask, params)[0])
    grads = jax.grad(lambda e, p: -crf.log_likelihood(e, tags, mask, p).sum(), argnums=(0, 1))(emissions, params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert np.all(np.asarray(grads[0])[~mask] == 0)  # no gradient reaches an unscored position
    assert float(jnp.abs(grads[1].transitions).sum()) > 0


def test_bio_constraints_forbid_an_inside_tag_that_follows_anything_else():
    labels = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
    allowed, start, end = crf.bio_constraints(labels)
    i = {t: n for n, t in enumerate(labels)}
    assert allowed[i["B-PER"], i["I-PER"]] and allowed[i["I-PER"], i["I-PER"]]
    assert not allowed[i["O"], i["I-PER"]] and not allowed[i["B-LOC"], i["I-PER"]]
    assert not allowed[i["I-LOC"], i["I-PER"]] and allowed[i["I-PER"], i["B-LOC"]]
    assert not start[i["I-PER"]] and start[i["B-PER"]] and start[i["O"]] and end.all()
    # decoding under the constraints never produces a forbidden move, even where emissions push for one
    rng = np.random.default_rng(3)
    emissions = jnp.asarray(rng.normal(size=(8, 7, 5)), jnp.float32).at[:, :, i["I-PER"]].add(3.0)
    mask = np.ones((8, 7), bool)
    params = crf.constrained(_params(rng, 5), allowed, start, end)
    tags = np.asarray(crf.viterbi(emissions, mask, params)[0])
    for row in tags:
        assert start[row[0]] and all(allowed[a, b] for a, b in zip(row, row[1:]))
    assert (tags == i["I-PER"]).any()  # the pushed tag is used where it may be
