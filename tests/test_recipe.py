"""The modern recipe's building blocks (issue 14): the muon optimizer and the llama options.

Muon is checked against a numpy Muon written from Keller Jordan's description (modded-nanogpt / the Muon
post: EMA momentum, Nesterov mix, 5 quintic Newton-Schulz steps with (3.4445, -4.7750, 2.0315) after a
Frobenius normalisation, the update scaled by sqrt(max(1, fan_out / fan_in)), decoupled weight decay),
independent of optax. Each model option is checked to change what it should and nothing else.
"""

from __future__ import annotations

import math
import pathlib

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import loss as loss_lib
from jaxllm import models, optim
from jaxllm.config import ConfigError, default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
NS_COEFFS = (3.4445, -4.7750, 2.0315)


# --- a numpy Muon (Keller Jordan's algorithm, float64) ------------------------------------------------------


def newton_schulz(g_IxO: np.ndarray, steps: int = 5) -> np.ndarray:
    """Keller Jordan's zeropower_via_newtonschulz5 in float64: X = G / ||G||_F, on the wide orientation,
    `steps` times X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = NS_COEFFS
    x = g_IxO / (np.linalg.norm(g_IxO) + 1e-8)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_reference(w_IxO, grads, lrs, betas, nesterov, weight_decay, optax_bias_correction=False):
    """The weights after one Muon update per gradient: buf = beta buf + (1 - beta) g (PyTorch lerp), Nesterov
    u = beta buf + (1 - beta) g (else u = buf), w = w (1 - lr wd) - lr NS(u) sqrt(max(1, O / I)).

    `optax_bias_correction`: optax's Nesterov mix divides buf by (1 - beta^(t+1)) and g by (1 - beta^t) first
    (Keller Jordan's does not); without Nesterov a bias correction is one scalar, which NS removes."""
    w, buf = np.array(w_IxO, np.float64), np.zeros_like(w_IxO, np.float64)
    scale = math.sqrt(max(1.0, w.shape[1] / w.shape[0]))
    for t, (g, lr, beta) in enumerate(zip(grads, lrs, betas), start=1):
        g = np.asarray(g, np.float64)
        buf = beta * buf + (1 - beta) * g
        if nesterov and optax_bias_correction:
            u = beta * buf / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
        elif nesterov:
            u = beta * buf + (1 - beta) * g
        else:
            u = buf
        w = w * (1 - lr * weight_decay) - lr * newton_schulz(u) * scale
    return w


def _muon_config(steps=4, **optim_fields):
    c = default_config()
    c.train.steps = steps
    c.optim.update(dict(name="muon", schedule="constant", warmup_pct=0.01, grad_clip=0.0, muon_lr=0.05))
    c.optim.update(optim_fields)
    return config_lib.validate(c)


def _run(optimizer, params, grads):
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])  # wide and tall: the scale and the transposition
@pytest.mark.parametrize("nesterov", [False, True])
def test_muon_step_matches_numpy_reference(shape, nesterov):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(4)]
    c = _muon_config(muon_nesterov=nesterov, muon_weight_decay=0.1)
    params = {"blocks_0": {"attn": {"q": {"kernel": jnp.asarray(w)}}}}
    out, _ = _run(optim.make_optimizer(c), params, [{"blocks_0": {"attn": {"q": {"kernel": g}}}} for g in grads])
    got = np.asarray(out["blocks_0"]["attn"]["q"]["kernel"], np.float64)
    ref = muon_reference(w, grads, [0.05] * 4, [0.95] * 4, nesterov, 0.1, optax_bias_correction=nesterov)
    moved = np.abs(ref - w).max()
    assert moved > 0.05  # the comparison is about the update, not the unchanged weights
    np.testing.assert_allclose(got, ref, atol=2e-4 * moved)
    if nesterov:  # optax's bias-corrected Nesterov mix is not Keller Jordan's plain one over the first steps
        plain = muon_reference(w, grads, [0.05] * 4, [0.95] * 4, True, 0.1)
        assert np.abs(plain - ref).max() > 10 * 2e-4 * moved


