"""Llama: RMSNorm (float32), RoPE attention with optional grouped-query heads, SwiGLU MLP, no positions.

The modern recipe's options (all off by default, which is the reference model op for op): `qk_norm`
(RMSNorm of each query and key head before RoPE, params attn/q_norm, attn/k_norm {"scale": [K]}),
`mlp_activation="relu2"` (layers.Relu2MLP: mlp/{w3, w2}), `zero_init_proj` (o and w2 start at zero, so
each block starts as the identity), `logit_softcap` (cap * tanh(logits / cap) on the plain head; the fused
head in loss.py applies the same cap) and `head_init_std` (the untied head's init: 0 = zeros).

Parameter tree: embed/embedding [V, D], blocks_i/{attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{w1,w3,w2}},
norm_f, and lm_head/kernel [D, V] when the head is untied; every linear weight is a "kernel", every norm
weight a "scale". An MoE layer's mlp is {router, w1, w3, w2} with stacked expert kernels (models/moe.py).

Decoding with a KV cache is the same module called with `cache` (`models.init_cache`), `position` and
optionally `start_B` (see `Llama.__call__`); it returns the logits and the updated cache. MoE layers route
every decoded or scored token to exactly its top-k experts (dropless): a step of one token has no
sequence to share a capacity over, so `moe.mode` and `moe.group_size` apply to the training forward only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.models import layers
from jaxllm.models.moe import MoEFeedForward, MoESpec
from jaxllm import sharding

# Hidden states split by rows over the batch axes in an SPMD-partitioned step (jaxllm/sharding.py).
ACTIVATION_AXES = ("batch", "length", "act_embed")

Dtype = Any


class Block(nn.Module):
    """x + attn(rmsnorm(x)), then x + swiglu(rmsnorm(x)); [B, L, D] -> [B, L, D] in `residual_dtype`.

    The norms read the stream and emit the compute dtype for the matmuls; the attention and MLP outputs
    (compute dtype) are cast to `residual_dtype` before they are added, so a float32 stream under bf16
    compute accumulates every layer's update in float32, as PyTorch autocast does.
    """

    n_layer: int
    n_head: int
    n_kv_head: int
    mlp_hidden: int
    norm_eps: float
    rope_theta: float
    init_std: float
    dropout: float
    dtype: Dtype
    param_dtype: Dtype
    moe: MoESpec | None = None  # set: the MLP is a mixture of SwiGLU experts (models/moe.py)
    attention: str = "jaxllm"  # the attention kernel (models/attention.py), already resolved
    residual_dtype: Dtype = jnp.float32  # the dtype of the stream x the block reads and returns
    head_dim: int = 0  # K; 0 = D / H
    rope_scaling: tuple[float, float, float, int] | None = None  # layers.rope_inv_freq
    qk_norm: bool = False  # RMSNorm on each query / key head (layers.CausalSelfAttention)
    mlp_activation: str = "swiglu"  # swiglu or relu2 (layers.Relu2MLP); MoE layers are SwiGLU experts
    zero_init_proj: bool = False  # o and w2 (every expert's too) initialised to zero

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, deterministic: bool = True, cache: dict | None = None,
                 position: jax.Array | None = None, start_B: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, positions_BxL: jax.Array | None = None):
        """x [B, L, D] -> x; with a KV `cache` (decoding, layers.CausalSelfAttention): (x, updated cache).
        `segment_ids_BxL` / `positions_BxL`: packed rows (layers.CausalSelfAttention)."""
        out_std = 0.0 if self.zero_init_proj else layers.residual_std(self.init_std, self.n_layer)
        norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        attn = layers.CausalSelfAttention(
            n_head=self.n_head, n_kv_head=self.n_kv_head, init_std=self.init_std, out_std=out_std,
            use_rope=True, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling, head_dim=self.head_dim,
            dropout=self.dropout, attention=self.attention, qk_norm=self.qk_norm, norm_eps=self.norm_eps,
            dtype=self.dtype, param_dtype=self.param_dtype, name="attn")
        if self.moe is None and self.mlp_activation == "relu2":
            mlp = layers.Relu2MLP(hidden=self.mlp_hidden, init_std=self.init_std, out_std=out_std, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="mlp")
        elif self.moe is None:
            mlp = layers.SwiGLU(hidden=self.mlp_hidden, init_std=self.init_std, out_std=out_std, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="mlp")
        else:
            mlp = MoEFeedForward(n_experts=self.moe.n_experts, top_k=self.moe.top_k, hidden=self.mlp_hidden,
                                 init_std=self.init_std, out_std=out_std, renormalize=self.moe.renormalize,
                                 # decoding routes dropless: exactly top-k experts per token (module docstring)
                                 mode=self.moe.mode if cache is None else "dropless",
                                 capacity_factor=self.moe.capacity_factor, group_size=self.moe.group_size,
                                 dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")
        x_BxLxD = x_BxLxD.astype(self.residual_dtype)
        h_BxLxD = layers.RMSNorm(**norm, name="attn_norm")(x_BxLxD)
        if cache is None and segment_ids_BxL is None and positions_BxL is None:
            h_BxLxD = attn(h_BxLxD, deterministic)
        elif cache is None:
            h_BxLxD = attn(h_BxLxD, deterministic, None, None, None, segment_ids_BxL, positions_BxL)
        else:
            h_BxLxD, cache = attn(h_BxLxD, deterministic, cache, position, start_B)
        h_BxLxD = h_BxLxD.astype(self.residual_dtype)
        x_BxLxD = x_BxLxD + nn.Dropout(self.dropout)(h_BxLxD, deterministic=deterministic)
        h_BxLxD = mlp(layers.RMSNorm(**norm, name="mlp_norm")(x_BxLxD)).astype(self.residual_dtype)
        x_BxLxD = x_BxLxD + nn.Dropout(self.dropout)(h_BxLxD, deterministic=deterministic)
        return x_BxLxD if cache is None else (x_BxLxD, cache)


class Llama(nn.Module):
    """tokens int32 [B, L] -> logits float32 [B, L, V]; n_kv_head key/value heads (= n_head: plain MHA).

    With `return_hidden=True`: the final-norm hidden states [B, L, D] in the compute dtype instead.
    With `cache` (a tuple of n_layer {"k", "v": [B, S, G, K]}, `models.init_cache`): the L tokens are at
    positions position .. position + L - 1 (int32 scalar `position`), their keys and values are written
    into the cache, and the result is (logits, updated cache); `start_B` (int32 [B]) hides the cache
    slots before it from row b, so a left-padded row scores as unpadded (RoPE is relative). Decoding
    skips `remat` (no backward pass) and routes MoE layers dropless.
    The residual stream between blocks is `residual_dtype` (layers.py's dtype policy); `attention` is the
    resolved attention kernel (models/attention.py; `models.build_model` resolves the config's request).

    Packed rows (training, several examples per row): `segment_ids_BxL` (int32, 1.. per example, 0 =
    padding) confines attention to each example and `positions_BxL` (int32, 0 at each example's start)
    sets RoPE's positions, so every example's logits are those it would get alone in a row. Both None:
    the plain forward, unchanged.
    """

    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    mlp_hidden: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    dropout: float = 0.0
    tie_embeddings: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    moe: MoESpec | None = None  # mixture-of-experts MLPs in the layers moe.is_moe_layer(i) selects
    attention: str = "jaxllm"  # "jaxllm", "xla" or "cudnn" (models/attention.py)
    residual_dtype: Dtype = jnp.float32  # the residual stream's dtype: float32 (the reference) or `dtype`
    head_dim: int = 0  # K, the size of each attention head; 0 = n_embd / n_head (imported models may differ)
    rope_scaling: tuple[float, float, float, int] | None = None  # Llama 3.1's long-context rope scaling
    qk_norm: bool = False  # the recipe's options: module docstring
    mlp_activation: str = "swiglu"
    zero_init_proj: bool = False
    logit_softcap: float = 0.0  # 0 = off
    head_init_std: float = -1.0  # untied head: < 0 = init_std, 0 = zeros

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array, deterministic: bool = True, return_hidden: bool = False,
                 cache: tuple | None = None, position: jax.Array | None = None, start_B: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, positions_BxL: jax.Array | None = None):
        embed = layers.Embed(self.vocab_size, self.n_embd, std=self.init_std, dtype=self.residual_dtype,
                             param_dtype=self.param_dtype, name="embed")
        x_BxLxD = nn.Dropout(self.dropout)(embed(tokens_BxL), deterministic=deterministic)
        x_BxLxD = sharding.constrain(x_BxLxD, ACTIVATION_AXES)
        block_cls = layers.remat_block(Block, self.remat) if cache is None else Block
        new_cache = []
        for i in range(self.n_layer):
            block = block_cls(n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head,
                              mlp_hidden=self.mlp_hidden, norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                              init_std=self.init_std, dropout=self.dropout, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              moe=self.moe if self.moe is not None and self.moe.is_moe_layer(i) else None,
                              attention=self.attention, residual_dtype=self.residual_dtype,
                              head_dim=self.head_dim, rope_scaling=self.rope_scaling, qk_norm=self.qk_norm,
                              mlp_activation=self.mlp_activation, zero_init_proj=self.zero_init_proj,
                              name=f"blocks_{i}")
            if cache is None and segment_ids_BxL is None and positions_BxL is None:
                x_BxLxD = block(x_BxLxD, deterministic)
                x_BxLxD = sharding.constrain(x_BxLxD, ACTIVATION_AXES)
            elif cache is None:  # positional: nn.remat's static_argnums count positions
                x_BxLxD = block(x_BxLxD, deterministic, None, None, None, segment_ids_BxL, positions_BxL)
                x_BxLxD = sharding.constrain(x_BxLxD, ACTIVATION_AXES)
            else:
                x_BxLxD, layer_cache = block(x_BxLxD, deterministic, cache[i], position, start_B)
                new_cache.append(layer_cache)
        x_BxLxD = layers.RMSNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="norm_f")(x_BxLxD)
        if return_hidden:  # the fused LM head + loss (loss.chunked_cross_entropy) takes it from here
            out = x_BxLxD
        elif self.tie_embeddings:
            out = layers.softcap(layers.tied_logits(x_BxLxD, embed.embedding, self.dtype), self.logit_softcap)
        else:
            head_std = self.init_std if self.head_init_std < 0 else self.head_init_std
            head = layers.lm_head(self.vocab_size, head_std, self.dtype, self.param_dtype)
            out = layers.softcap(head(x_BxLxD).astype(jnp.float32), self.logit_softcap)
        return out if cache is None else (out, tuple(new_cache))
