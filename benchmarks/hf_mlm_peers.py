"""The HF side of the time-to-accuracy benchmark: the data as run_mlm prepares it, HF PyTorch and HF Flax MLM
pretraining on a wall-clock budget, and the ONE evaluator every contender's checkpoints go through.

- Data: run_mlm's `group_texts` (every line tokenised with [CLS] ... [SEP], concatenated, cut into blocks).
- HF PyTorch: as run_mlm_no_trainer trains (`BertForMaskedLM`, `DataCollatorForLanguageModeling`, AdamW with no
  decay on biases and LayerNorm weights, `get_scheduler("linear")`).
- HF Flax: as run_mlm_flax trains (`FlaxBertForMaskedLM`, optax AdamW with the same decay mask, linear warmup
  then linear decay, the loss over the labelled positions; jit instead of pmap on one CPU device).
- HF has no time-based schedule, so each peer is calibrated: a few steps are timed first (not counted), then
  the schedule is set for `budget / step time` steps and the run stops at whichever comes first.
- The evaluator: HF PyTorch `BertForMaskedLM` on a fixed, seeded 15% (80/10/10) masking of the test blocks.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab_dir: str  # a directory with an uncased WordPiece vocab.txt
    seq_len: int = 128
    max_position_embeddings: int = 512


@dataclasses.dataclass(frozen=True)
class HParams:
    batch_size: int = 32
    lr: float = 5e-4
    warmup_fraction: float = 0.06  # of the calibrated number of steps
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    mlm_probability: float = 0.15
    seed: int = 0


# untimed warmup steps, then timed steps, on a throwaway copy of the model. 3 + 10 left the first steps' slowness
# (a fresh process's allocator and thread pools) in the mean: both HF peers planned too few steps and ended at 83%
# and 85% of a 10-minute budget (2026-12-05); 10 + 30 costs about 20 s outside the budget.
CALIBRATION_STEPS = (10, 30)


def tokenizer_of(cell: Cell):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(os.path.join(cell.vocab_dir, "vocab.txt"), do_lower_case=True)


def hf_bert_config(cell: Cell, vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=cell.hidden, num_hidden_layers=cell.layers,
                      num_attention_heads=cell.heads, intermediate_size=cell.intermediate,
                      max_position_embeddings=cell.max_position_embeddings, type_vocab_size=2)


def _wikitext_lines(path: Path) -> list[str]:
    """Non-empty lines that are not ` = Heading = ` lines."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not (s.startswith("=") and s.endswith("=")):
            out.append(s)
    return out


def train_texts(data_dir) -> list[str]:
    """WikiText-2 valid, then the packaged Meditations (one paragraph per line)."""
    from flaxbert.train.pretraining import packaged_corpus

    meditations = [s.strip() for s in Path(packaged_corpus()).read_text(encoding="utf-8").splitlines() if s.strip()]
    return _wikitext_lines(Path(data_dir) / "wikitext-2" / "wiki.valid.tokens") + meditations


def test_texts(data_dir) -> list[str]:
    return _wikitext_lines(Path(data_dir) / "wikitext-2" / "wiki.test.tokens")