def test_muon_momentum_warmup_follows_its_schedule():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 10)).astype(np.float32)
    grads = [rng.normal(size=w.shape).astype(np.float32) for _ in range(5)]
    c = _muon_config(steps=5, muon_nesterov=False, muon_momentum_warmup_steps=4, muon_momentum_start=0.5,
                     muon_momentum=0.9)
    betas = [0.5 + (0.9 - 0.5) * min(t / 4, 1.0) for t in range(5)]  # step 0 .. 4: 0.5, 0.6, 0.7, 0.8, 0.9
    params = {"blocks_0": {"mlp": {"w1": {"kernel": jnp.asarray(w)}}}}
    out, _ = _run(optim.make_optimizer(c), params, [{"blocks_0": {"mlp": {"w1": {"kernel": g}}}} for g in grads])
    ref = muon_reference(w, grads, [0.05] * 5, betas, False, 0.0)
    wrong = muon_reference(w, grads, [0.05] * 5, [0.9] * 5, False, 0.0)  # what no warm-up would give
    moved = np.abs(ref - w).max()
    np.testing.assert_allclose(np.asarray(out["blocks_0"]["mlp"]["w1"]["kernel"]), ref, atol=2e-4 * moved)
    assert np.abs(wrong - ref).max() > 10 * 2e-4 * moved


def _tiny(**model_fields):
    m = default_config().model
    m.update(dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, sequence_length=16))
    m.update(model_fields)
    return m


def test_muon_routes_hidden_matrices_and_adamw_gets_the_rest():
    c = default_config()
    c.model.update(_tiny(tie_embeddings=False).to_dict())
    c.moe.update(dict(n_experts=4, top_k=2, every=2))  # block 1 is MoE: stacked [E, I, O] kernels, a router
    params = models.abstract_params(c.model, c.moe)
    labels = {jax.tree_util.keystr(p, simple=True, separator="/"): label
              for p, label in jax.tree_util.tree_leaves_with_path(optim.muon_labels(params))}
    muon = {p for p, label in labels.items() if label == "muon"}
    assert muon == {f"blocks_{i}/{m}/kernel" for i in (0, 1) for m in ("attn/q", "attn/k", "attn/v", "attn/o",
                                                                       "mlp/w1", "mlp/w2", "mlp/w3")}
    assert {p for p in labels if p not in muon} == {
        "embed/embedding", "lm_head/kernel", "norm_f/scale", "blocks_1/mlp/router/kernel",
        *(f"blocks_{i}/{n}/scale" for i in (0, 1) for n in ("attn_norm", "mlp_norm"))}
    assert params["blocks_1"]["mlp"]["w1"]["kernel"].ndim == 3


def test_muon_orthogonalises_each_expert_on_its_own():
    rng = np.random.default_rng(2)
    g_ExIxO = rng.normal(size=(3, 8, 12)).astype(np.float32)
    c = _muon_config(steps=1)
    stacked, _ = _run(optim.make_optimizer(c), {"mlp": {"w1": {"kernel": jnp.zeros((3, 8, 12))}}},
                      [{"mlp": {"w1": {"kernel": g_ExIxO}}}])
    for e in range(3):
        ref = muon_reference(np.zeros((8, 12)), [g_ExIxO[e]], [0.05], [0.95], True, 0.0, optax_bias_correction=True)
        np.testing.assert_allclose(np.asarray(stacked["mlp"]["w1"]["kernel"][e]), ref, atol=1e-5)


