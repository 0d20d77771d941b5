"""Several processes, one run (jaxllm/distributed.py, jaxllm/launch.py): the same losses as one process over the
same devices, process 0 alone writing metrics, a checkpoint of 2 processes resumed on 1, the launcher's exit
codes and signals, the unreachable coordinator's error.

Multi-process runs are real subprocesses through `python -m jaxllm.launch` on simulated CPU devices (gloo
collectives). Tolerance: 2 processes reduce the gradients in a different order than one process over the same
devices (gloo's all-reduce vs XLA's in-process one), so losses agree to float32 rounding, within a relative
1e-5 over these few steps (measured: at most 1 ulp, 5e-7, in 6 steps), not bit for bit.

`MESHES` names the meshes the multi-process tests run on (train.mesh over all devices): data-parallel, and
FSDP with parameters and optimizer state sharded across the processes; the default suite's short run uses FSDP.
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import distributed, launch, sharding
from jaxllm import train as train_lib
from jaxllm.data import batches as batches_lib
from jaxllm.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA, FSDP = {"train.mesh": "data:-1"}, {"train.mesh": "fsdp:-1"}
MESHES = [pytest.param(DATA, id="data"), pytest.param(FSDP, id="fsdp")]
RTOL = 1e-5


def overrides(tmp_path, steps: int, **extra) -> list[str]:
    """The tiny model of tests/test_train.py, pretraining only, as --config.* overrides of configs/tiny.py."""
    values = {"stages": "pretrain", "model.n_layer": 2, "model.n_embd": 64, "model.sequence_length": 32,
              "data.synthetic_documents": 300, "data.num_proc": 1, "data.cache_dir": str(tmp_path / "cache"),
              "train.steps": steps, "train.batch_size": 8, "train.log_every": 1, "train.eval_every": 3,
              "train.eval_batches": 2, "train.checkpoint_every": 3, "train.keep_checkpoints": 3,
              "train.progress": False, "train.full_eval_at_end": False, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def launch_train(tmp_path, workdir, cli_overrides, num_processes=2, devices_per_process=2, timeout=240):
    """`python -m jaxllm.launch ... -- python -m jaxllm.train --config configs/tiny.py ...`: the result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "jaxllm.launch", "--num_processes", str(num_processes), "--devices_per_process",
               str(devices_per_process), "--", sys.executable, "-m", "jaxllm.train", "--config", "configs/tiny.py",
               "--workdir", str(workdir), *[f"--config.{item}" for item in cli_overrides]]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def in_process_train(workdir, cli_overrides):
    return train_lib.train(config_lib.load_config(str(ROOT / "configs/tiny.py"), cli_overrides), workdir)


def losses(workdir, split="train"):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == split]


def assert_close(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=RTOL)


# ----------------------------------------------------------------------------------------- one process


