"""jaxllm/checkpoint.py: params-only restore on another machine's devices, without the optimizer state."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as file:
        return int(next(line for line in file if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes read with Linux /proc/self/io")
def test_restore_params_reads_only_the_params(tmp_path):
    rng = np.random.default_rng(0)
    params = {"base": {"w": rng.random((32, 32), np.float32)}, "lora": {"a": rng.random((32, 2), np.float32)}}
    state = {"step": jnp.int32(5), "params": jax.tree.map(jnp.asarray, params),
             "opt_state": {"mu": jnp.asarray(rng.random((1024, 1024), np.float32))}}  # 4 MiB, the params 4 KiB
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(5, state, {"step": 5})
    before = _bytes_read()
    restored = checkpointer.restore_params(5)
    params_read = _bytes_read() - before
    before = _bytes_read()
    checkpointer.restore_saved(5)  # the whole state: the counter does see the optimizer state's bytes
    whole_read = _bytes_read() - before
    checkpointer.close()
    assert jax.tree.map(np.asarray, restored).keys() == params.keys()
    np.testing.assert_array_equal(restored["base"]["w"], params["base"]["w"])
    np.testing.assert_array_equal(restored["lora"]["a"], params["lora"]["a"])
    assert whole_read > 3_000_000 and params_read < 500_000, (params_read, whole_read)


READ_ON_ONE_DEVICE = """
import json, pathlib, sys
import jax
from jaxllm import config as config_lib, eval as eval_lib, finetune, generate
run = pathlib.Path(sys.argv[1])
assert jax.device_count() == 1
assert generate.main(["--workdir", str(run), "--prompt", "1 + 1 =", "--max_new_tokens", "4"]) == 0
assert eval_lib.main(["--workdir", str(run), "--shots", "0", "--max_questions", "2"]) == 0
config = config_lib.from_json((run / "config.json").read_text())
config.train.num_devices = 1
params = finetune.initial_params(config, run)
print("params", json.dumps(jax.tree.map(lambda p: list(p.shape), params)["embed"] if "embed" in params else len(params)))
"""


def test_checkpoint_of_four_devices_is_read_on_one(tmp_path):
    """eval, generate and the fine-tune's init_from read a 4-device FSDP run's checkpoint (every array split
    over the devices) on a 1-device machine."""
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head = 1, 32, 2
    c.model.vocab_size, c.model.sequence_length = 320, 32
    c.data.source, c.data.tokenizer, c.data.synthetic_documents, c.data.num_proc = "synthetic", "byte", 200, 1
    c.data.cache_dir = str(tmp_path / "cache")
    c.train.steps, c.train.batch_size, c.train.grad_accum = 2, 8, 1
    c.train.eval_batches, c.train.full_eval_at_end, c.train.checkpoint_every = 1, False, 2
    c.train.num_devices, c.train.progress, c.train.mesh = 4, False, "fsdp:4"
    c.mathqa.synthetic_problems, c.mathqa.eval_batch_size = 100, 4
    train_lib.train(config_lib.validate(c), tmp_path / "run")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", READ_ON_ONE_DEVICE, str(tmp_path / "run")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Topology mismatch" not in done.stderr
    assert json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])["step"] == 2
