"""The BERT encoder as pure linen modules: embeddings, scanned post-LN layers, pooler, and `encode`.

No I/O, no optimizer, no mesh. Every parameter carries logical axis names drawn from
{vocab, embed, heads, kv, mlp, layers, pos, type}; `flaxbert.sharding` maps them to a mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from flaxbert import sharding as shd
from flaxbert.config import BertConfig
from flaxbert.errors import ConfigError, InputError

Array = jax.Array
REPLICATED = PartitionSpec()  # a parameter gathered whole on every device
ENCODER_KEYS = ("input_ids", "token_type_ids", "attention_mask", "position_ids", "instance_ids")


class EncoderOutput(NamedTuple):
    last_hidden_state: Array  # [batch, seq, hidden]
    pooled_output: Optional[Array]  # [batch, hidden] ([batch, instances, hidden] packed); None without a pooler


def compute_dtype(config: BertConfig):
    """The dtype activations are computed in (parameters stay float32)."""
    return jnp.dtype(config.dtype)


def normal_init(config: BertConfig, axes):
    """BERT's N(0, initializer_range) initializer, with the parameter's logical axes."""
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes)


def zeros_init(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


# ----- elementwise pieces with hand-written backward passes ------------------------------------------
# Autodiff of LayerNorm and exact GELU saves several intermediates per call for the backward pass (the
# centred input, the erf term, its derivative, ...); inside the scanned encoder each one becomes a stacked
# [layers, batch, seq, width] buffer that is written in the forward pass and read back in the backward.
# These custom VJPs save one tensor each (the normalised input and its inverse std; the GELU input) and
# recompute the rest, which is elementwise and cheap next to the memory traffic it replaces.

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_TANH_C = 0.7978845608028654  # sqrt(2 / pi)


@jax.custom_vjp
def gelu_exact(x):
    """x * Phi(x), Phi the standard normal CDF (BERT's "gelu")."""
    return x * (0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))).astype(x.dtype)


def _gelu_exact_fwd(x):
    return gelu_exact(x), x