def test_muon_adamw_group_is_optax_adamw_at_optim_lr():
    """Embedding, head and norms get exactly `optax.adamw` (decay on the head kernel only), at optim.lr."""
    rng = np.random.default_rng(3)
    params = {"embed": {"embedding": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
              "lm_head": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)},
              "norm_f": {"scale": jnp.ones((8,))}}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]
    c = _muon_config(steps=3, lr=3e-3, weight_decay=0.1)
    got, _ = _run(optim.make_optimizer(c), params, grads)
    mask = {"embed": {"embedding": False}, "lm_head": {"kernel": True}, "norm_f": {"scale": False}}
    want, _ = _run(optax.adamw(3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask), params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_muon_group_lr_follows_the_same_schedule_shape():
    c = _muon_config(steps=10, schedule="wsd", warmup_steps=2, decay_pct=0.3, min_lr_ratio=0.1, lr=1e-3,
                     muon_lr=0.04)
    adam, muon = optim.make_schedule(c), optim.make_schedule(c, peak_lr=c.optim.muon_lr)
    # by hand: ramp 0, 1/2; flat to step 7 (= 10 - 3); then linear to 0.1 at step 10
    shape = [0.0, 0.5, 1, 1, 1, 1, 1, 1.0, 0.7, 0.4, 0.1]
    np.testing.assert_allclose([float(adam(s)) for s in range(11)], np.array(shape) * 1e-3, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose([float(muon(s)) for s in range(11)], np.array(shape) * 0.04, rtol=1e-5, atol=1e-9)


def test_wsd_without_warmup_is_flat_then_linear_decay():
    c = _muon_config(steps=6, schedule="wsd", warmup_pct=0.01, decay_pct=0.5, min_lr_ratio=0.0, lr=1.0)
    np.testing.assert_allclose([float(optim.make_schedule(c)(s)) for s in range(7)],
                               [1, 1, 1, 1, 2 / 3, 1 / 3, 0], atol=1e-6)


def test_muon_state_resumes_exactly_through_a_checkpoint(tmp_path):
    """4 steps (clipping, momentum warm-up on) = 2 steps, checkpoint, restore into the abstract state, 2 more."""
    c = _muon_config(steps=4, grad_clip=0.5, muon_momentum_warmup_steps=3, schedule="wsd", warmup_steps=1)
    optimizer = optim.make_optimizer(c)
    rng = np.random.default_rng(5)
    # a model-shaped tree (both groups, a stacked expert kernel) under a loss with a non-trivial gradient
    shapes = {"embed": {"embedding": (16, 8)}, "lm_head": {"kernel": (8, 16)}, "norm_f": {"scale": (8,)},
              "blocks_0": {"attn": {"q": {"kernel": (8, 8)}}, "mlp": {"w1": {"kernel": (2, 8, 12)}}}}
    params = jax.device_put(jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                                         is_leaf=lambda x: isinstance(x, tuple)), jax.devices()[0])
    targets = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    # jitted and committed like the step's outputs, so the step compiles once
    init = lambda p: jax.device_put(jax.jit(optimizer.init)(p), jax.devices()[0])

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            return sum(jnp.sum(jnp.sin(a) * b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(targets)))
        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def run(params, opt_state, n):
        for _ in range(n):
            params, opt_state = step(params, opt_state)
        return params, opt_state

    straight = run(params, init(params), 4)
    half = run(params, init(params), 2)
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(2, {"params": half[0], "opt_state": half[1]}, {"step": 2})
    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": optimizer.init(params)})
    restored, _ = checkpointer.restore(2, abstract)
    checkpointer.close()
    resumed = run(restored["params"], restored["opt_state"], 2)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


@pytest.mark.parametrize("nesterov", [True, False])
def test_scale_by_muon_is_optax_muon_with_the_same_state(nesterov):
    """jaxllm's scale_by_muon (the Newton-Schulz on plain matrices) gives optax.contrib.scale_by_muon's
    updates on tall, wide, square and stacked-expert leaves over 3 steps, and the same state tree, momentum
    warm-up included, so a checkpoint of one restores into the other."""
    rng = np.random.default_rng(3)
    shapes = {"tall": (24, 8), "wide": (8, 20), "square": (12, 12), "experts": (3, 16, 8)}
    dims = {k: optax.contrib.MuonDimensionNumbers(len(v) - 2, len(v) - 1) for k, v in shapes.items()}
    params = {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()}
    grads = [{k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()} for _ in range(3)]
    ours = optim.scale_by_muon(beta=0.9, nesterov=nesterov)
    theirs = optax.contrib.scale_by_muon(beta=0.9, nesterov=nesterov, weight_dimension_numbers=dims)
    state_ours, state_theirs = ours.init(params), theirs.init(params)
    for g in grads:
        u_ours, state_ours = jax.jit(ours.update)(g, state_ours)
        u_theirs, state_theirs = jax.jit(theirs.update)(g, state_theirs)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), u_ours, u_theirs)
    assert jax.tree.structure(state_ours) == jax.tree.structure(state_theirs)
    warm = lambda factory, **kw: optax.inject_hyperparams(factory, static_args=("ns_steps", "nesterov", *kw))(
        beta=lambda step: 0.9, ns_steps=5, nesterov=nesterov, **kw)
    assert (jax.tree.structure(warm(optim.scale_by_muon).init(params))
            == jax.tree.structure(warm(optax.contrib.scale_by_muon, weight_dimension_numbers=dims).init(params)))


