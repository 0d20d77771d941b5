"""Seeing runs: jaxllm.compare's table and PNG from hand-written metrics, curves.png of a tiny run (at a signal
stop and at the end), and the end of `python -m jaxllm.train`: a summary for a person, the JSON line last."""

import json
import os
import pathlib
import signal

import pytest

from jaxllm import compare, curves
from jaxllm import train as train_lib
from jaxllm.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder: pathlib.Path, rows) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def train_row(step, loss, tokens_per_s, elapsed_s, tokens_per_step=1000):
    return {"step": step, "split": "train", "loss": loss, "lr": 1e-3, "tokens_per_s": tokens_per_s,
            "tokens_seen": step * tokens_per_step, "elapsed_s": elapsed_s}


# Run "slow": 4 steps of 1000 tokens, 10 s each after a 20 s first step; sampled val at 2 and 4, a full pass at 4.
SLOW = [train_row(1, 6.0, float("nan"), 20.0), train_row(2, 5.0, 100.0, 30.0), {"step": 2, "split": "val", "loss": 5.5},
        train_row(3, 4.5, 300.0, 40.0), train_row(4, 4.0, 200.0, 50.0), {"step": 4, "split": "val", "loss": 4.2},
        {"step": 4, "split": "val", "loss": 4.1, "full": True}]
# Run "fast": the same tokens in half the time, no full pass; its val loss reaches slow's last sampled 4.2 at
# step 2 (15 s): sampled losses are set against sampled ones, never against slow's full 4.1.
FAST = [train_row(1, 5.0, float("nan"), 10.0), train_row(2, 4.0, 400.0, 15.0),
        {"step": 2, "split": "val", "loss": 4.05}, train_row(4, 3.5, 400.0, 25.0),
        {"step": 4, "split": "val", "loss": 3.75}]


def test_summarize_reads_final_full_val_tokens_wall_time_and_median_rate():
    slow, fast = compare.summarize(SLOW, "slow"), compare.summarize(FAST, "fast")
    assert slow == compare.RunSummary(name="slow", steps=4, tokens=4000, wall_s=50.0, tokens_per_s=200.0,
                                      first_val_loss=5.5, final_val_loss=4.1, final_val_full=True)
    assert (fast.final_val_loss, fast.final_val_full, fast.tokens_per_s, fast.wall_s) == (3.75, False, 400.0, 25.0)
    assert compare.time_to_loss(FAST, 4.2) == 15.0 and compare.time_to_loss(SLOW, 4.2) == 50.0
    assert compare.time_to_loss(SLOW, 3.0) is None
    assert compare.reach_target(SLOW) == (4.2, False) and compare.reach_target(FAST) == (3.75, False)
    only_full = [r for r in SLOW if r["split"] == "train" or r.get("full")]
    assert compare.reach_target(only_full) == (4.1, True)
    assert compare.time_to_loss(only_full, 4.1, full=True) == 50.0 and compare.time_to_loss(FAST, 4.1, True) is None
    assert compare.time_to_loss(SLOW, 4.1) is None  # its sampled losses never reach 4.1; only its full pass does
    # A validation row's tokens and time are read off the train rows at its step (step 3 lies between 2 and 4).
    assert compare.at_steps(FAST, "elapsed_s", [2, 3, 4]) == [15.0, 20.0, 25.0]


