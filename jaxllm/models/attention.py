"""Which causal-attention kernel a model runs, and the call into it.

Three implementations compute the same softmax(q k^T / sqrt(K) + causal mask) v (float32 softmax, matmuls
in the compute dtype with float32 accumulation), with grouped-query heads (query head h uses key/value head
h // R, R = H / G):

- "jaxllm": `primitives.causal_attention`, hand-written VJP whose row-major copies keep XLA:CPU's bf16 dots
  on its fast kernels (the measured CPU path); the only one that applies attention dropout.
- "xla": `jax.nn.dot_product_attention(implementation="xla")`, JAX's plain XLA lowering; what GPUs and TPUs
  run when cuDNN cannot take the shape.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention (the
  `__cudnn$fmha*` custom calls): bf16/fp16 only, head size a multiple of 8 and <= 128 (<= 256 from Hopper,
  compute capability 9.0), compute capability >= 8.0, no attention dropout (JAX's API takes none).

Packed batches (several examples per row, `segment_ids_BxL`) mask attention to each example: "jaxllm" and
"xla" take the segment mask, "cudnn" hands such a batch to "xla" (`causal_attention`).

Decoding with a KV cache (generation, MathQA scoring) runs `cached_attention` whatever the request: T new
queries attend to the S positions of a cache under a mask, not the square causal shape the three kernels
take.

`attention_impl` turns the config's request ("auto" or one of the three) into the implementation, from
facts known at trace time (backend, dtype, head size, dropout, compute capability), so the choice is a
static Python string, and every branch of the table is testable on a CPU.

Shape letters as in layers.py.
"""

from __future__ import annotations

from typing import Any

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import primitives

REQUESTS = ("auto", "cudnn", "xla", "jaxllm")  # what model.attention may say
IMPLEMENTATIONS = ("cudnn", "xla", "jaxllm")  # what attention_impl returns
CUDNN_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def cudnn_unsupported(backend: str, dtype: Any, head_dim: int, dropout: float,
                      compute_capability: tuple[int, int] | None) -> list[str]:
    """Why cuDNN flash attention cannot take this model, one short clause each; [] when it can.

    The limits are those jax 0.10 checks before it emits the custom call
    (jax/_src/cudnn/fused_attention_stablehlo.py: check_layout, check_is_flash_attention).
    """
    reasons = []
    if backend != "gpu":
        reasons.append(f"the backend is {backend}, not gpu")
    elif compute_capability is None:
        reasons.append("the GPU reports no CUDA compute capability (not an NVIDIA GPU)")
    elif compute_capability < (8, 0):
        reasons.append(f"compute capability {compute_capability[0]}.{compute_capability[1]} is below 8.0")
    if np.dtype(dtype) not in CUDNN_DTYPES:
        reasons.append(f"the compute dtype is {np.dtype(dtype).name} (cuDNN takes bfloat16 or float16)")
    max_head = 256 if compute_capability is not None and compute_capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head:
        reasons.append(f"the head size is {head_dim} (cuDNN takes a multiple of 8 up to {max_head})")
    if dropout > 0:
        reasons.append(f"attention dropout is {dropout} (jax's cuDNN attention takes none)")
    return reasons


def attention_impl(requested: str, backend: str, dtype: Any, head_dim: int, dropout: float,
                   compute_capability: tuple[int, int] | None) -> str:
    """The implementation ("cudnn", "xla" or "jaxllm") that runs a model's causal attention.

    "auto": on CPU "jaxllm" (its measured fast path); elsewhere "cudnn" when it can take the model, else
    "xla", or "jaxllm" when attention dropout is on (neither of jax's implementations applies dropout).
    An explicit request is honoured or refused: ValueError (one sentence) for "cudnn" where cuDNN cannot
    run, or "xla" with attention dropout. A refusal rather than a silent fallback: a user who names
    a kernel is measuring or debugging that kernel.
    """
    if requested not in REQUESTS:
        raise ValueError(f"model.attention is '{requested}'; choose one of {', '.join(REQUESTS)}")
    if requested == "jaxllm":
        return "jaxllm"
    if requested == "xla":
        if dropout > 0:
            raise ValueError(f"model.attention='xla' cannot apply attention dropout ({dropout}); "
                             "set model.attention=jaxllm (or auto), or model.dropout=0")
        return "xla"
    reasons = cudnn_unsupported(backend, dtype, head_dim, dropout, compute_capability)
    if requested == "cudnn":
        if reasons:
            raise ValueError(f"model.attention='cudnn' cannot run here because {'; '.join(reasons)}; "
                             "set model.attention=auto to fall back to XLA")
        return "cudnn"
    if backend == "cpu" or dropout > 0:
        return "jaxllm"
    return "xla" if reasons else "cudnn"