def _gelu_exact_bwd(x, dy):
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    return ((dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


@jax.custom_vjp
def gelu_tanh(x):
    """The tanh approximation of GELU ("gelu_new", "gelu_pytorch_tanh")."""
    return 0.5 * x * (1.0 + jnp.tanh(_TANH_C * (x + 0.044715 * x * x * x)))


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, dy):
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_TANH_C * (xf + 0.044715 * xf * xf * xf))
    grad = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _TANH_C * (1.0 + 3 * 0.044715 * xf * xf)
    return ((dy.astype(jnp.float32) * grad).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def activation(name: str):
    return {
        "gelu": gelu_exact,
        "gelu_new": gelu_tanh,
        "gelu_pytorch_tanh": gelu_tanh,
        "gelu_fast": gelu_tanh,
        "relu": jax.nn.relu,
        "tanh": jnp.tanh,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
    }[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """float32 LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    xhat = centred * inv_std
    return xhat * scale + bias, (xhat, inv_std, scale)


def _layer_norm_bwd(eps, residuals, dy):
    xhat, inv_std, scale = residuals
    g = dy * scale
    dx = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    batch_axes = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * xhat, axis=batch_axes), jnp.sum(dy, axis=batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def dropout_keep_mask(rng: Array, rate: float, shape) -> Array:
    """Bernoulli(1 - rate) mask from 16 random bits per element (threefry makes 32 bits at a time, so
    this is half the random-number work of a float32 uniform; the rate is exact to 1/65536)."""
    threshold = int(round(rate * 65536))
    return jax.random.bits(rng, shape, jnp.uint16) >= jnp.uint16(threshold)


class Dropout(nn.Module):
    """Inverted dropout (like flax's nn.Dropout, same `dropout` rng stream) with 16-bit random draws."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate <= 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        keep = dropout_keep_mask(self.make_rng("dropout"), self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


class LayerNorm(nn.Module):
    """LayerNorm whose statistics are always float32, whatever the compute dtype."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                           (features,), jnp.float32)
        bias = self.param("bias", zeros_init(("embed",)), (features,), jnp.float32)
        return layer_norm(x.astype(jnp.float32), scale, bias, self.eps).astype(self.dtype)


class Embeddings(nn.Module):
    """word + position (+ token-type, in a family that has them) embeddings -> LayerNorm -> dropout; `attend` is
    the tied MLM decoder."""

    config: BertConfig
    deterministic: bool

    def setup(self):
        c = self.config
        e = c.embedding_dim
        self.word_embeddings = self.param("word_embeddings", normal_init(c, ("vocab", "embed")),
                                          (c.vocab_size, e), jnp.float32)
        self.position_embeddings = self.param("position_embeddings", normal_init(c, ("pos", "embed")),
                                              (c.max_position_embeddings, e), jnp.float32)
        if c.family.token_types:
            self.token_type_embeddings = self.param("token_type_embeddings", normal_init(c, ("type", "embed")),
                                                    (c.type_vocab_size, e), jnp.float32)
        self.norm = LayerNorm(c.layer_norm_eps, compute_dtype(c), name="norm")
        self.dropout = Dropout(c.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids):
        # the tables gathered whole before the lookup (FSDP's all-gather of a parameter before its use), so the
        # rows come out split over the batch like the ids; a lookup into a sharded table would be re-partitioned
        # by XLA at full cost ("involuntary full rematerialization")
        whole = lambda table: shd.constrain(table, REPLICATED)  # noqa: E731
        x = (jnp.take(whole(self.word_embeddings), input_ids, axis=0)
             + jnp.take(whole(self.position_embeddings), position_ids, axis=0))  # [batch, seq, hidden]
        if self.config.family.token_types:
            x = x + jnp.take(whole(self.token_type_embeddings), token_type_ids, axis=0)
        x = self.norm(shd.constrain(x))  # rows split over the batch axes, the hidden dimension whole
        return shd.constrain(self.dropout(x, deterministic=self.deterministic))

    def attend(self, x):
        """Logits against the word embedding table (weights tied to the input embeddings)."""
        return jnp.einsum("...h,vh->...v", x, self.word_embeddings.astype(x.dtype))


def attention_mask_4d(attention_mask: Array, instance_ids: Optional[Array]) -> Array:
    """Boolean mask [batch, 1, q, k]: a query sees a key when the key is real and, for packed rows,
    belongs to the same instance."""
    if instance_ids is None:
        return attention_mask.astype(bool)[:, None, None, :]
    same = instance_ids[:, :, None] == instance_ids[:, None, :]
    return (same & (instance_ids[:, None, :] > 0))[:, None, :, :]


def cudnn_attention(q, k, v, mask, scale: float, config: BertConfig) -> Array:
    """cuDNN flash attention with cuDNN's own padding mask: the key lengths of right-padded rows (real tokens
    first, as every flaxbert batch builder makes them). What it cannot take is a ConfigError naming the
    setting, raised when the step is traced, rather than a quiet switch to another kernel (a benchmark would
    then time the wrong one): packed rows, whose block-diagonal mask would reach cuDNN only as a dense
    [batch, 1, seq, seq] additive bias; float32; and a backend without cuDNN."""
    problem = None
    if mask.shape[2] != 1:  # [batch, 1, q, k]: a per-query mask, i.e. packed rows with instance_ids
        problem = "packed rows (instance_ids) need a block-diagonal mask, which cuDNN's padding mask cannot express"
    elif config.dtype == "float32":
        problem = "cuDNN's flash kernel takes only bfloat16 or float16 (BertConfig.dtype is 'float32')"
    elif jax.default_backend() != "gpu":
        problem = f"it needs an NVIDIA GPU, and this process computes on {jax.default_backend()!r}"
    if problem:
        raise ConfigError(f"BertConfig.attention_impl='cudnn': {problem}; use attention_impl="
                          "'dot_product_attention' or 'xla' for this run")
    # A row without real tokens (a filler row) keeps one key, so that it stays finite as it does under xla.
    lengths = jnp.maximum(jnp.sum(mask[:, 0, 0, :], axis=-1, dtype=jnp.int32), 1)  # [batch]
    return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn")


class SelfAttention(nn.Module):
    config: BertConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        dtype = compute_dtype(c)

        def proj(name):
            return nn.DenseGeneral((c.num_attention_heads, c.head_dim), axis=-1, dtype=dtype,
                                   param_dtype=jnp.float32, kernel_init=normal_init(c, ("embed", "heads", "kv")),
                                   bias_init=zeros_init(("heads", "kv")), name=name)(x)

        q, k, v = proj("query"), proj("key"), proj("value")  # [batch, seq, heads, head_dim]
        scale = 1.0 / math.sqrt(c.head_dim)
        if c.attention_impl == "xla":
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale  # [batch, heads, q, k]
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
            if not self.deterministic and c.attention_probs_dropout_prob > 0:
                probs = Dropout(c.attention_probs_dropout_prob)(probs, deterministic=False)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        elif c.attention_impl == "cudnn":
            ctx = cudnn_attention(q, k, v, mask, scale, c)
        else:  # jax.nn.dot_product_attention (XLA's version) has no attention-probability dropout
            ctx = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
        return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), dtype=dtype, param_dtype=jnp.float32,
                               kernel_init=normal_init(c, ("heads", "kv", "embed")), bias_init=zeros_init(("embed",)),
                               name="output")(ctx)


class Layer(nn.Module):
    """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    config: BertConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        dtype = compute_dtype(c)
        drop = Dropout(c.hidden_dropout_prob)
        attn = SelfAttention(c, self.deterministic, name="attention")(x, mask)
        x = LayerNorm(c.layer_norm_eps, dtype, name="attention_norm")(x + drop(attn, self.deterministic))
        x = checkpoint_name(x, "attention_block_output")  # what remat_policy="minimal" keeps
        h = nn.Dense(c.intermediate_size, dtype=dtype, param_dtype=jnp.float32,
                     kernel_init=normal_init(c, ("embed", "mlp")), bias_init=zeros_init(("mlp",)), name="intermediate")(x)
        h = activation(c.hidden_act)(h)
        h = nn.Dense(c.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                     kernel_init=normal_init(c, ("mlp", "embed")), bias_init=zeros_init(("embed",)), name="output")(h)
        x = LayerNorm(c.layer_norm_eps, dtype, name="output_norm")(x + drop(h, self.deterministic))
        return shd.constrain(x), None


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # the attention half's output only: the backward pass recomputes each half from its own input, one
    # [batch, seq, hidden] array per layer beyond "full"
    "minimal": jax.checkpoint_policies.save_only_these_names("attention_block_output"),
}


class Encoder(nn.Module):
    """Layers stacked on a leading `layers` axis and run with lax.scan (unrolled when scan_layers=False:
    the parameters keep the same stacked layout either way)."""

    config: BertConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        layer = Layer
        if c.remat_policy != "none":
            layer = nn.remat(Layer, prevent_cse=False, policy=_REMAT_POLICIES[c.remat_policy])
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=nn.broadcast, length=c.num_hidden_layers,
                        unroll=1 if c.scan_layers else c.num_hidden_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(c, self.deterministic, name="layers")(x, mask)
        return x


class Pooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, cls_hidden):
        c = self.config
        y = nn.Dense(c.hidden_size, dtype=compute_dtype(c), param_dtype=jnp.float32,
                     kernel_init=normal_init(c, ("embed", "embed_out")), bias_init=zeros_init(("embed_out",)),
                     name="dense")(cls_hidden)
        return jnp.tanh(y)


