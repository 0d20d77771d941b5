"""Mixture-of-experts: router aux losses, equivalence with the dense MLP, capacity dropping, dropless vs
capacity, router gradients, FLOPs and parameter accounting, and the train loop (metrics, determinism,
resume, the 4-device mesh) with MoE on."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import models, optim, step as step_lib
from jaxllm import train as train_lib
from jaxllm.config import ConfigError, default_config
from jaxllm.metrics import read_metrics
from jaxllm.models import layers
from jaxllm.models import moe as moe_lib

from jaxllm import sharding
from test_train import SGD, _random_batch, losses, tiny_config

D, F, E, B, L = 32, 64, 4, 2, 16


def moe_ffn(mode="dropless", top_k=2, capacity_factor=1.25, renormalize=False, n_experts=E, hidden=F,
            group_size=0):
    return moe_lib.MoEFeedForward(n_experts=n_experts, top_k=top_k, hidden=hidden, init_std=0.02, out_std=0.02,
                                  renormalize=renormalize, mode=mode, capacity_factor=capacity_factor,
                                  group_size=group_size)


def random_x(seed=0, b=B, l=L):
    return jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)


def apply_ffn(module, params, x_BxLxD):
    y, state = module.apply({"params": params}, x_BxLxD, mutable=["intermediates"])
    return y, {name: value[0] for name, value in state["intermediates"].items()}


def ffn_params(seed=0, router_scale=1.0):
    """Random expert weights at a scale where outputs are O(1), and a router with visible preferences."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        "router": {"kernel": router_scale * jax.random.normal(keys[0], (D, E))},
        "w1": {"kernel": jax.random.normal(keys[1], (E, D, F)) / math.sqrt(D)},
        "w3": {"kernel": jax.random.normal(keys[2], (E, D, F)) / math.sqrt(D)},
        "w2": {"kernel": jax.random.normal(keys[3], (E, F, D)) / math.sqrt(F)},
    }


def swiglu_np(x_D, w1_DxF, w3_DxF, w2_FxD):
    gate, up = x_D @ w1_DxF, x_D @ w3_DxF
    return (gate / (1 + np.exp(-gate)) * up) @ w2_FxD


# --- aux losses ---------------------------------------------------------------------------------------------


