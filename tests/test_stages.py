"""Stages: the fine-tune starts from exactly the pretrained params, resumes exactly, is not rerun (nor after
its budget stopped it), counts real tokens, and its MathQA accuracy is what scoring each option by hand gives."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import finetune as finetune_lib
from jaxllm import models, optim
from jaxllm import step as step_lib
from jaxllm import train as train_lib
from jaxllm.data import mathqa
from jaxllm.metrics import read_metrics
from jaxllm.tokenizer import get_tokenizer


def staged_config(tmp_path, **overrides):
    c = config_lib.default_config()
    c.stages = "pretrain,finetune"
    c.model.n_layer, c.model.n_embd, c.model.n_head = 2, 32, 4
    c.model.vocab_size, c.model.sequence_length = 320, 64
    c.data.source, c.data.tokenizer, c.data.synthetic_documents = "synthetic", "byte", 200
    c.data.num_proc, c.data.cache_dir = 1, str(tmp_path / "cache")
    c.train.steps, c.train.batch_size, c.train.grad_accum = 3, 4, 1
    c.train.eval_every, c.train.eval_batches, c.train.checkpoint_every = 3, 1, 3
    c.train.num_devices, c.train.progress, c.train.full_eval_at_end = 1, False, False
    c.mathqa.synthetic_problems, c.mathqa.eval_questions, c.mathqa.eval_shots = 60, 4, "0,1"
    c.mathqa.max_length, c.mathqa.eval_batch_size = 128, 20
    f = c.finetune.train
    f.steps, f.batch_size, f.log_every, f.eval_every, f.eval_batches = 6, 4, 1, 3, 1
    f.checkpoint_every, f.keep_checkpoints, f.num_devices, f.progress = 2, 5, 1, False
    c.finetune.optim.lr = 1e-3
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return config_lib.validate(c)


def saved_params(workdir):
    folder, step = checkpoint_lib.locate(workdir)
    checkpointer = checkpoint_lib.Checkpointer(folder)
    state, _ = checkpointer.restore_saved(step)
    checkpointer.close()
    return state["params"]


def rows(workdir, split):
    return [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == split]


def test_finetune_starts_from_exactly_the_pretrained_params_with_fresh_optimizer(tmp_path, monkeypatch):
    first_states = []
    original = step_lib.compile_train_step

    def spy(fn, mesh, *placement):  # records the state each compiled step (one per stage) is first called with
        compiled, slot = original(fn, mesh, *placement), len(first_states)
        first_states.append(None)

        def wrapper(state, batch):
            if first_states[slot] is None:
                first_states[slot] = jax.device_get(state)
            return compiled(state, batch)

        return wrapper

    monkeypatch.setattr(step_lib, "compile_train_step", spy)
    summary = train_lib.run_stages(staged_config(tmp_path), tmp_path / "run")
    pretrain_start, finetune_start = first_states[0], first_states[1]
    pretrained = saved_params(tmp_path / "run" / "pretrain")
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), pretrained, finetune_start.params)
    assert all(jax.tree.leaves(same))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, pretrain_start.params, finetune_start.params)))
    assert int(finetune_start.step) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(finetune_start.opt_state) if np.ndim(x) > 0)
    assert set(summary) == {"pretrain", "finetune"}
    mc = rows(tmp_path / "run" / "finetune", "mathqa")
    assert [r["shots"] for r in mc] == [0, 1] and all(r["n"] == 4 for r in mc)
    # The 0-shot accuracies are what scoring each option alone, unbatched and uncached, gives.
    config = staged_config(tmp_path)
    questions = mathqa.load_splits(config.mathqa)[0]["test"][:4]
    acc, acc_norm = zero_shot_by_hand(config, saved_params(tmp_path / "run" / "finetune"), questions)
    assert (mc[0]["acc"], mc[0]["acc_norm"]) == (acc, acc_norm)
    assert (tmp_path / "run" / "finetune" / "stage_done.json").is_file()


def zero_shot_by_hand(config, params, questions) -> tuple[float, float]:
    """(acc, acc_norm) of `questions` with each option scored on its own: the summed log-probabilities of its
    tokens after the prompt (cut from the left to mathqa.max_length + 1 tokens), argmax over the five, and
    over the five divided by the option's characters."""
    model, tokenizer, max_length = models.build_model(config.model), get_tokenizer("byte"), config.mathqa.max_length
    hits = hits_norm = 0
    for question in questions:
        scores, per_char = [], []
        for option in range(5):
            text = mathqa.format_choice(question, option)
            answer = tokenizer.encode(text)
            ids = tokenizer.encode(mathqa.format_prompt(question))[-(max_length + 1 - len(answer)):] + answer
            logits_LxV = model.apply({"params": params}, jnp.asarray([ids[:-1]], jnp.int32))[0]
            logp_LxV = np.asarray(jax.nn.log_softmax(logits_LxV.astype(jnp.float32)))
            score = sum(float(logp_LxV[i - 1, ids[i]]) for i in range(len(ids) - len(answer), len(ids)))
            scores.append(score)
            per_char.append(score / len(text))
        for values in (scores, per_char):  # no near-ties: float noise between scorers cannot flip the choice
            top = sorted(values)
            assert top[-1] - top[-2] > 1e-4
        hits += int(np.argmax(scores) == question.answer)
        hits_norm += int(np.argmax(per_char) == question.answer)
    return hits / len(questions), hits_norm / len(questions)



