"""Acceptance 3: packed rows carry exactly the instances of an epoch, and the model sees each packed instance as
if it were alone in an unpacked row (encoder outputs within 1e-5 in fp32, equal MLM/NSP losses)."""

from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest

import flaxbert
from flaxbert import losses
from flaxbert.data import PACKED_KEYS, make_loader, prepare

MEDITATIONS = Path(flaxbert.__file__).parent / "resources" / "meditations.txt"
SEQ = 128


@pytest.fixture(scope="module")
def prepared(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packing") / "meditations"
    # short_seq_prob 0.5: many short instances, so rows hold several
    return out, prepare(MEDITATIONS, minilm_dir, out, corpus_format="lines", max_seq_length=SEQ,
                        short_seq_prob=0.5, progress=False)


def epoch(prepared_dir, packed, batch_size=16):
    return list(make_loader(prepared_dir, batch_size=batch_size, seed=3, num_epochs=1, packed=packed,
                            drop_remainder=False))


def unpack(batch):
    """Each instance of a packed batch as its own unpacked row: (row, instance) -> dict of 1-D arrays."""
    out = {}
    for r, ids in enumerate(batch["instance_ids"]):
        for k in range(1, ids.max() + 1):
            where = np.flatnonzero(ids == k)
            start, n = where[0], len(where)
            assert (where == np.arange(start, start + n)).all()  # an instance is contiguous
            assert (batch["position_ids"][r, where] == np.arange(n)).all()
            assert batch["cls_positions"][r, k - 1] == start and batch["next_sentence_weights"][r, k - 1] == 1
            mine = (batch["masked_lm_weights"][r] > 0) & (batch["masked_lm_positions"][r] >= start) & \
                   (batch["masked_lm_positions"][r] < start + n)
            out[r, k] = {"input_ids": batch["input_ids"][r, where], "token_type_ids": batch["token_type_ids"][r, where],
                         "masked_lm_positions": batch["masked_lm_positions"][r, mine] - start,
                         "masked_lm_ids": batch["masked_lm_ids"][r, mine],
                         "next_sentence_labels": batch["next_sentence_labels"][r, k - 1]}
    return out


def key(inst):
    return tuple(tuple(np.asarray(inst[k]).ravel().tolist()) for k in sorted(inst))


def test_packed_epoch_holds_every_instance_once(prepared):
    out, manifest = prepared
    packed = epoch(out, packed=True)
    assert set(packed[0]) == set(PACKED_KEYS)
    from_packed = Counter(key(inst) for batch in packed for inst in unpack(batch).values())
    from_plain = Counter()
    for batch in epoch(out, packed=False):
        for r, n in enumerate(batch["attention_mask"].sum(axis=1)):
            m = batch["masked_lm_weights"][r] > 0
            from_plain[key({"input_ids": batch["input_ids"][r, :n], "token_type_ids": batch["token_type_ids"][r, :n],
                            "masked_lm_positions": batch["masked_lm_positions"][r, m],
                            "masked_lm_ids": batch["masked_lm_ids"][r, m],
                            "next_sentence_labels": batch["next_sentence_labels"][r]})] += 1
    assert sum(from_plain.values()) == manifest["counts"]["instances"]
    assert from_packed == from_plain
    rows = sum(len(b["input_ids"]) for b in packed)
    fill = sum(b["attention_mask"].sum() for b in packed) / (rows * SEQ)
    plain_fill = manifest["counts"]["tokens"] / (manifest["counts"]["instances"] * SEQ)
    print(f"token fill: packed {fill:.3f}, unpacked {plain_fill:.3f}")
    assert rows < manifest["counts"]["instances"] and fill > plain_fill


def pad_rows(instances):
    """Unpacked batch in the contract from 1-D instances (the reference the packed rows are compared with)."""
    n, p = len(instances), max(len(i["masked_lm_positions"]) for i in instances)
    batch = {k: np.zeros((n, SEQ), np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}
    batch.update({k: np.zeros((n, p), np.int32) for k in ("masked_lm_positions", "masked_lm_ids")})
    batch["masked_lm_weights"] = np.zeros((n, p), np.float32)
    batch["next_sentence_labels"] = np.array([i["next_sentence_labels"] for i in instances], np.int32)
    for r, inst in enumerate(instances):
        length, m = len(inst["input_ids"]), len(inst["masked_lm_positions"])
        batch["input_ids"][r, :length] = inst["input_ids"]
        batch["token_type_ids"][r, :length] = inst["token_type_ids"]
        batch["attention_mask"][r, :length] = 1
        batch["masked_lm_positions"][r, :m] = inst["masked_lm_positions"]
        batch["masked_lm_ids"][r, :m] = inst["masked_lm_ids"]
        batch["masked_lm_weights"][r, :m] = 1
    return batch


def test_packed_rows_match_unpacked_outputs_and_losses(prepared):
    out, manifest = prepared
    # the first batch in which several rows really are packed (how many are depends on the prepared draws)
    batch = next(b for b in make_loader(out, batch_size=8, seed=5, packed=True)
                 if (b["instance_ids"].max(axis=1) >= 2).sum() >= 4)
    config = flaxbert.BertConfig.tiny(vocab_size=manifest["vocab_size"], hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, max_position_embeddings=SEQ)
    params = flaxbert.init(config, jax.random.PRNGKey(0), head="pretraining")
    packed_out = flaxbert.encode(params, batch, config)
    instances = unpack(batch)
    alone = pad_rows(list(instances.values()))
    alone_out = flaxbert.encode(params, alone, config)
    for i, ((r, k), inst) in enumerate(instances.items()):
        where = batch["instance_ids"][r] == k
        n = len(inst["input_ids"])
        np.testing.assert_allclose(np.asarray(packed_out.last_hidden_state[r][where]),
                                   np.asarray(alone_out.last_hidden_state[i, :n]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(packed_out.pooled_output[r, k - 1]),
                                   np.asarray(alone_out.pooled_output[i]), atol=1e-5, rtol=0)
    packed_losses = losses.pretraining_losses(flaxbert.apply_head(params, batch, config, head="pretraining"), batch)
    alone_losses = losses.pretraining_losses(flaxbert.apply_head(params, alone, config, head="pretraining"), alone)
    for name in ("mlm", "nsp"):
        assert float(packed_losses[name].weight) == float(alone_losses[name].weight) > 0
        np.testing.assert_allclose(float(packed_losses[name].loss_sum), float(alone_losses[name].loss_sum),
                                   rtol=1e-5)

    def total_loss(p, b):
        out = losses.pretraining_losses(flaxbert.apply_head(p, b, config, head="pretraining"), b)
        return out["mlm"].loss_sum + out["nsp"].loss_sum

    packed_grads = jax.grad(total_loss)(params, batch)
    alone_grads = jax.grad(total_loss)(params, alone)
    for path, g in jax.tree_util.tree_leaves_with_path(packed_grads):
        ref = np.asarray(_at(alone_grads, path))
        np.testing.assert_allclose(np.asarray(g), ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_plan_packs_every_instance_once_within_the_limits():
    from flaxbert.data import packing

    rng = np.random.default_rng(0)
    for seq, k in ((128, 8), (64, 3), (512, 16)):
        sizes = np.concatenate([rng.integers(3, seq + 1, 3000), np.full(500, seq), rng.integers(3, 20, 800)])
        plan = packing.plan(sizes, seq, k)
        rows = packing.deal(plan, sizes, rng.permutation(len(sizes)))
        filled = rows >= 0
        assert sorted(rows[filled].tolist()) == list(range(len(sizes)))  # every instance exactly once
        assert (np.where(filled, sizes[np.maximum(rows, 0)], 0).sum(axis=1) <= seq).all()
        assert filled.sum(axis=1).max() <= k and filled[:, 0].all()
        assert (np.diff(filled.astype(int), axis=1) <= 0).all()  # filled slots first
        assert len(rows) == len(best_fit_decreasing(sizes, seq, k)) >= np.ceil(sizes.sum() / seq)


def best_fit_decreasing(sizes, seq, k):
    """The per-item reference: each item, longest first, into the open row with the least room that fits."""
    import bisect

    open_rows, closed = [], 0  # open_rows: sorted (room, row id, count)
    for size in sorted(sizes.tolist(), reverse=True):
        i = bisect.bisect_left(open_rows, (size, -1, 0))
        if i == len(open_rows):
            room, row, count = seq - size, len(open_rows) + closed, 1
        else:
            room, row, count = open_rows.pop(i)
            room, count = room - size, count + 1
        if room == 0 or count == k:
            closed += 1
        else:
            bisect.insort(open_rows, (room, row, count))
    return [None] * (closed + len(open_rows))