def gather_positions(x: Array, positions: Array) -> Array:
    """x [batch, seq, ...], positions [batch, n] -> [batch, n, ...]."""
    idx = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx.astype(jnp.int32), axis=1)


def cls_states(x: Array, cls_positions: Optional[Array]) -> Array:
    """The [CLS] (token 0) hidden states [batch, hidden], or [batch, instances, hidden] at packed rows' positions."""
    return x[:, 0] if cls_positions is None else gather_positions(x, cls_positions)


class BertEncoder(nn.Module):
    """The `bert` parameter tree: embeddings, encoder layers, pooler (for a family that has one)."""

    config: BertConfig
    deterministic: bool = True

    def setup(self):
        c = self.config
        self.embeddings = Embeddings(c, self.deterministic)
        if c.embedding_dim != c.hidden_size:  # ELECTRA's narrower embeddings, projected up to the layers' width
            self.embeddings_project = nn.Dense(
                c.hidden_size, dtype=compute_dtype(c), param_dtype=jnp.float32,
                kernel_init=normal_init(c, ("embed", "embed_out")), bias_init=zeros_init(("embed_out",)))
        self.encoder = Encoder(c, self.deterministic)
        if self.config.family.pooler:
            self.pooler = Pooler(self.config)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None,
                 instance_ids=None, cls_positions=None) -> EncoderOutput:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = (instance_ids > 0) if instance_ids is not None else jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = default_positions(input_ids, self.config)
        else:  # given ones count from 0 in each instance (packed rows); the table's first row may be later
            position_ids = position_ids + self.config.family.first_position(self.config.pad_token_id)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        if self.config.embedding_dim != self.config.hidden_size:
            x = self.embeddings_project(x)
        x = self.encoder(x, attention_mask_4d(attention_mask, instance_ids))  # [batch, seq, hidden]
        if not self.config.family.pooler:
            return EncoderOutput(x, None)
        return EncoderOutput(x, self.pooler(cls_states(x, cls_positions)))