def test_compare_cli_prints_the_table_and_writes_the_png(tmp_path, capsys):
    slow, fast = write_run(tmp_path / "slow", SLOW), write_run(tmp_path / "fast", FAST)
    out = tmp_path / "cmp.png"
    assert compare.main([str(slow), str(fast), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["run", "final", "val", "loss", "steps", "tokens", "wall", "time", "tokens/s",
                                "reaches", "first's", "loss", "at"]
    assert lines[1].split() == ["slow", "4.1000", "(full)", "4", "4k", "50.0s", "200", "50.0s"]
    assert lines[2].split() == ["fast", "3.7500", "4", "4k", "25.0s", "400", "15.0s"]
    assert lines[3] == f"curves: {out}"
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000


def test_compare_picks_a_stage_of_multistage_runs_and_says_what_is_missing(tmp_path, capsys):
    write_run(tmp_path / "run" / "pretrain", SLOW)
    write_run(tmp_path / "run" / "finetune", FAST)
    assert compare.stage_dir(tmp_path / "run") == tmp_path / "run" / "pretrain"
    text, path = compare.compare([tmp_path / "run"], stage="finetune", out=None)
    assert path is None and text.splitlines()[1].split()[:2] == ["run", "3.7500"]
    assert compare.main([str(tmp_path / "run"), "--stage", "sft", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'run'} has no sft stage with metrics.jsonl; it "
                                               f"has: finetune, pretrain; choose with --stage")
    (tmp_path / "empty").mkdir()
    with pytest.raises(compare.CompareError, match="holds no metrics.jsonl"):
        compare.stage_dir(tmp_path / "empty")
    assert not (tmp_path / "x.png").exists()


def test_a_failure_to_draw_is_one_warning_never_an_error(tmp_path, capsys):
    assert curves.write_curves(tmp_path / "missing") is None  # no metrics.jsonl, no folder
    err = capsys.readouterr().err
    assert err.startswith("warning: could not draw") and err.count("\n") == 1


def cli_args(workdir, cache):
    """`python -m jaxllm.train` on configs/tiny.py shrunk to tests/test_train.py's tiny model, pretraining only."""
    settings = {"stages": "pretrain", "model.n_layer": 2, "model.n_embd": 64, "model.sequence_length": 32,
                "data.synthetic_documents": 300, "data.num_proc": 1, "data.cache_dir": cache, "train.steps": 4,
                "train.batch_size": 8, "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 2,
                "train.checkpoint_every": 2, "train.progress": False, "train.async_checkpoint": "off",
                "train.num_devices": 1}
    return ["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
            *[f"--config.{key}={value}" for key, value in settings.items()]]


def test_main_prints_a_summary_for_a_person_then_the_json_line_last(tmp_path, capsys, monkeypatch):
    """The end of `python -m jaxllm.train` for a two-stage run, its stages replaced by hand-written results."""
    mathqa = {"step": 4, "split": "mathqa", "n": 16, "shots": 5, "acc": 0.3125, "acc_norm": 0.25}

    def fake_stages(config, workdir):
        for name, rows in (("pretrain", SLOW), ("finetune", FAST)):
            curves.write_curves(write_run(pathlib.Path(workdir) / name, rows))
        return {"pretrain": {"step": 4, "val_full": SLOW[-1]}, "finetune": {"step": 4, "mathqa_5shot": mathqa}}

    monkeypatch.setattr(train_lib, "run_stages", fake_stages)
    run = tmp_path / "run"
    assert train_lib.main(["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])  # scripts read the last line of stdout; summary.json holds the same
    assert summary == json.loads((run / "summary.json").read_text()) == fake_stages(None, run)
    assert out[:-1] == [
        "pretrain: 4 steps, 4k tokens, 50.0s; val loss 5.5000 -> 4.1000 (full pass)",
        f"  checkpoints: {run / 'pretrain' / 'checkpoints'}",
        f"  curves:      {run / 'pretrain' / 'curves.png'}",
        f"  tensorboard: {run / 'pretrain' / 'tensorboard'}",
        "finetune: 4 steps, 4k tokens, 25.0s; val loss 4.0500 -> 3.7500",
        "  MathQA test: 5-shot acc 0.3125 (acc_norm 0.2500, n=16)",
        f"  checkpoints: {run / 'finetune' / 'checkpoints'}",
        f"  curves:      {run / 'finetune' / 'curves.png'}",
        f"  tensorboard: {run / 'finetune' / 'tensorboard'}",
        f"view the logs: tensorboard --logdir {run}  (pip install tensorboard)",
        f"every metric: {run / 'summary.json'} and the JSON line below"]


@pytest.mark.slow  # two tiny runs, ~25 s here; test_train's tiny runs check curves.png and elapsed_s by default
def test_tiny_run_draws_curves_on_a_signal_stop_and_ends_with_a_summary_then_json(tmp_path, capsys,
                                                                                    interrupt_train_step):
    run = tmp_path / "run"
    with interrupt_train_step(2, lambda: os.kill(os.getpid(), signal.SIGTERM)):
        assert train_lib.main(cli_args(run, tmp_path / "cache")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"step": 2, "stopped": "received SIGTERM"}
    assert out[0].startswith("pretrain: 2 steps, 512 tokens, ")
    assert "  stopped: received SIGTERM; run the same command again to resume" in out
    assert (run / "curves.png").read_bytes().startswith(PNG)
    stopped_png = (run / "curves.png").read_bytes()

    assert train_lib.main(cli_args(run, tmp_path / "cache")) == 0  # resumes to the end
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])  # scripts read the last line; summary.json holds the same
    assert summary == json.loads((run / "summary.json").read_text()) and summary["step"] == 4
    rows = read_metrics(run / "metrics.jsonl")
    first_val = next(r["loss"] for r in rows if r["split"] == "val")
    assert out[0].startswith("pretrain: 4 steps, 1.02k tokens, ")
    assert out[0].endswith(f"val loss {first_val:.4f} -> {summary['val_full']['loss']:.4f} (full pass)")
    assert f"  checkpoints: {run / 'checkpoints'}" in out and f"  curves:      {run / 'curves.png'}" in out
    assert any(f"tensorboard --logdir {run}" in line for line in out)
    assert all(r["elapsed_s"] > 0 for r in rows if r["split"] == "train")  # wall time, across the resume
    assert (run / "curves.png").read_bytes() != stopped_png  # redrawn at the end with all the steps

    text, _ = compare.compare([run], out=None)  # the compare tool reads a real run too
    assert text.splitlines()[1].split()[:4] == ["run", f"{summary['val_full']['loss']:.4f}", "(full)", "4"]


def test_main_summary_of_a_finetune_only_run(tmp_path, capsys, monkeypatch):
    """stages=finetune: one stage, in workdir/finetune, its summary under its name."""
    def fake_stages(config, workdir):
        write_run(pathlib.Path(workdir) / "finetune", FAST)
        return {"finetune": {"step": 4}}

    monkeypatch.setattr(train_lib, "run_stages", fake_stages)
    run = tmp_path / "run"
    assert train_lib.main(["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(run),
                           "--config.stages=finetune", f"--config.finetune.init_from={tmp_path / 'base'}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"finetune": {"step": 4}}
    assert out[:-3] == ["finetune: 4 steps, 4k tokens, 25.0s; val loss 4.0500 -> 3.7500",
                        f"  checkpoints: {run / 'finetune' / 'checkpoints'}",
                        f"  tensorboard: {run / 'finetune' / 'tensorboard'}"]
