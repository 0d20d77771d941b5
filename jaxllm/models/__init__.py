"""Model construction and accounting: `build_model`, parameter counts, training FLOPs per token.

`build_model(model_cfg)` returns a Flax Linen module called as
`model.apply({"params": params}, tokens_BxL, deterministic=True)` -> logits float32 [B, L, V]
(pass `rngs={"dropout": key}` when `deterministic=False`); with `return_hidden=True` it returns the
final-norm hidden states [B, L, D] instead, and `lm_head_matrix(params, model_cfg)` the head [D, V], for
the fused LM head + cross-entropy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.gpt2 import GPT2
from jaxllm.models.layers import mlp_hidden
from jaxllm.models.llama import Llama

__all__ = ["GPT2", "Llama", "build_model", "count_params", "param_count", "flops_per_token", "mlp_hidden",
           "lm_head_matrix"]


def build_model(model_cfg) -> nn.Module:
    """The module described by the `model` config section (`name` is "gpt2" or "llama")."""
    m = model_cfg
    common = dict(vocab_size=m.vocab_size, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                  mlp_hidden=mlp_hidden(m), norm_eps=m.norm_eps, init_std=m.init_std, dropout=m.dropout,
                  tie_embeddings=m.tie_embeddings, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
                  remat=m.remat)
    if m.name == "gpt2":
        return GPT2(sequence_length=m.sequence_length, **common)
    if m.name == "llama":
        return Llama(n_kv_head=m.n_kv_head or m.n_head, rope_theta=m.rope_theta, **common)
    raise ValueError(f"model.name is '{m.name}'; choose one of gpt2, llama")


def lm_head_matrix(params, model_cfg) -> jax.Array:
    """The LM head weight [D, V] in param dtype: the token embedding transposed when tied, else lm_head."""
    if model_cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


def abstract_params(model_cfg):
    """The parameter tree as ShapeDtypeStructs, via jax.eval_shape: nothing is allocated."""
    model = build_model(model_cfg)
    tokens_1xL = jax.ShapeDtypeStruct((1, model_cfg.sequence_length), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens_1xL)["params"]


def param_count(model_cfg) -> int:
    """Number of parameters of the configured model, computed without allocating them."""
    return count_params(abstract_params(model_cfg))


def flops_per_token(model_cfg) -> float:
    """Training FLOPs per token (forward + backward) of the configured model:

        6 * (N_nonembed + V * D) + 6 * n_layer * T * D

    N_nonembed is every parameter except the token embedding, the learned positions and an untied LM
    head; V * D is the LM head's matmul, counted whether tied or not (so tying does not change the count).
    6 = 2 (multiply-add) x 3 (forward, and the two backward matmuls). The attention term is the
    12 * n_layer * T * D of QK^T and AV (forward + backward, T = sequence_length) halved because the
    causal mask makes half the scores unneeded, as MaxText counts it.
    """
    params = abstract_params(model_cfg)
    v, d = model_cfg.vocab_size, model_cfg.n_embd
    embedding = sum(count_params(params[name]) for name in ("embed", "pos_embed", "lm_head") if name in params)
    n_nonembed = count_params(params) - embedding
    attention = 6 * model_cfg.n_layer * model_cfg.sequence_length * d
    return float(6 * (n_nonembed + v * d) + attention)
