"""The hand-written VJPs of models/primitives.py equal what autodiff of the plain jnp code gives, in float32
and bf16, with grouped-query heads and attention dropout; and on CPU they, the fused LM head that uses
the same row-major copies, and a whole bf16 model's gradient keep their dots bf16."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import loss as loss_lib
from jaxllm import models
from jaxllm.models import primitives


def plain_linear(x_NxI, kernel_IxO):
    return jnp.dot(x_NxI, kernel_IxO.astype(x_NxI.dtype), preferred_element_type=jnp.float32).astype(x_NxI.dtype)


def plain_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, keep_BxHxLxL=None, dropout=0.0):
    """Textbook causal attention with key/value heads repeated for their R query heads."""
    h, g, k = q_BxLxHxK.shape[2], k_BxLxGxK.shape[2], q_BxLxHxK.shape[3]
    k_BxLxHxK = jnp.repeat(k_BxLxGxK, h // g, axis=2)
    v_BxLxHxK = jnp.repeat(v_BxLxGxK, h // g, axis=2)
    scores = jnp.einsum("blhk,bmhk->bhlm", q_BxLxHxK, k_BxLxHxK, preferred_element_type=jnp.float32) / math.sqrt(k)
    l = scores.shape[-1]
    scores = jnp.where(jnp.tril(jnp.ones((l, l), bool)), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if keep_BxHxLxL is not None:
        probs = jnp.where(keep_BxHxLxL, probs / (1.0 - dropout), 0.0)
    out = jnp.einsum("bhlm,bmhk->blhk", probs.astype(q_BxLxHxK.dtype), v_BxLxHxK, preferred_element_type=jnp.float32)
    return out.astype(q_BxLxHxK.dtype)


def grads(fn, args, cotangent_seed=9):
    """The output and the VJP of a random cotangent, all as float32 numpy arrays."""
    out, vjp = jax.vjp(fn, *args)
    cotangent = jax.random.normal(jax.random.key(cotangent_seed), out.shape).astype(out.dtype)
    return [np.asarray(x, np.float32) for x in (out, *vjp(cotangent))]


TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_matches_autodiff(dtype):
    keys = jax.random.split(jax.random.key(0), 2)
    x_NxI = jax.random.normal(keys[0], (24, 16)).astype(dtype)
    kernel_IxO = jax.random.normal(keys[1], (16, 40))  # float32 parameter
    got = grads(jax.jit(primitives.linear), (x_NxI, kernel_IxO))
    want = grads(plain_linear, (x_NxI, kernel_IxO))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL[dtype])


def test_linear_kernel_gradient_keeps_the_parameter_dtype():
    x_NxI = jax.random.normal(jax.random.key(0), (8, 16)).astype(jnp.bfloat16)
    kernel_IxO = jax.random.normal(jax.random.key(1), (16, 32))
    dx, dkernel = jax.grad(lambda x, w: jnp.sum(primitives.linear(x, w).astype(jnp.float32)), argnums=(0, 1))(
        x_NxI, kernel_IxO)
    assert dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_causal_attention_matches_autodiff(dtype, n_kv_head):
    b, l, h, k = 2, 12, 4, 8
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, l, h, k)).astype(dtype)
    kk = jax.random.normal(keys[1], (b, l, n_kv_head, k)).astype(dtype)
    v = jax.random.normal(keys[2], (b, l, n_kv_head, k)).astype(dtype)
    got = grads(jax.jit(primitives.causal_attention), (q, kk, v))
    want = grads(plain_attention, (q, kk, v))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL[dtype])


@pytest.mark.slow
def test_causal_attention_with_dropout_matches_autodiff():
    b, l, h, k, rate = 2, 10, 4, 8, 0.3
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (b, l, h, k))
    kk, v = (jax.random.normal(key, (b, l, 2, k)) for key in keys[1:3])
    keep = jax.random.bernoulli(keys[3], 1.0 - rate, (b, h, l, l))
    got = grads(jax.jit(lambda *a: primitives.causal_attention(*a, keep, rate)), (q, kk, v))
    want = grads(lambda *a: plain_attention(*a, keep, rate), (q, kk, v))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_attention_is_causal():
    q, k, v = (jax.random.normal(key, (1, 8, 2, 4)) for key in jax.random.split(jax.random.key(3), 3))
    out = primitives.causal_attention(q, k, v)
    changed = primitives.causal_attention(q, k.at[:, 5:].set(0.0), v.at[:, 5:].set(7.0))
    np.testing.assert_allclose(out[:, :5], changed[:, :5], rtol=1e-6)
    assert not np.allclose(out[:, 5:], changed[:, 5:])


def compiled_dots(fn, *args):
    """[(lhs dtype, rhs dtype)] of every dot in the compiled HLO of jit(fn)(*args)."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    dtypes = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    return [(dtypes[lhs], dtypes[rhs]) for lhs, rhs in re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout workaround is for XLA:CPU")


