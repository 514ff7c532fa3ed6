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


@pytest.fixture(scope="module")
def prepared_wwm(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "meditations-wwm"
    prepare(MEDITATIONS, minilm_dir, out, corpus_format="lines", max_seq_length=64, max_predictions_per_seq=10,
            whole_word_masking=True, short_seq_prob=0.3, progress=False)
    return out


MODES = [("static", False, False), ("dynamic", False, False), ("static", True, False), ("dynamic", True, False),
         ("static", False, True), ("dynamic", False, True), ("dynamic", True, True)]


@pytest.mark.parametrize("masking,packed,whole_word", MODES)
def test_same_seed_same_bytes_and_exact_resume(prepared, prepared_wwm, masking, packed, whole_word):
    where = prepared_wwm if whole_word else prepared
    make = lambda seed, **kw: make_loader(where, batch_size=8, seed=seed, masking=masking, packed=packed,  # noqa: E731
                                          **kw)
    first = take(make(7), 130)  # over an epoch boundary (an epoch is ~100 batches of 8)
    assert same(first, take(make(7, prefetch_threads=0), 130))  # worker threads do not change the batches
    assert same(first[:20], take(make(7, prefetch_threads=3, prefetch_depth=7), 20))
    assert not same(first[:3], take(make(8), 3))
    for stop in (11, 97):  # mid-epoch, and just before an epoch boundary
        loader = make(7)
        take(loader, stop)
        state = json.loads(json.dumps(loader.get_state()))  # what a checkpoint stores
        assert len(json.dumps(state)) < 1000
        resumed = make(7)
        resumed.set_state(state)
        assert same(take(resumed, 130 - stop), first[stop:])
    other = make_loader(where, batch_size=4, seed=7, masking=masking, packed=packed)
    with pytest.raises(DataError, match="global_batch_size: saved 8, now 4"):
        other.set_state(state)
    with pytest.raises(DataError, match="another flaxbert loader"):
        other.set_state({"settings": state["settings"], "iterator": {}})


def test_worker_processes_make_the_same_batches_resume_and_clean_up(prepared, prepared_wwm):
    """Batches made in worker processes (shared-memory blocks) are the in-process ones, over an epoch boundary
    and after a mid-run set_state (which waits for the workers still writing); close() stops the workers and
    frees every block; a worker that dies is a DataError naming the data."""
    import os
    import signal
    from multiprocessing import shared_memory

    kw = dict(batch_size=8, seed=5, masking="dynamic", packed=True)
    reference = take(make_loader(prepared_wwm, prefetch_threads=0, **kw), 110)
    loader = make_loader(prepared_wwm, prefetch_processes=2, prefetch_depth=3, **kw)
    assert same(take(loader, 110), reference)
    state = {**loader.get_state(), "next_batch": 40}
    take(loader, 2)  # workers now busy with batches ahead
    loader.set_state(state)
    assert same(take(loader, 30), reference[40:70])
    names = [b.name for b in loader._blocks]
    workers = list(loader._pool._processes.values())
    loader.close()
    assert all(not w.is_alive() for w in workers)
    for name in names:
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)
    assert same(take(make_loader(prepared, prefetch_processes=1, masking="static", batch_size=8, seed=5), 5),
                take(make_loader(prepared, prefetch_threads=0, masking="static", batch_size=8, seed=5), 5))
    doomed = make_loader(prepared, prefetch_processes=1, batch_size=8, seed=5)
    next(doomed)
    for w in list(doomed._pool._processes.values()):
        os.kill(w.pid, signal.SIGKILL)
    with pytest.raises(DataError, match=r"meditations: a loader worker process ended abruptly.*batch \d+"):
        take(doomed, 10)
    doomed.close()
    with pytest.raises(DataError, match="prefetch_threads and prefetch_processes must be >= 0"):
        make_loader(prepared, prefetch_processes=-1, batch_size=8, seed=5)


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
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
from flaxbert.data import make_loader
for masking, packed in (("static", False), ("dynamic", False), ("dynamic", True)):
    loader = make_loader(sys.argv[1], batch_size=4, seed=11, masking=masking, packed=packed,
                         process_index=jax.process_index(), process_count=jax.process_count())
    batches = [next(loader) for _ in range(6)]
    np.savez(f"{sys.argv[4]}/{masking}-{packed}-{jax.process_index()}.npz",
             **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    if jax.process_index() == 0:
        with open(f"{sys.argv[4]}/{masking}-{packed}-state.json", "w") as f:
            json.dump(loader.get_state(), f)
jax.distributed.shutdown()
"""


def test_two_processes_read_the_global_batches_of_one_and_resume_on_one(prepared, tmp_path):
    """2 real processes (jax.distributed, gloo) x 4 rows == 1 process x 8 rows, batch for batch; the state
    saved by the 2-process job continues the same global sequence in a 1-process job."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(prepared), address, str(i), str(tmp_path)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
    for masking, packed in (("static", False), ("dynamic", False), ("dynamic", True)):
        parts = [np.load(tmp_path / f"{masking}-{packed}-{i}.npz") for i in range(2)]
        two = [{k: np.concatenate([p[f"{i}/{k}"] for p in parts]) for k in BATCH_KEYS} for i in range(6)]
        one = make_loader(prepared, batch_size=8, seed=11, masking=masking, packed=packed)
        assert same(two, [{k: b[k] for k in BATCH_KEYS} for b in take(one, 6)]), (masking, packed)
        assert not same(two[:1], two[1:2])
        resumed = make_loader(prepared, batch_size=8, seed=11, masking=masking, packed=packed)
        resumed.set_state(json.loads((tmp_path / f"{masking}-{packed}-state.json").read_text()))
        assert same(take(resumed, 3), take(one, 3)), (masking, packed)


def test_processes_read_disjoint_parts_that_cover_the_epoch(prepared):
    kw = dict(batch_size=5, seed=11, num_epochs=1, process_count=3, drop_remainder=False, masking="dynamic")
    parts = [restored_rows(make_loader(prepared, process_index=i, **kw)) for i in range(3)]
    everything = restored_rows(make_loader(prepared, batch_size=5, seed=0, num_epochs=1, shuffle=False,
                                           drop_remainder=False))
    n = sum(everything.values())
    assert all(sum(p.values()) == n // 3 for p in parts)  # equal shares (the n % 3 left over are left out)
    union = parts[0] + parts[1] + parts[2]
    assert union <= everything and sum((everything - union).values()) == n % 3


def test_bad_prepared_data_and_settings_get_a_clear_error(prepared, minilm_dir, tmp_path):
    import shutil

    def copy(name):
        shutil.copytree(prepared, tmp_path / name)
        return tmp_path / name

    manifest = load_manifest(prepared)
    shard = manifest["shards"][0]["name"]
    truncated = copy("truncated")
    data = (truncated / shard / "tokens.npy").read_bytes()
    (truncated / shard / "tokens.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=f"{shard}/tokens.npy: unreadable or truncated"):
        make_loader(truncated, batch_size=4, seed=0)
    missing = copy("missing")
    (missing / shard / "mask_inputs.npy").unlink()
    with pytest.raises(DataError, match=f"{shard}/mask_inputs.npy: missing"):
        make_loader(missing, batch_size=4, seed=0)
    short = copy("short")
    np.save(short / shard / "a_lengths.npy", np.load(short / shard / "a_lengths.npy")[:-1])
    with pytest.raises(DataError, match=f"{shard}/a_lengths.npy: shape .* the manifest says"):
        make_loader(short, batch_size=4, seed=0)
    for name, edit, message in (("version", {"format_version": 99}, "format_version 99"),
                                ("escape", {"shards": [{"name": "../outside", "instances": 1}]},
                                 "shard name '../outside' is not a directory name")):
        bad = copy(name)
        (bad / "manifest.json").write_text(json.dumps({**manifest, **edit}))
        with pytest.raises(DataError, match=message):
            make_loader(bad, batch_size=4, seed=0)
    with pytest.raises(DataError, match="not the model's tokenizer"):
        make_loader(prepared, batch_size=4, seed=0, tokenizer_sha256="0" * 64)
    make_loader(prepared, batch_size=4, seed=0, tokenizer_sha256=manifest["tokenizer_sha256"])
    n = manifest["counts"]["instances"]
    with pytest.raises(DataError, match=f"fewer than one global batch of {2 * (n // 2 + 1)} rows"):
        make_loader(prepared, batch_size=n // 2 + 1, seed=0, process_count=2)
    with pytest.raises(DataError, match="masking must be"):
        make_loader(prepared, batch_size=4, seed=0, masking="random")


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
