"""The encoder against HF PyTorch on real weights, and the model's own invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxbert
from flaxbert.config import REMAT_POLICIES
from flaxbert.hf import load_pretrained


def _sentences(data_dir, n=10):
    rows = (data_dir / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    # Pick sentences of clearly different lengths so the batch has real padding.
    rows = sorted((r.split("\t")[0] for r in rows), key=len)
    step = len(rows) // n
    return [rows[i * step] for i in range(n)]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_pretrained(str(minilm_dir), head=None)


@pytest.fixture(scope="module")
def batch(minilm, data_dir):
    enc = minilm.tokenizer(_sentences(data_dir), padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_minilm_matches_hf_pytorch(minilm, batch, minilm_dir):
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padding is exercised
    assert minilm.report.missing == [] and minilm.report.unexpected == []
    out = flaxbert.encode(minilm.params, batch, minilm.config)
    ref = BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        r = ref(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
    mask = batch["attention_mask"].astype(bool)
    hidden_diff = np.abs(np.asarray(out.last_hidden_state)[mask] - r.last_hidden_state.numpy()[mask]).max()
    pooled_diff = np.abs(np.asarray(out.pooled_output) - r.pooler_output.numpy()).max()
    print(f"MiniLM vs HF PyTorch: hidden max|diff| {hidden_diff:.2e}, pooled {pooled_diff:.2e}")
    assert hidden_diff <= 1e-4
    assert pooled_diff <= 1e-4


def test_gradients_match_hf_pytorch(minilm, batch, minilm_dir):
    """The hand-written LayerNorm / GELU backward passes, end to end: parameter gradients of a fixed
    function of the hidden states agree with torch autograd through HF BertModel on the real weights."""
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    proj = np.random.default_rng(0).normal(size=batch["input_ids"].shape + (minilm.config.hidden_size,))
    proj = proj.astype(np.float32) * batch["attention_mask"][..., None]

    def objective(params):
        return jnp.sum(flaxbert.encode(params, batch, minilm.config).last_hidden_state * proj)

    grads = jax.grad(objective)(minilm.params)["bert"]
    ref = BertModel.from_pretrained(str(minilm_dir)).eval()
    out = ref(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}).last_hidden_state
    (out * torch.as_tensor(proj)).sum().backward()
    tg = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.grad is not None}
    layers = grads["encoder"]["layers"]
    pairs = {
        "embeddings.word_embeddings.weight": grads["embeddings"]["word_embeddings"],
        "embeddings.LayerNorm.weight": grads["embeddings"]["norm"]["scale"],
        "embeddings.LayerNorm.bias": grads["embeddings"]["norm"]["bias"],
        "encoder.layer.0.attention.self.query.weight": layers["attention"]["query"]["kernel"][0].reshape(384, 384).T,
        "encoder.layer.2.attention.output.LayerNorm.weight": layers["attention_norm"]["scale"][2],
        "encoder.layer.3.intermediate.dense.weight": layers["intermediate"]["kernel"][3].T,
        "encoder.layer.3.intermediate.dense.bias": layers["intermediate"]["bias"][3],
        "encoder.layer.5.output.dense.weight": layers["output"]["kernel"][5].T,
        "encoder.layer.5.output.LayerNorm.bias": layers["output_norm"]["bias"][5],
    }
    for name, ours in pairs.items():
        theirs = tg[name]
        err = np.max(np.abs(np.asarray(ours) - theirs)) / (np.max(np.abs(theirs)) + 1e-12)
        assert err < 2e-4, f"{name}: relative gradient error {err:.2e}"


def test_custom_vjps_match_autodiff_of_the_formulas():
    from flaxbert.model import gelu_exact, gelu_tanh, layer_norm

    x = jax.random.normal(jax.random.key(0), (3, 5, 64)) * 3
    w = jax.random.normal(jax.random.key(3), x.shape)
    for ours, approximate in ((gelu_exact, False), (gelu_tanh, True)):
        ref = lambda v, a=approximate: jax.nn.gelu(v, approximate=a)  # noqa: E731
        np.testing.assert_allclose(ours(x), ref(x), atol=1e-5)
        g1 = jax.grad(lambda v: jnp.sum(ours(v) * w))(x)
        g2 = jax.grad(lambda v: jnp.sum(ref(v) * w))(x)
        np.testing.assert_allclose(g1, g2, atol=1e-5)
    scale = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (64,))
    bias = jax.random.normal(jax.random.key(2), (64,))

    def textbook(v, s, b):
        m = jnp.mean(v, -1, keepdims=True)
        return (v - m) / jnp.sqrt(jnp.var(v, -1, keepdims=True) + 1e-12) * s + b

    ours = jax.grad(lambda *a: jnp.sum(layer_norm(*a, 1e-12) * w), argnums=(0, 1, 2))(x, scale, bias)
    ref = jax.grad(lambda *a: jnp.sum(textbook(*a) * w), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_dropout_mask_rate_and_scale():
    from flaxbert.model import Dropout, dropout_keep_mask

    keep = np.asarray(dropout_keep_mask(jax.random.key(0), 0.1, (2000, 500)))
    assert abs(keep.mean() - 0.9) < 0.002  # 1M draws: 5 standard deviations is 0.0015
    x = jnp.ones((1000, 100))
    y = Dropout(0.25).apply({}, x, False, rngs={"dropout": jax.random.key(1)})
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_array_equal(Dropout(0.25).apply({}, x, True), x)


def test_bf16_compute_close_to_fp32(minilm, batch):
    cfg16 = minilm.config.replace(dtype="bfloat16")
    out32 = flaxbert.encode(minilm.params, batch, minilm.config)
    out16 = flaxbert.encode(minilm.params, batch, cfg16)
    assert out16.last_hidden_state.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(minilm.params))
    mask = batch["attention_mask"].astype(bool)
    a = np.asarray(out16.last_hidden_state, np.float32)[mask]
    b = np.asarray(out32.last_hidden_state)[mask]
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel <= 2e-2, rel


def _tiny(**kw):
    return flaxbert.BertConfig.tiny(vocab_size=128, max_position_embeddings=64, **kw)


def _random_batch(cfg, b=3, s=16, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, s + 1, size=b)
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": (rng.integers(5, cfg.vocab_size, (b, s)) * mask).astype(np.int32),
            "token_type_ids": ((np.arange(s)[None] >= lengths[:, None] // 2) * mask).astype(np.int32),
            "attention_mask": mask,
            "masked_lm_positions": rng.integers(0, 4, (b, 3)).astype(np.int32),
            "masked_lm_ids": rng.integers(5, cfg.vocab_size, (b, 3)).astype(np.int32),
            "masked_lm_weights": np.ones((b, 3), np.float32),
            "next_sentence_labels": rng.integers(0, 2, (b,)).astype(np.int32)}


def _loss_and_grads(cfg, params, batch, dropout_rng=None):
    from flaxbert.losses import pretraining_losses

    def loss(p):
        terms = pretraining_losses(flaxbert.apply_head(p, batch, cfg, "pretraining", dropout_rng=dropout_rng), batch)
        return terms["mlm"].mean + terms["nsp"].mean

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("variant", [dict(scan_layers=False)]
                         + [dict(remat_policy=p) for p in REMAT_POLICIES if p != "none"]
                         + [pytest.param(dict(scan_layers=False, remat_policy=p), marks=pytest.mark.slow)  # for time
                            for p in ("dots_no_batch", "minimal")], ids=str)
def test_scan_unroll_and_remat_agree(variant):
    """Every remat policy BertConfig accepts runs, scanned and unrolled, with the loss and gradients of none."""
    base = _tiny()
    other = base.replace(**variant)
    params = flaxbert.init(base, jax.random.key(1), head="pretraining")
    batch = _random_batch(base)
    rng = jax.random.key(7)  # dropout on: the layers must draw the same masks in every variant
    l0, g0 = _loss_and_grads(base, params, batch, rng)
    l1, g1 = _loss_and_grads(other, params, batch, rng)
    assert abs(float(l0) - float(l1)) <= 1e-6 * abs(float(l0))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g0, g1))
    assert max(diffs) <= 1e-5
    h0 = flaxbert.encode(params, batch, base).last_hidden_state
    h1 = flaxbert.encode(params, batch, other).last_hidden_state
    np.testing.assert_allclose(np.asarray(h0), np.asarray(h1), atol=1e-5)


def test_dropout_uses_the_given_rng():
    cfg = _tiny()
    params = flaxbert.init(cfg, jax.random.key(0))
    batch = _random_batch(cfg)
    a = flaxbert.encode(params, batch, cfg, dropout_rng=jax.random.key(1)).last_hidden_state
    b = flaxbert.encode(params, batch, cfg, dropout_rng=jax.random.key(1)).last_hidden_state
    c = flaxbert.encode(params, batch, cfg, dropout_rng=jax.random.key(2)).last_hidden_state
    d = flaxbert.encode(params, batch, cfg).last_hidden_state
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(d))


def test_dot_product_attention_matches_xla():
    cfg = _tiny()
    params = flaxbert.init(cfg, jax.random.key(0), head="pretraining")
    batch = _random_batch(cfg)
    a = flaxbert.apply_head(params, batch, cfg)
    b = flaxbert.apply_head(params, batch, cfg.replace(attention_impl="dot_product_attention"))
    np.testing.assert_allclose(np.asarray(a.mlm_logits), np.asarray(b.mlm_logits), atol=1e-4)


@pytest.mark.parametrize("dtype, packed, reason", [
    ("bfloat16", True, "packed rows"),  # checked first, so it is seen on a CPU too
    ("float32", False, "bfloat16 or float16"),
    ("bfloat16", False, "needs an NVIDIA GPU"),  # this CPU: the combination that runs on a GPU
])
def test_cudnn_attention_refuses_what_it_cannot_take_with_a_clear_error(dtype, packed, reason):
    cfg = _tiny(attention_impl="cudnn", dtype=dtype)
    params = flaxbert.init(cfg.replace(attention_impl="xla"), jax.random.key(0))  # the same parameters
    batch = _random_batch(cfg)
    if packed:
        batch["instance_ids"] = batch["attention_mask"] * (1 + (np.arange(16)[None] >= 8))
    with pytest.raises(flaxbert.ConfigError, match=f"attention_impl='cudnn': .*{reason}.*'dot_product_attention'"):
        flaxbert.encode(params, batch, cfg)


def test_padding_does_not_change_real_tokens():
    cfg = _tiny()
    params = flaxbert.init(cfg, jax.random.key(0))
    batch = _random_batch(cfg, b=1, s=8)
    batch["attention_mask"][:] = 1
    padded = {k: np.pad(batch[k], ((0, 0), (0, 8))) for k in ("input_ids", "token_type_ids", "attention_mask")}
    padded["input_ids"][:, 8:] = 77  # garbage under the mask must not leak into real positions
    a = flaxbert.encode(params, batch, cfg).last_hidden_state
    b = flaxbert.encode(params, padded, cfg).last_hidden_state[:, :8]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_heads_shapes_and_logical_axes():
    cfg = _tiny()
    batch = _random_batch(cfg)
    shapes = {
        "pretraining": lambda o: (o.mlm_logits.shape, o.nsp_logits.shape) == ((3, 3, 128), (3, 2)),
        "masked_lm": lambda o: o.mlm_logits.shape == (3, 3, 128),
        "sequence_classification": lambda o: o.logits.shape == (3, 5),
        "token_classification": lambda o: o.logits.shape == (3, 16, 5),
        "question_answering": lambda o: o.start_logits.shape == o.end_logits.shape == (3, 16),
    }
    for head, ok in shapes.items():
        params = flaxbert.init(cfg, jax.random.key(0), head=head, num_labels=5)
        assert ok(flaxbert.apply_head(params, batch, cfg)), head
        axes = flaxbert.logical_axes(cfg, head, num_labels=5)
        flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        flat_params = jax.tree.leaves(params)
        assert len(flat_axes) == len(flat_params)
        for spec, p in zip(flat_axes, flat_params):
            assert len(spec) == p.ndim and all(name is not None for name in spec), (head, spec, p.shape)
    params = flaxbert.init(cfg, jax.random.key(0), head="multiple_choice")
    mc = {k: np.stack([batch[k], batch[k][::-1]], axis=1) for k in ("input_ids", "token_type_ids", "attention_mask")}
    assert flaxbert.apply_head(params, mc, cfg).logits.shape == (3, 2)


def test_config_validation_and_hf_round_trip():
    with pytest.raises(flaxbert.ConfigError, match="not divisible"):
        flaxbert.BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(flaxbert.ConfigError, match="hidden_act"):
        flaxbert.BertConfig(hidden_act="gelu_magic")
    with pytest.raises(flaxbert.ConfigError, match="model_type"):
        flaxbert.BertConfig.from_hf_config({"model_type": "albert"})
    transformers = pytest.importorskip("transformers")
    cfg = flaxbert.BertConfig.small()
    hf = transformers.BertConfig(**cfg.to_hf_config())
    assert flaxbert.BertConfig.from_hf_config(hf) == cfg
    sizes = {name: (c.num_hidden_layers, c.hidden_size) for name in ("tiny", "mini", "small", "medium", "base", "large")
             for c in [flaxbert.BertConfig.preset(name)]}
    assert sizes == {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512),
                     "base": (12, 768), "large": (24, 1024)}


def test_flops_per_token_counts_matmuls():
    cfg = flaxbert.BertConfig.base()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flaxbert.param_shapes(cfg)["bert"]["encoder"]))
    # Forward: ~2 FLOPs per encoder weight per token + attention; training triples it.
    fwd = cfg.flops_per_token(128, training=False, masked_fraction=0.0)
    assert 2 * n_params <= fwd <= 2 * n_params * 1.1
    assert cfg.flops_per_token(128) == pytest.approx(3 * cfg.flops_per_token(128, training=False))


def test_bad_inputs_are_named(minilm, batch):
    bad = dict(batch)
    bad["input_ids"] = batch["input_ids"].copy()
    bad["input_ids"][0, 1] = minilm.config.vocab_size
    with pytest.raises(flaxbert.InputError, match=r"input_ids contains 30522"):
        flaxbert.encode(minilm.params, bad, minilm.config)
    long = {k: np.zeros((1, minilm.config.max_position_embeddings + 1), np.int32) for k in batch}
    with pytest.raises(flaxbert.InputError, match="longer than max_position_embeddings"):
        flaxbert.encode(minilm.params, long, minilm.config)
    with pytest.raises(flaxbert.InputError, match="token_type_ids has shape"):
        flaxbert.encode(minilm.params, {**batch, "token_type_ids": batch["token_type_ids"][:, :3]}, minilm.config)