def group_blocks(tokenizer, texts: Sequence[str], block_size: int) -> np.ndarray:
    """run_mlm's group_texts: each line with its special tokens, all concatenated, the remainder dropped."""
    ids = tokenizer(list(texts), add_special_tokens=True, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    flat = np.fromiter((t for row in ids for t in row), np.int32)
    n = len(flat) // block_size
    return flat[:n * block_size].reshape(n, block_size)


def eval_batch(tokenizer, blocks: np.ndarray, seed: int = 1234, mlm_probability: float = 0.15):
    """A fixed masking of `blocks`: each non-special token predicted with probability `mlm_probability`; of
    those 80% become [MASK], 10% a random token, 10% stay. Returns (input_ids, labels with -100 elsewhere)."""
    rng = np.random.default_rng(seed)
    special = np.isin(blocks, tokenizer.all_special_ids)
    chosen = (rng.random(blocks.shape) < mlm_probability) & ~special
    labels = np.where(chosen, blocks, -100).astype(np.int64)
    kind = rng.random(blocks.shape)
    random_ids = rng.integers(0, len(tokenizer), blocks.shape)
    inputs = blocks.astype(np.int64).copy()
    inputs[chosen & (kind < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (kind >= 0.8) & (kind < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs, labels


def evaluate(hf_dir: str, input_ids: np.ndarray, labels: np.ndarray, batch_size: int = 32) -> float:
    """Masked-LM accuracy of the checkpoint in `hf_dir` with HF PyTorch `BertForMaskedLM` (fp32, eval mode).
    Refuses a checkpoint whose MLM head did not load."""
    import torch
    from transformers import BertForMaskedLM

    has_pt = any(os.path.exists(os.path.join(hf_dir, f)) for f in ("model.safetensors", "pytorch_model.bin"))
    if has_pt:
        model, info = BertForMaskedLM.from_pretrained(hf_dir, output_loading_info=True)
        missing = [k for k in info["missing_keys"] if "decoder.weight" not in k]  # tied to the word embeddings
    else:  # a Flax checkpoint; `from_pretrained(from_flax=True)` leaves the weights on the meta device in
        # transformers 4.57, so the Flax parameters are copied into a fresh PyTorch model instead
        from transformers import BertConfig, FlaxBertForMaskedLM
        from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

        from flax.serialization import msgpack_restore
        from flax.traverse_util import flatten_dict

        with open(os.path.join(hf_dir, "flax_model.msgpack"), "rb") as f:
            saved = flatten_dict(msgpack_restore(f.read()))
        flax_model = FlaxBertForMaskedLM.from_pretrained(hf_dir)
        expected = flatten_dict(flax_model.params)
        missing = [".".join(k) for k in expected if k not in saved and "decoder" not in k]  # decoder: tied
        model = load_flax_weights_in_pytorch_model(BertForMaskedLM(BertConfig.from_pretrained(hf_dir)),
                                                   flax_model.params)
    if missing:
        raise ValueError(f"{hf_dir}: weights missing when loaded as BertForMaskedLM: {missing[:5]}")
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for i in range(0, len(input_ids), batch_size):
            x = torch.from_numpy(input_ids[i:i + batch_size])
            y = labels[i:i + batch_size]
            logits = model(input_ids=x, attention_mask=torch.ones_like(x),
                           token_type_ids=torch.zeros_like(x)).logits
            rows, cols = np.nonzero(y != -100)
            pred = logits[torch.from_numpy(rows), torch.from_numpy(cols)].argmax(-1).numpy()
            correct += int((pred == y[rows, cols]).sum())
            total += len(rows)
    return correct / max(total, 1)


def unigram_accuracy(tokenizer, train_blocks: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of always predicting the training blocks' most frequent non-special token."""
    counts = np.bincount(train_blocks.ravel(), minlength=len(tokenizer))
    counts[tokenizer.all_special_ids] = 0
    y = labels[labels != -100]
    return float((y == int(np.argmax(counts))).mean())


def _budget_steps(step_time: float, budget_s: float) -> int:
    return max(int(budget_s / step_time), 10)


def snapshot_due(points: Sequence[float], budget_s: float, taken: int, seconds: float) -> bool:
    """Whether the next of the budget shares `points` is reached after `taken` snapshots (the last one, at the
    end of the budget, is taken by the run itself): one rule for every contender."""
    return taken < len(points) - 1 and seconds >= points[taken] * budget_s


class _Snapshots:
    """Saves at the budget shares `points` of training time, with the clock stopped while saving."""

    def __init__(self, points: Sequence[float], budget_s: float, out_dir: str, save):
        self.points, self.budget_s, self.out_dir, self.save = list(points), budget_s, out_dir, save
        self.records: list[dict] = []
        self.paused = 0.0

    def maybe(self, seconds: float, step: int, losses: list, final: bool = False) -> None:
        k = len(self.records)
        if not final and not snapshot_due(self.points, self.budget_s, k, seconds):
            return
        t = time.perf_counter()
        where = os.path.join(self.out_dir, f"snapshot-{k}")
        self.save(where)
        self.records.append({"fraction": 1.0 if final else self.points[k], "wall_s": seconds, "step": step,
                             "dir": where, "train_loss": float(np.mean(losses[-20:])) if losses else float("nan")})
        self.paused += time.perf_counter() - t


def run_hf_torch(cell: Cell, hp: HParams, blocks: np.ndarray, budget_s: float, points: Sequence[float],
                 out_dir: str) -> list[dict]:
    import torch
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, get_scheduler

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = tokenizer_of(cell)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=hp.mlm_probability)

    def make(steps):
        torch.manual_seed(hp.seed)
        model = BertForMaskedLM(hf_bert_config(cell, len(tokenizer)))
        no_decay = ("bias", "LayerNorm.weight")
        groups = [{"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
                   "weight_decay": hp.weight_decay},
                  {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
                   "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.b1, hp.b2), eps=hp.eps)
        sched = get_scheduler("linear", opt, num_warmup_steps=int(hp.warmup_fraction * steps),
                              num_training_steps=steps)
        return model, opt, sched

    generator = torch.Generator().manual_seed(hp.seed)
    loader = torch.utils.data.DataLoader([{"input_ids": b} for b in blocks.tolist()], batch_size=hp.batch_size,
                                         shuffle=True, drop_last=True, collate_fn=collator, generator=generator)

    def batches():
        while True:
            yield from loader

    def one_step(model, opt, sched, batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        return float(loss)

    model, opt, sched = make(1000)  # calibration on a throwaway copy
    model.train()
    it = batches()
    warm, timed = CALIBRATION_STEPS
    for _ in range(warm):
        one_step(model, opt, sched, next(it))
    t = time.perf_counter()
    for _ in range(timed):
        one_step(model, opt, sched, next(it))
    step_time = (time.perf_counter() - t) / timed
    total = _budget_steps(step_time, budget_s)

    model, opt, sched = make(total)
    model.train()
    generator.manual_seed(hp.seed)
    it = batches()
    snaps = _Snapshots(points, budget_s, out_dir, lambda d: model.save_pretrained(d))
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    while step < total:
        losses.append(one_step(model, opt, sched, next(it)))
        step += 1
        seconds = time.perf_counter() - start - snaps.paused
        if seconds >= budget_s:
            break
        snaps.maybe(seconds, step, losses)
    snaps.maybe(time.perf_counter() - start - snaps.paused, step, losses, final=True)
    for r in snaps.records:
        r.update(calibrated_step_s=step_time, planned_steps=total, threads=torch.get_num_threads())
    return snaps.records


def run_hf_flax(cell: Cell, hp: HParams, blocks: np.ndarray, budget_s: float, points: Sequence[float],
                out_dir: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import traverse_util
    from transformers import DataCollatorForLanguageModeling, FlaxBertForMaskedLM

    tokenizer = tokenizer_of(cell)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=hp.mlm_probability, return_tensors="np")
    model = FlaxBertForMaskedLM(hf_bert_config(cell, len(tokenizer)), seed=hp.seed, dtype=jnp.float32)

    def decay_mask(params):  # run_mlm_flax: no decay on biases and LayerNorm scales
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {p: p[-1] != "bias" and p[-2:] != ("LayerNorm", "scale") for p in flat})

    def make(steps):
        warmup = int(hp.warmup_fraction * steps)
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, hp.lr, max(warmup, 1)),
             optax.linear_schedule(hp.lr, 0.0, max(steps - warmup, 1))], [warmup])
        tx = optax.adamw(schedule, b1=hp.b1, b2=hp.b2, eps=hp.eps, weight_decay=hp.weight_decay, mask=decay_mask)
        return tx, tx.init(model.params)

    def loss_fn(params, batch, rng):
        labels = batch.pop("labels")
        logits = model(**batch, params=params, dropout_rng=rng, train=True)[0]
        weights = (labels != -100).astype(jnp.float32)
        ce = optax.softmax_cross_entropy(logits, jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1]))
        return (ce * weights).sum() / weights.sum()

    def make_step(tx):
        @jax.jit  # run_mlm_flax pmaps this over devices; one CPU device here
        def train_step(params, opt_state, batch, rng):
            rng, dropout_rng = jax.random.split(rng)
            loss, grads = jax.value_and_grad(loss_fn)(params, dict(batch), dropout_rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, rng
        return train_step

    rng_np = np.random.default_rng(hp.seed)

    def batches():
        while True:
            order = rng_np.permutation(len(blocks))
            for i in range(0, len(order) - hp.batch_size + 1, hp.batch_size):
                b = collator([{"input_ids": blocks[j]} for j in order[i:i + hp.batch_size]])
                yield {"input_ids": b["input_ids"].astype(np.int32), "labels": b["labels"].astype(np.int32),
                       "attention_mask": np.ones_like(b["input_ids"], np.int32),
                       "token_type_ids": np.zeros_like(b["input_ids"], np.int32)}

    tx, opt_state = make(1000)  # calibration on a throwaway copy (its compile is not counted)
    step_fn = make_step(tx)
    params, rng, it = model.params, jax.random.PRNGKey(hp.seed), batches()
    warm, timed = CALIBRATION_STEPS
    for _ in range(warm):
        params, opt_state, loss, rng = step_fn(params, opt_state, next(it), rng)
    jax.block_until_ready(loss)
    t = time.perf_counter()
    for _ in range(timed):
        params, opt_state, loss, rng = step_fn(params, opt_state, next(it), rng)
    jax.block_until_ready(loss)
    step_time = (time.perf_counter() - t) / timed
    total = _budget_steps(step_time, budget_s)

    model = FlaxBertForMaskedLM(hf_bert_config(cell, len(tokenizer)), seed=hp.seed, dtype=jnp.float32)
    rng_np = np.random.default_rng(hp.seed)
    np.random.seed(hp.seed)  # the NumPy collator masks with NumPy's global generator
    it = batches()
    start = time.perf_counter()  # the real run compiles again (a new schedule): that is counted
    tx, opt_state = make(total)
    step_fn = make_step(tx)
    params, rng = model.params, jax.random.PRNGKey(hp.seed)
    state = {"params": params}
    snaps = _Snapshots(points, budget_s, out_dir, lambda d: model.save_pretrained(d, params=state["params"]))
    losses: list[float] = []
    step = 0
    pending = None
    while step < total:
        params, opt_state, loss, rng = step_fn(params, opt_state, next(it), rng)
        step += 1
        if pending is not None:
            losses.append(float(pending))  # one step in flight, so the clock is the device's
        pending = loss
        state["params"] = params
        seconds = time.perf_counter() - start - snaps.paused
        if seconds >= budget_s:
            break
        snaps.maybe(seconds, step, losses)
    losses.append(float(pending))
    snaps.maybe(time.perf_counter() - start - snaps.paused, step, losses, final=True)
    for r in snaps.records:
        r.update(calibrated_step_s=step_time, planned_steps=total)
    return snaps.records