@pytest.mark.parametrize("shape", [(16, 64), (32, 32), (64, 16)])
def test_newton_schulz_compiles_to_dots_without_per_step_transposes(shape):
    """The compiled orthogonalisation is 15 dots (5 steps x 3) with no transpose for a wide or square kernel
    and only those into and out of the wide orientation for a tall one, where optax's vmapped iteration
    transposes at every step (5 and 15 here)."""
    coeffs = jnp.asarray(NS_COEFFS)
    dims = optax.contrib.MuonDimensionNumbers(0, 1)

    def compiled_ops(fn):
        hlo = jax.jit(fn).lower(jnp.ones(shape, jnp.float32)).compile().as_text()
        return hlo.count(" dot("), hlo.count(" transpose(")

    dots, transposes = compiled_ops(lambda x: optim.newton_schulz(x, coeffs, 5))
    optax_dots, optax_transposes = compiled_ops(
        lambda x: optax.contrib._muon.orthogonalize_via_newton_schulz(x, coeffs, 5, dimension_numbers=dims))
    assert dots == optax_dots == 15
    assert optax_transposes >= 5
    assert transposes == 0 if shape[0] <= shape[1] else transposes <= 3


# --- model options -----------------------------------------------------------------------------------------


def _init(m, seed=0):
    model = models.build_model(m)
    tokens_BxL = jax.random.randint(jax.random.key(seed + 1), (2, m.sequence_length), 0, m.vocab_size)
    return model, model.init(jax.random.key(seed), tokens_BxL)["params"], tokens_BxL


