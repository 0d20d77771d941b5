"""cross_entropy against numpy references of the PyTorch definitions, and the sum properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import loss as loss_lib

B, L, V = 3, 5, 11


def _inputs(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits_BxLxV = (scale * rng.standard_normal((B, L, V))).astype(np.float32)
    targets_BxL = rng.integers(0, V, (B, L)).astype(np.int32)
    weights_BxL = (rng.random((B, L)) > 0.3).astype(np.float32)
    return logits_BxLxV, targets_BxL, weights_BxL


def _reference(logits, targets, weights, eps=0.0, z=0.0):
    """numpy float64 port of torch.nn.CrossEntropyLoss(reduction='none', label_smoothing=eps) + z-loss."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    logp = x - lse[..., None]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    smooth = -logp.sum(-1) / x.shape[-1]  # torch: eps * (-sum_c log p_c) / C
    obj = (1 - eps) * nll + eps * smooth + z * lse**2
    correct = (x.argmax(-1) == targets).astype(np.float64)
    w = weights.astype(np.float64)
    return dict(loss=(w * obj).sum(), nll=(w * nll).sum(), correct=(w * correct).sum(), weight=w.sum())


def _check(sums, ref, rtol=1e-5):
    for name in ("loss", "nll", "correct", "weight"):
        value = getattr(sums, name)
        assert value.dtype == jnp.float32 and value.shape == ()
        np.testing.assert_allclose(float(value), ref[name], rtol=rtol, atol=1e-5, err_msg=name)


def test_matches_numpy_reference():
    logits, targets, weights = _inputs()
    _check(loss_lib.cross_entropy(logits, targets, weights), _reference(logits, targets, weights))


def test_hand_computed_single_token():
    logits = np.array([[[1.0, 2.0, 3.0]]], np.float32)
    sums = loss_lib.cross_entropy(logits, np.array([[0]], np.int32), np.ones((1, 1), np.float32))
    expected = math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 1.0
    assert float(sums.nll) == pytest.approx(expected, rel=1e-6)
    assert float(sums.loss) == pytest.approx(expected, rel=1e-6)
    assert float(sums.correct) == 0.0 and float(sums.weight) == 1.0


def test_label_smoothing_matches_torch_formula():
    logits, targets, weights = _inputs(1)
    sums = loss_lib.cross_entropy(logits, targets, weights, label_smoothing=0.1)
    ref = _reference(logits, targets, weights, eps=0.1)
    _check(sums, ref)
    # Smoothing changes the objective, never the reported NLL.
    plain = loss_lib.cross_entropy(logits, targets, weights)
    assert float(sums.nll) == float(plain.nll)
    assert abs(float(sums.loss) - float(plain.loss)) > 1e-3


def test_z_loss_term():
    logits, targets, weights = _inputs(2)
    plain = loss_lib.cross_entropy(logits, targets, weights)
    with_z = loss_lib.cross_entropy(logits, targets, weights, z_loss=1e-2)
    _check(with_z, _reference(logits, targets, weights, z=1e-2))
    lse = jax.nn.logsumexp(jnp.asarray(logits, jnp.float32), axis=-1)
    np.testing.assert_allclose(float(with_z.loss - plain.loss), float(jnp.sum(weights * 1e-2 * lse**2)), rtol=1e-4)
    assert float(with_z.nll) == float(plain.nll)


def test_masked_positions_contribute_nothing():
    logits, targets, weights = _inputs(3)
    weights[0, :] = 0.0
    weights[1, 2] = 0.0
    base = loss_lib.cross_entropy(logits, targets, weights, label_smoothing=0.1, z_loss=1e-3)
    changed = logits.copy()
    mask = weights == 0
    changed[mask] = 1e4 * np.random.default_rng(9).standard_normal((mask.sum(), V))
    # Make the masked positions "correct" under the new logits, so accuracy would notice a leak.
    changed[mask, targets[mask]] = 1e6
    other = loss_lib.cross_entropy(changed, targets, weights, label_smoothing=0.1, z_loss=1e-3)
    for a, b in zip(base, other):
        assert float(a) == float(b)


def test_masked_positions_get_no_gradient():
    logits, targets, weights = _inputs(4)
    weights[2, :] = 0.0
    grad = jax.grad(lambda x: loss_lib.cross_entropy(x, targets, weights, z_loss=1e-3).loss)(jnp.asarray(logits))
    assert np.all(np.asarray(grad)[2] == 0.0)
    assert np.any(np.asarray(grad)[0] != 0.0)


def test_bf16_logits_computed_in_float32():
    logits, targets, weights = _inputs(5)
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    sums = loss_lib.cross_entropy(logits_bf16, targets, weights, label_smoothing=0.1, z_loss=1e-3)
    upcast = loss_lib.cross_entropy(logits_bf16.astype(jnp.float32), targets, weights, label_smoothing=0.1,
                                    z_loss=1e-3)
    for a, b in zip(sums, upcast):
        assert a.dtype == jnp.float32
        assert float(a) == float(b)


def test_halves_sum_to_whole_batch():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((4, L, V)).astype(np.float32)
    targets = rng.integers(0, V, (4, L)).astype(np.int32)
    weights = (rng.random((4, L)) > 0.2).astype(np.float32)
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3)
    whole = loss_lib.cross_entropy(logits, targets, weights, **kwargs)
    halves = [loss_lib.cross_entropy(logits[s], targets[s], weights[s], **kwargs) for s in (slice(0, 2), slice(2, 4))]
    summed = jax.tree.map(jnp.add, *halves)
    for a, b in zip(whole, summed):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    np.testing.assert_allclose(float(loss_lib.mean_loss(whole)), float(loss_lib.mean_loss(summed)), rtol=1e-6)


def test_stable_for_huge_logits():
    logits = np.array([[[1e4, 0.0, -1e4]]], np.float32)
    sums = loss_lib.cross_entropy(logits, np.array([[1]], np.int32), np.ones((1, 1), np.float32))
    assert float(sums.nll) == pytest.approx(1e4, rel=1e-6)


def test_mean_loss_and_summarize():
    logits, targets, weights = _inputs(7)
    sums = loss_lib.cross_entropy(logits, targets, weights, label_smoothing=0.1)
    ref = _reference(logits, targets, weights, eps=0.1)
    assert float(loss_lib.mean_loss(sums)) == pytest.approx(ref["loss"] / ref["weight"], rel=1e-5)
    metrics = loss_lib.summarize(sums)
    assert metrics["loss"] == pytest.approx(ref["nll"] / ref["weight"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(ref["nll"] / ref["weight"]), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(ref["correct"] / ref["weight"], rel=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())
    empty = loss_lib.cross_entropy(logits, targets, np.zeros_like(weights))
    assert float(loss_lib.mean_loss(empty)) == 0.0
    assert loss_lib.summarize(empty) == {"loss": 0.0, "perplexity": 1.0, "accuracy": 0.0}


def test_jit_compiles():
    logits, targets, weights = _inputs(8)
    fn = jax.jit(lambda *a: loss_lib.cross_entropy(*a, label_smoothing=0.1, z_loss=1e-4))
    _check(fn(logits, targets, weights), _reference(logits, targets, weights, eps=0.1, z=1e-4))


def test_auto_head_chunk_fuses_large_vocabularies_per_backend():
    assert loss_lib.head_chunk(48, 320, 1024, "cpu") == 48  # an explicit setting is used as given
    assert loss_lib.head_chunk(0, 50304, 1024, "gpu") == 0
    assert loss_lib.head_chunk(-1, 320, 1024, "cpu") == 0  # small vocabulary: plain head
    assert loss_lib.head_chunk(-1, 50304, 16384, "cpu") == 256
    assert loss_lib.head_chunk(-1, 50304, 16384, "gpu") == 4096
    assert loss_lib.head_chunk(-1, 50304, 16384, "tpu") == 4096
    assert loss_lib.head_chunk(-1, 50304, 1024, "gpu") == 1024  # never more than the device's tokens


def test_auto_head_chunk_is_the_default_and_bad_values_are_refused():
    from jaxllm import config as config_lib
    c = config_lib.default_config()
    assert c.loss.head_chunk == -1
    c.loss.head_chunk = -2
    with pytest.raises(config_lib.ConfigError, match="loss.head_chunk is -2"):
        config_lib.validate(c)
