"""Optimizers as BERT trains them: AdamW (eps 1e-6, decay 0.01, none on LayerNorm and biases) or LAMB,
global-norm clipping, linear warmup then linear/polynomial decay, and an optional frozen encoder."""

from __future__ import annotations

import jax
import optax

from flaxbert.run_config import OptimConfig

NO_DECAY_NAMES = ("bias", "scale")  # LayerNorm scale/bias and every Dense/MLM bias


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr linearly over `warmup_steps`, then to `end_lr` at `total_steps` (power 1 = linear)."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.decay == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        power = 1.0 if cfg.decay == "linear" else cfg.power
        decay = optax.polynomial_schedule(cfg.lr, cfg.end_lr, power, max(total_steps - cfg.warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def budget_lr(cfg: OptimConfig, step: int, progress: float) -> float:
    """The learning rate of a run on a wall-clock budget (Izsak et al. 2021; Geiping and Goldstein 2022), where
    `progress` is the share of the budget's schedule spent (0..1; the loop starts that clock when the first step
    has compiled and run): warmup over `warmup_fraction` of the budget (or, when that
    is 0, over the first `warmup_steps` steps), then the decay from `lr` to `end_lr` over the rest of the time."""
    p = min(max(progress, 0.0), 1.0)
    w = cfg.warmup_fraction
    if w > 0:
        warm, left = min(1.0, p / w), min(1.0, (1.0 - p) / (1.0 - w))
    else:
        warm, left = (1.0 if cfg.warmup_steps <= 0 else min(1.0, step / cfg.warmup_steps)), 1.0 - p
    if cfg.decay == "constant":
        return warm * cfg.lr
    power = 1.0 if cfg.decay == "linear" else cfg.power
    return warm * (cfg.end_lr + (cfg.lr - cfg.end_lr) * left ** power)


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params):
    """True where weight decay applies: kernels and embeddings, not LayerNorm parameters or biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in NO_DECAY_NAMES, params)


def trainable_labels(params, freeze_encoder: bool):
    """'frozen' for the `bert` subtree when the encoder is frozen, else 'train'."""
    def label(path, _):
        top = str(getattr(path[0], "key", path[0]))
        return "frozen" if freeze_encoder and top == "bert" else "train"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, budget: bool = False) -> optax.GradientTransformation:
    """clip -> AdamW/LAMB with the schedule. State is float32 (parameters are float32 master weights).

    `budget=True`: the learning rate is 1 and the step scales the updates by the rate it is given (`budget_lr`);
    both optimizers apply the rate last, so this equals running them with that rate."""
    lr = 1.0 if budget else schedule(cfg, total_steps)
    if cfg.name == "adamw":
        core = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        core = optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), core) if cfg.clip_norm > 0 else core
    if cfg.freeze_encoder:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda p: trainable_labels(p, True))
    return tx
