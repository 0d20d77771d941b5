"""The building blocks both models share: norms, RoPE, causal attention, MLPs, remat and the LM head.

Dtype policy (the same in every block): parameters are stored in `param_dtype` (float32); matmuls run in
the compute `dtype` (float32 or bfloat16) with float32 accumulation; norms, RoPE angles and the attention
softmax are computed in float32 and cast back to `dtype`; logits are float32. The residual stream between
blocks is carried in the models' `residual_dtype` (float32 by default, as PyTorch autocast keeps it, even
under bf16 compute): the embedding rows enter it in that dtype, each block adds its attention and MLP
outputs to it in that dtype, and the norms read it and hand the matmuls the compute dtype.

Shape letters: B batch, L query positions, M key positions, D model width, H query heads, G key/value
heads, R query heads per key/value head (H = G * R), K head size, F MLP hidden width, V vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm.models import attention as attention_lib
from jaxllm.models import primitives

Dtype = Any
LINEAR_OUTPUT = "linear_output"  # checkpoint name of every Dense output (what remat="dots" keeps)


def normal(std: float) -> nn.initializers.Initializer:
    """N(0, std^2), the reference init (PyTorch `normal_`, not truncated); std == 0: exact zeros (the recipe's
    zero-initialised projections and head)."""
    if std == 0:
        return nn.initializers.zeros
    return nn.initializers.normal(stddev=std)


def residual_std(init_std: float, n_layer: int) -> float:
    """Std of the projections that write into the residual stream: init_std / sqrt(2 * n_layer)."""
    return init_std / math.sqrt(2 * n_layer)


def residual_dtype(model_cfg) -> jnp.dtype:
    """The residual stream's dtype for a `model` config section: float32 for `residual_dtype="float32"`
    (the default, and what configs saved before the field existed get), the compute dtype for "compute"."""
    if model_cfg.get("residual_dtype", "float32") == "compute":
        return jnp.dtype(model_cfg.dtype)
    return jnp.dtype(jnp.float32)


def mlp_hidden(model_cfg) -> int:
    """MLP hidden width F: `model_cfg.mlp_hidden` if > 0, else gpt2 and llama's relu2 MLP: 4*d; llama: the
    SwiGLU rule.

    The SwiGLU rule rounds int(2 * 4 * d / 3) up to a multiple of `mlp_multiple_of` (2048 at d=768,
    2816 at d=1024), which keeps the parameter count of a 4*d GELU MLP.
    """
    if model_cfg.mlp_hidden > 0:
        return int(model_cfg.mlp_hidden)
    d = model_cfg.n_embd
    if model_cfg.name == "gpt2" or model_cfg.get("mlp_activation", "swiglu") == "relu2":
        return 4 * d
    h, m = int(2 * 4 * d / 3), model_cfg.mlp_multiple_of
    return m * ((h + m - 1) // m)


class Dense(nn.Module):
    """Bias-free linear layer [..., I] -> [..., O] through `primitives.linear`; its weight is a leaf named "kernel"
    [I, O] (the weight-decay mask keys on it), initialised like flax's nn.Dense, so the parameter trees
    and their initial values are the same."""

    features: int
    std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_IxO = self.param("kernel", normal(self.std), (x.shape[-1], self.features), self.param_dtype)
        x_NxI = x.astype(self.dtype).reshape(-1, x.shape[-1])
        y_NxO = checkpoint_name(primitives.linear(x_NxI, kernel_IxO), LINEAR_OUTPUT)  # for remat="dots"
        return y_NxO.reshape(*x.shape[:-1], self.features)


class Embed(nn.Module):
    """Embedding table "embedding" [V, D] in param dtype, initialised N(0, std^2) like flax's nn.Embed (same
    parameter and values); ids [...] -> rows [..., D] gathered first and cast to `dtype` after, so a bf16
    model never converts the whole table (nn.Embed casts it all, every step)."""

    num_embeddings: int
    features: int
    std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", normal(self.std), (self.num_embeddings, self.features),
                                    self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, computed in float32, returned in `dtype`."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.initializers.ones, (x_BxLxD.shape[-1],), self.param_dtype)
        x32_BxLxD = x_BxLxD.astype(jnp.float32)
        ms_BxLx1 = jnp.mean(jnp.square(x32_BxLxD), axis=-1, keepdims=True)
        y32_BxLxD = x32_BxLxD * jax.lax.rsqrt(ms_BxLx1 + self.eps) * scale_D.astype(jnp.float32)
        return y32_BxLxD.astype(self.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale over the last axis (no bias, as the reference), in float32."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.initializers.ones, (x_BxLxD.shape[-1],), self.param_dtype)
        x32_BxLxD = x_BxLxD.astype(jnp.float32)
        mean_BxLx1 = jnp.mean(x32_BxLxD, axis=-1, keepdims=True)
        centered_BxLxD = x32_BxLxD - mean_BxLx1
        var_BxLx1 = jnp.mean(jnp.square(centered_BxLxD), axis=-1, keepdims=True)
        y32_BxLxD = centered_BxLxD * jax.lax.rsqrt(var_BxLx1 + self.eps) * scale_D.astype(jnp.float32)
        return y32_BxLxD.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
    """The K/2 rotary frequencies theta^(-2i/K), float32, optionally rescaled for long contexts.

    `scaling` = (factor, low_freq_factor, high_freq_factor, original_max_len) is Llama 3.1's "llama3"
    rope scaling (transformers' `_compute_llama3_parameters`): wavelengths longer than
    original_max_len / low_freq_factor are stretched by `factor`, those shorter than
    original_max_len / high_freq_factor are kept, and the band between is interpolated smoothly.
    """
    inv_freq_half = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq_half
    factor, low_freq_factor, high_freq_factor, original_max_len = scaling
    wavelen_half = 2 * math.pi / inv_freq_half
    scaled_half = jnp.where(wavelen_half > original_max_len / low_freq_factor, inv_freq_half / factor, inv_freq_half)
    smooth_half = (original_max_len / wavelen_half - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_half = (1 - smooth_half) * scaled_half / factor + smooth_half * scaled_half
    medium_half = (wavelen_half >= original_max_len / high_freq_factor) & (wavelen_half <= original_max_len / low_freq_factor)
    return jnp.where(medium_half, smoothed_half, scaled_half)


def rope_angles(positions_L: jax.Array, head_dim: int, theta: float,
                scaling: tuple[float, float, float, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the RoPE angles, each float32 [L, K/2]: angle(p, i) = p * inv_freq_i (`rope_inv_freq`).

    Positions are cast to float32 first: in bfloat16 (8 mantissa bits) integers above 256 are rounded,
    which would silently give distant tokens the same angle.
    """
    positions_L = positions_L.astype(jnp.float32)
    inv_freq_half = rope_inv_freq(head_dim, theta, scaling)
    angles_LxHalf = positions_L[:, None] * inv_freq_half[None, :]
    return jnp.cos(angles_LxHalf), jnp.sin(angles_LxHalf)


def apply_rope(x_BxLxNxK: jax.Array, cos_LxHalf: jax.Array, sin_LxHalf: jax.Array) -> jax.Array:
    """Rotate each adjacent pair (2i, 2i+1) of every head's K dims by angle(position, i).

    x is [B, L, N, K] with any number N of heads; the angles are [L, K/2] (one position per index, shared
    by the batch) or [B, L, K/2] (each row its own positions: packed examples). The rotation is done in
    float32 and the result is returned in x's dtype.
    """
    b, l, n, k = x_BxLxNxK.shape
    x_BxLxNxHalfx2 = x_BxLxNxK.astype(jnp.float32).reshape(b, l, n, k // 2, 2)
    x0, x1 = x_BxLxNxHalfx2[..., 0], x_BxLxNxHalfx2[..., 1]
    if cos_LxHalf.ndim == 3:  # [B, L, K/2]
        cos, sin = cos_LxHalf[:, :, None, :], sin_LxHalf[:, :, None, :]
    else:
        cos = cos_LxHalf[None, :, None, :]
        sin = sin_LxHalf[None, :, None, :]
    rotated_BxLxNxHalfx2 = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated_BxLxNxHalfx2.reshape(b, l, n, k).astype(x_BxLxNxK.dtype)


class CausalSelfAttention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention, optionally with RoPE on queries and keys.

    Projections q [D, H*K], k and v [D, G*K], o [H*K, D], all bias-free. Each of the G key/value heads
    serves R = H/G consecutive query heads. Scores use scale 1/sqrt(K) and a float32 softmax; `attention`
    names the kernel (models/attention.py: "jaxllm", "xla" or "cudnn", already resolved from the config's
    request); attention dropout, when on, drops probabilities after the softmax (jaxllm only).

    Decoding: given a `cache` {"k", "v": [B, S, G, K]} the T tokens of x sit at positions position ..
    position + T - 1; their keys and values are written into the cache at those slots and the queries
    attend to every cached position up to their own (`attention.cached_attention`, `start_B` hiding a
    left-padded row's padding). Returns (output, the updated cache) then; without a cache the output alone,
    by the training code path unchanged.

    Packed rows (training only): `segment_ids_BxL` (int32, 1.. per example, 0 = padding) keeps each query
    to the keys of its own example, and `positions_BxL` (int32, restarting at 0 at each example) gives RoPE
    each token's position within its example, so a packed example computes what it would alone. Without
    them (None) the attention is the plain causal one over positions 0 .. L-1, op for op.
    """

    n_head: int
    n_kv_head: int
    init_std: float
    out_std: float
    use_rope: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[float, float, float, int] | None = None  # llama3 rope scaling (rope_inv_freq)
    head_dim: int = 0  # K; 0 = D / H
    dropout: float = 0.0
    attention: str = "jaxllm"  # the kernel: attention_lib.attention_impl's answer, never "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    qk_norm: bool = False  # RMSNorm over K of every query and key head ("q_norm", "k_norm": scale [K]), before RoPE
    norm_eps: float = 1e-5  # the qk norms' eps

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, deterministic: bool = True, cache: dict | None = None,
                 position: jax.Array | None = None, start_B: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, positions_BxL: jax.Array | None = None):
        b, l, d = x_BxLxD.shape
        if cache is not None and (segment_ids_BxL is not None or positions_BxL is not None):
            raise ValueError("packed rows (segment_ids_BxL, positions_BxL) are for training, not KV-cache decoding")
        h, g = self.n_head, self.n_kv_head
        k = self.head_dim or d // h
        proj = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        q_BxLxHxK = proj(h * k, self.init_std, name="q")(x_BxLxD).reshape(b, l, h, k)
        k_BxLxGxK = proj(g * k, self.init_std, name="k")(x_BxLxD).reshape(b, l, g, k)
        v_BxLxGxK = proj(g * k, self.init_std, name="v")(x_BxLxD).reshape(b, l, g, k)
        if self.qk_norm:  # one scale [K] per norm, shared by the heads (OLMo 2, Qwen3); cached keys are normed
            norm = functools.partial(RMSNorm, eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            q_BxLxHxK = norm(name="q_norm")(q_BxLxHxK)
            k_BxLxGxK = norm(name="k_norm")(k_BxLxGxK)
        positions_L = None if cache is None else position + jnp.arange(l)  # decoding: where the tokens sit
        if self.use_rope and positions_BxL is not None:
            cos_BLxHalf, sin_BLxHalf = rope_angles(positions_BxL.reshape(-1), k, self.rope_theta, self.rope_scaling)
            cos_LxHalf, sin_LxHalf = cos_BLxHalf.reshape(b, l, -1), sin_BLxHalf.reshape(b, l, -1)  # [B, L, K/2]
            q_BxLxHxK = apply_rope(q_BxLxHxK, cos_LxHalf, sin_LxHalf)
            k_BxLxGxK = apply_rope(k_BxLxGxK, cos_LxHalf, sin_LxHalf)
        elif self.use_rope:
            cos_LxHalf, sin_LxHalf = rope_angles(jnp.arange(l) if cache is None else positions_L, k, self.rope_theta,
                                                  self.rope_scaling)
            q_BxLxHxK = apply_rope(q_BxLxHxK, cos_LxHalf, sin_LxHalf)
            k_BxLxGxK = apply_rope(k_BxLxGxK, cos_LxHalf, sin_LxHalf)
        if cache is not None:
            at = (0, position, 0, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_BxLxGxK.astype(cache["k"].dtype), at),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v_BxLxGxK.astype(cache["v"].dtype), at)}
            out_BxLxHxK = attention_lib.cached_attention(q_BxLxHxK, cache["k"], cache["v"], positions_L, start_B)
            return proj(d, self.out_std, name="o")(out_BxLxHxK.reshape(b, l, h * k)), cache
        keep_BxHxLxL = None
        if self.dropout > 0 and not deterministic:
            keep_BxHxLxL = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout, (b, h, l, l))
        out_BxLxHxK = attention_lib.causal_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, self.attention,
                                                     keep_BxHxLxL, self.dropout, segment_ids_BxL)
        return proj(d, self.out_std, name="o")(out_BxLxHxK.reshape(b, l, h * k))


class GeluMLP(nn.Module):
    """GPT-2 MLP: D -> F ("fc"), exact GELU, F -> D ("proj"), bias-free."""

    hidden: int
    init_std: float
    out_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        proj = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h_BxLxF = nn.gelu(proj(self.hidden, self.init_std, name="fc")(x_BxLxD), approximate=False)
        return proj(x_BxLxD.shape[-1], self.out_std, name="proj")(h_BxLxF)


class SwiGLU(nn.Module):
    """Llama MLP: w2(silu(w1(x)) * w3(x)); w1 gate and w3 up are D -> F, w2 down is F -> D, bias-free."""

    hidden: int
    init_std: float
    out_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        proj = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        gate_BxLxF = proj(self.hidden, self.init_std, name="w1")(x_BxLxD)
        up_BxLxF = proj(self.hidden, self.init_std, name="w3")(x_BxLxD)
        return proj(x_BxLxD.shape[-1], self.out_std, name="w2")(nn.silu(gate_BxLxF) * up_BxLxF)


class Relu2MLP(nn.Module):
    """The recipe's non-gated MLP (modded-nanogpt): w2(relu(w3(x))^2); w3 up D -> F, w2 down F -> D, bias-free.

    The kernels are named as SwiGLU's up and down (so LoRA's up/down targets and the sharding rules apply);
    there is no gate (w1). relu and the square run in the compute dtype, like SwiGLU's silu and product.
    """

    hidden: int
    init_std: float
    out_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        proj = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        up_BxLxF = proj(self.hidden, self.init_std, name="w3")(x_BxLxD)
        return proj(x_BxLxD.shape[-1], self.out_std, name="w2")(jnp.square(nn.relu(up_BxLxF)))


def remat_block(block_cls: type[nn.Module], remat: str) -> type[nn.Module]:
    """The block class wrapped for rematerialisation: none, full (recompute all), dots (save matmuls).

    "dots" saves the outputs of the projections and MLP matmuls (every Dense output, by its checkpoint
    name: they run inside `primitives.linear`, where a policy keyed on dot_general cannot see them, and
    any other dot without batch dimensions) and recomputes the attention core and elementwise ops. The
    wrapped block's parameters keep the same names, so one parameter tree serves every policy.
    `deterministic` (argument 2, counting self) is static.
    """
    if remat == "none":
        return block_cls
    if remat == "full":
        return nn.remat(block_cls, static_argnums=(2,))
    if remat == "dots":
        return nn.remat(block_cls, static_argnums=(2,),
                        policy=jax.checkpoint_policies.save_from_both_policies(
                            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                            jax.checkpoint_policies.save_only_these_names(LINEAR_OUTPUT)))
    raise ValueError(f"model.remat is '{remat}'; choose one of none, full, dots")


def tied_logits(x_BxLxD: jax.Array, embedding_VxD: jax.Array, dtype: Dtype) -> jax.Array:
    """LM head sharing the token embedding: x @ E^T in `dtype` with float32 accumulation and output."""
    return jnp.einsum("bld,vd->blv", x_BxLxD.astype(dtype), embedding_VxD.astype(dtype),
                      preferred_element_type=jnp.float32)


def softcap(logits: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(logits / cap) (Gemma 2, modded-nanogpt): every logit in (-cap, cap), ~unchanged when small;
    cap == 0: the logits as they are."""
    if not cap:
        return logits
    return cap * jnp.tanh(logits / cap)


def lm_head(vocab_size: int, std: float, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    """Untied LM head "lm_head" (kernel [D, V]) whose matmul accumulates and returns float32."""
    return nn.Dense(vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=normal(std),
                    dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32),
                    name="lm_head")
