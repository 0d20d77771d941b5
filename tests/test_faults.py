"""Faults the checkpoints must survive: kill -9 at random points (in a checkpoint write too), a full disk
during a save, a corrupt newest checkpoint. After each, the same command resumes and the losses equal an
uninterrupted run's bit for bit."""

import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import train as train_lib
from jaxllm.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP = ".orbax-checkpoint-tmp"  # orbax's suffix of a step folder being written


def tiny_args(tmp_path, steps=12, **overrides):
    """`python -m jaxllm.train` arguments of a tiny pretraining run that checkpoints every step."""
    settings = {"stages": "pretrain", "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2,
                "model.sequence_length": 32, "data.synthetic_documents": 200, "data.num_proc": 1,
                "data.cache_dir": tmp_path / "cache", "train.steps": steps, "train.batch_size": 4,
                "train.log_every": 1, "train.eval_every": 1000, "train.eval_batches": 1,
                "train.full_eval_at_end": False, "train.checkpoint_every": 1, "train.keep_checkpoints": 2,
                "train.num_devices": 1, "train.progress": False, "train.async_checkpoint": "off", **overrides}
    return ["--config", str(ROOT / "configs" / "tiny.py")] + [f"--config.{k}={v}" for k, v in settings.items()]


def train_in_process(args, workdir):
    """The run `python -m jaxllm.train args` makes, in this process (no start-up cost)."""
    return train_lib.train(config_lib.load_config(args[1], [a[len("--config."):] for a in args[2:]]), workdir)


def train_command(args, workdir):
    return [sys.executable, "-m", "jaxllm.train", *args, "--workdir", str(workdir)]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)}


def run_to_end(args, workdir):
    done = subprocess.run(train_command(args, workdir), env=env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]


def newest_loads(folder: pathlib.Path, capsys) -> int | None:
    """The newest committed step of `folder`, asserting that it loads (no warning, no error)."""
    if not folder.is_dir():
        return None
    checkpointer = checkpoint_lib.Checkpointer(folder, read_only=True)
    try:
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    committed = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    assert step == (max(committed) if committed else None)
    assert "does not load" not in capsys.readouterr().err
    return step


def rows(workdir: pathlib.Path) -> int:
    path = workdir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def kill_suite(tmp_path, capsys, kills: int, seed: int, steps: int = 8) -> dict:
    """Kill a tiny run (a checkpoint every step) with SIGKILL `kills` times, each at a seeded random moment
    up to 1.5 s after its first new metrics row (among steps and checkpoint writes), rerunning the same
    command after each; then compare with an uninterrupted run. Returns counts for docs/reliability.md."""
    args = tiny_args(tmp_path, steps=steps)
    train_in_process(args, tmp_path / "straight")
    rng = random.Random(seed)
    workdir, folder = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    counts = {"kills": 0, "in_write": 0, "runs": 0}
    began = time.monotonic()
    while True:
        before = rows(workdir)
        process = subprocess.Popen(train_command(args, workdir), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        counts["runs"] += 1
        if counts["kills"] < kills:
            while process.poll() is None and rows(workdir) <= before:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is not None or counts["kills"] >= kills:
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-3000:]
            break
        process.send_signal(signal.SIGKILL)
        process.communicate()
        counts["kills"] += 1
        counts["in_write"] += any(TMP in p.name for p in folder.iterdir()) if folder.is_dir() else 0
        newest_loads(folder, capsys)
    counts["wall_s"] = round(time.monotonic() - began, 1)
    assert train_losses(workdir) == train_losses(tmp_path / "straight")
    assert len(train_losses(workdir)) == steps
    return counts


def test_kill_9_at_random_points_resumes_exactly(tmp_path, capsys):
    counts = kill_suite(tmp_path, capsys, kills=1, seed=0)
    print(counts)


@pytest.mark.slow  # 20 kills, 21 start-ups: ~10-20 min on 2 cores
def test_kill_9_twenty_times_resumes_exactly(tmp_path, capsys):
    counts = kill_suite(tmp_path, capsys, kills=20, seed=1, steps=100)  # long enough to be killed 20 times
    with capsys.disabled():
        print(f"\nkill suite: {counts}")
    assert counts["kills"] == 20


FULL_DISK = """
import resource, signal, sys
import jax.numpy as jnp, numpy as np
from jaxllm import checkpoint as checkpoint_lib
folder, async_save = sys.argv[1], sys.argv[2] == "on"
state = {"step": jnp.int32(1), "params": {"w": jnp.ones((8, 8))},
         "opt_state": {"mu": jnp.asarray(np.random.default_rng(0).random((256, 1024), np.float32))}}
checkpointer = checkpoint_lib.Checkpointer(folder, async_save=async_save)
checkpointer.save(1, state, {"step": 1})
checkpointer.wait_until_finished()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    checkpointer.save(2, state, {"step": 2})
    checkpointer.close()
except checkpoint_lib.CheckpointError as error:
    print(f"error: {error}")
    sys.exit(2)
"""


@pytest.mark.parametrize("async_save", ["off", "on"])
def test_full_disk_during_save_is_one_sentence_and_keeps_previous(tmp_path, capsys, async_save):
    folder = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(folder), async_save], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout.strip() == (f"error: could not write checkpoint 2 to {folder} (File too large); free disk "
                                   f"space or choose another --workdir; the previous checkpoint (step 1) is intact")
    assert not [p for p in folder.iterdir() if TMP in p.name]  # the partial step is gone
    assert newest_loads(folder, capsys) == 1
    checkpointer = checkpoint_lib.Checkpointer(folder, read_only=True)
    assert float(checkpointer.restore_params(1)["w"].sum()) == 64.0
    checkpointer.close()


def _truncate_largest_file(step_folder: pathlib.Path) -> None:
    largest = max((p for p in step_folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


def test_corrupt_newest_checkpoint_resumes_from_previous(tmp_path, capsys):
    args = tiny_args(tmp_path, steps=6, **{"train.checkpoint_every": 3})
    train_in_process(args, tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "corrupt", ignore=shutil.ignore_patterns("tensorboard"))
    folder = tmp_path / "corrupt" / "checkpoints"
    _truncate_largest_file(folder / "6")
    capsys.readouterr()
    train_in_process(args, tmp_path / "corrupt")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "does not load" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: checkpoint {folder / '6'} does not load (its arrays cannot be read")
    assert warnings[0].endswith("moved it to corrupt-6, using step 3 instead")
    assert train_losses(tmp_path / "corrupt") == train_losses(tmp_path / "straight")
    assert sorted(p.name for p in folder.iterdir()) == ["3", "6", "corrupt-6"]


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    args = tiny_args(tmp_path, steps=2)
    train_in_process(args, tmp_path / "run")
    for step in (1, 2):
        (tmp_path / "run" / "checkpoints" / str(step) / "meta" / "metadata").write_text("{garbled")
    with pytest.raises(checkpoint_lib.CheckpointError, match=(
            f"^no checkpoint in {tmp_path / 'run' / 'checkpoints'} loads \\(steps 2, 1; step 2: its metadata "
            f"cannot be read")):
        train_in_process(args, tmp_path / "run")
