"""The shared step loop: the budget stop, the budget warning and fit_steps_to_budget (on a fake clock),
throughput and MFU against hand-computed numbers, asynchronous checkpoints with exact resume, and the batch
prefetcher."""

import json
import threading

import pytest

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import loop as loop_lib
from jaxllm import hardware, optim, step as step_lib
from jaxllm import train as train_lib
from jaxllm.metrics import read_metrics

from conftest import Killed
from test_train import losses, tiny_config

STEP_S, EVAL_S = 10.0, 3.0  # fake seconds per train step call and per evaluation


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_timing(monkeypatch, kill_at=None):
    """loop.clock becomes a clock that only train steps (STEP_S each) and evaluations (EVAL_S) advance.

    Returns a dict counting train-step calls and compilations; the `kill_at`-th step call raises Killed.
    """
    clock, counts = FakeClock(), {"calls": 0, "compiles": 0}
    monkeypatch.setattr(loop_lib, "clock", clock)
    original_compile, original_evaluate = step_lib.compile_train_step, loop_lib.evaluate

    def compile_train_step(fn, mesh, *placement):
        compiled = original_compile(fn, mesh, *placement)
        counts["compiles"] += 1

        def timed_step(state, batch):
            counts["calls"] += 1
            if counts["calls"] == kill_at:
                raise Killed()
            clock.now += STEP_S
            return compiled(state, batch)

        return timed_step

    def evaluate(*args):
        clock.now += EVAL_S
        return original_evaluate(*args)

    monkeypatch.setattr(step_lib, "compile_train_step", compile_train_step)
    monkeypatch.setattr(loop_lib, "evaluate", evaluate)
    return counts


FIT = {"train.steps": 40, "train.max_duration_s": 300.0, "train.fit_steps_to_budget": True,
       "train.eval_every": 10, "train.checkpoint_every": 4, "train.keep_checkpoints": 10,
       "train.full_eval_at_end": False}


def expected_fit() -> int:
    """What the loop must fit on the fake clock (see loop.run_loop's probe).

    Step k's metrics are read after step k + 1 is dispatched, at 10 (k + 1) s: the probe times steps 1 -> 6
    (20 s -> 70 s, 10 s/step), the first 20 s are the compile reserve, and the fit happens at step 7, at
    70 s plus two evaluations (the first compiles the eval step) = 76 s. Saves take no fake time.
    """
    return loop_lib.steps_that_fit(300.0, 76.0, 7, STEP_S, eval_s=EVAL_S, eval_every=10, save_s=0.0,
                                   checkpoint_every=4, reserve_s=20.0)


def test_steps_that_fit_counts_steps_evaluations_checkpoints_and_reserves():
    # (1000 * 0.98 - 100 - 30) s left at 10 + 5/10 + 2/4 = 11 s per step: 77 more steps.
    assert loop_lib.steps_that_fit(1000.0, 100.0, 20, 10.0, eval_s=5.0, eval_every=10, save_s=2.0,
                                   checkpoint_every=4, reserve_s=30.0) == 20 + 77
    assert loop_lib.steps_that_fit(100.0, 200.0, 20, 10.0) == 20  # over budget already: no more steps


def test_fit_steps_to_budget_ends_the_schedule_where_training_ends(tmp_path, monkeypatch, capsys):
    fake_timing(monkeypatch)
    config = tiny_config(tmp_path, **FIT)
    summary = train_lib.train(config, tmp_path / "run")
    fitted = expected_fit()
    assert fitted == 26 and summary["step"] == fitted and "stopped" not in summary
    assert f"the schedule now ends at step {fitted}" in capsys.readouterr().err
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == fitted
    checkpointer = checkpoint_lib.Checkpointer(run / "checkpoints")
    assert checkpointer.read_meta(fitted)["fitted_steps"] == fitted
    assert "fitted_steps" not in checkpointer.read_meta(7)  # the probe's checkpoint: before the fit
    checkpointer.close()
    # The last update used the fitted one-cycle schedule's final value: lr / div_factor / final_div_factor.
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    last_lr = float(optim.onecycle_schedule(config.optim.lr, fitted, pct_start=config.optim.warmup_pct)(fitted - 1))
    assert rows[-1]["step"] == fitted and rows[-1]["lr"] == last_lr
    assert last_lr == pytest.approx(config.optim.lr / config.optim.div_factor / config.optim.final_div_factor)