# ----- input checks -----------------------------------------------------------------------------

def _concrete(x) -> Optional[np.ndarray]:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return np.asarray(x)
    return None


def default_positions(input_ids: Array, config: BertConfig) -> Array:
    """Position ids when the batch gives none: 0, 1, ... (BERT); or, in a family whose positions follow the
    padding id (RoBERTa), pad + 1, pad + 2, ... over the non-padding tokens and pad at the padding ones."""
    if not config.family.positions_after_pad:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    real = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + config.pad_token_id


def check_batch(batch: Mapping[str, Any], config: BertConfig, *, seq_axis: int = 1) -> None:
    """Shape, dtype and id-range checks with errors that name the key; value checks run only on
    concrete arrays (inside jit only shapes are checked)."""
    if "input_ids" not in batch:
        raise InputError(f"batch has no 'input_ids' (keys: {sorted(batch)})")
    ids = batch["input_ids"]
    shape = tuple(ids.shape)
    if len(shape) != seq_axis + 1:
        raise InputError(f"input_ids must have {seq_axis + 1} dimensions, got shape {shape}")
    if shape[seq_axis] > config.max_sequence_length:
        offset = config.family.first_position(config.pad_token_id)
        raise InputError(f"sequence length {shape[seq_axis]} is longer than max_position_embeddings "
                         f"({config.max_position_embeddings})" + (
                             f" minus the first position {offset} ({config.model_type} positions start after "
                             f"the padding id)" if offset else ""))
    limits = {"input_ids": config.vocab_size, "position_ids": config.max_sequence_length}
    if config.family.token_types:  # otherwise token_type_ids are ignored
        limits["token_type_ids"] = config.type_vocab_size
    for key in ENCODER_KEYS:
        if key not in batch or batch[key] is None:
            continue
        value = batch[key]
        if tuple(value.shape) != shape:
            raise InputError(f"{key} has shape {tuple(value.shape)} but input_ids has shape {shape}")
        if not jnp.issubdtype(value.dtype, jnp.integer) and not jnp.issubdtype(value.dtype, jnp.bool_):
            raise InputError(f"{key} must be an integer array, got dtype {value.dtype}")
        concrete = _concrete(value)
        if concrete is not None and key in limits and concrete.size:
            lo, hi = int(concrete.min()), int(concrete.max())
            if lo < 0 or hi >= limits[key]:
                bad = hi if hi >= limits[key] else lo
                raise InputError(f"{key} contains {bad}, outside [0, {limits[key]}) for this model")


def encoder_inputs(batch: Mapping[str, Any]) -> dict:
    return {k: batch[k] for k in ENCODER_KEYS if k in batch and batch[k] is not None}


def encode(params, batch: Mapping[str, Any], config: BertConfig, *,
           dropout_rng: Optional[Array] = None) -> EncoderOutput:
    """Run the encoder. `params` is either a full tree ({"bert": ..., head: ...}) or the `bert` tree.
    Dropout is active only when `dropout_rng` is given."""
    check_batch(batch, config)
    bert_params = params["bert"] if "bert" in params else params
    module = BertEncoder(config, deterministic=dropout_rng is None)
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return module.apply({"params": bert_params}, **encoder_inputs(batch),
                        cls_positions=batch.get("cls_positions"), rngs=rngs)
