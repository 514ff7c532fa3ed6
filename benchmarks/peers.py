"""The contenders of the pretraining benchmark, each a (loss on fixed weights, train step) pair over
the same config, weights, batch and optimizer settings:

- flaxbert: the training engine's sharded step (`flaxbert.train.step.make_sharded_step`) with the
  MLM+NSP loss of `flaxbert.train.pretraining`, AdamW from `flaxbert.train.optim`;
- HF PyTorch `BertForPreTraining`, eager, torch AdamW with the same decay groups and clipping;
- HF Flax `FlaxBertForPreTraining`, jitted with donated state, optax AdamW (the same optax chain).

HF models compute MLM logits at every position against the full vocabulary (their design); flaxbert
only at the masked positions. The loss is the same: mean MLM cross-entropy over masked positions plus
mean NSP cross-entropy.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from flaxbert import heads
from flaxbert.config import BertConfig
from flaxbert.run_config import OptimConfig
from flaxbert.train import optim
from flaxbert.train.pretraining import make_loss_fn

OPTIM = OptimConfig(lr=1e-4, warmup_steps=0, decay="constant", clip_norm=1.0, weight_decay=0.01)


class ParityError(AssertionError):
    """flaxbert and a peer disagree on the loss of the same weights and batch."""


@dataclasses.dataclass
class Runner:
    """A prepared contender: `loss()` = deterministic loss on the initial weights (float), `step()` =
    one optimizer step (returns when done), `compile_seconds` = time to build the step (None: eager)."""

    name: str
    loss: Callable[[], float]
    step: Callable[[], None]
    compile_seconds: Optional[float] = None
    compiled: Any = None  # the compiled step (JAX contenders): HLO text and memory analysis
    peak_device_bytes: Callable[[], Optional[int]] = lambda: None


def check_parity(reference: float, others: dict[str, float], rtol: float) -> dict[str, float]:
    """Raise ParityError unless every loss is within `rtol` (relative) of flaxbert's. Returns the
    relative differences."""
    diffs = {}
    for name, value in others.items():
        rel = abs(value - reference) / max(abs(reference), 1e-12)
        diffs[name] = rel
        if not np.isfinite(value) or rel > rtol:
            raise ParityError(f"parity check failed: {name} loss {value:.8f} vs flaxbert {reference:.8f} "
                              f"(relative difference {rel:.2e} > {rtol:.0e}); the comparison would not be "
                              "apples to apples, so nothing is timed")
    return diffs


def parity_rtol(config: BertConfig) -> float:
    return 1e-4 if config.dtype == "float32" else 3e-2


# ----- flaxbert ---------------------------------------------------------------------------------

def flaxbert_runner(config: BertConfig, params, batch: dict, *, dropout: bool = True, donate: bool = True,
                    name: str = "flaxbert", optim_cfg: OptimConfig = OPTIM, host_sync: bool = False,
                    compile_step: bool = True) -> Runner:
    """The engine's step on a data-parallel mesh over every device. `host_sync` reads the loss back
    to the host after each step (what a loop that logs every step does). `compile_step=False` builds
    only the loss (for the parity test)."""
    loss_fn = make_loss_fn(config)
    engine = common.flaxbert_engine(config, optim_cfg, len(batch["input_ids"]),
                                    lambda r: heads.init(config, r, head="pretraining"),
                                    heads.logical_axes(config, "pretraining"), loss_fn, dropout=dropout, donate=donate)
    state = engine.init_state(params)
    gbatch = engine.put(batch)
    step_fn = engine.step_fn
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, gbatch).compile() if compile_step else None
    compile_s = time.perf_counter() - t0
    eval_loss = jax.jit(lambda p, b: sum(s / w for s, w in loss_fn(p, b, None).terms.values()))
    holder = {"state": state}

    def loss():  # on the host copy of the initial weights: the donated state has moved on
        return float(eval_loss(params, gbatch))

    def step():
        holder["state"], metrics = compiled(holder["state"], gbatch)
        if host_sync:
            float(metrics["loss"])
        jax.block_until_ready(holder["state"].params)

    return Runner(name, loss, step, compile_s, compiled)


# ----- HF PyTorch -------------------------------------------------------------------------------

def torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_autocast(dev: str, dtype: str) -> Callable:
    """A context factory: torch.autocast to `dtype` (a BertConfig dtype name), or nothing for float32."""
    import contextlib

    import torch

    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(dev, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def hf_torch_runner(hf_dir: str, config: BertConfig, batch: dict, *, name: str = "HF PyTorch (eager)",
                    optim_cfg: OptimConfig = OPTIM) -> Runner:
    import torch
    from transformers import BertForPreTraining

    dev = torch_device()
    autocast = torch_autocast(dev, config.dtype)
    model = BertForPreTraining.from_pretrained(hf_dir).to(dev)
    labels = np.full(batch["input_ids"].shape, -100, np.int64)
    np.put_along_axis(labels, batch["masked_lm_positions"].astype(np.int64), batch["masked_lm_ids"].astype(np.int64), 1)
    t = lambda x: torch.as_tensor(np.asarray(x, np.int64), device=dev)  # noqa: E731
    inputs = dict(input_ids=t(batch["input_ids"]), token_type_ids=t(batch["token_type_ids"]),
                  attention_mask=t(batch["attention_mask"]), labels=t(labels),
                  next_sentence_label=t(batch["next_sentence_labels"]))
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=optim_cfg.lr,
                            betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)

    def loss():
        model.eval()
        with torch.no_grad(), autocast():
            value = float(model(**inputs).loss)
        model.train()
        return value

    def step():
        with autocast():
            out = model(**inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peak = (lambda: int(torch.cuda.max_memory_allocated())) if dev == "cuda" else (lambda: None)
    return Runner(name, loss, step, None, peak_device_bytes=peak)


# ----- HF Flax ----------------------------------------------------------------------------------

def hf_flax_runner(hf_dir: str, config: BertConfig, batch: dict, *, name: str = "HF Flax",
                   optim_cfg: OptimConfig = OPTIM, compile_step: bool = True) -> Runner:
    from transformers import FlaxBertForPreTraining

    model = FlaxBertForPreTraining.from_pretrained(hf_dir, dtype=jnp.dtype(config.dtype))
    params = model.params
    labels = np.full(batch["input_ids"].shape, -100, np.int32)
    np.put_along_axis(labels, batch["masked_lm_positions"], batch["masked_lm_ids"], 1)
    inputs = {k: jnp.asarray(batch[k]) for k in ("input_ids", "token_type_ids", "attention_mask")}
    labels, nsp = jnp.asarray(labels), jnp.asarray(batch["next_sentence_labels"])
    tx = optim.make_optimizer(optim_cfg, total_steps=10_000)

    def loss_fn(p, rng, train):
        out = model(**inputs, params=p, dropout_rng=rng, train=train)
        mask = labels >= 0
        mlm = optax.softmax_cross_entropy_with_integer_labels(out.prediction_logits.astype(jnp.float32),
                                                              jnp.where(mask, labels, 0))
        mlm = jnp.sum(mlm * mask) / jnp.sum(mask)
        nsp_loss = optax.softmax_cross_entropy_with_integer_labels(out.seq_relationship_logits.astype(jnp.float32), nsp)
        return mlm + jnp.mean(nsp_loss)

    def train_step(p, opt_state, rng):
        rng, drop = jax.random.split(rng)
        grads = jax.grad(loss_fn)(p, drop, True)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, rng

    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    initial = jax.tree.map(jnp.copy, params)
    holder = {"p": params, "o": tx.init(params), "rng": jax.random.PRNGKey(0)}
    t0 = time.perf_counter()
    compiled = jitted.lower(holder["p"], holder["o"], holder["rng"]).compile() if compile_step else None
    compile_s = time.perf_counter() - t0
    eval_loss = jax.jit(lambda p: loss_fn(p, None, False))

    def loss():
        return float(eval_loss(initial))

    def step():
        holder["p"], holder["o"], holder["rng"] = compiled(holder["p"], holder["o"], holder["rng"])
        jax.block_until_ready(holder["p"])

    return Runner(name, loss, step, compile_s, compiled)


# ----- the table of peers -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Peer:
    """A pretraining peer: what it needs installed ("module" or "module:Name") and its runner factory
    `make(hf_dir, config, batch) -> Runner`."""

    needs: tuple[str, ...]
    make: Callable[..., Runner]

    def missing(self) -> Optional[str]:
        """Why this peer cannot run here (None if it can): transformers 5 has no Flax classes, for example."""
        for need in self.needs:
            module_name, _, attr = need.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                return f"{module_name} is not installed ({e})"
            if attr and not _has(module, attr):
                version = getattr(module, "__version__", None)
                return f"{module_name}{f' {version}' if version else ''} has no {attr}"
        return None


def _has(module, attr: str) -> bool:
    try:  # transformers' lazy module raises on names whose backend is missing
        getattr(module, attr)
        return True
    except (AttributeError, ImportError, RuntimeError):
        return False


PRETRAINING_PEERS = {
    "hf_torch": Peer(("torch", "transformers:BertForPreTraining"), hf_torch_runner),
    "hf_flax": Peer(("flax", "transformers:FlaxBertForPreTraining"), hf_flax_runner),
}


def available(names) -> tuple[list[str], dict[str, str]]:
    """The peers among `names` that can run here, and why each of the others cannot."""
    skipped = {n: why for n in names if (why := PRETRAINING_PEERS[n].missing())}
    return [n for n in names if n not in skipped], skipped


def init_params(config: BertConfig, seed: int = 0) -> Any:
    return jax.device_get(heads.init(config, jax.random.key(seed), head="pretraining"))