@pytest.mark.slow
def test_resumed_fit_keeps_its_steps_without_measuring_again(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        fake_timing(patch, kill_at=20)  # dies at step 20, after the fit (last checkpoint: 16)
        with pytest.raises(Killed):
            train_lib.train(tiny_config(tmp_path, **FIT), tmp_path / "run")
    capsys.readouterr()
    counts = fake_timing(monkeypatch)
    summary = train_lib.train(tiny_config(tmp_path, **FIT), tmp_path / "run")
    assert summary["step"] == expected_fit()
    assert counts["compiles"] == 1 and counts["calls"] == expected_fit() - 16  # one schedule, no probe
    assert "fit_steps_to_budget" not in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == expected_fit()


@pytest.mark.slow
def test_warning_when_the_schedule_does_not_fit_the_budget(tmp_path, monkeypatch, capsys):
    fake_timing(monkeypatch)
    budget = {"train.steps": 20, "train.eval_every": 100, "train.full_eval_at_end": False}
    summary = train_lib.train(tiny_config(tmp_path, **budget, **{"train.max_duration_s": 100.0}), tmp_path / "short")
    err = capsys.readouterr().err
    # At step 7 (70 s in) with 10 s/step, 98 - 70 s hold 2 more steps.
    assert "only about 9 steps fit in train.max_duration_s=100 s" in err
    assert "--config.train.steps=9" in err and "fit_steps_to_budget=true" in err
    assert summary["stopped"].startswith("wall-clock budget")
    train_lib.train(tiny_config(tmp_path, **budget, **{"train.max_duration_s": 1000.0}), tmp_path / "long")
    assert "warning" not in capsys.readouterr().err


def test_budget_stopped_run_is_finished_and_not_trained_again(tmp_path, monkeypatch, capsys):
    """max_duration_s on the fake clock: 35 s hold 4 steps of 10 s (the check after step 4 sees 40 s). The stop
    is recorded in the checkpoint; running the same command again trains no step, writes no checkpoint and
    no row, repeats no full evaluation, and says the run is finished."""
    counts = fake_timing(monkeypatch)
    monkeypatch.setattr(hardware, "peak_flops", lambda dtype, n_devices=1: (1e6, "test"))
    config = tiny_config(tmp_path, **{"train.max_duration_s": 35.0, "train.eval_every": 100,
                                      "train.checkpoint_every": 100, "train.full_eval_at_end": True})
    summary = train_lib.train(config, tmp_path / "run")
    assert summary["step"] == 4 and summary["stopped"] == "wall-clock budget of 35 s reached"
    assert counts["calls"] == 4 and "the run is finished" in capsys.readouterr().err
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "run" / "checkpoints")
    assert checkpointer.all_steps() == [4]
    meta = checkpointer.read_meta(4)
    checkpointer.close()
    assert meta["stopped"] == "wall-clock budget of 35 s reached" and meta["elapsed_s"] == 40.0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("full")] == [4]
    # Throughput and MFU by hand: 8 x 32 tokens per 10 fake seconds; step 1's interval holds the compile (nan),
    # step 4 is read at once when the budget stops the run (no interval: nan). FLOPs per token of this llama
    # (2 layers, d 64, SwiGLU hidden 256, vocab 320, T 32): 6 x (2 x (4 d^2 + 3 x 256 d + 2 d) + d + 320 d)
    # + 6 x 2 x 32 x d = 935,808; the peak is the 1e6 FLOP/s patched in above.
    train_rows = {r["step"]: r for r in rows if r["split"] == "train"}
    for step in (2, 3):
        assert train_rows[step]["tokens_per_s"] == 25.6
        assert train_rows[step]["mfu"] == pytest.approx(25.6 * 935_808 / 1e6, rel=1e-12)
        assert train_rows[step]["tokens_seen"] == step * 256

    counts["calls"] = 0
    again = train_lib.train(config, tmp_path / "run")
    assert counts["calls"] == 0 and again["step"] == 4 and again["stopped"] == summary["stopped"]
    assert "already finished at step 4 (wall-clock budget of 35 s reached)" in capsys.readouterr().err
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == rows
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "run" / "checkpoints")
    assert checkpointer.all_steps() == [4]
    checkpointer.close()


