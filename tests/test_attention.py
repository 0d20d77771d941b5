"""The attention kernel choice (models/attention.py): the dispatch table on every backend it knows, the
refusals, the XLA path equal to the measured CPU path, and (marked `gpu`, skipped elsewhere) cuDNN's fused
attention really compiled into a bf16 model's forward and backward, with the reference's numbers.

Run the GPU tests on a GPU machine with: JAX_PLATFORMS=cuda python -m pytest tests/test_attention.py -m gpu
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import loss as loss_lib
from jaxllm import models
from jaxllm.models import attention as attention_lib
from jaxllm.models import primitives

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def model_cfg(name="llama", **fields):
    """A small model config (2 layers, d=32, 4 heads of 8, vocab 64, T=16) with `fields` changed."""
    m = config_lib.default_config().model
    m.update(dict(name=name, n_layer=2, n_embd=32, n_head=4, vocab_size=64, sequence_length=16))
    m.update(fields)
    return m


def vjp_outputs(fn, args, cotangent_seed=9):
    """fn(*args) and the VJP of a fixed random cotangent, as float32 numpy arrays."""
    out, vjp = jax.vjp(fn, *args)
    cotangent = jax.random.normal(jax.random.key(cotangent_seed), out.shape).astype(out.dtype)
    return [np.asarray(x, np.float32) for x in (out, *vjp(cotangent))]


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# --- the dispatch table (pure: no GPU needed) -----------------------------------------------------------


@pytest.mark.parametrize("requested, backend, dtype, head_dim, dropout, cc, expected", [
    # CPU keeps its measured path whatever the dtype; an explicit request is honoured where it can run.
    ("auto", "cpu", BF16, 64, 0.0, None, "jaxllm"),
    ("auto", "cpu", F32, 64, 0.0, None, "jaxllm"),
    ("xla", "cpu", F32, 64, 0.0, None, "xla"),
    ("jaxllm", "gpu", BF16, 64, 0.0, (9, 0), "jaxllm"),
    # GPU: cuDNN where it can take the model ...
    ("auto", "gpu", BF16, 64, 0.0, (8, 0), "cudnn"),
    ("auto", "gpu", F16, 64, 0.0, (9, 0), "cudnn"),
    ("auto", "gpu", BF16, 128, 0.0, (8, 6), "cudnn"),
    ("auto", "gpu", BF16, 256, 0.0, (9, 0), "cudnn"),  # Hopper takes head size 256
    ("cudnn", "gpu", BF16, 8, 0.0, (8, 0), "cudnn"),
    # ... else XLA: float32, a head size it cannot tile, too old a GPU, a GPU without CUDA (ROCm) ...
    ("auto", "gpu", F32, 64, 0.0, (9, 0), "xla"),
    ("auto", "gpu", BF16, 60, 0.0, (9, 0), "xla"),
    ("auto", "gpu", BF16, 256, 0.0, (8, 0), "xla"),  # Ampere stops at 128
    ("auto", "gpu", BF16, 264, 0.0, (9, 0), "xla"),
    ("auto", "gpu", BF16, 64, 0.0, (7, 5), "xla"),
    ("auto", "gpu", BF16, 64, 0.0, None, "xla"),
    ("auto", "tpu", BF16, 64, 0.0, None, "xla"),
    # ... and with attention dropout the one kernel that applies it.
    ("auto", "gpu", BF16, 64, 0.1, (9, 0), "jaxllm"),
    ("auto", "tpu", BF16, 64, 0.1, None, "jaxllm"),
])
def test_attention_impl_dispatch_table(requested, backend, dtype, head_dim, dropout, cc, expected):
    assert attention_lib.attention_impl(requested, backend, dtype, head_dim, dropout, cc) == expected


@pytest.mark.parametrize("requested, backend, dtype, head_dim, dropout, cc, words", [
    ("cudnn", "cpu", BF16, 64, 0.0, None, "backend is cpu"),
    ("cudnn", "gpu", F32, 64, 0.0, (9, 0), "float32"),
    ("cudnn", "gpu", BF16, 12, 0.0, (9, 0), "head size is 12"),
    ("cudnn", "gpu", BF16, 256, 0.0, (8, 6), "up to 128"),
    ("cudnn", "gpu", BF16, 64, 0.0, (7, 0), "compute capability 7.0"),
    ("cudnn", "gpu", BF16, 64, 0.1, (9, 0), "dropout"),
    ("xla", "gpu", BF16, 64, 0.1, (9, 0), "dropout"),
    ("flash", "gpu", BF16, 64, 0.0, (9, 0), "choose one of auto, cudnn, xla, jaxllm"),
])
def test_impossible_requests_are_refused_with_the_reason(requested, backend, dtype, head_dim, dropout, cc, words):
    with pytest.raises(ValueError, match=r"model\.attention") as error:
        attention_lib.attention_impl(requested, backend, dtype, head_dim, dropout, cc)
    assert words in str(error.value)


def test_cudnn_refusal_names_every_reason():
    with pytest.raises(ValueError) as error:
        attention_lib.attention_impl("cudnn", "cpu", F32, 12, 0.0, None)
    message = str(error.value)
    assert "backend is cpu" in message and "float32" in message and "head size is 12" in message
    assert "model.attention=auto" in message  # and what to do


def test_build_model_resolves_the_request_on_this_backend():
    """build_model holds the resolved kernel as a static string; "cudnn" where it cannot run is a
    ConfigError at build time, before anything compiles."""
    if jax.default_backend() == "cpu":
        assert models.build_model(model_cfg(dtype="bfloat16")).attention == "jaxllm"
        with pytest.raises(config_lib.ConfigError, match="model.attention='cudnn' cannot run here"):
            models.build_model(model_cfg(dtype="bfloat16", attention="cudnn"))
    assert models.build_model(model_cfg(attention="xla")).attention == "xla"
    assert models.build_model(model_cfg(attention="jaxllm")).attention == "jaxllm"
    old = model_cfg()
    del old["attention"]  # a config.json saved before the field existed means "auto"
    assert models.build_model(old).attention == attention_lib.resolve(model_cfg())


def test_config_validates_the_attention_field():
    c = config_lib.default_config()
    assert c.model.attention == "auto"
    c.model.attention = "flash"
    with pytest.raises(config_lib.ConfigError, match="model.attention.*choose one of auto, cudnn, xla, jaxllm"):
        config_lib.validate(c)


# --- the XLA path equals the measured CPU path ---------------------------------------------------------


def random_qkv(b, l, h, g, k, dtype):
    """Standard-normal q [B, L, H, K] and k, v [B, L, G, K] in `dtype` (fixed seed)."""
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, l, h, k)).astype(dtype)
    return (q, *(jax.random.normal(key, (b, l, g, k)).astype(dtype) for key in keys[1:]))

@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_xla_attention_matches_jaxllm_attention(dtype, n_kv_head):
    """jax.nn.dot_product_attention's XLA path and primitives.causal_attention: same outputs and gradients,
    grouped-query heads included (query head h uses key/value head h // R in both)."""
    b, l, h, k = 2, 12, 4, 8
    q, kk, v = random_qkv(b, l, h, n_kv_head, k, dtype)
    xla = vjp_outputs(jax.jit(lambda *a: attention_lib.causal_attention(*a, "xla")), (q, kk, v))
    ours = vjp_outputs(jax.jit(primitives.causal_attention), (q, kk, v))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(xla, ours):
        np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("name, n_kv_head", [("llama", 2), pytest.param("gpt2", 0, marks=pytest.mark.slow)])
def test_model_with_xla_attention_matches_jaxllm_attention(name, n_kv_head):
    """A whole float32 model: logits and parameter gradients agree between the two kernels."""
    results = {}
    tokens_BxL = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    params = models.build_model(model_cfg(name, n_kv_head=n_kv_head)).init(jax.random.key(0), tokens_BxL)["params"]
    for impl in ("jaxllm", "xla"):
        model = models.build_model(model_cfg(name, n_kv_head=n_kv_head, attention=impl))
        assert model.attention == impl

        def loss(p):
            logits_BxLxV = model.apply({"params": p}, tokens_BxL)
            return jnp.mean(jax.nn.logsumexp(logits_BxLxV, -1) - logits_BxLxV[..., 0]), logits_BxLxV

        results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results["xla"],
                 results["jaxllm"])