def test_aux_loss_is_minimal_under_uniform_routing():
    params = ffn_params()
    params["router"]["kernel"] = jnp.zeros((D, E))  # every token: probabilities 1/E
    _, stats = apply_ffn(moe_ffn(), params, random_x())
    # E * sum_i f_i * (1/E) = sum_i f_i = 1, the minimum; z-loss = logsumexp(0,...,0)^2 = log(E)^2.
    np.testing.assert_allclose(stats["load_balance_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats["z_loss"], math.log(E) ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.sum(stats["expert_load"]), 1.0, rtol=1e-6)
    # A router that prefers expert 0 for every token is penalised above the minimum.
    params["router"]["kernel"] = jnp.zeros((D, E)).at[:, 0].set(1.0)
    _, stats = apply_ffn(moe_ffn(), params, jnp.abs(random_x()))
    assert stats["load_balance_loss"] > 1.5


# --- equivalences ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", moe_lib.MODES)
def test_all_experts_identical_and_chosen_equals_dense_swiglu(mode):
    """top_k = n_experts, no renormalisation: gates are the softmax, which sums to 1, so E copies of one
    SwiGLU give exactly that SwiGLU."""
    dense = layers.SwiGLU(hidden=F, init_std=0.02, out_std=0.02)
    x = random_x(1)
    dense_params = dense.init(jax.random.key(3), x)["params"]
    dense_params = jax.tree.map(lambda w: w * 20.0, dense_params)  # outputs of order 1
    params = ffn_params()
    for name in ("w1", "w3", "w2"):
        params[name]["kernel"] = jnp.broadcast_to(dense_params[name]["kernel"], (E,) + dense_params[name]["kernel"].shape)
    y_moe, stats = apply_ffn(moe_ffn(mode, top_k=E, capacity_factor=1.0), params, x)
    y_dense = dense.apply({"params": dense_params}, x)
    assert float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y_moe, y_dense, rtol=1e-5, atol=1e-5)
    assert float(jnp.std(y_dense)) > 0.1


@pytest.mark.parametrize("renormalize", [pytest.param(False, marks=pytest.mark.slow), True])
def test_dropless_equals_capacity_when_nothing_is_dropped(renormalize):
    params, x = ffn_params(), random_x(2)
    # capacity_factor = E / k gives C = L: an expert could take every token of a sequence.
    y_drop, s_drop = apply_ffn(moe_ffn("dropless", renormalize=renormalize), params, x)
    y_cap, s_cap = apply_ffn(moe_ffn("capacity", capacity_factor=E / 2, renormalize=renormalize), params, x)
    assert float(s_cap["dropped_fraction"]) == 0.0 and float(s_drop["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y_cap, y_drop, rtol=1e-5, atol=1e-5)
    for name in ("load_balance_loss", "z_loss", "expert_load"):
        np.testing.assert_allclose(s_cap[name], s_drop[name], rtol=1e-6)

    def grads(mode, cf):
        def f(p):
            return jnp.sum(jnp.sin(apply_ffn(moe_ffn(mode, capacity_factor=cf, renormalize=renormalize), p, x)[0]))
        return jax.grad(f)(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 grads("dropless", 1.25), grads("capacity", E / 2))


def test_renormalize_rescales_the_top_k_gates():
    params, x = ffn_params(), random_x(4)
    # With one expert chosen and renormalisation, the gate is 1: the output is that expert's SwiGLU.
    y, _ = apply_ffn(moe_ffn(top_k=1, renormalize=True), params, x)
    probs = jax.nn.softmax(x @ params["router"]["kernel"], axis=-1)
    chosen = np.asarray(jnp.argmax(probs, axis=-1))
    p = jax.tree.map(np.asarray, params)
    b, l = 1, 5
    e = chosen[b, l]
    expected = swiglu_np(np.asarray(x[b, l]), p["w1"]["kernel"][e], p["w3"]["kernel"][e], p["w2"]["kernel"][e])
    np.testing.assert_allclose(y[b, l], expected, rtol=1e-4, atol=1e-5)
    y_plain, _ = apply_ffn(moe_ffn(top_k=1, renormalize=False), params, x)
    np.testing.assert_allclose(y_plain[b, l], float(probs[b, l, e]) * expected, rtol=1e-4, atol=1e-5)


# --- capacity mode drops exactly the overflow --------------------------------------------------------------


def capacity_reference(x, params, top_k, c, group_size):
    """Plain-loop GShard capacity routing: per group, all first choices in order, then second choices..."""
    p = jax.tree.map(np.asarray, params)
    x = np.asarray(x).reshape(-1, group_size, D)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(x) @ params["router"]["kernel"], axis=-1))
    y = np.zeros_like(x)
    dropped = 0
    for b in range(x.shape[0]):
        order = np.argsort(-probs[b], axis=-1, kind="stable")[:, :top_k]
        used = np.zeros(E, int)
        for k in range(top_k):
            for l in range(x.shape[1]):
                e = order[l, k]
                if used[e] >= c:
                    dropped += 1
                    continue
                used[e] += 1
                y[b, l] += probs[b, l, e] * swiglu_np(x[b, l], p["w1"]["kernel"][e], p["w3"]["kernel"][e],
                                                      p["w2"]["kernel"][e])
    return y.reshape(B, L, D), dropped


@pytest.mark.parametrize("capacity_factor, group_size", [(0.5, 0), (1.0, 0), (1.0, 4)])
def test_capacity_mode_drops_exactly_the_tokens_over_capacity(capacity_factor, group_size):
    # A skewed router (large logits) overloads some experts, so some assignments overflow.
    params, x = ffn_params(seed=5, router_scale=3.0), random_x(5)
    c = moe_lib.capacity(group_size or L, E, 2, capacity_factor)
    y, stats = apply_ffn(moe_ffn("capacity", capacity_factor=capacity_factor, group_size=group_size), params, x)
    y_ref, dropped = capacity_reference(x, params, 2, c, group_size or L)
    assert dropped > 0
    np.testing.assert_allclose(float(stats["dropped_fraction"]), dropped / (B * L * 2), rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)


# --- the model and the train step ----------------------------------------------------------------------


def moe_config(tmp_path, mode="dropless", **overrides):
    """tiny_config (2 layers) with 4 experts, top-2, in every layer."""
    fields = {"moe.n_experts": 4, "moe.top_k": 2, "moe.mode": mode, **overrides}
    return tiny_config(tmp_path, **fields)


def test_every_selects_the_moe_layers_and_decay_covers_expert_kernels(tmp_path):
    config = moe_config(tmp_path, **{"model.n_layer": 4, "moe.every": 2})
    params = jax.eval_shape(lambda: step_lib.init_state(models.build_model(config.model, config.moe),
                                                        optim.make_optimizer(config), config)).params
    moe_blocks = [i for i in range(4) if "router" in params[f"blocks_{i}"]["mlp"]]
    assert moe_blocks == [1, 3]  # i % every == every - 1
    mlp = params["blocks_1"]["mlp"]
    assert mlp["w1"]["kernel"].shape == (4, 64, models.mlp_hidden(config.model))
    mask = optim.decay_mask(params)
    assert all(mask["blocks_1"]["mlp"][name]["kernel"] for name in ("router", "w1", "w2", "w3"))
    assert not mask["blocks_1"]["mlp_norm"]["scale"]


def test_param_counts_and_flops_of_the_reference_moe_config():
    c = config_lib.load_config("configs/moe.py")
    dense = models.param_count(c.model)
    expert = 3 * 768 * 2048
    assert dense == 123_587_328
    assert models.param_count(c.model, c.moe) == dense + 12 * (3 * expert + 768 * 4)  # 293,493,504
    # Top-2 of 4: two experts where the dense model has one MLP, plus the router.
    assert models.active_param_count(c.model, c.moe) == dense + 12 * (expert + 768 * 4)  # 180,247,296
    info = train_lib.describe(c)
    assert info["active_params"] == 180_247_296
    assert info["params"] == 293_493_504
    extra = models.flops_per_token(c.model, c.moe) - models.flops_per_token(c.model)
    assert extra == 6 * 12 * (expert + 768 * 4)  # one more expert per layer and the router


def test_capacity_mode_flops_are_top_k_experts_not_all():
    """XLA's own FLOP count of the capacity-mode MoE MLP (top-2 of 4, capacity factor 1) is about twice the
    dense SwiGLU's at the same width, not four times. The dispatch and combine einsums add 2 * L * k * D
    per token each, 2 * L / (3 * F) of the experts' work: 2% here (L=16, F=512), 0.5% at L=512, F=2048."""
    x = random_x(0, b=2, l=L)
    dense = layers.SwiGLU(hidden=512, init_std=0.02, out_std=0.02)

    def flops(module):
        params = module.init(jax.random.key(0), x)["params"]
        cost = jax.jit(lambda p: module.apply({"params": p}, x)).lower(params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    ratio = flops(moe_ffn("capacity", capacity_factor=1.0, hidden=512)) / flops(dense)
    assert 1.95 < ratio < 2.15, ratio


@pytest.mark.parametrize("mode", [m if m != "dropless" else pytest.param(m, marks=pytest.mark.slow) for m in moe_lib.MODES])
def test_router_gets_gradients_and_metrics_are_reported(tmp_path, mode):
    config = moe_config(tmp_path, mode, **{"moe.capacity_factor": 1.0})
    model = models.build_model(config.model, config.moe)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
    batch = jax.tree.map(lambda a: jnp.asarray(a[0]), _random_batch(1, 4, 32))

    def objective(p):
        sums, moe_sums = step_lib._loss_sums(model, config, p, batch, None)
        return sums.loss, (sums, moe_sums)

    (_, (sums, moe_sums)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    for i in (0, 1):
        g = np.asarray(grads[f"blocks_{i}"]["mlp"]["router"]["kernel"])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    metrics = {name: float(value / sums.weight) for name, value in moe_sums.items()}
    expected = config.moe.aux_loss_coef * metrics["moe/load_balance_loss"] + config.moe.z_loss_coef * metrics["moe/z_loss"]
    assert metrics["moe/aux_loss"] == pytest.approx(expected, rel=1e-5)
    assert float(sums.loss - sums.nll) == pytest.approx(metrics["moe/aux_loss"] * float(sums.weight), rel=1e-4)
    for i in (0, 1):
        assert sum(metrics[f"moe/load/layer_{i}/expert_{j}"] for j in range(4)) == pytest.approx(1.0)
    assert "moe/load/layer_2/expert_0" not in metrics
    assert (metrics["moe/dropped_fraction"] > 0) == (mode == "capacity")


@pytest.mark.slow
def test_remat_keeps_moe_outputs_and_stats(tmp_path):
    outs = []
    for remat in ("none", "full"):
        config = moe_config(tmp_path, **{"model.remat": remat})
        model = models.build_model(config.model, config.moe)
        tokens = jnp.asarray(_random_batch(1, 2, 32)["inputs"][0])
        params = model.init(jax.random.key(0), tokens)["params"]
        outs.append(jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))(params, tokens))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), outs[0], outs[1])


