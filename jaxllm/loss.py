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


def chunked_cross_entropy(hidden_BxLxD: jax.Array, head_DxV: jax.Array, targets_BxL: jax.Array,
                          weights_BxL: jax.Array, *, chunk: int, label_smoothing: float = 0.0,
                          z_loss: float = 0.0) -> LossSums:
    """`cross_entropy(hidden @ head, ...)` without ever holding the full float32 logits [B, L, V].

    The B*L tokens are cut into chunks of `chunk` tokens (the last one padded with weight 0); a `lax.scan`
    computes each chunk's logits [chunk, V] (matmul in hidden's dtype, float32 accumulation, as
    `layers.tied_logits`) and its `cross_entropy` sums, and adds them. Each chunk is rematerialised in the
    backward pass, so only [chunk, V] logits are alive at any time, forward or backward, at the price of
    recomputing the head matmul once. Same sums as the plain path up to float32 summation order.
    """
    b, l, d = hidden_BxLxD.shape
    n = b * l
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    hidden_NxD = hidden_BxLxD.reshape(n, d)
    targets_N = targets_BxL.reshape(n).astype(jnp.int32)
    weights_N = weights_BxL.reshape(n).astype(jnp.float32)
    if pad:
        hidden_NxD = jnp.pad(hidden_NxD, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad))
        weights_N = jnp.pad(weights_N, (0, pad))
    head_DxV = head_DxV.astype(hidden_BxLxD.dtype)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_sums(hidden_CxD, targets_C, weights_C):
        logits_CxV = jnp.dot(hidden_CxD, head_DxV, preferred_element_type=jnp.float32)
        return cross_entropy(logits_CxV[None], targets_C[None], weights_C[None],
                             label_smoothing=label_smoothing, z_loss=z_loss)

    def body(total, xs):
        return jax.tree.map(jnp.add, total, chunk_sums(*xs)), None

    zeros = LossSums(*(jnp.zeros((), jnp.float32) for _ in LossSums._fields))
    total, _ = jax.lax.scan(body, zeros, (hidden_NxD.reshape(n_chunks, chunk, d),
                                          targets_N.reshape(n_chunks, chunk), weights_N.reshape(n_chunks, chunk)))
    return total
