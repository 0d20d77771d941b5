"""Learning-rate schedules and the optimizer chain.

The schedule is a pure function of the optimizer step (int32, traced or not) returning a float32 scalar;
the training step logs `schedule(step)`, which is the learning rate that step's update uses (optax counts
updates from 0, as PyTorch's scheduler does before its first `scheduler.step()`).

Weight decay is decoupled from the gradient statistics and multiplied by the learning rate, as in PyTorch
AdamW (`p -= lr * wd * p`), and applies only to linear-layer weight matrices (`decay_mask`).

Muon (`optim.name=muon`, `make_muon`): the blocks' projection kernels (`muon_labels`) get optax's Muon
update (optax.contrib: Nesterov momentum, 5 quintic Newton-Schulz steps with Keller Jordan's coefficients;
the iteration on plain matrices: `scale_by_muon`), scaled by sqrt(max(1, fan_out / fan_in)); everything
else gets AdamW as `adamw` would. Each group has its own peak lr (optim.muon_lr, optim.lr) on the same
schedule shape.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

ANNEALS = ("cos", "linear")


def _anneal(start: float, end: float, progress: jax.Array, remaining: jax.Array, anneal: str) -> jax.Array:
    """Interpolate from `start` to `end`; `progress` and `remaining` = 1 - progress are float32 in [0, 1].

    Written as start * w_start + end * w_end with both weights >= 0, so no large terms cancel: PyTorch's
    `end + (start - end) / 2 * (cos(pi * p) + 1)` loses most digits of a tiny `end` in float32 (the 2025
    settings end at lr / 250000). For cos, w_start = cos^2(pi p / 2) = sin^2(pi (1 - p) / 2); `remaining`
    is passed in, not computed as 1 - progress, because that subtraction is what loses the digits near p = 1.
    """
    if anneal == "cos":
        w_start = jnp.square(jnp.sin(0.5 * math.pi * remaining))
        w_end = jnp.square(jnp.sin(0.5 * math.pi * progress))
    else:
        w_start, w_end = remaining, progress
    return start * w_start + end * w_end


def _phase(step_f: jax.Array, start_step: float, end_step: float, start_lr: float, end_lr: float,
           anneal: str) -> jax.Array:
    """One annealing phase over [start_step, end_step]; steps outside hold the nearer end's value."""
    length = end_step - start_step
    if length <= 0:  # a degenerate phase (e.g. pct_start * total_steps == 1) is already at its end
        return jnp.full_like(step_f, end_lr)
    progress = jnp.clip((step_f - start_step) / length, 0.0, 1.0)
    remaining = jnp.clip((end_step - step_f) / length, 0.0, 1.0)
    return _anneal(start_lr, end_lr, progress, remaining, anneal)


def onecycle_schedule(peak_lr: float, total_steps: int, pct_start: float = 0.05, anneal: str = "cos",
                      div_factor: float = 100.0, final_div_factor: float = 0.1) -> optax.Schedule:
    """PyTorch OneCycleLR (three_phase=False) as a jit-traceable function of the step.

    initial = peak_lr / div_factor, min = initial / final_div_factor. Phase 1 runs from step 0 to
    end1 = float(pct_start * total_steps) - 1, initial -> peak; phase 2 from end1 to total_steps - 1,
    peak -> min; steps past total_steps - 1 hold min (PyTorch raises there). With the reference defaults
    (div 100, final_div 0.1) that is lr/100 -> lr -> lr/10. Returns a float32 scalar.
    """
    if anneal not in ANNEALS:
        raise ValueError(f"anneal is '{anneal}'; choose one of {', '.join(ANNEALS)}")
    if total_steps < 1 or peak_lr <= 0 or not 0 < pct_start <= 1 or div_factor <= 0 or final_div_factor <= 0:
        raise ValueError(f"onecycle_schedule needs peak_lr > 0, total_steps >= 1, 0 < pct_start <= 1 and "
                         f"positive div factors; got {peak_lr}, {total_steps}, {pct_start}, {div_factor}, "
                         f"{final_div_factor}")
    initial_lr = peak_lr / div_factor
    min_lr = initial_lr / final_div_factor
    end1 = float(pct_start * total_steps) - 1  # PyTorch's own float arithmetic, kept on the host in float64
    end2 = float(total_steps - 1)

    def schedule(step) -> jax.Array:
        step_f = jnp.asarray(step, jnp.float32)
        warm = _phase(step_f, 0.0, end1, initial_lr, peak_lr, anneal)
        down = _phase(step_f, end1, end2, peak_lr, min_lr, anneal)
        # PyTorch picks phase 1 while step <= end1, else the last phase.
        return jnp.where(step_f <= end1, warm, down).astype(jnp.float32)

    return schedule