def test_settings_from_flags_env_and_nothing():
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    none = parser.parse_args([])
    assert distributed.settings_from(none, environ={}) is None  # a plain run: jax.distributed is never called
    flags = parser.parse_args(["--coordinator_address", "h:1234", "--num_processes", "2", "--process_id", "1",
                               "--local_device_ids", "2,3", "--initialization_timeout", "7"])
    assert distributed.settings_from(flags, environ={}) == distributed.Settings("h:1234", 2, 1, (2, 3), 7)
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings_from(none, environ=env) == distributed.Settings("h:1", 4, 3, None, 300)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert distributed.settings_from(none, environ=slurm).detected == "slurm"
    assert distributed.settings_from(none, environ={**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None  # sbatch script
    with pytest.raises(distributed.DistributedError, match="--process_id missing"):
        distributed.settings_from(parser.parse_args(["--coordinator_address", "h:1", "--num_processes", "2"]), {})
    with pytest.raises(distributed.DistributedError, match="HOST:PORT"):
        distributed.settings_from(none, environ={**env, "JAX_COORDINATOR_ADDRESS": "nohost"})


def test_process_rows_and_shard_batch_from_process_rows():
    """One process holds every row; a batch built from `process_rows` and placed with `global_rows` is the
    same global array as the whole batch placed with device_put."""
    import jax

    mesh = sharding.make_mesh(4)
    assert sharding.process_rows(mesh, (2, 8, 32), batch_axis=1) == (0, 8)
    tokens = np.arange(5000, dtype=np.uint16) % 251
    whole = batches_lib.train_batch(tokens, seed=3, step=5, batch_size=8, seq_len=32)
    part = batches_lib.train_batch(tokens, seed=3, step=5, batch_size=8, seq_len=32, rows=np.arange(2, 6))
    np.testing.assert_array_equal(part["inputs"], whole["inputs"][2:6])
    placed = sharding.shard_batch(whole, mesh, global_rows=8)
    for name, array in placed.items():
        np.testing.assert_array_equal(np.asarray(array), whole[name])
        assert array.sharding == sharding.batch_sharding(mesh)
    assert sharding.to_host(jax.device_put(whole["inputs"], sharding.batch_sharding(mesh))).shape == (8, 32)


def test_unreachable_coordinator_is_one_sentence(tmp_path, capsys):
    """`python -m jaxllm.train`'s main, in this process: the probe of the coordinator fails before
    jax.distributed.initialize is called, so nothing of JAX's runtime is set up here."""
    port = launch.free_port()  # nobody listens there
    code = train_lib.main(["--config", str(ROOT / "configs/tiny.py"), "--workdir", str(tmp_path / "run"),
                           "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "1",
                           "--initialization_timeout", "1"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: the coordinator at 127.0.0.1:{port} could not be reached within 1 s (Connection refused); start "
        f"process 0 there first, check the address and port (and the firewall), or raise --initialization_timeout"]
    assert not (tmp_path / "run").exists()
    assert not distributed.is_multiprocess()


def test_launcher_kills_the_rest_and_returns_the_first_failure():
    child = ("import os, sys, time\n"
             "print('process', os.environ['JAX_PROCESS_ID'], 'of', os.environ['JAX_NUM_PROCESSES'],"
             " os.environ['JAX_NUM_CPU_DEVICES'], os.environ['XLA_FLAGS'], flush=True)\n"
             "sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(60)")
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "jaxllm.launch", "--num_processes", "2", "--devices_per_process",
                             "2", "--", sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and time.monotonic() - began < 30  # process 0 did not sleep its minute
    assert "[1] process 1 of 2 2 --xla_force_host_platform_device_count=2" in result.stdout


def test_launcher_forwards_sigint_to_every_child(tmp_path):
    child = ("import os, signal, sys, time\n"
             "def stop(signum, frame):\n"
             "    print('stopping', os.environ['JAX_PROCESS_ID'], flush=True); sys.exit(0)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-m", "jaxllm.launch", "--num_processes", "2", "--", sys.executable,
                                 "-c", child], stdout=subprocess.PIPE, text=True)
    lines = [launcher.stdout.readline(), launcher.stdout.readline()]
    assert sorted(lines) == ["[0] ready\n", "[1] ready\n"]
    launcher.send_signal(signal.SIGINT)
    out, _ = launcher.communicate(timeout=30)
    assert launcher.returncode == 0
    assert sorted(out.splitlines()) == ["[0] stopping 0", "[1] stopping 1"]


# ------------------------------------------------------------------------------------- several processes


@pytest.mark.parametrize("mesh", [pytest.param(FSDP, id="fsdp"), pytest.param(DATA, id="data", marks=pytest.mark.slow)])
def test_two_processes_match_one_and_only_process_0_writes(tmp_path, mesh):
    """The default suite's multi-process run (kept short: 2 steps, 2 x 1 device): the losses of 1 process
    over 2 devices, one metrics row per step and one TensorBoard file (process 0's)."""
    cli = overrides(tmp_path, steps=2, **{"train.eval_every": 2, "train.checkpoint_every": 2,
                                          "train.eval_batches": 1, **mesh})
    launch_train(tmp_path, tmp_path / "two", cli, devices_per_process=1)
    in_process_train(tmp_path / "one", cli + ["train.num_devices=2"])
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert_close(losses(tmp_path / "two", "val"), losses(tmp_path / "one", "val"))
    assert [r["step"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")] == [1, 2, 2]
    assert len(list((tmp_path / "two" / "tensorboard").glob("*tfevents*"))) == 1
    assert [r["tokens_seen"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["split"] == "train"] == [
        256, 512]  # both processes' rows counted: 8 rows x 32 tokens a step


@pytest.fixture(scope="module", params=MESHES)
def two_by_two(request, tmp_path_factory):
    """(tmp_path, the run's overrides, workdir) of a 6-step run of 2 processes x 2 devices (checkpoints 3, 6)."""
    tmp_path = tmp_path_factory.mktemp("two_by_two")
    cli = overrides(tmp_path, steps=6, **request.param)
    launch_train(tmp_path, tmp_path / "run", cli)
    return tmp_path, cli, tmp_path / "run"


@pytest.mark.slow  # ~60-90 s here: a 2-process run and a 4-device one
def test_two_processes_of_two_devices_match_one_process_of_four(two_by_two):
    tmp_path, cli, run = two_by_two
    in_process_train(tmp_path / "one", cli)
    assert_close(losses(run), losses(tmp_path / "one"))
    assert_close(losses(run, "val"), losses(tmp_path / "one", "val"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6"]


@pytest.mark.slow  # ~40-60 s here, with the fixture's 2-process run shared with the test above
def test_checkpoint_of_two_processes_resumes_on_one_device(two_by_two):
    """Step 3's checkpoint (as a kill after step 3 would leave it) of 2 processes x 2 devices, resumed by one
    process on one device: steps 4-6 as the uninterrupted 2-process run had them."""
    tmp_path, cli, run = two_by_two
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    summary = in_process_train(resumed, cli + ["train.num_devices=1"])
    assert summary["step"] == 6
    assert_close(losses(resumed), losses(run))
    assert_close(losses(resumed, "val"), losses(run, "val"))
    assert json.loads((resumed / "config.json").read_text())["train"]["steps"] == 6
