"""Next-token cross-entropy as weighted token sums.

`cross_entropy` returns sums over tokens, not means, so that the caller can add them over
gradient-accumulation micro-batches and devices and divide once by the total weight: the token mean of
k micro-batches is then exactly the token mean of one k-times bigger batch (the reference's definition).
Everything is computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import primitives


class LossSums(NamedTuple):
    """Weighted token sums (float32 scalars); a pytree, so it adds with `jax.tree.map(jnp.add, a, b)`.

    loss: sum of weight * training objective (label-smoothed NLL plus the z-loss term).
    nll: sum of weight * plain negative log-likelihood (what validation loss and perplexity report).
    correct: sum of weight * [argmax logits == target].
    weight: sum of weights (the token count when weights are 0/1).
    """

    loss: jax.Array
    nll: jax.Array
    correct: jax.Array
    weight: jax.Array


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> LossSums:
    """Weighted sums of the cross-entropy of `targets_BxL` (int32) under `logits_BxLxV` (any float dtype).

    Per token, with lse = logsumexp over the vocabulary V and eps = label_smoothing:
      nll       = lse - logits[target]
      objective = (1 - eps) * nll + eps * mean_over_V(lse - logits) + z_loss * lse**2
    (PyTorch CrossEntropyLoss's label smoothing: the target distribution is (1 - eps) one-hot plus eps
    uniform over all V classes, padded vocabulary entries included). Each is multiplied by `weights_BxL`
    (float32; 0 removes a position from every sum) and summed. Returns float32 scalars.
    """
    # Cast first: a bf16 logsumexp over 50k entries loses the digits that the loss differences live in.
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    weights_BxL = weights_BxL.astype(jnp.float32)
    targets_BxL = targets_BxL.astype(jnp.int32)

    # Stable logsumexp: subtract the (gradient-free) max so exp never overflows.
    max_BxL = jax.lax.stop_gradient(jnp.max(logits_BxLxV, axis=-1))
    lse_BxL = max_BxL + jnp.log(jnp.sum(jnp.exp(logits_BxLxV - max_BxL[..., None]), axis=-1))
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    nll_BxL = lse_BxL - target_logit_BxL

    objective_BxL = nll_BxL
    if label_smoothing:
        # mean over V of -log p = lse - mean(logits): no [B, L, V] log-probabilities are materialised.
        smooth_BxL = lse_BxL - jnp.mean(logits_BxLxV, axis=-1)
        objective_BxL = (1.0 - label_smoothing) * nll_BxL + label_smoothing * smooth_BxL
    if z_loss:
        # Keeps the normaliser near 1 (PaLM's z-loss), which keeps bf16 logits well conditioned.
        objective_BxL = objective_BxL + z_loss * jnp.square(lse_BxL)

    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    # jnp.where, not a product: a masked position with inf/nan logits must still contribute exactly 0.
    def weighted_sum(x_BxL):
        return jnp.sum(jnp.where(weights_BxL != 0, weights_BxL * x_BxL, 0.0))

    return LossSums(loss=weighted_sum(objective_BxL), nll=weighted_sum(nll_BxL),
                    correct=weighted_sum(correct_BxL), weight=jnp.sum(weights_BxL))


def mean_loss(sums: LossSums) -> jax.Array:
    """The token-mean training objective, sums.loss / max(sums.weight, 1) (float32 scalar)."""
    return sums.loss / jnp.maximum(sums.weight, 1.0)


def summarize(sums: LossSums) -> dict[str, float]:
    """Python floats for logging: loss (token-mean NLL), perplexity exp(loss), accuracy (top-1)."""
    nll, correct, weight = (float(np.asarray(x)) for x in jax.device_get((sums.nll, sums.correct, sums.weight)))
    weight = max(weight, 1.0)
    loss = nll / weight
    # exp overflows a Python float above ~709; an exploded run should log inf, not crash the logger.
    perplexity = math.exp(loss) if loss < 700 else (math.inf if loss == loss else math.nan)
    return {"loss": loss, "perplexity": perplexity, "accuracy": correct / weight}


def _chunk_terms(hidden_DxC, hidden_CxD, head_VxD, head_DxV, targets_C, weights_C, label_smoothing, z_loss,
                 with_grads, softcap=0.0):
    """One chunk of C tokens, vocabulary-major: LossSums and, if `with_grads`, the gradients of its `loss` sum,
    (dhidden [D, C] float32, dhead [V, D] float32).

    Logits are held as [V, C] so that every reduction over the vocabulary runs down axis 0, across tokens,
    which XLA:CPU vectorises (a row reduction over the last axis ran ~8x slower), and every head matmul is a
    plain [m, k] @ [k, n] product of row-major operands, which is the layout XLA:CPU's bf16 dot kernels take
    directly (a transposed operand sent them to a float32 fallback ~2-4x slower): hence the chunk arrives in
    both layouts and the head in both orientations. Per token, d objective / d logits =
    (1 + 2 z lse) softmax - (1 - eps) onehot(target) - eps / V, times the token's weight. With `softcap` > 0
    the logits are cap * tanh(raw / cap) and that derivative is taken back through the tanh:
    d objective / d raw = d objective / d logits * (1 - tanh^2).
    """
    compute_dtype = hidden_CxD.dtype
    logits_VxC = jnp.dot(head_VxD, hidden_DxC, preferred_element_type=jnp.float32)
    if softcap:
        tanh_VxC = jnp.tanh(logits_VxC / softcap)
        logits_VxC = softcap * tanh_VxC
    v, c = logits_VxC.shape
    max_C = jnp.max(logits_VxC, axis=0)
    exp_VxC = jnp.exp(logits_VxC - max_C[None, :])
    sum_C = jnp.sum(exp_VxC, axis=0)
    lse_C = max_C + jnp.log(sum_C)
    target_logit_C = logits_VxC[targets_C, jnp.arange(c)]
    nll_C = lse_C - target_logit_C
    objective_C = nll_C
    if label_smoothing:
        objective_C = (1.0 - label_smoothing) * nll_C + label_smoothing * (lse_C - jnp.mean(logits_VxC, axis=0))
    if z_loss:
        objective_C = objective_C + z_loss * jnp.square(lse_C)
    # "The target has the top logit": argmax == target except on exact ties, which an argmax pass over
    # [V, C] (a variadic reduce, the slowest op in the chunk) would break towards the lower index.
    correct_C = (target_logit_C >= max_C).astype(jnp.float32)
    live_C = weights_C != 0

    def weighted_sum(x_C):
        return jnp.sum(jnp.where(live_C, weights_C * x_C, 0.0))

    sums = LossSums(weighted_sum(objective_C), weighted_sum(nll_C), weighted_sum(correct_C), jnp.sum(weights_C))
    if not with_grads:
        return sums
    scale_C = jnp.where(live_C, weights_C, 0.0)
    probs_scale_C = scale_C * (1.0 + 2.0 * z_loss * lse_C) / sum_C
    onehot_VxC = jnp.arange(v)[:, None] == targets_C[None, :]
    dlogits_VxC = (probs_scale_C[None, :] * exp_VxC
                   - jnp.where(onehot_VxC, ((1.0 - label_smoothing) * scale_C)[None, :], 0.0)
                   - (label_smoothing / v) * scale_C[None, :])
    if softcap:
        dlogits_VxC = dlogits_VxC * (1.0 - jnp.square(tanh_VxC))
    dlogits_VxC = dlogits_VxC.astype(compute_dtype)
    dhidden_DxC = jnp.dot(head_DxV, dlogits_VxC, preferred_element_type=jnp.float32)
    dhead_VxD = jnp.dot(dlogits_VxC, hidden_CxD, preferred_element_type=jnp.float32)
    return sums, dhidden_DxC, dhead_VxD


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused_loss(hidden_NxD, head_DxV, targets_N, weights_N, chunk, label_smoothing, z_loss, softcap):
    return _scan_chunks(hidden_NxD, head_DxV, targets_N, weights_N, chunk, label_smoothing, z_loss, False, softcap)


def _scan_chunks(hidden_NxD, head_DxV, targets_N, weights_N, chunk, label_smoothing, z_loss, with_grads,
                 softcap=0.0):
    """Sum `_chunk_terms` over the N / chunk chunks; with grads: (sums, (dhidden [N, D], dhead [D, V])).

    The head is cast to the compute dtype and laid out both ways once, outside the loop, as row-major
    copies (`primitives.row_major`: the bf16 dots stay on XLA:CPU's fast kernels). The first chunk runs
    before the loop and its results start the sums, so the float32 d head [V, D] is never zero-filled.
    """
    n, d = hidden_NxD.shape
    compute_dtype = hidden_NxD.dtype
    hidden_KxCxD = hidden_NxD.reshape(n // chunk, chunk, d)
    head_VxD = primitives.row_major(head_DxV.T.astype(compute_dtype))
    head_DxV = primitives.row_major(head_DxV.astype(compute_dtype))
    xs = (primitives.transposed(hidden_KxCxD), hidden_KxCxD, targets_N.reshape(-1, chunk),
          weights_N.reshape(-1, chunk))

    def terms(x):
        hidden_DxC, hidden_CxD, targets_C, weights_C = x
        return _chunk_terms(hidden_DxC, hidden_CxD, head_VxD, head_DxV, targets_C, weights_C, label_smoothing,
                            z_loss, with_grads, softcap)

    first = terms(jax.tree.map(lambda a: a[0], xs))
    rest = jax.tree.map(lambda a: a[1:], xs)
    if not with_grads:
        total, _ = jax.lax.scan(lambda total, x: (jax.tree.map(jnp.add, total, terms(x)), None), first, rest)
        return total

    def body(carry, x):
        total, dhead_VxD = carry
        sums, dhidden_DxC, dhead_chunk_VxD = terms(x)
        return (jax.tree.map(jnp.add, total, sums), dhead_VxD + dhead_chunk_VxD), dhidden_DxC

    sums, dhidden_DxC, dhead_VxD = first
    (total, dhead_VxD), dhidden_rest = jax.lax.scan(body, (sums, dhead_VxD), rest)
    dhidden_KxDxC = jnp.concatenate([dhidden_DxC[None], dhidden_rest])
    dhidden_NxD = primitives.transposed(dhidden_KxDxC).reshape(n, d).astype(compute_dtype)
    return total, (dhidden_NxD, primitives.transposed(dhead_VxD))


def _fused_fwd(hidden_NxD, head_DxV, targets_N, weights_N, chunk, label_smoothing, z_loss, softcap):
    total, grads = _scan_chunks(hidden_NxD, head_DxV, targets_N, weights_N, chunk, label_smoothing, z_loss, True,
                                softcap)
    return total, (grads, jnp.zeros((0,), head_DxV.dtype))  # the empty array carries head's dtype


def _fused_bwd(chunk, label_smoothing, z_loss, softcap, residuals, cotangent):
    (dhidden_NxD, dhead_DxV), head_dtype_0 = residuals
    g = cotangent.loss  # the wrapper stops the gradient of nll, correct and weight: only `loss` has one
    return ((g * dhidden_NxD).astype(dhidden_NxD.dtype), (g * dhead_DxV).astype(head_dtype_0.dtype), None, None)


_fused_loss.defvjp(_fused_fwd, _fused_bwd)


# `loss.head_chunk = -1` (auto): the fused head for vocabularies at least this large, in chunks of
# AUTO_HEAD_CHUNK[backend] tokens. CPU: bench_cpu's measured best (docs/benchmarks.md). Accelerators: large
# enough that each chunk's [V, C] matmuls fill the device, small enough that the float32 [V, C] logits and
# their gradient (~0.8 GB each at V=50304, C=4096) are a small part of a 40 GB card.
AUTO_HEAD_MIN_VOCAB = 8192
AUTO_HEAD_CHUNK = {"cpu": 256}
AUTO_HEAD_CHUNK_ACCELERATOR = 4096


def head_chunk(setting: int, vocab_size: int, n_tokens: int, backend: str | None = None) -> int:
    """Tokens per chunk of the fused LM head + cross-entropy for the `loss.head_chunk` setting; 0 = plain head.

    A setting >= 0 is used as given. -1 (auto) is 0 below AUTO_HEAD_MIN_VOCAB (the [B, L, V] logits are
    small) and otherwise AUTO_HEAD_CHUNK for the backend (`jax.default_backend()` when None), capped at the
    `n_tokens` one device holds in a micro-batch, so a small per-device batch is not padded to a full chunk.
    """
    if setting >= 0:
        return setting
    if vocab_size < AUTO_HEAD_MIN_VOCAB:
        return 0
    backend = backend or jax.default_backend()
    return min(AUTO_HEAD_CHUNK.get(backend, AUTO_HEAD_CHUNK_ACCELERATOR), n_tokens)


def chunked_cross_entropy(hidden_BxLxD: jax.Array, head_DxV: jax.Array, targets_BxL: jax.Array,
                          weights_BxL: jax.Array, *, chunk: int, label_smoothing: float = 0.0,
                          z_loss: float = 0.0, softcap: float = 0.0) -> LossSums:
    """`cross_entropy(hidden @ head, ...)` without ever holding the float32 logits [B, L, V]; with `softcap`
    > 0, `cross_entropy(cap * tanh(hidden @ head / cap), ...)` (the model's `logit_softcap`).

    The B*L tokens are cut into chunks of `chunk` tokens (the last one padded with weight 0). In one
    `lax.scan` over the chunks, a custom VJP computes for each chunk the logits [V, chunk] (hidden's dtype,
    float32 accumulation), the sums, d(loss)/d(logits) in closed form and from it d hidden and d head
    (float32 accumulation over chunks), so the backward pass only scales them by the incoming cotangent.
    Three head matmuls in all, as the plain path. Gradients flow through `loss` only (to hidden and head;
    targets and weights are data); `nll`, `correct` and `weight` are returned under stop_gradient. Same sums
    and gradients as the plain path up to float32 summation order, except that `correct` counts a token
    whose target ties for the top logit (argmax takes the lowest index). Layout and speed:
    `_chunk_terms`, docs/benchmarks.md.
    """
    b, l, d = hidden_BxLxD.shape
    n = b * l
    pad = -n % chunk
    hidden_NxD = hidden_BxLxD.reshape(n, d)
    targets_N = targets_BxL.reshape(n).astype(jnp.int32)
    weights_N = weights_BxL.reshape(n).astype(jnp.float32)
    if pad:
        hidden_NxD = jnp.pad(hidden_NxD, ((0, pad), (0, 0)))
        targets_N, weights_N = jnp.pad(targets_N, (0, pad)), jnp.pad(weights_N, (0, pad))
    sums = _fused_loss(hidden_NxD, head_DxV, targets_N, weights_N, chunk, float(label_smoothing), float(z_loss),
                       float(softcap))
    return LossSums(sums.loss, *(jax.lax.stop_gradient(x) for x in sums[1:]))