def device_compute_capability() -> tuple[int, int] | None:
    """(major, minor) CUDA compute capability of the first device, or None (CPU, TPU, ROCm)."""
    text = getattr(jax.devices()[0], "compute_capability", None)
    if not text:
        return None
    try:
        major, minor = (int(x) for x in str(text).split(".")[:2])
    except ValueError:
        return None
    return major, minor


def resolve(model_cfg) -> str:
    """`attention_impl` for a `model` config section on this process's default backend and first device.

    Configs saved before `model.attention` existed mean "auto".
    """
    requested = model_cfg.get("attention", "auto")
    return attention_impl(requested, jax.default_backend(), jnp.dtype(model_cfg.dtype),
                          int(model_cfg.get("head_dim", 0) or model_cfg.n_embd // model_cfg.n_head),
                          float(model_cfg.dropout),
                          device_compute_capability())


def causal_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, impl: str,
                     keep_BxHxLxL: jax.Array | None = None, dropout: float = 0.0,
                     segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    """Causal attention [B, L, H, K] in q's dtype through implementation `impl` (see `attention_impl`).

    `keep_BxHxLxL` (the attention-dropout mask) only with "jaxllm". jax's layout [B, T, N, H] is ours, and
    its grouped heads (query head n uses key/value head n // (N / K)) are our R consecutive query heads.

    `segment_ids_BxL` (int32; packed examples, 0 = padding) restricts each query to the keys of its own
    segment as well. "jaxllm" masks the scores itself; "xla" gets the same-segment mask as `mask=`. jax 0.10's
    public `jax.nn.dot_product_attention` has no segment input for cuDNN (its packed-segment offsets live in
    the private jax._src.cudnn API, and a `mask=` there becomes a dense [B, 1, L, L] bias), so "cudnn" runs
    packed batches through "xla"; without segment ids it runs as always.
    """
    if impl == "jaxllm":
        return primitives.causal_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, keep_BxHxLxL, dropout, segment_ids_BxL)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"attention implementation '{impl}'; choose one of {', '.join(IMPLEMENTATIONS)}")
    if keep_BxHxLxL is not None:
        raise ValueError(f"attention dropout needs the jaxllm implementation, not '{impl}'")
    if segment_ids_BxL is None:
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=True, implementation=impl)
    same_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=same_Bx1xLxL, is_causal=True,
                                        implementation="xla")


def cached_attention(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, positions_T: jax.Array,
                     start_B: jax.Array | None = None) -> jax.Array:
    """Attention of T queries at `positions_T` over a cache of S positions, [B, T, H, K] in q's dtype.

    The query at position p sees the cached positions <= p (later slots are zeros or stale) and, when
    `start_B` (int32 [B]) is given, none before row b's start (rows left-padded to a common length).
    Same maths and dtypes as `causal_attention`: float32 scores and softmax, matmuls in q's dtype.
    """
    b, t, h, k = q_BxTxHxK.shape
    s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
    visible_TxS = jnp.arange(s)[None, :] <= positions_T[:, None]
    if start_B is not None:
        visible_BxTxS = visible_TxS[None] & (jnp.arange(s)[None, None, :] >= start_B[:, None, None])
        visible = visible_BxTxS[:, None, None]  # broadcast over the G, R head axes of the scores
    else:
        visible = visible_TxS
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, k)
    scores_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK.astype(q_BxTxHxK.dtype),
                                  preferred_element_type=jnp.float32) / math.sqrt(k)
    scores_BxGxRxTxS = jnp.where(visible, scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(q_BxTxHxK.dtype)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxSxGxK.astype(q_BxTxHxK.dtype))
    return out_BxTxGxRxK.reshape(b, t, h, k)