def warmup_steps(config) -> int:
    """Warm-up length of cosine/wsd/constant: optim.warmup_steps if set, else int(warmup_pct * train.steps)."""
    o = config.optim
    return int(o.warmup_steps) if o.warmup_steps > 0 else int(o.warmup_pct * config.train.steps)


def _warmup_then(lr: float, warmup: int, after) -> optax.Schedule:
    """Linear warm-up 0 -> lr over `warmup` steps (lr * step / warmup), then `after(step_f)`."""

    def schedule(step) -> jax.Array:
        step_f = jnp.asarray(step, jnp.float32)
        rest = after(step_f)
        if warmup <= 0:
            return jnp.asarray(rest, jnp.float32)
        ramp = lr * jnp.clip(step_f / warmup, 0.0, 1.0)
        return jnp.where(step_f < warmup, ramp, rest).astype(jnp.float32)

    return schedule


def make_schedule(config, peak_lr: float | None = None) -> optax.Schedule:
    """The learning rate as a function of the optimizer step, from `config.optim` and `config.train.steps`;
    `peak_lr` replaces optim.lr (the same shape at another height: the Muon group's optim.muon_lr).

    cos/linear: `onecycle_schedule` (pct_start = warmup_pct, div_factor, final_div_factor).
    cosine: linear warm-up 0 -> lr, then cosine to lr * min_lr_ratio at step train.steps.
    wsd: linear warm-up, constant lr, then linear decay to lr * min_lr_ratio over the last decay_pct of
      train.steps (reached at step train.steps).
    constant: linear warm-up, then lr.
    """
    o, steps = config.optim, int(config.train.steps)
    lr = float(o.lr if peak_lr is None else peak_lr)
    if o.schedule in ANNEALS:
        return onecycle_schedule(lr, steps, pct_start=o.warmup_pct, anneal=o.schedule,
                                 div_factor=o.div_factor, final_div_factor=o.final_div_factor)
    warmup = warmup_steps(config)
    min_lr = lr * float(o.min_lr_ratio)
    if o.schedule == "cosine":
        return _warmup_then(lr, warmup, lambda s: _phase(s, float(warmup), float(steps), lr, min_lr, "cos"))
    if o.schedule == "wsd":
        # The decay never eats into the warm-up, however large decay_pct is.
        decay_start = max(steps - int(o.decay_pct * steps), warmup)
        return _warmup_then(lr, warmup,
                            lambda s: _phase(s, float(decay_start), float(steps), lr, min_lr, "linear"))
    if o.schedule == "constant":
        return _warmup_then(lr, warmup, lambda s: jnp.full_like(s, lr))
    raise ValueError(f"optim.schedule is '{o.schedule}'; choose one of cos, linear, cosine, wsd, constant")


def learning_rate(config, step) -> jax.Array:
    """The learning rate of optimizer step `step` (float32 scalar): `make_schedule(config)(step)`."""
    return make_schedule(config)(step)


def _key_name(key) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def decay_mask(params) -> Any:
    """A pytree of bools like `params`: True only for linear-layer weight matrices.

    That is a leaf whose last path key is "kernel" and which has ndim >= 2. Embeddings ("embedding"),
    norm scales ("scale"), biases and learned positions are never decayed (the reference's rule).
    """

    def is_matrix(path, leaf) -> bool:
        return bool(path) and _key_name(path[-1]) == "kernel" and jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


