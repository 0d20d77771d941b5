"""Llama: RMSNorm (float32), RoPE attention with optional grouped-query heads, SwiGLU MLP, no positions.

Parameter tree: embed/embedding [V, D], blocks_i/{attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{w1,w3,w2}},
norm_f, and lm_head/kernel [D, V] when the head is untied; every linear weight is a "kernel", every norm
weight a "scale". An MoE layer's mlp is {router, w1, w3, w2} with stacked expert kernels (models/moe.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.models import layers
from jaxllm.models.moe import MoEFeedForward, MoESpec

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

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, deterministic: bool = True) -> jax.Array:
        out_std = layers.residual_std(self.init_std, self.n_layer)
        norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        attn = layers.CausalSelfAttention(
            n_head=self.n_head, n_kv_head=self.n_kv_head, init_std=self.init_std, out_std=out_std,
            use_rope=True, rope_theta=self.rope_theta, dropout=self.dropout, attention=self.attention,
            dtype=self.dtype, param_dtype=self.param_dtype, name="attn")
        if self.moe is None:
            mlp = layers.SwiGLU(hidden=self.mlp_hidden, init_std=self.init_std, out_std=out_std, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="mlp")
        else:
            mlp = MoEFeedForward(n_experts=self.moe.n_experts, top_k=self.moe.top_k, hidden=self.mlp_hidden,
                                 init_std=self.init_std, out_std=out_std, renormalize=self.moe.renormalize,
                                 mode=self.moe.mode, capacity_factor=self.moe.capacity_factor, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="mlp")
        x_BxLxD = x_BxLxD.astype(self.residual_dtype)
        h_BxLxD = attn(layers.RMSNorm(**norm, name="attn_norm")(x_BxLxD), deterministic)
        h_BxLxD = h_BxLxD.astype(self.residual_dtype)
        x_BxLxD = x_BxLxD + nn.Dropout(self.dropout)(h_BxLxD, deterministic=deterministic)
        h_BxLxD = mlp(layers.RMSNorm(**norm, name="mlp_norm")(x_BxLxD)).astype(self.residual_dtype)
        return x_BxLxD + nn.Dropout(self.dropout)(h_BxLxD, deterministic=deterministic)


class Llama(nn.Module):
    """tokens int32 [B, L] -> logits float32 [B, L, V]; n_kv_head key/value heads (= n_head: plain MHA).

    With `return_hidden=True`: the final-norm hidden states [B, L, D] in the compute dtype instead.
    The residual stream between blocks is `residual_dtype` (layers.py's dtype policy); `attention` is the
    resolved attention kernel (models/attention.py; `models.build_model` resolves the config's request).
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

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array, deterministic: bool = True,
                 return_hidden: bool = False) -> jax.Array:
        embed = layers.Embed(self.vocab_size, self.n_embd, std=self.init_std, dtype=self.residual_dtype,
                             param_dtype=self.param_dtype, name="embed")
        x_BxLxD = nn.Dropout(self.dropout)(embed(tokens_BxL), deterministic=deterministic)
        block_cls = layers.remat_block(Block, self.remat)
        for i in range(self.n_layer):
            x_BxLxD = block_cls(n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head,
                                mlp_hidden=self.mlp_hidden, norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                                init_std=self.init_std, dropout=self.dropout, dtype=self.dtype,
                                param_dtype=self.param_dtype,
                                moe=self.moe if self.moe is not None and self.moe.is_moe_layer(i) else None,
                                attention=self.attention, residual_dtype=self.residual_dtype,
                                name=f"blocks_{i}")(x_BxLxD, deterministic)
        x_BxLxD = layers.RMSNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="norm_f")(x_BxLxD)
        if return_hidden:  # the fused LM head + loss (loss.chunked_cross_entropy) takes it from here
            return x_BxLxD
        if self.tie_embeddings:
            return layers.tied_logits(x_BxLxD, embed.embedding, self.dtype)
        head = layers.lm_head(self.vocab_size, self.init_std, self.dtype, self.param_dtype)
        return head(x_BxLxD).astype(jnp.float32)