@pytest.mark.slow  # ~40-80 s here; run with -m slow
def test_killed_finetune_resumes_exactly_and_pretrain_is_not_rerun(tmp_path, monkeypatch, kill_train_step):
    train_lib.run_stages(staged_config(tmp_path), tmp_path / "straight")
    with kill_train_step(3 + 6):  # pretrain's 3 steps, then die before fine-tune step 6 (checkpoint at 4)
        train_lib.run_stages(staged_config(tmp_path), tmp_path / "resumed")

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the finished pretrain stage ran again")

    monkeypatch.setattr(train_lib, "train", no_pretraining)
    train_lib.run_stages(staged_config(tmp_path), tmp_path / "resumed")
    for split in ("train", "val", "mathqa"):
        a, b = rows(tmp_path / "straight" / "finetune", split), rows(tmp_path / "resumed" / "finetune", split)
        for row in a + b:
            for timing in ("tokens_per_s", "mfu", "seconds", "elapsed_s"):
                row.pop(timing, None)
        assert a == b, split


@pytest.mark.slow
def test_lora_stage_trains_adapters_only_and_reports_optimizer_memory(tmp_path):
    full = staged_config(tmp_path, **{"finetune.train.steps": 2, "mathqa.eval_shots": ""})
    lora = staged_config(tmp_path, **{"finetune.train.steps": 2, "mathqa.eval_shots": "",
                                      "finetune.lora.rank": 2, "finetune.lora.targets": "q,v"})
    train_lib.run_stages(full, tmp_path / "full")
    finetune_lib.finetune(config_lib.stage_config(lora, "finetune"), tmp_path / "lora", tmp_path / "full" / "pretrain")
    memory = {name: rows(tmp_path / name / ("finetune" if name == "full" else ""), "memory")[0]
              for name in ("full", "lora")}
    assert memory["lora"]["opt_state_bytes"] < memory["full"]["opt_state_bytes"] / 10
    params = saved_params(tmp_path / "lora")
    pretrained = saved_params(tmp_path / "full" / "pretrain")
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), pretrained, params["base"])
    assert all(jax.tree.leaves(same))
    assert (tmp_path / "lora" / "export").is_dir()


def test_stage_config_errors():
    c = config_lib.default_config()
    c.stages = "finetune,pretrain"
    with pytest.raises(config_lib.ConfigError, match="in that order"):
        config_lib.validate(c)
    c.stages = "finetune"
    with pytest.raises(config_lib.ConfigError, match="finetune.init_from"):
        config_lib.validate(c)
    c.stages, c.finetune.lora.targets = "pretrain,finetune", "q,x"
    with pytest.raises(config_lib.ConfigError, match="finetune.lora.targets"):
        config_lib.validate(c)


@pytest.mark.slow
def test_finetune_stage_fits_its_steps_to_its_budget(tmp_path, monkeypatch):
    from test_loop import fake_timing  # 10 fake seconds per train step, 3 per evaluation

    fake_timing(monkeypatch)
    config = staged_config(tmp_path, **{"finetune.train.steps": 40, "finetune.train.max_duration_s": 300.0,
                                        "finetune.train.fit_steps_to_budget": True, "finetune.train.eval_every": 10,
                                        "finetune.train.checkpoint_every": 4, "mathqa.eval_shots": ""})
    summary = train_lib.run_stages(config, tmp_path / "run")
    stage = tmp_path / "run" / "finetune"
    fitted = json.loads((stage / "config.json").read_text())["train"]["steps"]
    assert 7 < fitted < 40 and summary["finetune"]["step"] == fitted and "stopped" not in summary["finetune"]
    checkpointer = checkpoint_lib.Checkpointer(stage / "checkpoints")
    assert checkpointer.read_meta(fitted)["fitted_steps"] == fitted
    checkpointer.close()
    stage_cfg = config_lib.with_train_steps(config_lib.stage_config(config, "finetune"), fitted)
    last = rows(stage, "train")[-1]
    assert last["step"] == fitted and last["lr"] == float(optim.make_schedule(stage_cfg)(fitted - 1))


def test_finetune_counts_real_tokens_and_honours_full_eval_at_end(tmp_path):
    """15 steps x 4 examples = one epoch of the 60 training questions: tokens_seen is the sum of their
    lengths (inputs = ids[:-1]), not the padded batch sizes; finetune.train.full_eval_at_end=false writes no
    full validation row."""
    config = staged_config(tmp_path, **{"finetune.train.steps": 15, "finetune.train.eval_every": 15,
                                        "finetune.train.checkpoint_every": 15, "finetune.train.full_eval_at_end": False,
                                        "mathqa.eval_shots": ""})
    train_lib.run_stages(config, tmp_path / "run")
    stage = tmp_path / "run" / "finetune"
    questions = mathqa.load_splits(config.mathqa)[0]
    data = mathqa.FinetuneData(questions, get_tokenizer("byte"), max_length=128, pad_multiple=64)
    assert len(data.train) == 60
    train_rows = rows(stage, "train")
    assert train_rows[-1]["step"] == 15
    assert train_rows[-1]["tokens_seen"] == sum(len(ids) - 1 for ids, _ in data.train)
    assert not any(r.get("full") for r in read_metrics(stage / "metrics.jsonl"))


@pytest.mark.slow  # ~15 s; the pretraining budget stop: tests/test_loop.py
def test_budget_stopped_finetune_is_finished(tmp_path, monkeypatch, capsys):
    """The fine-tune's budget (25 fake seconds: 3 steps of 10) stops it at step 3; the stage is finished:
    run again, it trains no step and writes no checkpoint or row, and says so."""
    from test_loop import fake_timing  # 10 fake seconds per train step, 3 per evaluation

    counts = fake_timing(monkeypatch)
    config = staged_config(tmp_path, **{"finetune.train.max_duration_s": 25.0, "finetune.train.eval_every": 100,
                                        "finetune.train.checkpoint_every": 100, "mathqa.eval_shots": ""})
    summary = train_lib.run_stages(config, tmp_path / "run")
    assert summary["finetune"]["step"] == 3 and summary["finetune"]["stopped"] == "wall-clock budget of 25 s reached"
    stage = tmp_path / "run" / "finetune"
    written = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in written if r.get("full")] == [3]
    capsys.readouterr()
    counts["calls"] = 0
    again = finetune_lib.finetune(config_lib.stage_config(config, "finetune"), stage, tmp_path / "run" / "pretrain")
    assert counts["calls"] == 0 and again["step"] == 3
    assert "already finished at step 3 (wall-clock budget of 25 s reached)" in capsys.readouterr().err
    assert read_metrics(stage / "metrics.jsonl") == written
    checkpointer = checkpoint_lib.Checkpointer(stage / "checkpoints")
    assert checkpointer.all_steps() == [3] and checkpointer.read_meta(3)["stopped"] == again["stopped"]
    checkpointer.close()
