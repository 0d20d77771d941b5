"""KV-cache generation equals the argmax of full forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib, generate, models
from jaxllm.models import moe as moe_lib


@pytest.mark.parametrize("n_kv_head, tie", [(0, True), (2, False)])
def test_greedy_kv_cache_generation_equals_full_forward_argmax(n_kv_head, tie):
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_kv_head = 2, 32, 4, n_kv_head
    c.model.vocab_size, c.model.sequence_length, c.model.tie_embeddings = 64, 32, tie
    c.model.init_std = 0.2  # sharper distributions: argmax ties would make the comparison fragile
    model = models.build_model(c.model)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
    params = model.init(jax.random.key(0), prompt)["params"]
    assert_generation_equals_full_forward_argmax(model, params, prompt, max_new_tokens=8)


def assert_generation_equals_full_forward_argmax(model, params, prompt_BxP, max_new_tokens: int) -> None:
    """Greedy `generate` (KV cache) == argmax of the training model re-run on the whole sequence each step.

    The sequence is kept at a fixed length (trailing zeros) so it compiles once; causality makes the padding
    irrelevant."""
    out = np.asarray(generate.generate(model, params, prompt_BxP, max_new_tokens=max_new_tokens))
    full = jax.jit(lambda t: model.apply({"params": params}, t))
    b, p = prompt_BxP.shape
    tokens = np.zeros((b, p + max_new_tokens), np.int32)
    tokens[:, :p] = np.asarray(prompt_BxP)
    for n in range(p, p + max_new_tokens):
        tokens[:, n] = np.asarray(jnp.argmax(full(jnp.asarray(tokens))[:, n - 1], -1))
    np.testing.assert_array_equal(out, tokens[:, p:])


def _cached_and_full_logits(c, cache_dtype):
    """(logits of 9 tokens through the KV cache, 6 then 3, the full forward's logits, params, tokens)."""
    model = models.build(c)
    tokens = jax.random.randint(jax.random.key(2), (1, 9), 0, 64)
    params = model.init(jax.random.key(0), tokens)["params"]
    cache = models.init_cache(model, 1, 12)
    assert cache[0]["k"].dtype == cache_dtype
    first, cache = model.apply({"params": params}, tokens[:, :6], cache=cache, position=jnp.int32(0))
    rest, _ = model.apply({"params": params}, tokens[:, 6:], cache=cache, position=jnp.int32(6))
    return np.concatenate([first, rest], axis=1), model.apply({"params": params}, tokens), params, tokens


def tiny(**overrides):
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.vocab_size = 2, 32, 4, 64
    c.model.sequence_length, c.model.init_std = 32, 0.1
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return config_lib.validate(c)


MOE = {"moe.n_experts": 4, "moe.top_k": 2}
CASES = {
    "dense": {},
    "gqa_untied": {"model.n_kv_head": 2, "model.tie_embeddings": False},
    "gpt2": {"model.name": "gpt2"},
    "moe_dropless": MOE,
    # capacity_factor = n_experts / top_k: each expert can take every token of the sequence, nothing drops
    "moe_capacity_no_drops": {**MOE, "moe.mode": "capacity", "moe.capacity_factor": 2.0, "moe.every": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_cached_logits_equal_full_forward_logits(case):
    """The model's own cache mode (prefill 6 tokens, then 3) gives the training forward's logits: dense,
    grouped-query with an untied head, gpt2, and MoE (dropless, and capacity where nothing is dropped)."""
    c = tiny(**CASES[case])
    cached, full, params, tokens = _cached_and_full_logits(c, jnp.float32)
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
    if "moe.mode" in CASES[case]:
        _, state = models.build(c).apply({"params": params}, tokens, mutable=["intermediates"])
        dropped = moe_lib.router_stats(state["intermediates"])["dropped_fraction"]
        assert list(dropped) == [1] and float(dropped[1]) == 0.0  # the comparison above is capacity's


def test_capacity_model_decodes_dropless():
    """Decoding a capacity-mode model routes every token to its top-k experts: where training drops
    assignments (capacity factor 0.5) the cached logits are the dropless model's, not the capacity forward's."""
    c = tiny(**MOE, **{"moe.mode": "capacity", "moe.capacity_factor": 0.5, "model.init_std": 0.5})
    cached, capacity_full, params, tokens = _cached_and_full_logits(c, jnp.float32)
    dropless = models.build(tiny(**MOE, **{"model.init_std": 0.5})).apply({"params": params}, tokens)
    np.testing.assert_allclose(cached, dropless, atol=1e-4, rtol=1e-4)
    assert np.abs(cached - capacity_full).max() > 1e-2


@pytest.mark.slow  # the cached-logits test above and the MoE stage test cover it in the fast suite
def test_moe_generation_equals_full_forward_argmax():
    c = tiny(**MOE, **{"model.init_std": 0.2})
    model = models.build(c)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
    params = model.init(jax.random.key(0), prompt)["params"]
    assert_generation_equals_full_forward_argmax(model, params, prompt, max_new_tokens=6)


def test_gpt2_generation_past_its_positions_is_refused():
    c = tiny(**{"model.name": "gpt2", "model.sequence_length": 8})
    model = models.build(c)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    with pytest.raises(config_lib.ConfigError, match="exceed gpt2's 8 learned positions"):
        generate.generate(model, params, jnp.zeros((1, 5), jnp.int32), max_new_tokens=4)


@pytest.mark.parametrize("residual", ["float32", "compute"])
def test_bf16_cached_logits_follow_the_models_residual_dtype(residual):
    """Under bf16 compute the cached forward carries the residual stream in the model's residual_dtype: its
    logits equal the training model's with that setting (0.0 measured) and not the other's (1.8e-3 apart)."""
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.vocab_size = 2, 32, 4, 64
    c.model.dtype, c.model.residual_dtype = "bfloat16", residual
    cached, full, params, tokens = _cached_and_full_logits(c, jnp.bfloat16)
    np.testing.assert_allclose(cached, full, atol=2e-4)
    other = c.model.copy_and_resolve_references()
    other.residual_dtype = "compute" if residual == "float32" else "float32"
    assert np.abs(cached - models.build_model(other).apply({"params": params}, tokens)).max() > 5e-4


def test_sampling_is_seeded_and_respects_top_k():
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.vocab_size = 1, 32, 4, 64
    model = models.build_model(c.model)
    prompt = jnp.zeros((1, 3), jnp.int32)
    params = model.init(jax.random.key(0), prompt)["params"]
    a = generate.generate(model, params, prompt, max_new_tokens=16, temperature=1.0, top_k=1, seed=1)
    greedy = generate.generate(model, params, prompt, max_new_tokens=16)
    np.testing.assert_array_equal(a, greedy)  # top_k=1 is greedy whatever the temperature
    b = generate.generate(model, params, prompt, max_new_tokens=16, temperature=2.0, seed=1)
    assert np.array_equal(b, generate.generate(model, params, prompt, max_new_tokens=16, temperature=2.0, seed=1))
    assert not np.array_equal(b, generate.generate(model, params, prompt, max_new_tokens=16, temperature=2.0, seed=2))