def test_fit_needs_a_budget():
    c = config_lib.default_config()
    c.train.fit_steps_to_budget = True
    with pytest.raises(config_lib.ConfigError, match="train.max_duration_s > 0"):
        config_lib.validate(c)
    c.train.max_duration_s, c.train.async_checkpoint = 60.0, "yes"
    with pytest.raises(config_lib.ConfigError, match="train.async_checkpoint"):
        config_lib.validate(c)


@pytest.mark.slow  # ~30-60 s here; async saves are off on CPU by default
def test_async_checkpoints_resume_exactly_and_are_complete(tmp_path, kill_train_step):
    sync_run = tiny_config(tmp_path, **{"train.checkpoint_every": 2, "train.async_checkpoint": "off"})
    async_run = tiny_config(tmp_path, **{"train.checkpoint_every": 2, "train.async_checkpoint": "on"})
    train_lib.train(sync_run, tmp_path / "straight")
    with kill_train_step(8):  # dies after step 7 (last checkpoint: 6)
        train_lib.train(async_run, tmp_path / "resumed")
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "resumed" / "checkpoints")
    assert checkpointer.latest_step() == 6
    checkpointer.close()
    train_lib.train(async_run, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert losses(tmp_path / "resumed", "val") == losses(tmp_path / "straight", "val")
    # Complete when train returns: the newest steps are committed (no temporary folders) and restore.
    folder = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["4", "6", "8"]
    checkpointer = checkpoint_lib.Checkpointer(folder)
    state, meta = checkpointer.restore_saved(8)
    checkpointer.close()
    assert meta["step"] == 8 and int(state["step"]) == 8


@pytest.mark.slow
def test_prefetching_leaves_the_losses_unchanged(tmp_path):
    train_lib.train(tiny_config(tmp_path, **{"train.prefetch": 0}), tmp_path / "inline")
    train_lib.train(tiny_config(tmp_path, **{"train.prefetch": 2}), tmp_path / "prefetched")
    assert losses(tmp_path / "prefetched") == losses(tmp_path / "inline")
    assert losses(tmp_path / "prefetched", "val") == losses(tmp_path / "inline", "val")


def test_prefetcher_keeps_order_raises_errors_and_stops():
    made = []

    def make(n):
        made.append(n)
        if n == 5:
            raise ValueError("batch 5 is broken")
        return n * n

    prefetcher = loop_lib.Prefetcher(make, 2, 10, depth=2)
    assert [prefetcher.get(n) for n in (2, 3, 4)] == [4, 9, 16]
    with pytest.raises(ValueError, match="batch 5"):
        prefetcher.get(5)
    prefetcher.close()
    assert made == [2, 3, 4, 5]
    idle = loop_lib.Prefetcher(lambda n: n, 0, 1000, depth=1)  # closed with its queue full: must not hang
    idle.close()
    assert not any(t.name == "jaxllm-prefetch" for t in threading.enumerate())
    assert loop_lib.Prefetcher(lambda n: -n, 0, 3, depth=0).get(1) == -1
