"""Mixture-of-experts feed-forward: a softmax top-k router over SwiGLU experts, and its auxiliary losses.

`MoEFeedForward` replaces the llama SwiGLU MLP in the layers `MoESpec.is_moe_layer` selects. Routing,
per token: router logits = x @ router [D, E] (float32), probs = softmax(logits), the top-k probabilities
are the gates (renormalised to sum to 1 only if `renormalize`; the reference does not), and the output is
sum over the k chosen experts of gate * swiglu_expert(x). Two ways to run the experts, same maths:

- "dropless": the N*k (token, expert) assignments are sorted by expert and the experts run as grouped
  matmuls (`jax.lax.ragged_dot`) over the sorted rows; no token is ever dropped.
- "capacity": GShard-style. Each run of `group_size` consecutive positions of a sequence (default: the
  whole sequence) is one group; each expert takes at most C = ceil(capacity_factor * G * k / E)
  assignments per group, filled first with every token's first choice in position order, then the
  second choices, and so on; assignments beyond C are dropped (they contribute 0, the residual carries
  the token). Dispatch and combine are one-hot einsums, so the experts run as one dense batched matmul
  of fixed shape [groups, E, C, D]. The two einsums cost 2 * G * k * capacity_factor * D FLOPs per token
  each, G * capacity_factor / (3 * F) of the experts' work: smaller groups are cheaper but drop more.

Inference (the KV-cache path of generation and MathQA scoring, models/llama.py) routes "dropless" whatever
`moe.mode` says: every token goes to exactly its top-k experts. A decoding step holds one token per row,
so there is no sequence (or group) to take a capacity over, and a scored row's result must not depend on
its padding or on the other rows of its batch. A capacity-trained model therefore decodes as it would
train with no drops (the same logits where training drops nothing); the training forward, including the
validation loss, keeps `moe.mode` and `moe.group_size`.

The module reports, with `self.sow("intermediates", ...)` (kept only when the caller applies the model
with `mutable=["intermediates"]`): `load_balance_loss` (Switch: E * sum_i f_i * P_i, f_i the fraction of
the N*k assignments routed to expert i before dropping, P_i the mean router probability of expert i; 1.0
under uniform routing), `z_loss` (mean over tokens of logsumexp(router logits)^2), `expert_load` [E]
(f itself) and `dropped_fraction` (the fraction of the N*k assignments dropped; 0 when dropless).
`router_stats` gathers them per layer and `aux_loss` combines them (see there).

Parameter tree of an MoE layer's `mlp`: router/kernel [D, E], w1/kernel and w3/kernel [E, D, F],
w2/kernel [E, F, D]. The stacked expert weights are leaves named "kernel" with ndim 3, so the optimizer's
decay mask treats them as the linear weights they are; the router is a linear layer too.

Shape letters as in layers.py, plus E experts, K (here) the top-k choices, N = B * L tokens, M = N * K
assignments, C the per-sequence expert capacity.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.models import layers

Dtype = Any
MODES = ("dropless", "capacity")
STAT_NAMES = ("load_balance_loss", "z_loss", "expert_load", "dropped_fraction")


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """The `moe` config section as a hashable value for Flax module fields."""

    n_experts: int
    top_k: int
    every: int = 1
    renormalize: bool = False
    mode: str = "dropless"
    capacity_factor: float = 1.25
    group_size: int = 0

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based) is MoE when i % every == every - 1: every layer for 1, layers 1, 3, ... for 2."""
        return i % self.every == self.every - 1

    def n_moe_layers(self, n_layer: int) -> int:
        return sum(self.is_moe_layer(i) for i in range(n_layer))

    @classmethod
    def from_config(cls, moe_cfg) -> "MoESpec | None":
        """The spec of a `moe` config section, or None when it is off (n_experts == 0) or absent."""
        if moe_cfg is None or not moe_cfg.n_experts:
            return None
        return cls(n_experts=int(moe_cfg.n_experts), top_k=int(moe_cfg.top_k), every=int(moe_cfg.every),
                   renormalize=bool(moe_cfg.renormalize), mode=str(moe_cfg.mode),
                   capacity_factor=float(moe_cfg.capacity_factor), group_size=int(moe_cfg.group_size))


def capacity(tokens_per_group: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments each expert accepts per group: ceil(capacity_factor * tokens * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / n_experts))


class ExpertKernel(nn.Module):
    """A stack of E weight matrices [E, in, out] stored as a leaf named "kernel" (decayed like a Dense's)."""

    shape: tuple[int, int, int]
    std: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", layers.normal(self.std), self.shape, self.param_dtype)


