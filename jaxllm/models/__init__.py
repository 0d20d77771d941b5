"""Model construction and accounting: `build_model`, parameter counts, training FLOPs per token.

`build_model(model_cfg, moe_cfg=None)` returns a Flax Linen module called as
`model.apply({"params": params}, tokens_BxL, deterministic=True)` -> logits float32 [B, L, V]
(pass `rngs={"dropout": key}` when `deterministic=False`); with `return_hidden=True` it returns the
final-norm hidden states [B, L, D] instead, and `lm_head_matrix(params, model_cfg)` the head [D, V], for
the fused LM head + cross-entropy. With a `moe` config section whose n_experts > 0 the llama MLPs of the
selected layers are mixtures of experts (models/moe.py); every function here takes that section as an
optional second argument. `build(config)` is `build_model(config.model, config.moe)`: what pretraining,
the finetune stage (and its LoRA wrapper), eval and generation all construct.

Decoding with a KV cache is the same module: `model.apply({"params": params}, tokens_BxT,
cache=init_cache(model, B, S), position=p[, start_B=...])` -> (logits [B, T, V], updated cache), the T
tokens at positions p .. p + T - 1 (models/llama.py). Without `cache` the module is the training forward,
unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.models import attention as attention_lib
from jaxllm.models.gpt2 import GPT2
from jaxllm.models.layers import mlp_hidden, residual_dtype
from jaxllm.models.llama import Llama
from jaxllm.models.moe import MoESpec

__all__ = ["GPT2", "Llama", "build", "build_model", "init_cache", "count_params", "param_count",
           "active_param_count", "flops_per_token", "head_dim", "rope_scaling", "logit_softcap", "mlp_hidden", "residual_dtype", "lm_head_matrix"]


def build_model(model_cfg, moe_cfg=None) -> nn.Module:
    """The module described by the `model` config section (`name` is "gpt2" or "llama") and `moe` section.

    `model.attention` is resolved here, once, for this process's backend (models/attention.py): the module
    holds the chosen kernel as a static string. A request the hardware cannot honour ("cudnn" on a CPU, in
    float32, ...) raises ConfigError here, before anything is compiled.
    """
    m = model_cfg
    moe = MoESpec.from_config(moe_cfg)
    try:
        attention = attention_lib.resolve(m)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    common = dict(vocab_size=m.vocab_size, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                  mlp_hidden=mlp_hidden(m), norm_eps=m.norm_eps, init_std=m.init_std, dropout=m.dropout,
                  tie_embeddings=m.tie_embeddings, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
                  remat=m.remat, attention=attention, residual_dtype=residual_dtype(m))
    if m.name == "gpt2":
        if moe is not None:
            raise ConfigError("mixture-of-experts MLPs are for llama; set moe.n_experts=0 for gpt2")
        return GPT2(sequence_length=m.sequence_length, **common)
    if m.name == "llama":
        return Llama(n_kv_head=m.n_kv_head or m.n_head, rope_theta=m.rope_theta, moe=moe,
                     head_dim=m.get("head_dim", 0), rope_scaling=rope_scaling(m), qk_norm=bool(m.get("qk_norm", False)),
                     mlp_activation=m.get("mlp_activation", "swiglu"),
                     zero_init_proj=bool(m.get("zero_init_proj", False)),
                     logit_softcap=float(m.get("logit_softcap", 0.0)),
                     head_init_std=float(m.get("head_init_std", -1.0)), **common)
    raise ValueError(f"model.name is '{m.name}'; choose one of gpt2, llama")


def head_dim(model_cfg) -> int:
    """K, the size of an attention head: `model.head_dim`, or n_embd / n_head when it is 0 (or absent)."""
    return int(model_cfg.get("head_dim", 0) or model_cfg.n_embd // model_cfg.n_head)


def rope_scaling(model_cfg) -> tuple[float, float, float, int] | None:
    """The llama3 rope scaling of a `model` section as `layers.rope_inv_freq` takes it; None when off."""
    if model_cfg.get("rope_scaling", "none") != "llama3":
        return None
    return (float(model_cfg.rope_scaling_factor), float(model_cfg.rope_low_freq_factor),
            float(model_cfg.rope_high_freq_factor), int(model_cfg.rope_original_max_len))


def build(config) -> nn.Module:
    """`build_model` of a whole config: its `model` section and its `moe` section (absent in configs saved
    before mixture-of-experts existed: a dense model)."""
    return build_model(config.model, config.get("moe"))


def init_cache(model: nn.Module, batch: int, size: int) -> tuple[dict[str, jax.Array], ...]:
    """An empty KV cache for `model` (a built GPT2 or Llama): per layer {"k", "v"} zeros [B, S, G, K] in the
    compute dtype, for S = `size` positions (prompt + new tokens)."""
    g = getattr(model, "n_kv_head", model.n_head)
    shape = (batch, size, g, getattr(model, "head_dim", 0) or model.n_embd // model.n_head)
    return tuple({"k": jnp.zeros(shape, model.dtype), "v": jnp.zeros(shape, model.dtype)}
                 for _ in range(model.n_layer))


def lm_head_matrix(params, model_cfg) -> jax.Array:
    """The LM head weight [D, V] in param dtype: the token embedding transposed when tied, else lm_head.

    LoRA params ({"base", "lora"}: adapters never touch the head) give the frozen base's head.
    """
    if set(params) == {"base", "lora"}:
        params = jax.lax.stop_gradient(params["base"])
    if model_cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


def abstract_params(model_cfg, moe_cfg=None):
    """The parameter tree as ShapeDtypeStructs, via jax.eval_shape: nothing is allocated."""
    model = build_model(model_cfg, moe_cfg)
    tokens_1xL = jax.ShapeDtypeStruct((1, model_cfg.sequence_length), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens_1xL)["params"]


def param_count(model_cfg, moe_cfg=None) -> int:
    """Number of parameters of the configured model (every expert counted), computed without allocating them."""
    return count_params(abstract_params(model_cfg, moe_cfg))


def logit_softcap(model_cfg) -> float:
    """The cap of the logits (`model.logit_softcap`; 0 = off, also for configs saved before it existed)."""
    return float(model_cfg.get("logit_softcap", 0.0))


def inactive_expert_params(model_cfg, moe_cfg=None) -> int:
    """Parameters of the experts a token does not use: (E - top_k) SwiGLUs of 3 * D * F in each MoE layer."""
    moe = MoESpec.from_config(moe_cfg)
    if moe is None:
        return 0
    per_expert = 3 * model_cfg.n_embd * mlp_hidden(model_cfg)
    return moe.n_moe_layers(model_cfg.n_layer) * (moe.n_experts - moe.top_k) * per_expert


def active_param_count(model_cfg, moe_cfg=None) -> int:
    """Parameters one token passes through: all of them, less the experts its router did not pick."""
    return param_count(model_cfg, moe_cfg) - inactive_expert_params(model_cfg, moe_cfg)


def flops_per_token(model_cfg, moe_cfg=None) -> float:
    """Training FLOPs per token (forward + backward) of the configured model:

        6 * (N_nonembed + V * D) + 6 * n_layer * T * H * K

    N_nonembed is every parameter except the token embedding, the learned positions and an untied LM
    head; V * D is the LM head's matmul, counted whether tied or not (so tying does not change the count).
    6 = 2 (multiply-add) x 3 (forward, and the two backward matmuls). The attention term is the
    12 * n_layer * T * H * K of QK^T and AV (forward + backward, T = sequence_length, H * K = D unless
    model.head_dim says otherwise) halved because the
    causal mask makes half the scores unneeded, as MaxText counts it. With mixture-of-experts layers only
    the active parameters count (the top_k chosen experts and the router): the routing's own cost, not
    what a capacity factor > 1 or the dropless CPU lowering actually spend.
    The recipe's options enter through the parameters: relu2's 2 * D * F MLP (F = 4 D) in place of SwiGLU's
    3 * D * F, and qk_norm's 2 * K scales per layer (counted like every norm scale, 6 FLOPs each); the
    softcap's tanh and the norms' elementwise work are not counted, as no elementwise op is.
    """
    params = abstract_params(model_cfg, moe_cfg)
    v, d = model_cfg.vocab_size, model_cfg.n_embd
    embedding = sum(count_params(params[name]) for name in ("embed", "pos_embed", "lm_head") if name in params)
    n_nonembed = count_params(params) - embedding - inactive_expert_params(model_cfg, moe_cfg)
    attention = 6 * model_cfg.n_layer * model_cfg.sequence_length * model_cfg.n_head * head_dim(model_cfg)
    return float(6 * (n_nonembed + v * d) + attention)