def _one_step(config, batch_KxBxL, num_devices):
    """Params and metrics after one compiled train step of the MoE model on a mesh of `num_devices`."""
    mesh = sharding.make_mesh(num_devices)
    model = models.build_model(config.model, config.moe)
    optimizer = optim.make_optimizer(config)
    step = step_lib.compile_train_step(
        step_lib.make_train_step(model, optimizer, optim.make_schedule(config), config, mesh), mesh)
    state = jax.jit(lambda: step_lib.init_state(model, optimizer, config), out_shardings=sharding.replicated(mesh))()
    state, metrics = step(state, sharding.shard_batch(batch_KxBxL, mesh, batch_axis=1))
    return jax.device_get(state.params), jax.device_get(metrics)


def _per_device_router_metrics(config, params, batch_KxBxL, num_devices):
    """The "moe/..." metrics as the sharded step defines them, computed on one device: each device's rows
    of each micro-batch give their own router statistics (per-device load balancing), and the step
    averages them with the token weights of those rows."""
    model = models.build_model(config.model, config.moe)
    sums_of = jax.jit(lambda p, b: step_lib._loss_sums(model, config, p, b, None))
    totals, weight = {}, 0.0
    for k in range(batch_KxBxL["inputs"].shape[0]):
        for rows in np.split(np.arange(batch_KxBxL["inputs"].shape[1]), num_devices):
            sums, moe_sums = sums_of(params, {name: a[k, rows] for name, a in batch_KxBxL.items()})
            weight += float(sums.weight)
            for name, value in moe_sums.items():
                totals[name] = totals.get(name, 0.0) + float(value)
    return {name: value / weight for name, value in totals.items()}


