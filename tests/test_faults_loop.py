"""Faults in the step loop: a NaN at a given step, an evaluation that raises. Each stops the run with the
steps before it safe in a checkpoint that resumes."""

import math
import pathlib

import numpy as np
import pytest

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import loop as loop_lib
from jaxllm import train as train_lib
from jaxllm.data import batches as batches_lib
from jaxllm.metrics import read_metrics

from test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cli(tmp_path, workdir, *args) -> int:
    """`python -m jaxllm.train` on configs/tiny.py, shrunk to the tiny test model: 8 steps, checkpoints every 2."""
    return train_lib.main([
        "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir), "--config.stages=pretrain",
        "--config.model.n_layer=2", "--config.model.n_embd=64", "--config.model.sequence_length=32",
        "--config.data.synthetic_documents=300", "--config.data.num_proc=1",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.train.steps=8", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=4", "--config.train.eval_batches=2", "--config.train.checkpoint_every=2",
        "--config.train.keep_checkpoints=5", "--config.train.num_devices=1", "--config.train.progress=false",
        "--config.train.full_eval_at_end=false", *args])


def test_nan_at_a_step_stops_there_and_the_last_good_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    """Step 5's batch has NaN weights (its loss and update are NaN): the CLI exits 2 with one sentence naming
    step 5 and the last good checkpoint (4); no checkpoint of the NaN state exists; checkpoint 4 restores with
    finite params, and the same command then trains on to step 8 from it."""
    original = batches_lib.train_batch

    def poisoned(tokens, *, seed, step, batch_size, seq_len, **rows):
        batch = original(tokens, seed=seed, step=step, batch_size=batch_size, seq_len=seq_len, **rows)
        if step == 4:  # the batch of the 5th update
            batch["weights"] = np.full_like(batch["weights"], np.nan)
        return batch

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(batches_lib, "train_batch", poisoned)
        assert cli(tmp_path, run) == 2
    err = capsys.readouterr().err
    assert "error: the loss became nan at step 5; stopped without checkpointing this state (last good " \
           "checkpoint: step 4)" in err and "Traceback" not in err
    checkpointer = checkpoint_lib.Checkpointer(run / "checkpoints")
    assert checkpointer.all_steps() == [2, 4]
    state, meta = checkpointer.restore_saved(4)
    checkpointer.close()
    assert int(state["step"]) == 4 and meta["step"] == 4
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in _leaves(state["params"]))
    before = read_metrics(run / "metrics.jsonl")
    assert max(r["step"] for r in before) == 4  # step 5's NaN row was never written

    assert cli(tmp_path, run) == 0
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert [r for r in rows if r["step"] <= 4] == before


def test_failing_evaluation_checkpoints_the_steps_before_it(tmp_path, monkeypatch):
    """An evaluation that raises (at step 3, with no checkpoint due before step 8) leaves checkpoint 3, so the
    three steps are not lost: the same command resumes at step 3 and trains 5 more."""
    config = tiny_config(tmp_path, **{"train.eval_every": 3, "train.checkpoint_every": 100})

    def broken(*args):
        raise RuntimeError("the evaluation broke")

    with monkeypatch.context() as patch:
        patch.setattr(loop_lib, "evaluate", broken)
        with pytest.raises(RuntimeError, match="the evaluation broke"):
            train_lib.train(config, tmp_path / "run")
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "run" / "checkpoints")
    assert checkpointer.all_steps() == [3]
    checkpointer.close()
    summary = train_lib.train(config, tmp_path / "run")
    train_rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert summary["step"] == 8 and [r["step"] for r in train_rows] == list(range(1, 9))


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree
