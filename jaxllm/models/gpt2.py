"""GPT-2 (the hackathon baseline): learned positions, pre-LayerNorm blocks, exact-GELU MLP, tied LM head.

Parameter tree: embed/embedding [V, D], pos_embed/embedding [T, D], blocks_i/{ln_1, attn/{q,k,v,o},
ln_2, mlp/{fc, proj}}, ln_f, and lm_head/kernel [D, V] if untied (the reference ties); every linear weight is a "kernel", every norm weight a "scale".
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.models import layers
from jaxllm import sharding

# Hidden states split by rows over the batch axes in an SPMD-partitioned step (jaxllm/sharding.py).
ACTIVATION_AXES = ("batch", "length", "act_embed")

Dtype = Any


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); [B, L, D] -> [B, L, D] in `residual_dtype`.

    As llama's block: norms emit the compute dtype for the matmuls, and the attention and MLP outputs are
    cast to `residual_dtype` before they are added to the stream.
    """

    n_layer: int
    n_head: int
    mlp_hidden: int
    norm_eps: float
    init_std: float
    dropout: float
    dtype: Dtype
    param_dtype: Dtype
    attention: str = "jaxllm"  # the attention kernel (models/attention.py), already resolved
    residual_dtype: Dtype = jnp.float32  # the dtype of the stream x the block reads and returns

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, deterministic: bool = True, cache: dict | None = None,
                 position: jax.Array | None = None):
        """x [B, L, D] -> x; with a KV `cache` (decoding, layers.CausalSelfAttention): (x, updated cache)."""
        out_std = layers.residual_std(self.init_std, self.n_layer)
        norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        attn = layers.CausalSelfAttention(
            n_head=self.n_head, n_kv_head=self.n_head, init_std=self.init_std, out_std=out_std,
            use_rope=False, dropout=self.dropout, attention=self.attention, dtype=self.dtype,
            param_dtype=self.param_dtype, name="attn")
        mlp = layers.GeluMLP(hidden=self.mlp_hidden, init_std=self.init_std, out_std=out_std, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="mlp")
        x_BxLxD = x_BxLxD.astype(self.residual_dtype)
        h_BxLxD = layers.LayerNorm(**norm, name="ln_1")(x_BxLxD)
        if cache is None:
            h_BxLxD = attn(h_BxLxD, deterministic)
        else:
            h_BxLxD, cache = attn(h_BxLxD, deterministic, cache, position)
        h_BxLxD = h_BxLxD.astype(self.residual_dtype)
        x_BxLxD = x_BxLxD + nn.Dropout(self.dropout)(h_BxLxD, deterministic=deterministic)
        h_BxLxD = mlp(layers.LayerNorm(**norm, name="ln_2")(x_BxLxD)).astype(self.residual_dtype)
        x_BxLxD = x_BxLxD + nn.Dropout(self.dropout)(h_BxLxD, deterministic=deterministic)
        return x_BxLxD if cache is None else (x_BxLxD, cache)


class GPT2(nn.Module):
    """tokens int32 [B, L] (L <= sequence_length) -> logits float32 [B, L, V].

    With `return_hidden=True`: the final-norm hidden states [B, L, D] in the compute dtype instead.
    With `cache` and `position` (as Llama's): (logits, updated cache) of tokens at positions position ..
    position + L - 1, which must stay below sequence_length. No `start_B`: learned absolute positions
    make a left-padded row score differently from an unpadded one.
    The residual stream (token + position embeddings, then each block's updates) is `residual_dtype`.
    """

    vocab_size: int
    sequence_length: int
    n_layer: int
    n_embd: int
    n_head: int
    mlp_hidden: int
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dropout: float = 0.0
    tie_embeddings: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    attention: str = "jaxllm"  # "jaxllm", "xla" or "cudnn" (models/attention.py)
    residual_dtype: Dtype = jnp.float32  # the residual stream's dtype: float32 (the reference) or `dtype`

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array, deterministic: bool = True, return_hidden: bool = False,
                 cache: tuple | None = None, position: jax.Array | None = None):
        l = tokens_BxL.shape[1]
        embed = layers.Embed(self.vocab_size, self.n_embd, std=self.init_std, dtype=self.residual_dtype,
                             param_dtype=self.param_dtype, name="embed")
        pos_embed = layers.Embed(self.sequence_length, self.n_embd, std=self.init_std, dtype=self.residual_dtype,
                                 param_dtype=self.param_dtype, name="pos_embed")
        positions_L = jnp.arange(l) if cache is None else position + jnp.arange(l)
        x_BxLxD = embed(tokens_BxL) + pos_embed(positions_L)[None]
        x_BxLxD = nn.Dropout(self.dropout)(x_BxLxD, deterministic=deterministic)
        x_BxLxD = sharding.constrain(x_BxLxD, ACTIVATION_AXES)
        block_cls = layers.remat_block(Block, self.remat) if cache is None else Block
        new_cache = []
        for i in range(self.n_layer):
            block = block_cls(n_layer=self.n_layer, n_head=self.n_head, mlp_hidden=self.mlp_hidden,
                              norm_eps=self.norm_eps, init_std=self.init_std, dropout=self.dropout,
                              dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
                              residual_dtype=self.residual_dtype, name=f"blocks_{i}")
            if cache is None:
                x_BxLxD = block(x_BxLxD, deterministic)
                x_BxLxD = sharding.constrain(x_BxLxD, ACTIVATION_AXES)
            else:
                x_BxLxD, layer_cache = block(x_BxLxD, deterministic, cache[i], position)
                new_cache.append(layer_cache)
        x_BxLxD = layers.LayerNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                   name="ln_f")(x_BxLxD)
        if return_hidden:  # the fused LM head + loss (loss.chunked_cross_entropy) takes it from here
            out = x_BxLxD
        elif self.tie_embeddings:
            out = layers.tied_logits(x_BxLxD, embed.embedding, self.dtype)
        else:
            head = layers.lm_head(self.vocab_size, self.init_std, self.dtype, self.param_dtype)
            out = head(x_BxLxD).astype(jnp.float32)
        return out if cache is None else (out, tuple(new_cache))
