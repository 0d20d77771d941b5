"""The matmul-heavy primitives of the models, with hand-written VJPs: `linear` and `causal_attention`.

Both compute what plain jnp code would (bf16 or float32 operands, float32 accumulation); the hand-written
backward passes exist for speed on XLA:CPU, whose fast dot kernels (YNNPACK) keep bf16 operands only for a
dot whose lhs is row-major and contracted on its last axis and whose rhs is row-major and contracted on its
first. XLA upcasts every other bf16 dot to float32, about 2x slower on this hardware, and autodiff's
backward dots are exactly those other dots (x^T @ g, g @ w^T). Here every backward dot gets its transposed
operand as a real row-major copy (`transposed`), which costs a fraction of what it saves
(docs/benchmarks.md). On GPU the copies are skipped: cuBLAS reads either layout.

Shape letters as in layers.py; N is a flattened row count (tokens, or query heads x positions).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def row_major(a: jax.Array) -> jax.Array:
    """`a` as a fresh row-major array on CPU (identity elsewhere), to be used as a dot operand.

    jax lowers a transpose as a layout change that the ops after it inherit, so a value that went through
    one (a head split, a cotangent coming back through it) reaches the dot in a permuted layout, and XLA
    then keeps the dot off the fast kernels. The `where` (a select inside a call) writes the values into a
    fresh row-major array, and the barrier keeps XLA from folding a transpose back into the dot, which would
    also reach a fallback that cannot run bf16 x bf16 -> f32 at all.
    """
    if jax.default_backend() != "cpu":
        return a
    return jax.lax.optimization_barrier(jnp.where(True, a, jnp.zeros((), a.dtype)))


def transposed(a: jax.Array) -> jax.Array:
    """`a` with its last two axes swapped, as a real row-major copy on CPU (`row_major`). The barrier on
    the input keeps XLA from folding the swap into the dot that produced `a` either."""
    if jax.default_backend() != "cpu":
        return jnp.swapaxes(a, -1, -2)
    return row_major(jnp.swapaxes(jax.lax.optimization_barrier(a), -1, -2))


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b over the last axis of `a` and the second-to-last of `b`, leading axes batched, float32 out."""
    batch = tuple(range(a.ndim - 2))
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)),
                               preferred_element_type=jnp.float32)


# --- linear ------------------------------------------------------------------------------------------------


@jax.custom_vjp
def linear(x_NxI: jax.Array, kernel_IxO: jax.Array) -> jax.Array:
    """x @ kernel in x's dtype (the compute dtype), accumulated in float32; kernel is cast to x's dtype.

    Backward: d x = g @ kernel^T and d kernel = x^T @ g, both bf16 x bf16 -> float32 when x is bf16, and
    d kernel is returned in the kernel's own dtype straight from the float32 accumulator (never rounded to
    bf16 on its way to a float32 parameter).
    """
    return _matmul(x_NxI, kernel_IxO.astype(x_NxI.dtype)).astype(x_NxI.dtype)


def _linear_fwd(x_NxI, kernel_IxO):
    return linear(x_NxI, kernel_IxO), (x_NxI, kernel_IxO)