def _names(params):
    return {jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_options_off_change_nothing():
    """The reference configs keep their parameter counts, and a config saved before the options existed
    builds the same module and logits, bit for bit, as one with them explicitly off."""
    wide = config_lib.load_config(str(ROOT / "configs/wide.py"))
    assert models.param_count(wide.model) == 179_983_360
    m = _tiny(tie_embeddings=False)
    new_fields = set(config_lib.RECIPE_MODEL_OFF) | {"head_init_std"}
    old = ml_collections.ConfigDict({"model": {k: v for k, v in m.to_dict().items() if k not in new_fields}})
    assert models.build_model(old.model) == models.build_model(m)
    model, params, tokens_BxL = _init(m)
    _, old_params, _ = _init(old.model)
    jax.tree.map(np.testing.assert_array_equal, params, old_params)
    np.testing.assert_array_equal(model.apply({"params": params}, tokens_BxL),
                                  models.build_model(old.model).apply({"params": params}, tokens_BxL))
    assert _names(params) == {"embed/embedding", "lm_head/kernel", "norm_f/scale"} | {
        f"blocks_{i}/{n}" for i in (0, 1) for n in ("attn_norm/scale", "mlp_norm/scale", "attn/q/kernel",
                                                    "attn/k/kernel", "attn/v/kernel", "attn/o/kernel",
                                                    "mlp/w1/kernel", "mlp/w2/kernel", "mlp/w3/kernel")}


def test_qk_norm_adds_per_head_norms_before_attention():
    m_off, m_on = _tiny(norm_eps=1e-12), _tiny(qk_norm=True, norm_eps=1e-12)  # eps out of the invariance
    _, p_off, tokens_BxL = _init(m_off)
    model, p_on, _ = _init(m_on)
    assert models.param_count(m_on) - models.param_count(m_off) == 2 * 2 * 8  # n_layer x (q, k) x head_dim
    assert _names(p_on) - _names(p_off) == {f"blocks_{i}/attn/{n}_norm/scale" for i in (0, 1) for n in "qk"}
    assert p_on["blocks_0"]["attn"]["q_norm"]["scale"].shape == (8,)
    logits = model.apply({"params": p_on}, tokens_BxL)
    # Scaling one query head's and one key head's projection leaves every logit unchanged: each head is
    # normalised on its own (a norm over all H * K would not undo a one-head scale).
    scaled = jax.tree.map(lambda x: x, p_on)
    for name, factor in (("q", 7.0), ("k", 0.2)):
        kernel = scaled["blocks_0"]["attn"][name]["kernel"]
        scaled["blocks_0"]["attn"][name]["kernel"] = kernel.at[:, 8:16].multiply(factor)
    np.testing.assert_allclose(model.apply({"params": scaled}, tokens_BxL), logits, rtol=1e-4, atol=1e-5)
    # without qk_norm the same scaling does change the logits
    plain = models.build_model(m_off)
    p_copy = jax.tree.map(lambda x: x, p_off)
    p_copy["blocks_0"]["attn"]["q"]["kernel"] = p_copy["blocks_0"]["attn"]["q"]["kernel"].at[:, 8:16].multiply(7.0)
    assert np.abs(plain.apply({"params": p_copy}, tokens_BxL) - plain.apply({"params": p_off}, tokens_BxL)).max() > 1e-3


def test_relu2_mlp_counts_and_values():
    m = _tiny(mlp_activation="relu2")
    assert models.mlp_hidden(m) == 4 * 32
    swiglu = _tiny()
    per_layer = 2 * 32 * 128 - 3 * 32 * models.mlp_hidden(swiglu)
    assert models.param_count(m) - models.param_count(swiglu) == 2 * per_layer
    assert models.flops_per_token(m) - models.flops_per_token(swiglu) == 6 * 2 * per_layer
    assert models.mlp_hidden(_tiny(mlp_activation="relu2", mlp_hidden=48)) == 48
    model, params, _ = _init(m)
    assert set(params["blocks_0"]["mlp"]) == {"w3", "w2"}
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    from jaxllm.models import layers
    mlp = layers.Relu2MLP(hidden=128, init_std=0.02, out_std=0.02)
    p = mlp.init(jax.random.key(0), x)["params"]
    w3, w2 = (np.asarray(p[n]["kernel"], np.float64) for n in ("w3", "w2"))
    np.testing.assert_allclose(mlp.apply({"params": p}, x), np.square(np.maximum(x @ w3, 0)) @ w2, rtol=1e-4,
                               atol=1e-6)


def test_zero_init_proj_starts_every_block_as_the_identity():
    m = _tiny(zero_init_proj=True, tie_embeddings=False)
    model, params, tokens_BxL = _init(m)
    _, reference, _ = _init(_tiny(tie_embeddings=False))
    for i in (0, 1):
        assert not np.any(params[f"blocks_{i}"]["attn"]["o"]["kernel"])
        assert not np.any(params[f"blocks_{i}"]["mlp"]["w2"]["kernel"])
        np.testing.assert_array_equal(params[f"blocks_{i}"]["attn"]["q"]["kernel"],
                                      reference[f"blocks_{i}"]["attn"]["q"]["kernel"])  # nothing else changes
    # the first forward is the embedding-only path: rmsnorm(embed[token]) @ head
    x = np.asarray(params["embed"]["embedding"], np.float64)[np.asarray(tokens_BxL)]
    x = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(model.apply({"params": params}, tokens_BxL), x @ np.asarray(params["lm_head"]["kernel"]),
                               rtol=1e-4, atol=1e-5)


def test_untied_head_init():
    head = lambda **f: _init(_tiny(tie_embeddings=False, init_std=0.02, vocab_size=512, **f))[1]["lm_head"]["kernel"]
    assert not np.any(head(head_init_std=0.0))  # modded-nanogpt's zero head
    assert float(jnp.std(head())) == pytest.approx(0.02, rel=0.05)  # default: init_std
    assert float(jnp.std(head(head_init_std=0.05))) == pytest.approx(0.05, rel=0.05)


def test_logit_softcap_bounds_and_tanh():
    m_off, m_on = _tiny(tie_embeddings=False, init_std=1.0), _tiny(tie_embeddings=False, init_std=1.0, logit_softcap=3.0)
    _, params, tokens_BxL = _init(m_off)
    raw = models.build_model(m_off).apply({"params": params}, tokens_BxL)
    capped = models.build_model(m_on).apply({"params": params}, tokens_BxL)
    assert float(jnp.abs(raw).max()) > 6.0  # the cap is reached
    assert float(jnp.abs(capped).max()) <= 3.0
    np.testing.assert_allclose(capped, 3.0 * np.tanh(np.asarray(raw, np.float64) / 3.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing, z_loss", [pytest.param(0.0, 0.0, marks=pytest.mark.slow), (0.1, 1e-3)])
def test_fused_head_with_softcap_equals_plain(smoothing, z_loss):
    rng = np.random.default_rng(4)
    hidden_BxLxD = jnp.asarray(rng.normal(size=(2, 12, 16)), jnp.float32)
    head_DxV = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
    targets_BxL = jnp.asarray(rng.integers(0, 40, (2, 12)), jnp.int32)
    weights_BxL = jnp.asarray(rng.random((2, 12)) > 0.2, jnp.float32)
    cap = 5.0

    def plain(h, w):
        logits = cap * jnp.tanh(jnp.einsum("bld,dv->blv", h, w) / cap)
        return loss_lib.cross_entropy(logits, targets_BxL, weights_BxL, label_smoothing=smoothing, z_loss=z_loss)

    def fused(h, w):
        return loss_lib.chunked_cross_entropy(h, w, targets_BxL, weights_BxL, chunk=8, label_smoothing=smoothing,
                                              z_loss=z_loss, softcap=cap)

    for name, value in plain(hidden_BxLxD, head_DxV)._asdict().items():
        np.testing.assert_allclose(getattr(fused(hidden_BxLxD, head_DxV), name), value, rtol=1e-5, err_msg=name)
    grads_plain = jax.grad(lambda h, w: plain(h, w).loss, argnums=(0, 1))(hidden_BxLxD, head_DxV)
    grads_fused = jax.grad(lambda h, w: fused(h, w).loss, argnums=(0, 1))(hidden_BxLxD, head_DxV)
    for a, b in zip(grads_fused, grads_plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    uncapped = jax.grad(lambda h: loss_lib.chunked_cross_entropy(h, head_DxV, targets_BxL, weights_BxL, chunk=8).loss)
    assert np.abs(uncapped(hidden_BxLxD) - grads_fused[0]).max() > 1e-2  # the tanh's derivative is in there


def test_cached_decoding_with_every_option_equals_the_full_forward():
    """generate and MathQA scoring decode with a KV cache: qk_norm, relu2, softcap and the untied head hold there."""
    m = _tiny(qk_norm=True, mlp_activation="relu2", zero_init_proj=False, logit_softcap=2.0, tie_embeddings=False)
    model, params, tokens_BxL = _init(m)
    full = model.apply({"params": params}, tokens_BxL)
    cache = models.init_cache(model, 2, 16)
    decode = jax.jit(lambda tokens, cache, position: model.apply({"params": params}, tokens, cache=cache,
                                                                  position=position))
    first, cache = decode(tokens_BxL[:, :10], cache, jnp.int32(0))
    rest = []
    for t in range(10, 16):
        logits, cache = decode(tokens_BxL[:, t:t + 1], cache, jnp.int32(t))
        rest.append(logits)
    np.testing.assert_allclose(jnp.concatenate([first, *rest], axis=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field, value", [("qk_norm", True), ("mlp_activation", "relu2"), ("logit_softcap", 30.0)])
def test_export_refuses_what_llama_checkpoints_cannot_hold(field, value, tmp_path):
    from jaxllm import gguf_io, hf
    c = default_config()
    c.model.update(_tiny(**{field: value}).to_dict())
    with pytest.raises(hf.HFError, match=f"model.{field}"):
        hf.check_exportable(c)
    with pytest.raises(gguf_io.GGUFError, match=f"model.{field}"):
        gguf_io.write_gguf(c.model, {}, tmp_path / "x.gguf")
    c.model.update(_tiny(zero_init_proj=True, head_init_std=0.0, tie_embeddings=False).to_dict())
    hf.check_exportable(c)  # init-only options leave a plain llama


def test_recipe_options_are_validated():
    def check(**model_fields):
        c = default_config()
        c.model.update(model_fields)
        return config_lib.validate(c)

    with pytest.raises(ConfigError, match="model.qk_norm .* llama option"):
        check(name="gpt2", qk_norm=True)
    with pytest.raises(ConfigError, match="model.mlp_activation"):
        check(mlp_activation="gelu")
    with pytest.raises(ConfigError, match="model.logit_softcap"):
        check(logit_softcap=-1.0)
    c = default_config()
    c.model.mlp_activation, c.moe.n_experts = "relu2", 4
    with pytest.raises(ConfigError, match="relu2"):
        config_lib.validate(c)
    c = default_config()
    c.optim.name, c.optim.muon_momentum = "muon", 1.0
    with pytest.raises(ConfigError, match="optim.muon_momentum"):
        config_lib.validate(c)


@pytest.mark.parametrize("name", ["speedrun_cpu", "speedrun"])
def test_speedrun_configs_load(name):
    c = config_lib.load_config(str(ROOT / f"configs/{name}.py"))
    assert c.optim.name == "muon" and c.optim.schedule == "wsd"
    assert c.model.qk_norm and c.model.mlp_activation == "relu2" and c.model.zero_init_proj
    assert c.model.logit_softcap > 0 and not c.model.tie_embeddings
