"""Acceptance 2: deterministic batches, exact mid-epoch resume from a JSON state, disjoint per-process data
(two real processes), plus the batch contract, epochs, dynamic re-masking and worker-independent preparation."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import flaxbert
from flaxbert.data import BATCH_KEYS, DataError, check_model, load_manifest, make_loader, prepare

MEDITATIONS = Path(flaxbert.__file__).parent / "resources" / "meditations.txt"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "meditations"
    prepare(MEDITATIONS, minilm_dir, out, corpus_format="lines", max_seq_length=64, max_predictions_per_seq=10,
            progress=False)
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x) for x, y in zip(a, b))


def restored_rows(batches):
    """Multiset of unmasked instances (input ids with masked positions put back), independent of masks."""
    rows = Counter()
    for b in batches:
        for r in range(len(b["input_ids"])):
            ids = b["input_ids"][r].copy()
            m = b["masked_lm_weights"][r] > 0
            ids[b["masked_lm_positions"][r, m]] = b["masked_lm_ids"][r, m]
            rows[ids[b["attention_mask"][r] > 0].tobytes()] += 1
    return rows


def test_batch_contract(prepared):
    manifest = load_manifest(prepared)
    batch = next(make_loader(prepared, batch_size=4, seed=0))
    assert set(batch) == set(BATCH_KEYS)
    S, P = manifest["max_seq_length"], manifest["max_predictions_per_seq"]
    shapes = {"input_ids": (4, S), "token_type_ids": (4, S), "attention_mask": (4, S), "masked_lm_positions": (4, P),
              "masked_lm_ids": (4, P), "masked_lm_weights": (4, P), "next_sentence_labels": (4,)}
    for k, shape in shapes.items():
        assert batch[k].shape == shape, k
        assert batch[k].dtype == (np.float32 if k == "masked_lm_weights" else np.int32), k
    check_model(manifest, flaxbert.BertConfig.tiny(vocab_size=manifest["vocab_size"], max_position_embeddings=S))
    with pytest.raises(DataError, match="embedding table has only 1000 rows"):
        check_model(manifest, flaxbert.BertConfig.tiny(vocab_size=1000))
    with pytest.raises(DataError, match="max_position_embeddings 32"):
        check_model(manifest, flaxbert.BertConfig.tiny(vocab_size=manifest["vocab_size"], max_position_embeddings=32))


@pytest.mark.parametrize("masking,packed", [("static", False), ("dynamic", False), ("dynamic", True)])
def test_same_seed_same_bytes_and_exact_resume(prepared, masking, packed):
    make = lambda seed: make_loader(prepared, batch_size=8, seed=seed, masking=masking, packed=packed)  # noqa: E731
    first = take(make(7), 30)
    assert same(first, take(make(7), 30))
    assert not same(first[:3], take(make(8), 3))
    loader = make(7)
    take(loader, 11)  # mid-epoch (an epoch is ~100 batches of 8)
    state = json.loads(json.dumps(loader.get_state()))  # what a checkpoint stores
    resumed = make(7)
    resumed.set_state(state)
    assert same(take(resumed, 19), first[11:])
    other = make_loader(prepared, batch_size=4, seed=7, masking=masking, packed=packed)
    with pytest.raises(DataError, match="batch_size"):
        other.set_state(state)


def test_epochs_reshuffle_and_dynamic_masks_change(prepared):
    n = load_manifest(prepared)["counts"]["instances"]
    kw = dict(batch_size=1, seed=1, num_epochs=2, drop_remainder=False)
    static = list(make_loader(prepared, **kw))
    dynamic = list(make_loader(prepared, masking="dynamic", **kw))
    assert len(static) == len(dynamic) == 2 * n
    for batches in (static, dynamic):
        e1, e2 = restored_rows(batches[:n]), restored_rows(batches[n:])
        assert e1 == e2 and sum(e1.values()) == n  # each epoch is every instance once
    assert restored_rows(static[:20]) != restored_rows(static[n:n + 20])  # a new order in epoch 2
    static_masks = {r.tobytes(): b["masked_lm_positions"].tobytes() for b in static[:n] for r in b["input_ids"]}
    assert all(static_masks.get(r.tobytes()) is not None for b in static[n:] for r in b["input_ids"])  # same masks
    # dynamic: the same instance gets other masks in its second epoch
    first_masks = {}
    for b in dynamic[:n]:
        first_masks[next(iter(restored_rows([b])))] = b["masked_lm_positions"].tobytes()
    changed = [first_masks[next(iter(restored_rows([b])))] != b["masked_lm_positions"].tobytes() for b in dynamic[n:]]
    assert np.mean(changed) > 0.8


_WORKER = """
import json, sys
import numpy as np
from flaxbert.data import make_loader
loader = make_loader(sys.argv[1], batch_size=5, seed=11, num_epochs=1, process_index=int(sys.argv[2]),
                     process_count=2, drop_remainder=False)
rows = []
for b in loader:
    for r in range(len(b["input_ids"])):
        ids = b["input_ids"][r].copy()
        m = b["masked_lm_weights"][r] > 0
        ids[b["masked_lm_positions"][r, m]] = b["masked_lm_ids"][r, m]
        rows.append(ids[b["attention_mask"][r] > 0].tolist())
print(json.dumps(rows))
"""


def test_two_processes_read_disjoint_parts_that_cover_the_epoch(prepared):
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(prepared), str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outputs.append(Counter(np.array(r, np.int32).tobytes() for r in json.loads(stdout)))
    everything = restored_rows(make_loader(prepared, batch_size=5, seed=0, num_epochs=1, shuffle=False,
                                           drop_remainder=False))
    n = sum(everything.values())
    a, b = outputs
    assert sum(a.values()) == sum(b.values()) == n // 2  # equal shares (an odd instance out is left out)
    # as multisets: no instance is read more often than it exists (disjoint), and all but n % 2 are read (cover)
    assert a + b <= everything and sum((everything - (a + b)).values()) == n % 2


def test_prepare_is_independent_of_workers(minilm_dir, tmp_path):
    for workers in (1, 2):
        prepare(MEDITATIONS, minilm_dir, tmp_path / f"w{workers}", corpus_format="lines", workers=workers,
                num_shards=3, progress=False)
    m1, m2 = load_manifest(tmp_path / "w1"), load_manifest(tmp_path / "w2")
    assert m1["throughput"]["workers"] == 1 and m2["throughput"]["workers"] == 2
    assert m1["counts"] == m2["counts"] and len(m1["shards"]) == 3
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*.npy"))
    assert len(files) > 20
    for f in files:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f