@cpu_only
def test_backward_dots_stay_bf16_on_cpu():
    """The reason the VJPs exist: every dot of a bf16 linear + attention backward pass runs with bf16
    operands (XLA:CPU upcasts a dot whose operands it cannot feed to its fast kernels to float32)."""
    n, d, h = 64, 32, 4

    def loss(x, w_q, w_k, w_v):
        q, k, v = (primitives.linear(x, w).reshape(2, n // 2, h, d // h) for w in (w_q, w_k, w_v))
        return jnp.sum(jnp.square(primitives.causal_attention(q, k, v).astype(jnp.float32)))

    args = [jax.random.normal(jax.random.key(0), (n, d)).astype(jnp.bfloat16)]
    args += [jax.random.normal(jax.random.key(i), (d, d)) for i in (1, 2, 3)]
    dots = compiled_dots(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
    assert len(dots) == 3 + 3 * 2 + 2 + 4  # q/k/v linear forward and backward, attention forward and backward
    assert set(dots) == {("bf16", "bf16")}


@cpu_only
@pytest.mark.parametrize("chunk", [64, 16])  # one chunk (no loop), four
def test_fused_head_dots_stay_bf16_on_cpu(chunk):
    """The fused LM head + cross-entropy (loss.py) uses the same row-major copies: its three head matmuls
    per chunk keep bf16 operands, with the head tied (an embedding's transpose) as in the real models."""
    hidden_BxLxD = jax.random.normal(jax.random.key(0), (2, 32, 64)).astype(jnp.bfloat16)
    embedding_VxD = jax.random.normal(jax.random.key(1), (320, 64))
    targets_BxL, weights_BxL = jnp.zeros((2, 32), jnp.int32), jnp.ones((2, 32))

    def loss(h, e):
        return loss_lib.chunked_cross_entropy(h, e.T, targets_BxL, weights_BxL, chunk=chunk).loss

    dots = compiled_dots(jax.grad(loss, argnums=(0, 1)), hidden_BxLxD, embedding_VxD)
    assert len(dots) == 3 * (2 if chunk == 16 else 1)  # the first chunk runs before the loop
    assert set(dots) == {("bf16", "bf16")}


@cpu_only
@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("residual", ["float32", "compute"])
def test_model_gradient_dots_stay_bf16_on_cpu(name, residual):
    """A whole bf16 model's gradient through the fused head, as the train step takes it: every dot keeps
    bf16 operands with the float32 residual stream (the default) as with the bf16 one. The float32 stream
    meets the matmuls only through the norms (bf16 out) and the cotangents the Dense VJPs cast to bf16."""
    m = config_lib.default_config().model
    m.update(dict(name=name, n_layer=2, n_embd=64, n_head=4, vocab_size=320, sequence_length=64,
                  dtype="bfloat16", residual_dtype=residual))
    model = models.build_model(m)
    tokens_BxL = jax.random.randint(jax.random.key(1), (2, 64), 0, 320)
    params = model.init(jax.random.key(0), tokens_BxL)["params"]

    def loss(p):
        hidden_BxLxD = model.apply({"params": p}, tokens_BxL, return_hidden=True)
        return loss_lib.chunked_cross_entropy(hidden_BxLxD, models.lm_head_matrix(p, m), tokens_BxL,
                                              jnp.ones((2, 64)), chunk=64).loss

    dots = compiled_dots(jax.grad(loss), params)
    # 2 layers x (3 per linear: 7 llama, 6 gpt2; + 6 attention) + 3 head matmuls x 2 chunks (one before the loop)
    assert len(dots) == (60 if name == "llama" else 54)
    assert set(dots) == {("bf16", "bf16")}