@pytest.mark.parametrize("mode", [m if m == "dropless" else pytest.param(m, marks=pytest.mark.slow) for m in moe_lib.MODES])
def test_one_device_equals_four_devices_with_moe(tmp_path, mode):
    """The sharded step routes each device's tokens on their own, as before; what changed is the router
    statistics: each device computes them over its own rows (per-device load balancing, the load-balance
    loss is not linear in the tokens) and the step averages them with token weights. So the NLL matches
    1 device to float rounding, the "moe/..." metrics match their per-device definition, and the objective
    and params differ from 1 device only through the aux loss (coefficients 1e-2 and 1e-3): each tensor's
    update within 5% of 1 device's (measured: 1.4-1.5%; a gradient summed over one device only, or twice,
    would be off by 75% or 100%)."""
    batch = _random_batch(2, 8, 32, seed=1)
    config = moe_config(tmp_path, mode, **SGD, **{"train.grad_accum": 2, "moe.capacity_factor": 1.0})
    params_1, metrics_1 = _one_step(config, batch, 1)
    params_4, metrics_4 = _one_step(config, batch, 4)
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(metrics_4[name], metrics_1[name], rtol=1e-5)
    model = models.build_model(config.model, config.moe)
    params_0 = jax.device_get(step_lib.init_state(model, optim.make_optimizer(config), config).params)
    expected = _per_device_router_metrics(config, params_0, batch, 4)
    for name in ("moe/aux_loss", "moe/load_balance_loss", "moe/z_loss", "moe/dropped_fraction",
                 "moe/load/layer_1/expert_2"):
        np.testing.assert_allclose(metrics_4[name], expected[name], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics_4["objective"], metrics_4["loss"] + metrics_4["moe/aux_loss"], rtol=1e-6)
    def relative_update_error(p0, p1, p4):
        return float(np.linalg.norm(p4 - p1) / np.linalg.norm(p1 - p0))

    errors = jax.tree.leaves(jax.tree.map(relative_update_error, params_0, params_1, params_4))
    print(f"largest relative difference of a tensor's update, 4 vs 1 device: {max(errors):.2e}")
    assert max(errors) < 5e-2