# The modules whose "kernel" is a hidden weight matrix: attention q/k/v/o, SwiGLU w1/w2/w3 (also relu2's w3/w2
# and MoE's stacked expert kernels [E, I, O]), gpt2's fc/proj. Not the embedding, the LM head or MoE routers.
MUON_MODULES = frozenset({"q", "k", "v", "o", "w1", "w2", "w3", "fc", "proj"})


def muon_labels(params) -> Any:
    """A pytree of "muon" / "adam" like `params`: "muon" for a hidden weight matrix, i.e. a "kernel" leaf of a
    MUON_MODULES module with 2 dimensions [I, O] or 3 (stacked experts [E, I, O], each orthogonalised on
    its own); "adam" for the rest (embedding, LM head, norm scales, MoE routers, LoRA adapters "a"/"b").
    The head and the embedding stay on AdamW as in modded-nanogpt: their rows are per-token, not a map
    between hidden spaces whose singular values Muon's orthogonalisation equalises."""

    def label(path, leaf) -> str:
        keys = [_key_name(key) for key in path]
        hidden = len(keys) >= 2 and keys[-1] == "kernel" and keys[-2] in MUON_MODULES and jnp.ndim(leaf) in (2, 3)
        return "muon" if hidden else "adam"

    return jax.tree_util.tree_map_with_path(label, params)


MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic (optax's default)


def newton_schulz(x: jax.Array, coeffs: jax.Array, steps: int, eps: float = 1e-8) -> jax.Array:
    """Orthogonalise `x` [I, O] (or each [I, O] of stacked experts [E, I, O]) as optax's
    `orthogonalize_via_newton_schulz` does: on the wider orientation, X / (||X||_F + eps), then `steps` times
    X <- a X + (b A + c A A) X with A = X X^T, (a, b, c) = `coeffs`; the same operations in the same order.

    Written out because optax runs every matrix through `jax.vmap` (a batch of 1 for a plain kernel), and
    XLA:CPU then copies a transposed operand of the batched dots at every iteration (15 transposes for a
    [1024, 256] kernel, 5 for [256, 256]; here none, or the two into and out of the wide orientation): 5.7%
    of the modern recipe's op time on this CPU (docs/benchmarks.md, lever 14). Plain 2-D dots are what
    every backend does best.
    """
    if x.ndim == 3:
        return jax.vmap(lambda m: newton_schulz(m, coeffs, steps, eps))(x)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    coeffs = coeffs.astype(x.dtype)
    x = x / (jnp.linalg.norm(x, ord="fro") + eps)
    for _ in range(steps):
        a = x @ x.T
        b = coeffs[1] * a + coeffs[2] * a @ a
        x = coeffs[0] * x + b @ x
    return x.T if tall else x


def scale_by_muon(ns_coeffs=MUON_NS_COEFFS, ns_steps: int = 5, beta: float = 0.95, eps: float = 1e-8, *,
                  nesterov: bool = True) -> optax.GradientTransformation:
    """optax.contrib.scale_by_muon (its momentum, bias corrections, Nesterov mix and MuonState, so checkpoints
    of either read in the other), orthogonalising with `newton_schulz` on plain matrices instead of optax's
    vmapped iteration. tests/test_recipe.py checks the two updates agree."""

    def init(params):
        return optax.contrib.MuonState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                                       ns_coeffs=jnp.asarray(ns_coeffs))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        if nesterov:
            mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                                  optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                                  optax.tree.bias_correction(updates, beta, count))
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, count)
        updates = jax.tree.map(lambda m: newton_schulz(m, state.ns_coeffs, ns_steps, eps), mu_hat)
        return updates, optax.contrib.MuonState(count=count, mu=mu, ns_coeffs=state.ns_coeffs)

    return optax.GradientTransformation(init, update)


