"""Packing: several whole examples per row with segment ids and per-example positions compute what the examples
compute alone (loss sums and gradients), on every attention kernel; the packing is a best fit, covers each example
once per epoch, and is a pure function of (seed, step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import models
from jaxllm import step as step_lib
from jaxllm.data import sft
from jaxllm.models import attention as attention_lib


def tiny_config(attention="jaxllm", head_chunk=0, n_experts=0):
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_kv_head = 2, 32, 4, 2
    c.model.vocab_size, c.model.sequence_length, c.model.attention = 97, 64, attention
    c.loss.head_chunk = head_chunk
    c.moe.n_experts = n_experts
    return c


def random_examples(n, seed=0, low=3, high=20):
    """n (ids, mask) examples of random lengths whose second half is trained."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(low, high))
        ids = rng.integers(1, 97, length).astype(np.int32)
        mask = (np.arange(length) >= length // 2).astype(np.float32)
        examples.append((ids, mask))
    return examples


def loss_and_grads(config, params, batch):
    model = models.build(config)

    def objective(p):
        sums, _ = step_lib._loss_sums(model, config, p, batch, jax.random.key(0))
        return sums.loss, sums

    (_, sums), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return sums, grads


@pytest.mark.parametrize("attention,head_chunk", [("jaxllm", 0), ("xla", 0), ("jaxllm", 16)])
def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(attention, head_chunk):
    config = tiny_config(attention, head_chunk)
    examples = random_examples(6)
    rows = [[i for i in row] for row in sft.pack_best_fit([len(ids) - 1 for ids, _ in examples], 32)]
    assert len(rows) < len(examples)  # some rows really hold several examples
    packed = sft.make_packed_batch([[examples[i] for i in row] for row in rows], len(rows), 32)
    unpacked = sft.make_batch(examples, len(examples), 32)
    params = models.build(config).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    sums_packed, grads_packed = loss_and_grads(config, params, jax.tree.map(jnp.asarray, packed))
    sums_unpacked, grads_unpacked = loss_and_grads(config, params, jax.tree.map(jnp.asarray, unpacked))
    assert float(sums_packed.weight) == float(sums_unpacked.weight) == sum(m[1:].sum() for _, m in examples)
    np.testing.assert_allclose(float(sums_packed.nll), float(sums_unpacked.nll), rtol=4 * np.finfo(np.float32).eps)
    assert float(sums_packed.correct) == float(sums_unpacked.correct)
    for a, b in zip(jax.tree.leaves(grads_packed), jax.tree.leaves(grads_unpacked)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


def test_packed_moe_model_gives_each_example_its_own_logits():
    """MoE layers route tokens one by one (dropless), so a packed row's logits are each example's own."""
    config = tiny_config(n_experts=4)
    config.model.n_layer = 1
    model = models.build(config)
    apply = jax.jit(lambda params, tokens, kwargs: model.apply({"params": params}, tokens, **kwargs))
    examples = random_examples(2, seed=3, low=12, high=13)
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    batch = sft.make_packed_batch([examples], 1, 24)
    logits = apply(params, jnp.asarray(batch["inputs"]), step_lib.packed_inputs(jax.tree.map(jnp.asarray, batch)))[0]
    offset = 0
    for ids, _ in examples:
        alone = apply(params, jnp.asarray(ids[None, :-1]), {})[0]
        np.testing.assert_allclose(np.asarray(logits[offset:offset + len(ids) - 1]), np.asarray(alone), atol=2e-5)
        offset += len(ids) - 1


@pytest.mark.parametrize("attention", ["jaxllm", "xla"])
def test_one_segment_at_positions_from_zero_is_the_plain_forward(attention):
    config = tiny_config(attention)
    model = models.build(config)
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 97)
    params = model.init(jax.random.key(1), tokens)["params"]
    apply = jax.jit(lambda params, tokens, kwargs: model.apply({"params": params}, tokens, **kwargs))
    plain = apply(params, tokens, {})
    segmented = apply(params, tokens, {"segment_ids_BxL": jnp.ones((2, 24), jnp.int32),
                                       "positions_BxL": jnp.tile(jnp.arange(24, dtype=jnp.int32), (2, 1))})
    np.testing.assert_allclose(np.asarray(plain), np.asarray(segmented), rtol=1e-6, atol=1e-6)


def test_cudnn_request_runs_packed_attention_through_xla():
    q = jax.random.normal(jax.random.key(0), (2, 12, 4, 8))
    k, v = jax.random.normal(jax.random.key(1), (2, 12, 2, 8)), jax.random.normal(jax.random.key(2), (2, 12, 2, 8))
    segments = jnp.asarray([[1] * 5 + [2] * 6 + [0], [1] * 12], jnp.int32)
    run = jax.jit(attention_lib.causal_attention, static_argnames="impl")
    xla = run(q, k, v, "xla", segment_ids_BxL=segments)
    cudnn = run(q, k, v, "cudnn", segment_ids_BxL=segments)
    ours = run(q, k, v, "jaxllm", segment_ids_BxL=segments)
    np.testing.assert_array_equal(np.asarray(xla), np.asarray(cudnn))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=1e-5)
    # the second segment of row 0 attends only to itself: the same as attending alone
    alone = run(q[:1, 5:11], k[:1, 5:11], v[:1, 5:11], "xla")
    np.testing.assert_allclose(np.asarray(ours[:1, 5:11]), np.asarray(alone), atol=1e-5)


def reference_best_fit(sizes, capacity):
    """Best fit written plainly: scan every row for the one with the least room that still holds the item."""
    rows, rooms = [], []
    for index, size in enumerate(sizes):
        fits = [(room, row) for row, room in enumerate(rooms) if room >= size]
        if fits:
            _, row = min(fits)
        else:
            rows.append([]), rooms.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        rooms[row] -= size
    return rows


def test_best_fit_packing_matches_a_plain_reference_and_respects_the_capacity():
    rng = np.random.default_rng(0)
    for capacity in (16, 64, 128):
        sizes = [int(s) for s in rng.integers(1, capacity + 1, 300)]
        rows = sft.pack_best_fit(sizes, capacity)
        assert rows == reference_best_fit(sizes, capacity)
        assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in row) <= capacity for row in rows)


def test_packed_batches_cover_each_example_once_per_epoch_and_depend_only_on_seed_and_step():
    examples = random_examples(40, seed=5, high=30)
    data = sft.ExampleBatches(examples, examples[:2], max_length=48, pad_multiple=16, packing=True)
    first_epoch_rows = sft.pack_best_fit(
        [len(examples[i][0]) - 1 for i in sft.epoch_order(7, 0, 40)], 48)
    n_rows = len(first_epoch_rows)
    batches = [data.train_batch(seed=7, step=s, batch_size=2, grad_accum=1) for s in range(n_rows // 2)]
    seen = []
    for batch in batches:
        for row in range(2):
            segments = batch["segment_ids"][0, row]
            for segment in range(1, segments.max() + 1):
                at = segments == segment
                assert batch["positions"][0, row][at].tolist() == list(range(at.sum()))
                seen.append(tuple(batch["inputs"][0, row][at]))
    expected = [tuple(examples[i][0][:-1]) for row in first_epoch_rows[:len(batches) * 2]
                for i in [int(sft.epoch_order(7, 0, 40)[j]) for j in row]]
    assert seen == expected and len(set(seen)) == len(seen)
    # a fresh instance (a resumed run) gives the same batch for a late step, and the weights are the masks'
    fresh = sft.ExampleBatches(examples, examples[:2], max_length=48, pad_multiple=16, packing=True)
    late_a = data.train_batch(seed=7, step=25, batch_size=2, grad_accum=2)
    late_b = fresh.train_batch(seed=7, step=25, batch_size=2, grad_accum=2)
    assert all(np.array_equal(late_a[k], late_b[k]) for k in late_a)
    assert late_a["inputs"].shape == (2, 2, 48) and late_a["segment_ids"].dtype == np.int32


def test_packing_is_refused_for_gpt2():
    c = config_lib.default_config()
    c.model.name, c.finetune.packing = "gpt2", True
    with pytest.raises(config_lib.ConfigError, match="finetune.packing is for llama"):
        config_lib.validate(c)