class MoEFeedForward(nn.Module):
    """x [B, L, D] -> sum of gate * SwiGLU expert over each token's top-k experts, [B, L, D] in `dtype`."""

    n_experts: int
    top_k: int
    hidden: int
    init_std: float
    out_std: float
    renormalize: bool = False
    mode: str = "dropless"
    capacity_factor: float = 1.25
    group_size: int = 0  # capacity mode: positions per routing group; 0 = the whole sequence
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        b, l, d = x_BxLxD.shape
        e, k, f = self.n_experts, self.top_k, self.hidden
        # The router runs in float32: its softmax and top-k decide discrete routes, bf16 ties flip them.
        router = nn.Dense(e, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                          kernel_init=layers.normal(self.init_std), name="router")
        logits_BxLxE = router(x_BxLxD.astype(jnp.float32))
        probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
        gates_BxLxK, experts_BxLxK = jax.lax.top_k(probs_BxLxE, k)
        if self.renormalize:
            gates_BxLxK = gates_BxLxK / jnp.sum(gates_BxLxK, axis=-1, keepdims=True)

        kernel = functools.partial(ExpertKernel, param_dtype=self.param_dtype)
        w1_ExDxF = kernel((e, d, f), self.init_std, name="w1")().astype(self.dtype)
        w3_ExDxF = kernel((e, d, f), self.init_std, name="w3")().astype(self.dtype)
        w2_ExFxD = kernel((e, f, d), self.out_std, name="w2")().astype(self.dtype)
        x_BxLxD = x_BxLxD.astype(self.dtype)

        if self.mode == "dropless":
            y_BxLxD = _dropless(x_BxLxD, gates_BxLxK, experts_BxLxK, w1_ExDxF, w3_ExDxF, w2_ExFxD)
            dropped = jnp.zeros((), jnp.float32)
        elif self.mode == "capacity":
            g = self.group_size or l
            if l % g:
                raise ValueError(f"moe.group_size ({g}) must divide the sequence length ({l})")
            c = capacity(g, e, k, self.capacity_factor)
            y_GxgxD, dropped = _capacity(x_BxLxD.reshape(-1, g, d), gates_BxLxK.reshape(-1, g, k),
                                         experts_BxLxK.reshape(-1, g, k), w1_ExDxF, w3_ExDxF, w2_ExFxD, c)
            y_BxLxD = y_GxgxD.reshape(b, l, d)
        else:
            raise ValueError(f"moe.mode is '{self.mode}'; choose one of {', '.join(MODES)}")

        # Statistics and auxiliary losses over all B * L tokens (padding included, as in the reference).
        load_E = jnp.mean(jax.nn.one_hot(experts_BxLxK, e, dtype=jnp.float32), axis=(0, 1, 2))
        mean_prob_E = jnp.mean(probs_BxLxE, axis=(0, 1))
        # f (load) comes from a top-k, so only P carries gradient: the loss pushes probability away from
        # experts that are already over-used (Switch Transformer, eq. 4).
        self.sow("intermediates", "load_balance_loss", e * jnp.sum(jax.lax.stop_gradient(load_E) * mean_prob_E))
        self.sow("intermediates", "z_loss", jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxLxE, axis=-1))))
        self.sow("intermediates", "expert_load", load_E)
        self.sow("intermediates", "dropped_fraction", dropped)
        return y_BxLxD.astype(self.dtype)


def _swiglu_dense(x_BxExCxD, w1_ExDxF, w3_ExDxF, w2_ExFxD):
    gate = jnp.einsum("becd,edf->becf", x_BxExCxD, w1_ExDxF)
    up = jnp.einsum("becd,edf->becf", x_BxExCxD, w3_ExDxF)
    return jnp.einsum("becf,efd->becd", nn.silu(gate) * up, w2_ExFxD)


def _capacity(x_BxLxD, gates_BxLxK, experts_BxLxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, c):
    """GShard dispatch/combine with capacity c per expert and group; B here counts groups, L positions in
    a group. Returns (y [B, L, D], the dropped fraction of the B * L * k assignments)."""
    b, l, d = x_BxLxD.shape
    k = gates_BxLxK.shape[-1]
    e = w1_ExDxF.shape[0]
    # Priority order within a group: choice-major (all first choices, then all second choices, ...),
    # positions in order within a choice. slot = how many earlier assignments went to the same expert.
    assign_BxKxLxE = jax.nn.one_hot(jnp.swapaxes(experts_BxLxK, 1, 2), e, dtype=jnp.int32)
    flat_BxKLxE = assign_BxKxLxE.reshape(b, k * l, e)
    slot_BxKxLxE = (jnp.cumsum(flat_BxKLxE, axis=1) - flat_BxKLxE).reshape(b, k, l, e)
    kept_BxKxLxE = assign_BxKxLxE * (slot_BxKxLxE < c)
    # top_k picks k distinct experts, so summing over the choices leaves one (slot, gate) per token and expert.
    kept_BxLxE = jnp.sum(kept_BxKxLxE, axis=1)
    slot_BxLxE = jnp.sum(kept_BxKxLxE * slot_BxKxLxE, axis=1)
    gate_BxLxE = jnp.sum(jnp.swapaxes(gates_BxLxK, 1, 2)[..., None] * kept_BxKxLxE, axis=1)
    dispatch_BxLxExC = jax.nn.one_hot(slot_BxLxE, c, dtype=jnp.float32) * kept_BxLxE[..., None]
    combine_BxLxExC = dispatch_BxLxExC * gate_BxLxE[..., None]
    dropped = 1.0 - jnp.sum(kept_BxLxE).astype(jnp.float32) / (b * l * k)

    dtype = x_BxLxD.dtype
    x_BxExCxD = jnp.einsum("blec,bld->becd", dispatch_BxLxExC.astype(dtype), x_BxLxD)
    out_BxExCxD = _swiglu_dense(x_BxExCxD, w1_ExDxF, w3_ExDxF, w2_ExFxD)
    y_BxLxD = jnp.einsum("blec,becd->bld", combine_BxLxExC.astype(dtype), out_BxExCxD)
    return y_BxLxD, dropped


def _dropless(x_BxLxD, gates_BxLxK, experts_BxLxK, w1_ExDxF, w3_ExDxF, w2_ExFxD):
    """Sort the N*k assignments by expert, run grouped matmuls, unsort and gate; returns y [B, L, D]."""
    b, l, d = x_BxLxD.shape
    k = gates_BxLxK.shape[-1]
    e = w1_ExDxF.shape[0]
    x_NxD = x_BxLxD.reshape(b * l, d)
    experts_M = experts_BxLxK.reshape(-1)
    order_M = jnp.argsort(experts_M, stable=True)  # rows of expert 0 first, then expert 1, ...
    rows_MxD = x_NxD[order_M // k]  # assignment m belongs to token m // k
    group_sizes_E = jnp.bincount(experts_M, length=e).astype(jnp.int32)
    grouped = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes_E)
    h_MxF = nn.silu(grouped(rows_MxD, w1_ExDxF)) * grouped(rows_MxD, w3_ExDxF)
    out_sorted_MxD = grouped(h_MxF, w2_ExFxD)
    out_MxD = jnp.zeros_like(out_sorted_MxD).at[order_M].set(out_sorted_MxD, unique_indices=True)
    out_NxKxD = out_MxD.reshape(b * l, k, d)
    gates_NxK = gates_BxLxK.reshape(b * l, k).astype(out_NxKxD.dtype)
    return jnp.einsum("nkd,nk->nd", out_NxKxD, gates_NxK).reshape(b, l, d)


# --- what the train step does with the sown statistics ---------------------------------------------------


def router_stats(intermediates) -> dict[str, dict[int, jax.Array]]:
    """The sown statistics by name and layer: {"z_loss": {3: scalar, ...}, "expert_load": {3: [E], ...}, ...}.

    `intermediates` is the "intermediates" collection of a Llama applied with mutable=["intermediates"];
    the layer index is read from the `blocks_<i>` path component.
    """
    stats: dict[str, dict[int, jax.Array]] = {name: {} for name in STAT_NAMES}
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates)).items():
        name = path[-1]
        block = next((p for p in path if isinstance(p, str) and p.startswith("blocks_")), None)
        if name in stats and block is not None:
            stats[name][int(block.split("_")[1])] = value[0]  # sow keeps a tuple of the values it was given
    return stats


def aux_loss(stats, aux_loss_coef: float, z_loss_coef: float) -> jax.Array:
    """The auxiliary objective added to the token-mean loss (float32 scalar):

        aux_loss_coef * mean over MoE layers of load_balance_loss + z_loss_coef * mean over layers of z_loss

    The mean over layers (not the sum) keeps the coefficients' meaning independent of depth, as the
    reference computed both losses once over the router logits of all layers stacked together.
    """
    lb = jnp.mean(jnp.stack(list(stats["load_balance_loss"].values())))
    z = jnp.mean(jnp.stack(list(stats["z_loss"].values())))
    return aux_loss_coef * lb + z_loss_coef * z


def scalar_metrics(stats, aux_loss_coef: float, z_loss_coef: float) -> dict[str, jax.Array]:
    """Flat float32 scalars for the logs: moe/aux_loss (what the objective adds), moe/load_balance_loss and
    moe/z_loss (means over layers, without coefficients), moe/dropped_fraction (mean over layers) and
    moe/load/layer_<i>/expert_<j> (fraction of layer i's assignments routed to expert j)."""
    metrics = {
        "moe/aux_loss": aux_loss(stats, aux_loss_coef, z_loss_coef),
        "moe/load_balance_loss": jnp.mean(jnp.stack(list(stats["load_balance_loss"].values()))),
        "moe/z_loss": jnp.mean(jnp.stack(list(stats["z_loss"].values()))),
        "moe/dropped_fraction": jnp.mean(jnp.stack(list(stats["dropped_fraction"].values()))),
    }
    for layer, load_E in sorted(stats["expert_load"].items()):
        for expert in range(load_E.shape[0]):
            metrics[f"moe/load/layer_{layer}/expert_{expert}"] = load_E[expert]
    return {name: value.astype(jnp.float32) for name, value in metrics.items()}