def scale_by_width() -> optax.GradientTransformation:
    """Each [..., I, O] update times sqrt(max(1, O / I)): Keller Jordan's Muon width scaling, which optax's
    `muon` applies with its (unexported) `scale_by_shape`; written out here to be used outside `muon`."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * math.sqrt(max(1.0, u.shape[-1] / u.shape[-2])), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def muon_momentum(config) -> float | optax.Schedule:
    """Muon's momentum: optim.muon_momentum, or with muon_momentum_warmup_steps = N > 0 a schedule rising
    linearly from muon_momentum_start at step 0 to muon_momentum at step N, constant after (modded-nanogpt's
    0.85 -> 0.95 over 300 steps)."""
    o = config.optim
    end, warmup = float(o.muon_momentum), int(o.muon_momentum_warmup_steps)
    if warmup <= 0:
        return end
    start = float(o.muon_momentum_start)

    def schedule(step) -> jax.Array:
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup, 0.0, 1.0)
        return (start * (1.0 - frac) + end * frac).astype(jnp.float32)

    return schedule


def make_muon(config) -> optax.GradientTransformation:
    """Muon on `muon_labels`' "muon" leaves, AdamW on the rest (`optax.partition`), each with its own lr.

    Muon group: `scale_by_muon`, optax.contrib.scale_by_muon's update (momentum EMA m = beta m + (1 - beta) g;
    Nesterov: beta m + (1 - beta) g; then 5 Newton-Schulz steps of X <- a X + (b A + c A^2) X, A = X X^T,
    (a, b, c) = (3.4445, -4.7750, 2.0315), after X / (||X||_F + 1e-8), on the wider orientation), `scale_by_width`
    (sqrt(max(1, fan_out / fan_in)), Keller Jordan's width scaling, as optax's `muon`), decoupled weight decay
    optim.muon_weight_decay, times -schedule(muon_lr). One difference from Keller Jordan's PyTorch Muon:
    optax bias-corrects both terms of the Nesterov mix (m / (1 - beta^(t+1)) and g / (1 - beta^t)), which
    changes their relative weight over the first tens of steps and not after (tests/test_recipe.py checks
    the update against a numpy reference both ways). A momentum warm-up (`muon_momentum`) is injected as a
    hyperparameter (optax.inject_hyperparams), so beta is read from the schedule at each step and stored in
    the state.
    AdamW group: exactly `make_optimizer`'s adamw (optim.lr, betas, eps, weight_decay on `decay_mask`).
    """
    o = config.optim
    muon_kwargs = dict(ns_steps=int(o.muon_ns_steps), nesterov=bool(o.muon_nesterov))
    momentum = muon_momentum(config)
    if callable(momentum):
        orthogonalise = optax.inject_hyperparams(scale_by_muon, static_args=tuple(muon_kwargs))(
            beta=momentum, **muon_kwargs)
    else:
        orthogonalise = scale_by_muon(beta=momentum, **muon_kwargs)
    muon = optax.chain(orthogonalise,
                       scale_by_width(),
                       optax.add_decayed_weights(o.muon_weight_decay, mask=decay_mask),
                       optax.scale_by_learning_rate(make_schedule(config, peak_lr=float(o.muon_lr))))
    adam = optax.adamw(make_schedule(config), b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=decay_mask)
    return optax.partition({"muon": muon, "adam": adam}, muon_labels)


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping (if optim.grad_clip > 0), then the optimizer named by optim.name.

    adamw: optax.adamw with betas, eps and decoupled, lr-scaled weight decay on `decay_mask` leaves
      (the same update as torch.optim.AdamW).
    lion: optax.lion with betas and the same masked, decoupled weight decay.
    sgd: heavy-ball momentum (optim.momentum) on the gradient, plus the masked decay added after the
      momentum (decoupled: it does not accumulate in the momentum), all times -lr.
    muon: `make_muon` (Muon on the hidden weight matrices at optim.muon_lr, this adamw on the rest).
    The learning rate follows `make_schedule(config)`.
    """
    o = config.optim
    schedule = make_schedule(config)
    if o.name == "adamw":
        opt = optax.adamw(schedule, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    elif o.name == "lion":
        opt = optax.lion(schedule, b1=o.beta1, b2=o.beta2, weight_decay=o.weight_decay, mask=decay_mask)
    elif o.name == "sgd":
        opt = optax.chain(optax.trace(decay=o.momentum),
                          optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
                          optax.scale_by_learning_rate(schedule))
    elif o.name == "muon":
        opt = make_muon(config)
    else:
        raise ValueError(f"optim.name is '{o.name}'; choose one of adamw, lion, sgd, muon")
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt
