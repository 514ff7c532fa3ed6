"""Packed fine-tuning batches (flaxbert/infer/batching.py): the same examples, the same loss and
gradients as unpacked batches, on the real MiniLM weights and real SST-2 / STS-B sentences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert.infer import batching
from flaxbert.finetune.task_data import FeatureSettings, load_task_data, make_features
from flaxbert.finetune.run import make_loss_fn
from flaxbert.finetune.tasks import get_task
from flaxbert.heads import apply_head
from flaxbert.hf import load_pretrained


def _features(task_name, folder, data_dir, minilm_dir, n=64):
    task = get_task(task_name)
    model = load_pretrained(str(minilm_dir), head="sequence_classification", num_labels=task.num_labels)
    train = load_task_data(task, str(data_dir / "glue" / folder)).train[:n]
    return task, model, make_features(task, model.tokenizer, train, FeatureSettings(128), training=True)


def _strip(batch):
    return {k: v for k, v in batch.items() if k != "index"}


@pytest.mark.parametrize("task_name,folder", [("sst2", "SST-2"), ("stsb", "STS-B")])
def test_packed_batch_has_the_unpacked_loss_and_gradients(task_name, folder, data_dir, minilm_dir):
    task, model, feats = _features(task_name, folder, data_dir, minilm_dir)
    idx = list(range(32))
    packed = batching.pack_batch(feats, idx, 64, 32)
    plain = batching.pad_batch(feats, idx, 32, max(batching.length_of(feats[i]) for i in idx))
    assert packed["input_ids"].shape[0] < 32  # the rows really hold several examples
    loss_fn = make_loss_fn(task, model.config)

    def mean_loss(params, batch):
        (s, w), = loss_fn(params, _strip(batch), None).terms.values()
        return s / w

    lp, gp = jax.value_and_grad(mean_loss)(model.params, packed)
    lu, gu = jax.value_and_grad(mean_loss)(model.params, plain)
    assert abs(float(lp) - float(lu)) <= 1e-5 * abs(float(lu))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(gu))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)))
    assert diff <= 1e-4 * scale
    out_p = np.asarray(apply_head(model.params, _strip(packed), model.config, head="sequence_classification").logits)
    out_u = np.asarray(apply_head(model.params, _strip(plain), model.config, head="sequence_classification").logits)
    real = packed["index"] >= 0
    np.testing.assert_allclose(out_p[real], out_u[packed["index"][real]], atol=2e-5)


def test_packed_epoch_layout(data_dir, minilm_dir):
    _, _, feats = _features("sst2", "SST-2", data_dir, minilm_dir, n=300)
    feats = feats + [dict(feats[0], input_ids=np.arange(100, 190, dtype=np.int32),
                          token_type_ids=np.zeros(90, np.int32))]  # one example longer than a row of 64
    seen, shapes = [], set()
    for b in batching.make_packed_batches(feats, 32, 64, seed=3, row_multiple=2):
        rows, length = b["input_ids"].shape
        shapes.add((rows, length))
        assert rows % 2 == 0 and rows in batching.PACKED_ROW_COUNTS
        assert int(b["weight"].sum()) == int((b["index"] >= 0).sum()) <= 32
        for r in range(rows):
            for slot in np.flatnonzero(b["index"][r] >= 0):
                f = feats[b["index"][r, slot]]
                start = b["cls_positions"][r, slot]
                n = batching.length_of(f)
                np.testing.assert_array_equal(b["input_ids"][r, start:start + n], f["input_ids"])
                np.testing.assert_array_equal(b["position_ids"][r, start:start + n], np.arange(n))
                assert (b["instance_ids"][r, start:start + n] == slot + 1).all()
                assert b["label"][r, slot] == f["label"]
        seen += b["index"][b["index"] >= 0].tolist()
    assert sorted(seen) == list(range(len(feats)))  # every example exactly once
    assert {length for _, length in shapes} == {64, 128}  # the long example got a longer row
    assert len(shapes) <= 8


def test_packing_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        batching.first_fit_decreasing([10, 70], 64)