def test_xla_attention_refuses_a_dropout_mask():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="dropout needs the jaxllm"):
        attention_lib.causal_attention(q, q, q, "xla", jnp.ones((1, 2, 4, 4), bool), 0.1)


# --- on a GPU: cuDNN really runs, and agrees with the reference ----------------------------------------

CUDNN = "__cudnn$fmha"


def gpu_cfg(**fields):
    """A bf16 llama cuDNN can take on any sm80+ GPU: head size 64, grouped-query heads (8 query, 2 kv), T=128."""
    fields = {"dtype": "bfloat16", **fields}
    return model_cfg(n_layer=2, n_embd=512, n_head=8, n_kv_head=2, vocab_size=512, sequence_length=128, **fields)


def loss_fn(model, m, tokens_BxL):
    """The train step's objective on one batch: fused LM head + cross-entropy over the final hidden states,
    as a token mean (nats)."""
    def loss(params):
        hidden_BxLxD = model.apply({"params": params}, tokens_BxL, return_hidden=True)
        head_DxV = models.lm_head_matrix(params, m)
        targets_BxL = jnp.roll(tokens_BxL, -1, axis=1)
        sums = loss_lib.chunked_cross_entropy(hidden_BxLxD, head_DxV, targets_BxL, jnp.ones(tokens_BxL.shape),
                                              chunk=128)
        return sums.loss / tokens_BxL.size
    return loss


