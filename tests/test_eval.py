"""The multiple-choice scorer: log-likelihood of each option's text given the question; its prompts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import checkpoint as checkpoint_lib, config as config_lib, eval as eval_lib, finetune as finetune_lib
from jaxllm import models, sharding
from jaxllm.data import mathqa
from jaxllm.metrics import read_metrics
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
                                      max_length=512, batch_size=batch_size, pad_multiple=32, mesh=mesh)
        assert result == {"n": 5, "shots": shots, "acc": 1.0, "acc_norm": 1.0, "shots_mean": shots,
                          "shots_min": shots, "fewer_shots": 0, "cut_prompts": 0}


def test_scorer_sums_exactly_the_continuation_log_probs():
    tok = ByteTokenizer()
    ids, mask = eval_lib.choice_example(tok, "Answer:", " a ) zz", max_length=64)
    assert tok.decode(ids[mask == 1]) == " a ) zz" and ids[-1] != tok.eot_id
    batch = mathqa.make_batch([(ids, mask)], batch_size=1, seq_len=16)
    score = eval_lib.make_score_fn(LovesZ(), sharding.make_mesh(1))(None, batch)
    logp_other = -20.0 - np.log1p(319 * np.exp(-20.0))  # log p of a byte that is not "z"
    logp_z = 20.0 - (20.0 + np.log1p(319 * np.exp(-20.0)))
    np.testing.assert_allclose(score[0], 5 * logp_other + 2 * logp_z, rtol=1e-5)


def pool_and_tests():
    """A shot pool and test questions that cannot be mistaken for each other (problems "pool k" / "test i")."""
    pool = [mathqa.Question(problem=f"pool {k}", options=tuple(f"p{k}{j}" for j in range(5)), answer=k % 5)
            for k in range(10, 40)]  # every solved example has the same length
    tests = [mathqa.Question(problem=f"test {i}", options=tuple(f"t{i}{j}" for j in range(5)), answer=i % 5)
             for i in range(6)]
    return pool, tests


def scored_contexts(monkeypatch, pool, tests, **kwargs):
    """The context tokens evaluate_mc really scores (plain layout), decoded: {question index: text}."""
    seen, original = {}, eval_lib.choice_example

    def spy(tokenizer, context, continuation, max_length):
        ids, mask = original(tokenizer, context, continuation, max_length)
        seen.setdefault(context, tokenizer.decode(ids[mask == 0].tolist()))
        return ids, mask

    monkeypatch.setattr(eval_lib, "choice_example", spy)
    mesh = sharding.make_mesh(1)
    result = eval_lib.evaluate_mc(eval_lib.make_score_fn(LovesZ(), mesh), {}, ByteTokenizer(), tests, pool,
                                  seed=0, batch_size=40, pad_multiple=0, mesh=mesh, **kwargs)
    texts = {}
    for context, text in seen.items():
        texts[int(context.rsplit("Question: test ", 1)[1].split("\n")[0])] = text
    return texts, result


def test_shots_are_deterministic_and_from_train(monkeypatch):
    a = mathqa.shot_indices(100, 5, seed=0, question_index=7)
    assert len(set(a.tolist())) == 5 and np.array_equal(a, mathqa.shot_indices(100, 5, seed=0, question_index=7))
    assert not np.array_equal(a, mathqa.shot_indices(100, 5, seed=0, question_index=8))
    pool, tests = pool_and_tests()
    texts, _ = scored_contexts(monkeypatch, pool, tests, shots=3, max_length=1024)
    assert sorted(texts) == list(range(6))
    for i, text in texts.items():
        # exactly the 3 drawn pool questions, solved with their correct answer, then test question i
        picks = mathqa.shot_indices(len(pool), 3, seed=0, question_index=i)
        assert text == mathqa.few_shot_prefix([pool[k] for k in picks]) + mathqa.format_prompt(tests[i])
        assert text.count("Question: pool ") == 3 and text.count("Question: test ") == 1


def test_contexts_drop_whole_shots_to_fit_and_report_how_many(monkeypatch):
    """A context that cannot hold all K shots keeps as many whole ones as fit, never a fragment."""
    pool, tests = pool_and_tests()
    tok = ByteTokenizer()
    shot = len(mathqa.few_shot_prefix([pool[10]]))  # bytes of one solved example (all have the same length)
    prompt, option = len(mathqa.format_prompt(tests[0])), len(mathqa.format_choice(tests[0], 0))
    room = -(-option // 8) * 8  # the continuation columns reserved for the cached layout
    max_length = prompt + room + 2 * shot + shot // 2  # two and a half shots fit
    texts, result = scored_contexts(monkeypatch, pool, tests, shots=5, max_length=max_length)
    for i, text in texts.items():
        picks = mathqa.shot_indices(len(pool), 5, seed=0, question_index=i)
        # the two drawn last (nearest the question) are kept whole
        assert text == mathqa.few_shot_prefix([pool[k] for k in picks[3:]]) + mathqa.format_prompt(tests[i])
        assert len(tok.encode(text)) + room <= max_length
    assert result["shots"] == 5 and result["shots_mean"] == 2 and result["shots_min"] == 2
    assert result["fewer_shots"] == 6 and result["cut_prompts"] == 0
    contexts, _, shots_N, cut_N = eval_lib.mc_contexts(tok, tests, pool, shots=5, seed=0, max_length=prompt + room)
    assert shots_N.tolist() == [0] * 6 and not cut_N.any() and contexts[0] == mathqa.format_prompt(tests[0])
    _, _, shots_N, cut_N = eval_lib.mc_contexts(tok, tests, pool, shots=5, seed=0, max_length=prompt + room - 1)
    assert shots_N.tolist() == [0] * 6 and cut_N.all()  # a prompt too long on its own: left to the scorer's cut


def test_eval_length_beyond_the_training_length_is_llama_only():
    c = config_lib.default_config()
    c.model.sequence_length, c.mathqa.eval_max_length = 256, 1024
    assert eval_lib.eval_max_length(config_lib.validate(c)) == 1024
    c.mathqa.eval_max_length, c.mathqa.max_length = 0, 384
    assert eval_lib.eval_max_length(c) == 384  # 0 = the training length
    c.mathqa.max_length = 0
    assert eval_lib.eval_max_length(c) == 256
    c.model.name, c.mathqa.eval_max_length = "gpt2", 1024
    with pytest.raises(config_lib.ConfigError, match="mathqa.eval_max_length .1024. exceeds gpt2's 256 learned"):
        config_lib.validate(c)
    with pytest.raises(config_lib.ConfigError, match="exceeds gpt2's 256 learned positions"):
        eval_lib.eval_max_length(c)  # what the eval CLI calls on a run's saved config


def test_cached_scorer_equals_one_row_per_option(monkeypatch):
    """Both layouts score the same whole-shot contexts, also when some questions must drop their shot, and
    llama scores them past the length it trained at (RoPE: no learned positions)."""
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_kv_head = 2, 32, 4, 2
    c.model.vocab_size, c.model.init_std, c.model.sequence_length = 320, 0.1, 64
    model = models.build_model(c.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    mesh = sharding.make_mesh(1)
    qs = [mathqa.Question(problem="x" * (3 + 7 * i), options=tuple(f"{i}{j}" * (j + 1) for j in range(5)), answer=i % 5)
          for i in range(7)]
    tok, max_length = ByteTokenizer(), 260  # > sequence_length 64; four of seven questions lose their one shot
    # pad_multiple=0: one batch length per layout, so one compilation each
    kwargs = dict(shots=1, seed=0, max_length=max_length, batch_size=10, pad_multiple=0, mesh=mesh)
    score = eval_lib.make_score_fn(model, mesh)
    plain = eval_lib.evaluate_mc(score, params, tok, qs, qs, **kwargs)
    captured, original = {}, eval_lib._evaluate_cached

    def spy(*args, **kw):
        captured["scores"] = original(*args, **kw)
        return captured["scores"]

    monkeypatch.setattr(eval_lib, "_evaluate_cached", spy)
    cached = eval_lib.evaluate_mc(eval_lib.make_cached_score_fn(model, mesh), params, tok, qs, qs, **kwargs)
    assert plain == cached and plain["fewer_shots"] == 4 and plain["cut_prompts"] == 0
    # and the scores themselves agree (left padding + RoPE's relative positions change nothing)
    contexts, continuations, _, _ = eval_lib.mc_contexts(tok, qs, qs, shots=1, seed=0, max_length=max_length)
    direct = []
    for context, row in zip(contexts, continuations):
        ex = [eval_lib.choice_example(tok, context, continuation, max_length) for continuation in row]
        assert all(tok.decode(ids[mask == 0].tolist()) == context for ids, mask in ex)  # nothing cut
        direct.append(np.asarray(score(params, mathqa.make_batch(ex, 10, max_length)))[:5])
    np.testing.assert_allclose(captured["scores"], np.stack(direct), rtol=1e-4, atol=1e-4)


def cli_run_config(tmp_path):
    """A one-layer llama fine-tune config on synthetic MathQA with validation carved out of train
    (mathqa.val_split=""), and a checkpoint of its fresh params in tmp_path/init (the stage's init_from)."""
    c = config_lib.default_config()
    c.stages, c.finetune.init_from = "finetune", str(tmp_path / "init")
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.vocab_size, c.model.sequence_length = 1, 32, 2, 320, 64
    c.data.tokenizer = "byte"
    q = c.mathqa
    q.synthetic_problems, q.val_split, q.val_fraction, q.max_length, q.eval_max_length = 40, "", 0.25, 256, 1024
    q.eval_shots, q.eval_questions, q.eval_batch_size, q.pad_multiple = "2", 3, 15, 0
    f = c.finetune.train
    f.steps, f.batch_size, f.grad_accum, f.eval_every, f.eval_batches, f.checkpoint_every = 1, 4, 1, 1, 1, 1
    f.num_devices, f.progress, f.max_duration_s = 1, False, 0.0
    config_lib.validate(c)
    params = models.build_model(c.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    init = checkpoint_lib.Checkpointer(tmp_path / "init" / "checkpoints")
    init.save(0, {"params": params}, {"model_shape": checkpoint_lib.shape_signature(c.model)})
    init.close()
    return c


def record_prompts(monkeypatch) -> list:
    """Every list of contexts evaluate_mc builds from now on, in call order."""
    prompts, original = [], eval_lib.mc_contexts

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        prompts.append(out[0])
        return out

    monkeypatch.setattr(eval_lib, "mc_contexts", spy)
    return prompts


def test_eval_cli_draws_shots_from_the_fine_tune_pool(tmp_path, monkeypatch, capsys):
    """With mathqa.val_split="" the fine-tune stage's shots come from train less the validation carve-out
    (finetune scores with load_splits' "train"); the eval CLI must not draw from the whole train split."""
    c = cli_run_config(tmp_path)
    splits, _ = mathqa.load_splits(c.mathqa)
    assert len(splits["train"]) == 30
    stage_prompts, _, _, _ = eval_lib.mc_contexts(ByteTokenizer(), splits["test"][:3], splits["train"], shots=2,
                                                  seed=0, max_length=1024)
    (tmp_path / "init" / "config.json").write_text(config_lib.to_json(config_lib.stage_config(c, "finetune")))
    prompts = record_prompts(monkeypatch)
    assert eval_lib.main(["--workdir", str(tmp_path / "init"), "--shots", "2", "--max_questions", "3"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert prompts == [stage_prompts]
    assert row["shots"] == row["shots_min"] == 2 and row["fewer_shots"] == 0 and row["n"] == 3


@pytest.mark.slow
def test_eval_cli_scores_the_prompts_the_fine_tune_stage_scored(tmp_path, monkeypatch, capsys):
    """End to end: a fine-tune stage, then the eval CLI on its folder: the same prompts, the same scores."""
    c = cli_run_config(tmp_path)
    prompts = record_prompts(monkeypatch)
    finetune_lib.finetune(config_lib.stage_config(c, "finetune"), tmp_path / "run", tmp_path / "init")
    stage = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "mathqa"]
    capsys.readouterr()
    assert eval_lib.main(["--workdir", str(tmp_path / "run"), "--shots", "2", "--max_questions", "3"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(prompts) == 2 and len(prompts[0]) == 3 and prompts[0] == prompts[1]
    assert all(p.count("Question:") == 3 for p in prompts[0])  # 2 whole shots each, in 1024 tokens
    for name in ("n", "shots", "shots_mean", "shots_min", "fewer_shots", "acc", "acc_norm"):
        assert cli[name] == stage[0][name], name
