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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip -> AdamW/LAMB with the schedule. State is float32 (parameters are float32 master weights)."""
    lr = schedule(cfg, total_steps)
    if cfg.name == "adamw":
        core = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        core = optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), core) if cfg.clip_norm > 0 else core
    if cfg.freeze_encoder:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda p: trainable_labels(p, True))
    return tx
