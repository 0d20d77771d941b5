"""Schedules and the AdamW chain against torch itself (OneCycleLR, AdamW, clip_grad_norm_), the decay mask."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxllm import config as config_lib
from jaxllm import optim


def torch_onecycle_lrs(max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor):
    """The learning rate of each of the `total_steps` updates: torch's OneCycleLR driving a real AdamW.

    cycle_momentum=False: jaxllm keeps AdamW's betas fixed at optim.beta1/beta2 (torch's default would cycle
    beta1 between 0.85 and 0.95). The scheduler is stepped once per update, as a training loop does; the
    optimizer steps once first so torch sees the usual order.
    """
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=max_lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy=anneal_strategy,
        div_factor=div_factor, final_div_factor=final_div_factor, cycle_momentum=False)
    param.grad = torch.ones_like(param)
    opt.step()
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        scheduler.step()
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    return np.array(lrs)


def _config(**optim_fields):
    c = config_lib.default_config()
    c.train.steps = optim_fields.pop("steps", 1000)
    for k, v in optim_fields.items():
        c.optim[k] = v
    return config_lib.validate(c)


def test_onecycle_reference_defaults_endpoints():
    lr, total = 1e-3, 1000
    schedule = optim.onecycle_schedule(lr, total)  # pct 0.05, cos, div 100, final_div 0.1
    assert float(schedule(0)) == pytest.approx(lr / 100, rel=1e-6)
    assert float(schedule(int(0.05 * total) - 1)) == pytest.approx(lr, rel=1e-6)
    assert float(schedule(total - 1)) == pytest.approx(lr / 10, rel=1e-6)
    assert float(schedule(total + 50)) == pytest.approx(lr / 10, rel=1e-6)  # held past the end
    # Cosine-shaped warm-up: at a quarter of it the cos ramp is below the linear one.
    quarter = schedule((int(0.05 * total) - 1) // 4)
    assert float(quarter) < lr / 100 + (lr - lr / 100) * 0.25


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("lr,total,pct,div,final_div", [
    (1e-3, 1000, 0.05, 100.0, 0.1),  # the reference default
    (1e-3, 1000, 0.3, 25.0, 1e4),  # the 2025 team
    (1.25e-3, 337, 0.3, 25.0, 1e4),  # a fractional end of warm-up (0.3 * 337 - 1 = 100.1)
    (3e-4, 7, 0.05, 100.0, 0.1),  # warm-up shorter than one step: end1 < 0
])
def test_onecycle_matches_torch_at_every_step(anneal, lr, total, pct, div, final_div):
    schedule = jax.jit(optim.onecycle_schedule(lr, total, pct, anneal, div, final_div))
    ours = np.asarray(jax.vmap(schedule)(jnp.arange(total, dtype=jnp.int32)))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_onecycle_lrs(lr, total, pct, anneal, div, final_div), rtol=2e-6, atol=0)


CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_pretraining_schedule_matches_torch(path):
    """Each shipped config's one-cycle schedule, over all of its train.steps, against torch's OneCycleLR."""
    c = config_lib.load_config(str(path), [])
    o, total = c.optim, int(c.train.steps)
    if o.schedule not in optim.ANNEALS:
        pytest.skip(f"{path.name} pretrains with the '{o.schedule}' schedule, not the one-cycle")
    ours = np.asarray(jax.jit(jax.vmap(optim.make_schedule(c)))(jnp.arange(total, dtype=jnp.int32)))
    theirs = torch_onecycle_lrs(o.lr, total, o.warmup_pct, o.schedule, o.div_factor, o.final_div_factor)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=0)


def test_adamw_onecycle_and_clipping_match_torch_over_a_whole_schedule():
    """300 updates of optim.make_optimizer against torch AdamW + OneCycleLR + clip_grad_norm_ on the same grads.

    Decayed (a "kernel" matrix) and undecayed (a norm "scale") parameters; the gradients are large enough that
    clipping acts on some steps and not on others. float32 on both sides.
    """
    total = 300
    c = _config(steps=total)  # the reference's AdamW (0.9, 0.95, eps 1e-8, wd 0.1) and one-cycle, clip 1.0
    o = c.optim
    rng = np.random.default_rng(0)
    kernel0, scale0 = rng.normal(size=(4, 3)).astype(np.float32), np.ones(3, np.float32)
    grads = [(rng.normal(size=(4, 3)) * s, rng.normal(size=3) * s)
             for s in np.where(np.arange(total) % 3 == 0, 2.0, 0.1)]

    tx = optim.make_optimizer(c)
    params = {"dense": {"kernel": jnp.asarray(kernel0)}, "norm": {"scale": jnp.asarray(scale0)}}
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g_kernel, g_scale in grads:
        g = {"dense": {"kernel": jnp.asarray(g_kernel, jnp.float32)}, "norm": {"scale": jnp.asarray(g_scale, jnp.float32)}}
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)

    kernel, scale = torch.nn.Parameter(torch.tensor(kernel0)), torch.nn.Parameter(torch.tensor(scale0))
    opt = torch.optim.AdamW([{"params": [kernel], "weight_decay": o.weight_decay},
                             {"params": [scale], "weight_decay": 0.0}], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=o.lr, total_steps=total, pct_start=o.warmup_pct, anneal_strategy=o.schedule,
        div_factor=o.div_factor, final_div_factor=o.final_div_factor, cycle_momentum=False)
    clipped = 0
    for g_kernel, g_scale in grads:
        kernel.grad = torch.tensor(g_kernel, dtype=torch.float32)
        scale.grad = torch.tensor(g_scale, dtype=torch.float32)
        clipped += float(torch.nn.utils.clip_grad_norm_([kernel, scale], o.grad_clip)) > o.grad_clip
        opt.step()
        scheduler.step()
    assert 0 < clipped < total
    np.testing.assert_allclose(np.asarray(params["dense"]["kernel"]), kernel.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["norm"]["scale"]), scale.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(params["dense"]["kernel"]), kernel0, atol=1e-3)  # it did train


def test_onecycle_team_2025_endpoints():
    lr, total = 1e-3, 1000
    schedule = optim.onecycle_schedule(lr, total, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    assert float(schedule(0)) == pytest.approx(lr / 25, rel=1e-6)
    assert float(schedule(299)) == pytest.approx(lr, rel=1e-6)
    assert float(schedule(999)) == pytest.approx(lr / 25 / 1e4, rel=1e-6)


def test_onecycle_rejects_bad_anneal():
    with pytest.raises(ValueError, match="anneal"):
        optim.onecycle_schedule(1e-3, 100, anneal="cosine")


def test_make_schedule_onecycle_uses_config():
    c = _config(schedule="linear", warmup_pct=0.3, div_factor=25.0, final_div_factor=1e4, lr=2e-3)
    schedule = optim.make_schedule(c)
    theirs = torch_onecycle_lrs(2e-3, 1000, 0.3, "linear", 25.0, 1e4)
    for step in (0, 17, 299, 300, 640, 999):
        assert float(schedule(step)) == pytest.approx(theirs[step], rel=2e-6)
    assert float(optim.learning_rate(c, 299)) == pytest.approx(2e-3, rel=1e-6)


def test_cosine_shape():
    c = _config(schedule="cosine", warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    s = optim.make_schedule(c)
    assert float(s(0)) == 0.0
    assert float(s(50)) == pytest.approx(0.5e-3, rel=1e-6)
    assert float(s(100)) == pytest.approx(1e-3, rel=1e-6)
    assert float(s(550)) == pytest.approx(0.55e-3, rel=1e-5)  # half-way down the cosine: the mean of ends
    assert float(s(1000)) == pytest.approx(1e-4, rel=1e-6)
    assert float(s(5000)) == pytest.approx(1e-4, rel=1e-6)
    values = np.asarray(jax.vmap(s)(jnp.arange(100, 1001)))
    assert np.all(np.diff(values) <= 0)


def test_warmup_from_pct_when_steps_unset():
    c = _config(schedule="cosine", warmup_steps=0, warmup_pct=0.05, lr=1e-3)
    assert optim.warmup_steps(c) == 50
    assert float(optim.make_schedule(c)(50)) == pytest.approx(1e-3, rel=1e-6)


def test_wsd_shape():
    c = _config(schedule="wsd", warmup_steps=100, lr=1e-3, min_lr_ratio=0.1, decay_pct=0.2)
    s = optim.make_schedule(c)
    assert float(s(0)) == 0.0
    assert float(s(100)) == pytest.approx(1e-3, rel=1e-6)
    assert float(s(500)) == pytest.approx(1e-3, rel=1e-6)
    assert float(s(800)) == pytest.approx(1e-3, rel=1e-6)  # decay starts at 1000 - 200
    assert float(s(900)) == pytest.approx(0.55e-3, rel=1e-6)
    assert float(s(1000)) == pytest.approx(1e-4, rel=1e-6)


def test_constant_shape():
    c = _config(schedule="constant", warmup_steps=10, lr=1e-3)
    s = optim.make_schedule(c)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5e-3, rel=1e-6)
    assert float(s(10)) == pytest.approx(1e-3, rel=1e-6)
    assert float(s(999)) == pytest.approx(1e-3, rel=1e-6)


@pytest.mark.parametrize("name", ["cos", "linear", "cosine", "wsd", "constant"])
def test_every_schedule_jit_compiles(name):
    s = optim.make_schedule(_config(schedule=name, warmup_steps=0 if name in ("cos", "linear") else 20))
    jitted = jax.jit(s)
    for step in (0, 20, 500, 999):
        value = jitted(jnp.asarray(step, jnp.int32))
        assert value.dtype == jnp.float32 and value.shape == ()
        assert float(value) == pytest.approx(float(s(step)), rel=1e-6)


def _params():
    return {
        "wte": {"embedding": jnp.ones((16, 4))},
        "wpe": {"embedding": jnp.ones((8, 4))},
        "blocks_0": {"attn": {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}},
                     "norm1": {"scale": jnp.ones((4,))}},
        "lm_head": {"kernel": jnp.ones((4, 16))},
        "vector": {"kernel": jnp.ones((4,))},  # a 1-d "kernel" is not a weight matrix
    }


def test_decay_mask():
    mask = optim.decay_mask(_params())
    assert mask == {
        "wte": {"embedding": False},
        "wpe": {"embedding": False},
        "blocks_0": {"attn": {"q": {"kernel": True, "bias": False}}, "norm1": {"scale": False}},
        "lm_head": {"kernel": True},
        "vector": {"kernel": False},
    }


def test_decay_mask_on_flax_params():
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Embed(10, 4, name="wte")(x)
            x = nn.RMSNorm(name="norm")(x)
            return nn.Dense(10, name="lm_head")(x)

    params = Tiny().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    mask = optim.decay_mask(params)
    assert mask["lm_head"] == {"kernel": True, "bias": False}
    assert mask["wte"] == {"embedding": False} and mask["norm"] == {"scale": False}


def test_adamw_decays_only_masked_in_params():
    c = _config(name="adamw", schedule="constant", warmup_pct=1e-6, lr=0.1, weight_decay=0.5, grad_clip=1.0)
    tx = optim.make_optimizer(c)
    params = _params()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    mask = optim.decay_mask(params)
    for (path, old), new_leaf, decayed in zip(jax.tree_util.tree_leaves_with_path(params),
                                              jax.tree.leaves(new), jax.tree.leaves(mask)):
        if decayed:
            # torch AdamW: p <- p * (1 - lr * wd)
            np.testing.assert_allclose(np.asarray(new_leaf), np.asarray(old) * (1 - 0.1 * 0.5), rtol=1e-6,
                                       err_msg=str(path))
        else:
            np.testing.assert_array_equal(np.asarray(new_leaf), np.asarray(old), err_msg=str(path))


def test_adamw_matches_torch_first_step():
    """One AdamW step with a gradient: p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)."""
    c = _config(name="adamw", schedule="constant", warmup_pct=1e-6, lr=1e-2, weight_decay=0.1, grad_clip=0.0)
    tx = optim.make_optimizer(c)
    params = {"dense": {"kernel": jnp.full((2, 2), 2.0)}}
    grads = {"dense": {"kernel": jnp.array([[0.5, -1.0], [2.0, 0.0]])}}
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)["dense"]["kernel"]
    g = np.asarray(grads["dense"]["kernel"])
    # After bias correction, step 1: m_hat = g, v_hat = g^2.
    expected = 2.0 - 1e-2 * (g / (np.abs(g) + 1e-8) + 0.1 * 2.0)
    np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-6)


def test_gradient_clipping_caps_global_norm():
    # sgd without momentum and decay: the update is -lr * clipped gradient, so its norm shows the clip.
    c = _config(name="sgd", momentum=0.0, weight_decay=0.0, schedule="constant", warmup_pct=1e-6, lr=1.0,
                grad_clip=1.0)
    tx = optim.make_optimizer(c)
    params = {"a": {"kernel": jnp.zeros((3, 3))}, "b": {"bias": jnp.zeros((3,))}}
    big = {"a": {"kernel": jnp.full((3, 3), 10.0)}, "b": {"bias": jnp.full((3,), -10.0)}}
    updates, _ = tx.update(big, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
    small = jax.tree.map(lambda g: g * 1e-3, big)
    updates, _ = tx.update(small, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(float(optax.tree.norm(small)), rel=1e-5)


@pytest.mark.parametrize("name", ["lion", "sgd"])
def test_lion_and_sgd_take_a_step(name):
    lr, wd = 1e-2, 0.1
    c = _config(name=name, schedule="constant", warmup_pct=1e-6, lr=lr, weight_decay=wd, momentum=0.9,
                grad_clip=0.0)
    tx = optim.make_optimizer(c)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p1, state = step(params, tx.init(params))
    # Both first steps move by lr * 1 (lion: sign of the gradient; sgd: the first momentum is the
    # gradient itself), plus lr * wd * p on the decayed kernels only.
    np.testing.assert_allclose(np.asarray(p1["lm_head"]["kernel"]), 1 - lr * (1 + wd), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p1["wte"]["embedding"]), 1 - lr, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p1["blocks_0"]["norm1"]["scale"]), 1 - lr, rtol=1e-6)
    if name == "sgd":
        # Second step: momentum 1 + 0.9 of the gradient; the decay is not carried in the momentum.
        p2, _ = step(p1, state)
        k1 = 1 - lr * (1 + wd)
        np.testing.assert_allclose(np.asarray(p2["lm_head"]["kernel"]), k1 - lr * (1.9 + wd * k1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(p2["wte"]["embedding"]), 1 - lr - lr * 1.9, rtol=1e-6)