@pytest.mark.slow  # ~45-90 s here; run with -m slow
def test_moe_training_is_deterministic_resumable_and_logged(tmp_path, kill_train_step):
    config = moe_config(tmp_path, "capacity")
    # Resuming a killed run reproduces the straight run bit for bit, which also shows the run deterministic.
    train_lib.train(config, tmp_path / "a")
    with kill_train_step(7):
        train_lib.train(moe_config(tmp_path, "capacity"), tmp_path / "resumed")
    train_lib.train(moe_config(tmp_path, "capacity"), tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "a")
    assert losses(tmp_path / "resumed", "val") == losses(tmp_path / "a", "val")

    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    train_row = next(r for r in rows if r["split"] == "train")
    assert {"moe/aux_loss", "moe/load_balance_loss", "moe/z_loss", "moe/dropped_fraction",
            "moe/load/layer_0/expert_0", "moe/load/layer_1/expert_3"} <= train_row.keys()
    assert train_row["objective"] > train_row["loss"]  # the aux loss is in the training objective...
    val_row = next(r for r in rows if r["split"] == "val")
    assert not any(name.startswith("moe/") for name in val_row)  # ...and not in validation
    tags = b"".join(p.read_bytes() for p in (tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert b"train/moe/load/layer_1/expert_1" in tags and b"train/moe/dropped_fraction" in tags


def test_checkpoint_of_a_dense_model_is_refused_by_an_moe_run(tmp_path):
    train_lib.train(tiny_config(tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2}), tmp_path / "run")
    with pytest.raises(train_lib.checkpoint_lib.CheckpointError, match="moe.n_experts is 0 there, 4 here"):
        train_lib.train(moe_config(tmp_path, **{"train.steps": 4}), tmp_path / "run")


def test_group_size_reaches_the_model_through_the_config(tmp_path):
    """moe.group_size in the config changes capacity routing (on main build_model never passed it on:
    group sizes 0 and 4 gave the same logits and drop fractions)."""
    tokens_BxL = jax.random.randint(jax.random.key(1), (4, 32), 0, 320)

    def forward(group_size):
        config = moe_config(tmp_path, "capacity", **{"moe.group_size": group_size, "moe.capacity_factor": 1.0,
                                                     "model.init_std": 0.3})
        model = models.build_model(config.model, config.moe)
        params = model.init(jax.random.key(0), tokens_BxL)["params"]
        logits, state = model.apply({"params": params}, tokens_BxL, mutable=["intermediates"])
        dropped = moe_lib.router_stats(state["intermediates"])["dropped_fraction"]
        return np.asarray(logits), float(np.mean([float(x) for x in dropped.values()]))

    (whole, dropped_whole), (grouped, dropped_grouped) = forward(0), forward(4)
    assert dropped_grouped > dropped_whole  # capacity 2 per 4 positions is tighter than 16 per 32
    assert np.abs(whole - grouped).max() > 1e-4


def test_group_size_must_divide_the_finetune_lengths():
    c = default_config()
    config_lib.apply_overrides(c, ["moe.n_experts=4", "moe.mode=capacity", "moe.group_size=32",
                                   "stages=pretrain,finetune", "mathqa.pad_multiple=48"])
    with pytest.raises(ConfigError, match=r"moe.group_size \(32\) must divide mathqa.pad_multiple \(48\)"):
        config_lib.validate(c)
    config_lib.apply_overrides(c, ["mathqa.pad_multiple=64"])
    config_lib.validate(c)


# --- config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("moe.top_k=5", "moe.top_k is 5; it must be between 1 and moe.n_experts (4)"),
    ("moe.mode=dropped", "choose one of dropless, capacity"),
    ("moe.every=13", "moe.every is 13"),
    ("moe.capacity_factor=0", "moe.capacity_factor"),
    ("moe.group_size=5", "moe.group_size (5) must divide model.sequence_length (512)"),
    ("model.name=gpt2", "mixture-of-experts MLPs are for llama"),
])
def test_bad_moe_values(override, message):
    c = default_config()
    config_lib.apply_overrides(c, ["moe.n_experts=4", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(c)


def test_moe_preset_is_the_2024_moe_team_run():
    c = config_lib.load_config("configs/moe.py")
    assert (c.model.name, c.model.n_layer, c.model.n_embd, c.model.n_head) == ("llama", 12, 768, 12)
    assert (c.moe.n_experts, c.moe.top_k, c.moe.every, c.moe.renormalize) == (4, 2, 1, False)
    assert (c.moe.aux_loss_coef, c.moe.z_loss_coef) == (1e-2, 1e-3)
    assert (c.train.steps, c.train.batch_size, c.train.grad_accum, c.model.sequence_length) == (11000, 32, 4, 512)
    smoothed = config_lib.load_config("configs/moe.py", ["loss.label_smoothing=0.1"])
    assert smoothed.loss.label_smoothing == 0.1
