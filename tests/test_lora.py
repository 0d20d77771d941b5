"""LoRA adapters: zero B is the base model, only adapters train, merged weights give the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import config as config_lib, models, optim, step as step_lib
from jaxllm.models import lora as lora_lib


def small_config(n_experts=0, **lora):
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_kv_head = 2, 32, 4, 2
    c.model.vocab_size, c.model.sequence_length = 64, 16
    c.moe.n_experts = n_experts
    c.finetune.lora.rank, c.finetune.lora.alpha = 4, 8.0
    c.finetune.lora.update(lora)
    c.optim.lr, c.optim.schedule, c.train.steps = 1e-2, "constant", 10
    return config_lib.validate(c)


def setup(config):
    base = models.build(config)
    lo = config.finetune.lora
    model = lora_lib.LoraModel(base, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    params = model.init(jax.random.key(0), tokens)["params"]
    return base, model, params, tokens


def test_fresh_adapters_leave_the_model_unchanged():
    base, model, params, tokens = setup(small_config())
    assert set(params["lora"]) == {f"blocks_{i}/{p}" for i in range(2)
                                   for p in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/w1", "mlp/w3", "mlp/w2")}
    np.testing.assert_array_equal(model.apply({"params": params}, tokens),
                                  base.apply({"params": params["base"]}, tokens))


def test_targets_select_modules():
    _, _, params, _ = setup(small_config(targets="q,down"))
    assert set(params["lora"]) == {"blocks_0/attn/q", "blocks_0/mlp/w2", "blocks_1/attn/q", "blocks_1/mlp/w2"}
    assert params["lora"]["blocks_0/attn/q"]["a"].shape == (32, 4)


def test_only_adapters_train_and_base_has_no_optimizer_state():
    config = small_config()
    _, model, params, tokens = setup(config)
    optimizer = lora_lib.frozen_base_optimizer(optim.make_optimizer(config))
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    full_bytes = lora_lib.tree_bytes(optim.make_optimizer(config).init(params["base"]))
    assert lora_lib.tree_bytes(state.opt_state) < full_bytes / 5  # no Adam moments for the base
    train_step = jax.jit(step_lib.make_train_step(model, optimizer, optim.make_schedule(config), config))
    batch = {"inputs": tokens[None], "targets": jnp.roll(tokens, -1, axis=1)[None],
             "weights": jnp.ones((1, 2, 16), jnp.float32)}
    for _ in range(3):
        state, metrics = train_step(state, batch)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.params["base"], params["base"])
    assert all(jax.tree.leaves(same))
    assert not np.array_equal(state.params["lora"]["blocks_0/attn/q"]["b"], 0)


def trained_adapters(params):
    """The params with adapters moved off their fresh values (b = 0 would make every comparison trivial)."""
    return {**params, "lora": jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                                           params["lora"])}


@pytest.mark.parametrize("n_experts", [0, 4])
def test_merged_weights_give_the_same_logits(n_experts):
    """Also for MoE layers, whose gate/up/down adapters are per expert [E, D_in, r] x [E, r, D_out]."""
    base, model, params, tokens = setup(small_config(n_experts))
    if n_experts:
        assert params["lora"]["blocks_0/mlp/w1"]["a"].shape == (4, 32, 4)
        assert params["lora"]["blocks_0/mlp/w2"]["b"].shape == (4, 4, 32)
    params = trained_adapters(params)
    adapted = model.apply({"params": params}, tokens)
    merged = base.apply({"params": lora_lib.merge(params, {"alpha": 8.0})}, tokens)
    assert not np.allclose(adapted, base.apply({"params": params["base"]}, tokens), atol=1e-3)
    np.testing.assert_allclose(merged, adapted, atol=2e-5, rtol=1e-5)


def test_adapter_dropout_is_active_only_in_training():
    config = small_config(dropout=0.5)
    _, model, params, tokens = setup(config)
    params["lora"] = jax.tree.map(lambda x: x + 0.1, params["lora"])
    rngs = {"dropout": jax.random.key(5)}
    train = model.apply({"params": params}, tokens, deterministic=False, rngs=rngs)
    evaluation = model.apply({"params": params}, tokens, deterministic=True)
    assert not np.allclose(train, evaluation)
    np.testing.assert_array_equal(evaluation, model.apply({"params": params}, tokens))


@pytest.mark.parametrize("n_experts", [0, 4])
def test_lora_model_decodes_with_the_kv_cache(n_experts):
    """The LoRA wrapper passes the cache through: cached logits (prefill 10, then 6) equal its full forward,
    and equal the merged model's cached logits (what generation and scoring run)."""
    base, model, params, tokens = setup(small_config(n_experts))
    params = trained_adapters(params)
    full = model.apply({"params": params}, tokens)

    def cached(module, variables):
        first, cache = module.apply(variables, tokens[:, :10], cache=models.init_cache(base, 2, 16),
                                    position=jnp.int32(0))
        rest, _ = module.apply(variables, tokens[:, 10:], cache=cache, position=jnp.int32(10))
        return np.concatenate([first, rest], axis=1)

    np.testing.assert_allclose(cached(model, {"params": params}), full, atol=2e-5, rtol=1e-5)
    merged = {"params": lora_lib.merge(params, {"alpha": 8.0})}
    np.testing.assert_allclose(cached(base, merged), full, atol=2e-5, rtol=1e-5)


def test_adapter_dropout_on_expert_kernels_is_refused():
    with pytest.raises(config_lib.ConfigError, match="finetune.lora.dropout"):
        small_config(4, dropout=0.1)
    small_config(4, dropout=0.1, targets="q,k,v,o")