def _linear_bwd(residuals, g_NxO):
    x_NxI, kernel_IxO = residuals
    g_NxO = g_NxO.astype(x_NxI.dtype)
    dx_NxI = _matmul(g_NxO, transposed(kernel_IxO.astype(x_NxI.dtype)))
    dkernel_IxO = _matmul(transposed(x_NxI), g_NxO)
    return dx_NxI.astype(x_NxI.dtype), dkernel_IxO.astype(kernel_IxO.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


# --- causal attention --------------------------------------------------------------------------------------


def causal_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                     keep_BxHxLxL: jax.Array | None = None, dropout: float = 0.0,
                     segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(K) + causal mask) v per head, in q's dtype: [B, L, H, K].

    Query head h uses key/value head h // R (R = H / G query heads per key/value head, the PyTorch
    repeat_interleave convention). Scores, softmax and their gradients are float32; the matmuls take
    q's dtype with float32 accumulation. `keep_BxHxLxL` (bool), when given, is the attention-dropout mask:
    kept probabilities are scaled by 1 / (1 - dropout). `segment_ids_BxL` (int32), when given, also masks
    every key of another segment (packed examples: a query sees only the earlier tokens of its own example;
    padding, segment 0, sees only padding, so no row is fully masked). Without it the computation is the
    plain causal one, op for op.

    The R query heads that share a key/value head are stacked into one [R * L, K] block, so that every
    matmul is one batched [B, G] product with K and V used as they are.
    """
    b, l, h, k = q_BxLxHxK.shape
    g = k_BxLxGxK.shape[2]
    r = h // g
    q_BxGxNxK = row_major(q_BxLxHxK.reshape(b, l, g, r, k).transpose(0, 2, 3, 1, 4).reshape(b, g, r * l, k))
    k_BxGxLxK = row_major(k_BxLxGxK.transpose(0, 2, 1, 3))
    v_BxGxLxK = row_major(v_BxLxGxK.transpose(0, 2, 1, 3))
    if keep_BxHxLxL is not None:
        keep_BxGxNxL = keep_BxHxLxL.reshape(b, g, r * l, l)
        scale_BxGxNxL = jnp.where(keep_BxGxNxL, 1.0 / (1.0 - dropout), 0.0).astype(jnp.float32)
    else:
        scale_BxGxNxL = None
    out_BxGxNxK = _attention(q_BxGxNxK, k_BxGxLxK, v_BxGxLxK, scale_BxGxNxL, segment_ids_BxL)
    return out_BxGxNxK.reshape(b, g, r, l, k).transpose(0, 3, 1, 2, 4).reshape(b, l, h, k)


def _causal_mask(n: int, l: int) -> jax.Array:
    """[N, L] bool: row i (query position i mod L, the R heads stacked) may attend to key positions <= it."""
    return (jnp.arange(n) % l)[:, None] >= jnp.arange(l)[None, :]


def _segment_mask(segment_ids_BxL: jax.Array, n: int) -> jax.Array:
    """[B, 1, N, L] bool: row i (query position i mod L, the R heads stacked) may attend to key positions <= it
    of its own segment."""
    l = segment_ids_BxL.shape[1]
    query_segment_BxN = segment_ids_BxL[:, jnp.arange(n) % l]
    same_BxNxL = query_segment_BxN[:, :, None] == segment_ids_BxL[:, None, :]
    return (_causal_mask(n, l)[None] & same_BxNxL)[:, None]


def _probs(q_BxGxNxK, k_BxGxLxK, segment_ids_BxL=None):
    """Attention probabilities [B, G, N, L] in float32 (0 above the diagonal and, with segment ids, outside
    the query's segment)."""
    n, l = q_BxGxNxK.shape[2], k_BxGxLxK.shape[2]
    scores_BxGxNxL = _matmul(q_BxGxNxK, transposed(k_BxGxLxK)) / math.sqrt(q_BxGxNxK.shape[-1])
    visible = _causal_mask(n, l) if segment_ids_BxL is None else _segment_mask(segment_ids_BxL, n)
    scores_BxGxNxL = jnp.where(visible, scores_BxGxNxL, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BxGxNxL, axis=-1)


@jax.custom_vjp
def _attention(q_BxGxNxK, k_BxGxLxK, v_BxGxLxK, scale_BxGxNxL, segment_ids_BxL):
    return _attention_fwd(q_BxGxNxK, k_BxGxLxK, v_BxGxLxK, scale_BxGxNxL, segment_ids_BxL)[0]


def _attention_fwd(q_BxGxNxK, k_BxGxLxK, v_BxGxLxK, scale_BxGxNxL, segment_ids_BxL):
    dtype = q_BxGxNxK.dtype
    probs_BxGxNxL = _probs(q_BxGxNxK, k_BxGxLxK, segment_ids_BxL)
    used_BxGxNxL = probs_BxGxNxL if scale_BxGxNxL is None else probs_BxGxNxL * scale_BxGxNxL
    out_BxGxNxK = _matmul(used_BxGxNxL.astype(dtype), v_BxGxLxK).astype(dtype)
    return out_BxGxNxK, (q_BxGxNxK, k_BxGxLxK, v_BxGxLxK, scale_BxGxNxL, probs_BxGxNxL)


def _attention_bwd(residuals, dout_BxGxNxK):
    """d scores = p * (dp - sum(dp * p)) with dp = d out @ v^T (times the dropout scale); then
    d q = d scores @ k, d k = d scores^T @ q, d v = p_used^T @ d out."""
    q_BxGxNxK, k_BxGxLxK, v_BxGxLxK, scale_BxGxNxL, probs_BxGxNxL = residuals
    dtype = q_BxGxNxK.dtype
    dout_BxGxNxK = row_major(dout_BxGxNxK.astype(dtype))
    dprobs_BxGxNxL = _matmul(dout_BxGxNxK, transposed(v_BxGxLxK))
    used_BxGxNxL = probs_BxGxNxL
    if scale_BxGxNxL is not None:
        dprobs_BxGxNxL = dprobs_BxGxNxL * scale_BxGxNxL
        used_BxGxNxL = probs_BxGxNxL * scale_BxGxNxL
    row_BxGxNx1 = jnp.sum(dprobs_BxGxNxL * probs_BxGxNxL, axis=-1, keepdims=True)
    dscores_BxGxNxL = (probs_BxGxNxL * (dprobs_BxGxNxL - row_BxGxNx1)
                       / math.sqrt(q_BxGxNxK.shape[-1])).astype(dtype)
    dq_BxGxNxK = _matmul(dscores_BxGxNxL, k_BxGxLxK)
    dk_BxGxLxK = _matmul(transposed(dscores_BxGxNxL), q_BxGxNxK)
    dv_BxGxLxK = _matmul(transposed(used_BxGxNxL.astype(dtype)), dout_BxGxNxK)
    # The dropout scale and the segment ids are data (masks): None is their zero cotangent.
    return (dq_BxGxNxK.astype(dtype), dk_BxGxLxK.astype(k_BxGxLxK.dtype), dv_BxGxLxK.astype(v_BxGxLxK.dtype),
            None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
