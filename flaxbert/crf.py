"""A linear-chain CRF in JAX (Lafferty et al. 2001): the sequence log-likelihood by the forward algorithm and the
best tag path by Viterbi, both over a batch, with optional BIO constraints on the transitions.

Scores of a tag path y over the scored positions t_1 < t_2 < ... < t_n of a row (where `mask` is true; they need
not be contiguous: NER scores the first sub-token of each word):

    score(y) = start[y_1] + sum_i emissions[t_i, y_i] + sum_{i>1} transitions[y_{i-1}, y_i] + end[y_n]

and log p(y) = score(y) - log Z, with Z the sum of exp(score) over every path. Unscored positions are skipped:
they neither emit nor break the chain. A row with no scored position has likelihood 1 (log p = 0).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FORBIDDEN = -1e4  # added to a forbidden transition's score: exp() of it is 0 in float32 next to real scores


class CRFParams(NamedTuple):
    transitions: Array  # [K, K] score of tag i followed by tag j
    start: Array  # [K] score of starting with a tag
    end: Array  # [K] score of ending with a tag


def constrained(params: CRFParams, allowed: Array, start_allowed: Array, end_allowed: Array) -> CRFParams:
    """`params` with the forbidden moves scored FORBIDDEN (their learned scores are ignored there)."""
    return CRFParams(jnp.where(allowed, params.transitions, FORBIDDEN),
                     jnp.where(start_allowed, params.start, FORBIDDEN), jnp.where(end_allowed, params.end, FORBIDDEN))


def bio_constraints(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(allowed [K, K], start_allowed [K], end_allowed [K]) for BIO / IOB2 tags: I-X may only follow B-X or I-X
    (so it never starts a sequence); every tag may end one. Tags other than B-/I- (O, ...) are unconstrained."""
    kinds = [(t[:2], t[2:]) if t[:2] in ("B-", "I-") else ("", t) for t in labels]
    k = len(labels)
    allowed = np.ones((k, k), bool)
    for j, (prefix, entity) in enumerate(kinds):
        if prefix == "I-":
            for i, (p_i, e_i) in enumerate(kinds):
                allowed[i, j] = p_i in ("B-", "I-") and e_i == entity
    start_allowed = np.array([prefix != "I-" for prefix, _ in kinds])
    return allowed, start_allowed, np.ones(k, bool)


def _scan_inputs(emissions: Array, mask: Array):
    """Time-major emissions [T, B, K] (float32) and mask [T, B]."""
    return jnp.swapaxes(emissions.astype(jnp.float32), 0, 1), jnp.swapaxes(mask.astype(bool), 0, 1)


def log_partition(emissions: Array, mask: Array, params: CRFParams) -> Array:
    """log Z per row [B]: the forward algorithm in log space, skipping unscored positions."""
    em, m = _scan_inputs(emissions, mask)
    batch, k = em.shape[1], em.shape[2]

    def step(carry, x):
        alpha, started = carry  # [B, K] log-sum of paths ending in each tag; [B] any scored position yet
        e, on = x
        moved = jax.nn.logsumexp(alpha[:, :, None] + params.transitions[None], axis=1) + e
        first = params.start[None] + e
        new = jnp.where(started[:, None], moved, first)
        return (jnp.where(on[:, None], new, alpha), started | on), None

    init = (jnp.zeros((batch, k), jnp.float32), jnp.zeros((batch,), bool))
    (alpha, started), _ = jax.lax.scan(step, init, (em, m))
    return jnp.where(started, jax.nn.logsumexp(alpha + params.end[None], axis=-1), 0.0)