def gpu_setup(**fields):
    m = gpu_cfg(**fields)
    model = models.build_model(m)
    tokens_BxL = jax.random.randint(jax.random.key(1), (4, m.sequence_length), 0, m.vocab_size)
    params = model.init(jax.random.key(0), tokens_BxL)["params"]
    return m, model, params, tokens_BxL


@pytest.mark.gpu
def test_auto_picks_cudnn_and_it_is_compiled_into_forward_and_backward():
    m, model, params, tokens_BxL = gpu_setup()
    assert model.attention == "cudnn"  # "auto" on an sm80+ GPU in bf16
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens_BxL).compile().as_text()
    assert CUDNN in forward
    backward = jax.jit(jax.value_and_grad(loss_fn(model, m, tokens_BxL))).lower(params).compile().as_text()
    targets = set(re.findall(r'custom_call_target="(__cudnn\$fmha\w*)"', backward))
    assert any("Backward" in t for t in targets), targets
    assert any("Backward" not in t for t in targets), targets


@pytest.mark.gpu
def test_float32_on_gpu_falls_back_to_xla_and_explicit_cudnn_is_refused():
    m = gpu_cfg(dtype="float32")
    model = models.build_model(m)
    assert model.attention == "xla"
    tokens_BxL = jnp.zeros((1, m.sequence_length), jnp.int32)
    params = model.init(jax.random.key(0), tokens_BxL)["params"]
    hlo = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens_BxL).compile().as_text()
    assert CUDNN not in hlo
    with pytest.raises(config_lib.ConfigError, match="float32"):
        models.build_model(gpu_cfg(dtype="float32", attention="cudnn"))


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv_head", [8, 2, 1])
def test_cudnn_attention_matches_the_reference_in_bf16(n_kv_head):
    """The kernel alone: output and the q/k/v gradients of a random cotangent, cuDNN on bf16 inputs vs the
    reference attention in float32 on the same (bf16-rounded) values, within bf16 rounding."""
    b, l, h, k = 2, 256, 8, 64
    q, kk, v = random_qkv(b, l, h, n_kv_head, k, BF16)
    cudnn = vjp_outputs(jax.jit(lambda *a: attention_lib.causal_attention(*a, "cudnn")), (q, kk, v))
    reference = vjp_outputs(jax.jit(primitives.causal_attention), [x.astype(F32) for x in (q, kk, v)])
    for name, got, want in zip(("out", "dq", "dk", "dv"), cudnn, reference):
        assert np.all(np.isfinite(got)), name
        assert relative_error(got, want) < 2e-2, (name, relative_error(got, want))


@pytest.mark.gpu
def test_cudnn_model_matches_the_reference_model_in_bf16():
    """The whole bf16 model: logits, loss and parameter gradients with cuDNN attention vs the same model
    with the reference kernel (attention="jaxllm"), both bf16, within bf16 rounding."""
    m, model, params, tokens_BxL = gpu_setup()
    reference = models.build_model(gpu_cfg(attention="jaxllm"))
    assert model.attention == "cudnn" and reference.attention == "jaxllm"
    logits = jax.jit(lambda p: model.apply({"params": p}, tokens_BxL))(params)
    want_logits = jax.jit(lambda p: reference.apply({"params": p}, tokens_BxL))(params)
    assert relative_error(logits, want_logits) < 2e-2
    loss, grads = jax.jit(jax.value_and_grad(loss_fn(model, m, tokens_BxL)))(params)
    want_loss, want_grads = jax.jit(jax.value_and_grad(loss_fn(reference, m, tokens_BxL)))(params)
    assert float(loss) == pytest.approx(float(want_loss), abs=1e-2)  # nats, around ln(512) = 6.2
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = _leaf(want_grads, path)
        assert np.all(np.isfinite(np.asarray(got))), path
        assert relative_error(got, want) < 5e-2, (jax.tree_util.keystr(path), relative_error(got, want))


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree
