"""The multiple-choice scorer: log-likelihood of each option's text given the question."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import eval as eval_lib, sharding
from jaxllm.data import mathqa
from jaxllm.tokenizer import ByteTokenizer


class LovesZ:
    """A stand-in model: every next token is "z" with probability ~1, anything else ~e^-20."""

    def apply(self, variables, tokens_BxL, deterministic=True):
        return 20.0 * jax.nn.one_hot(jnp.full(tokens_BxL.shape, ord("z")), 320)


def questions():
    # Option values "zzzz" cost only their " x ) " prefix; every other value costs one more unlikely byte
    # per character, so the z option wins both by total log-likelihood and per character.
    out = []
    for answer in range(5):
        options = tuple("zzzz" if i == answer else str(i) for i in range(5))
        out.append(mathqa.Question(problem=f"question {answer}", options=options, answer=answer))
    return out


def test_scorer_picks_the_option_the_model_is_certain_of():
    mesh = sharding.make_mesh(1)
    score = eval_lib.make_score_fn(LovesZ(), mesh)
    for batch_size, shots in ((5, 0), (40, 2)):
        result = eval_lib.evaluate_mc(score, {}, ByteTokenizer(), questions(), questions(), shots=shots, seed=0,
                                      max_length=128, batch_size=batch_size, pad_multiple=32, mesh=mesh)
        assert result == {"n": 5, "shots": shots, "acc": 1.0, "acc_norm": 1.0}


def test_scorer_sums_exactly_the_continuation_log_probs():
    tok = ByteTokenizer()
    ids, mask = eval_lib.choice_example(tok, "Answer:", " a ) zz", max_length=64)
    assert tok.decode(ids[mask == 1]) == " a ) zz" and ids[-1] != tok.eot_id
    batch = mathqa.make_batch([(ids, mask)], batch_size=1, seq_len=16)
    score = eval_lib.make_score_fn(LovesZ(), sharding.make_mesh(1))(None, batch)
    logp_other = -20.0 - np.log1p(319 * np.exp(-20.0))  # log p of a byte that is not "z"
    logp_z = 20.0 - (20.0 + np.log1p(319 * np.exp(-20.0)))
    np.testing.assert_allclose(score[0], 5 * logp_other + 2 * logp_z, rtol=1e-5)


def test_shots_are_deterministic_and_from_train():
    a = mathqa.shot_indices(100, 5, seed=0, question_index=7)
    assert len(set(a.tolist())) == 5 and np.array_equal(a, mathqa.shot_indices(100, 5, seed=0, question_index=7))
    assert not np.array_equal(a, mathqa.shot_indices(100, 5, seed=0, question_index=8))
    prefix = mathqa.few_shot_prefix(questions()[:2])
    assert prefix.count("Question:") == 2 and prefix.endswith(" a ) zzzz\n\n" .replace("a", "b"))


def test_cached_scorer_equals_one_row_per_option():
    from jaxllm import config as config_lib, models

    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_kv_head = 2, 32, 4, 2
    c.model.vocab_size, c.model.init_std = 320, 0.1
    model = models.build_model(c.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    mesh = sharding.make_mesh(1)
    qs = [mathqa.Question(problem="x" * (3 + 7 * i), options=tuple(f"{i}{j}" * (j + 1) for j in range(5)), answer=i % 5)
          for i in range(7)]
    # max_length leaves every context whole, so both layouts score exactly the same tokens
    kwargs = dict(shots=1, seed=0, max_length=512, batch_size=10, pad_multiple=16, mesh=mesh)
    plain = eval_lib.evaluate_mc(eval_lib.make_score_fn(model, mesh), params, ByteTokenizer(), qs, qs, **kwargs)
    cached = eval_lib.evaluate_mc(eval_lib.make_cached_score_fn(model, mesh), params, ByteTokenizer(), qs, qs,
                                  **kwargs)
    assert plain == cached
    # and the scores themselves agree (left padding + RoPE's relative positions change nothing)
    captured = {}
    original = eval_lib._evaluate_cached

    def spy(*args, **kw):
        captured["scores"] = original(*args, **kw)
        return captured["scores"]

    eval_lib._evaluate_cached = spy
    try:
        eval_lib.evaluate_mc(eval_lib.make_cached_score_fn(model, mesh), params, ByteTokenizer(), qs, qs, **kwargs)
    finally:
        eval_lib._evaluate_cached = original
    score = eval_lib.make_score_fn(model, mesh)
    direct = []
    for i, q in enumerate(qs):
        ctx = mathqa.few_shot_prefix([qs[j] for j in mathqa.shot_indices(7, 1, 0, i)]) + mathqa.format_prompt(q)
        ex = [eval_lib.choice_example(ByteTokenizer(), ctx, mathqa.format_choice(q, o), 512) for o in range(5)]
        direct.append(np.asarray(score(params, mathqa.make_batch(ex, 5, 512))))
    np.testing.assert_allclose(captured["scores"], np.stack(direct), rtol=1e-4, atol=1e-4)