def path_score(emissions: Array, tags: Array, mask: Array, params: CRFParams) -> Array:
    """score(tags) per row [B] over the scored positions (tags elsewhere are ignored)."""
    em, m = _scan_inputs(emissions, mask)
    y = jnp.swapaxes(tags.astype(jnp.int32), 0, 1)
    batch = em.shape[1]

    def step(carry, x):
        total, prev, started = carry
        e, tag, on = x
        emit = jnp.take_along_axis(e, tag[:, None], axis=1)[:, 0]
        move = jnp.where(started, params.transitions[prev, tag], params.start[tag])
        return (total + jnp.where(on, emit + move, 0.0), jnp.where(on, tag, prev), started | on), None

    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
    (total, last, started), _ = jax.lax.scan(step, init, (em, y, m))
    return total + jnp.where(started, params.end[last], 0.0)


def log_likelihood(emissions: Array, tags: Array, mask: Array, params: CRFParams) -> Array:
    """log p(tags | emissions) per row [B]; the training loss is its negative."""
    return path_score(emissions, tags, mask, params) - log_partition(emissions, mask, params)


def viterbi(emissions: Array, mask: Array, params: CRFParams) -> tuple[Array, Array]:
    """(best tags [B, T] (0 at unscored positions), their score [B]) by Viterbi decoding."""
    em, m = _scan_inputs(emissions, mask)
    batch, k = em.shape[1], em.shape[2]
    identity = jnp.broadcast_to(jnp.arange(k), (batch, k))

    def forward(carry, x):
        delta, started = carry
        e, on = x
        cand = delta[:, :, None] + params.transitions[None]  # [B, from, to]
        moved, back = jnp.max(cand, axis=1) + e, jnp.argmax(cand, axis=1)
        new = jnp.where(started[:, None], moved, params.start[None] + e)
        back = jnp.where((on & started)[:, None], back, identity)  # unscored or first: points to itself
        return (jnp.where(on[:, None], new, delta), started | on), back

    init = (jnp.zeros((batch, k), jnp.float32), jnp.zeros((batch,), bool))
    (delta, started), backs = jax.lax.scan(forward, init, (em, m))
    final = delta + params.end[None]
    last, best = jnp.argmax(final, axis=-1), jnp.max(final, axis=-1)

    def backward(tag, x):
        back, on = x
        prev = jnp.take_along_axis(back, tag[:, None], axis=1)[:, 0]
        return prev, jnp.where(on, tag, 0)

    _, tags = jax.lax.scan(backward, last, (backs, m), reverse=True)
    return jnp.swapaxes(tags, 0, 1), jnp.where(started, best, 0.0)


_viterbi_jit = jax.jit(viterbi)


def decode(emissions: Sequence[np.ndarray], masks: Sequence[np.ndarray], params: CRFParams,
           chunk: int = 256) -> list[np.ndarray]:
    """Viterbi tags of many sequences on the host: `emissions[i]` [n_i, K] and `masks[i]` [n_i] (the scored
    positions); returns tags [n_i] (0 where unscored). Sequences are decoded in padded chunks of `chunk` rows
    and a power-of-two length, so a few compiled shapes serve every eval set."""
    out: list[np.ndarray] = []
    k = int(params.transitions.shape[-1])
    for lo in range(0, len(emissions), chunk):
        em, ms = emissions[lo:lo + chunk], masks[lo:lo + chunk]
        length = 1 << max(0, int(max(len(m) for m in ms)) - 1).bit_length()
        e = np.zeros((chunk, length, k), np.float32)
        m = np.zeros((chunk, length), bool)
        for i, (x, y) in enumerate(zip(em, ms)):
            e[i, :len(y)], m[i, :len(y)] = x, y
        tags = np.asarray(_viterbi_jit(jnp.asarray(e), jnp.asarray(m), params)[0])
        out.extend(tags[i, :len(y)] for i, y in enumerate(ms))
    return out


def bio_constrained(params: CRFParams, labels: Sequence[str]) -> CRFParams:
    """`params` with the BIO constraints of the tag names `labels` (see `bio_constraints`)."""
    return constrained(params, *(jnp.asarray(a) for a in bio_constraints(labels)))
