"""FSDP and tensor parallelism (train.mesh): the same losses as one device, 1/N of the state per device,
checkpoints that move between meshes, and the compiled step's work split N ways. (A 4-device FSDP checkpoint
read by eval, generate and init_from on a 1-device machine: tests/test_checkpoint.py; several processes:
tests/test_multihost.py.)

Tolerances: a sharded step adds its gradients in another order than one device does (partial sums per shard,
then a reduce-scatter or all-reduce), so losses agree to float32 rounding, not bit for bit: 20 AdamW steps of
the tiny model stay within 1e-5 (measured: ~1.5e-6). The same mesh twice is bit-exact (test_train's seed tests).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import hlo, sharding, step as step_lib
from jaxllm import stage as stage_lib
from jaxllm import train as train_lib
from jaxllm.config import ConfigError
from test_train import _random_batch, losses, tiny_config

LOSS_TOL = 1e-5


def _run_steps(config, mesh_spec: str, num_devices: int, steps: int):
    """(losses, state) of `steps` AdamW steps on random batches, on a mesh of `num_devices` devices."""
    mesh = sharding.make_mesh(num_devices, mesh_spec)
    model, optimizer, schedule = train_lib.build(config)
    abstract, shardings = stage_lib.state_shardings(config, model, optimizer, mesh)
    step = step_lib.compile_train_step(step_lib.make_train_step(model, optimizer, schedule, config, mesh), mesh,
                                       shardings)
    state = jax.jit(lambda: step_lib.init_state(model, optimizer, config), out_shardings=shardings)()
    out = []
    for i in range(steps):
        batch = _random_batch(config.train.grad_accum, config.train.batch_size, config.model.sequence_length, seed=i)
        state, metrics = step(state, sharding.shard_batch(batch, mesh, batch_axis=1))
        out.append(float(metrics["loss"]))
    return np.array(out), state


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("ref"), **MESH_TEST)
    return _run_steps(config, "data:-1", 1, 20)[0]


MESH_TEST = {"train.grad_accum": 2, "model.n_kv_head": 2}


@pytest.mark.parametrize("mesh_spec", ["fsdp:4", pytest.param("data:2,fsdp:2", marks=pytest.mark.slow),
                                       "data:2,tensor:2", pytest.param("fsdp:2,tensor:2", marks=pytest.mark.slow)])
def test_sharded_meshes_train_like_one_device(tmp_path, one_device_losses, mesh_spec):
    config = tiny_config(tmp_path, **MESH_TEST)
    ref = one_device_losses
    got, state = _run_steps(config, mesh_spec, 4, 20)
    np.testing.assert_allclose(got, ref, rtol=0, atol=LOSS_TOL)
    sizes = config_lib.parse_mesh(mesh_spec, 4)
    # Every matrix is split fsdp x tensor ways (each device holds exactly its share); norm scales are whole.
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        shard = leaf.addressable_shards[0].data
        ways = 1 if leaf.ndim == 1 else sizes["fsdp"] * sizes["tensor"]
        assert shard.size * ways == leaf.size, (jax.tree_util.keystr(path), leaf.shape, shard.shape)
    # Adam's moments are sharded as their parameters.
    mu = state.opt_state[-1][0].mu if hasattr(state.opt_state[-1][0], "mu") else None
    if mu is not None:
        jax.tree.map(lambda m, p: (m.sharding.spec == p.sharding.spec) or pytest.fail(f"{m.sharding} != {p.sharding}"),
                     mu, state.params)


def test_optimizer_state_is_sharded_like_its_params(tmp_path):
    config = tiny_config(tmp_path)
    mesh = sharding.make_mesh(4, "fsdp:4")
    model, optimizer, _ = train_lib.build(config)
    abstract, shardings = stage_lib.state_shardings(config, model, optimizer, mesh)
    params_bytes = sum(leaf.size for leaf in jax.tree.leaves(abstract.params)) * 4
    per_device = sum(np.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                     for leaf, s in zip(jax.tree.leaves(abstract.opt_state), jax.tree.leaves(shardings.opt_state)))
    norms = sum(leaf.size for leaf in jax.tree.leaves(abstract.params) if leaf.ndim == 1) * 4
    # AdamW: two moments per parameter; the matrices' moments 1/4 each, the norms' whole, a few scalars.
    assert per_device <= 2 * ((params_bytes - norms) / 4 + norms) + 64, (per_device, params_bytes)


def test_mesh_that_does_not_fit_the_model_or_batch_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="n_kv_head"):  # 2 key/value heads do not split 4 ways
        config = tiny_config(tmp_path, **{"model.n_kv_head": 2, "train.mesh": "tensor:4"})
        model, optimizer, _ = train_lib.build(config)
        stage_lib.state_shardings(config, model, optimizer, sharding.make_mesh(4, "tensor:4"))
    with pytest.raises(ConfigError, match="batch shards"):
        stage_lib.make_mesh(tiny_config(tmp_path, **{"train.num_devices": 4, "train.mesh": "data:-1,fsdp:2",
                                                     "train.batch_size": 6}), {"train.batch_size": 6})
    with pytest.raises(ConfigError, match="axis 'model'"):
        tiny_config(tmp_path, **{"train.mesh": "model:2"})


@pytest.mark.parametrize("mesh_spec", ["fsdp:4", pytest.param("data:2,tensor:2", marks=pytest.mark.slow)])
def test_sharded_step_does_a_quarter_of_the_work_per_device(tmp_path, mesh_spec):
    """Per-device matmul FLOPs of the compiled step on fsdp:4 and data:2,tensor:2 are ~1/4 of one device's:
    no device computes another's rows (the fused LM head runs a chunk loop per batch shard). FSDP moves
    weights by all-gather and gradients by reduce-scatter."""
    from test_sharding import FUSED_HEAD

    config = tiny_config(tmp_path, **FUSED_HEAD)

    def compiled(mesh_spec, n):
        mesh = sharding.make_mesh(n, mesh_spec)
        model, optimizer, schedule = train_lib.build(config)
        abstract, shardings = stage_lib.state_shardings(config, model, optimizer, mesh)
        step = step_lib.compile_train_step(step_lib.make_train_step(model, optimizer, schedule, config, mesh),
                                           mesh, shardings)
        shape = (1, config.train.batch_size, config.model.sequence_length)
        batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32), "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
                 "weights": jax.ShapeDtypeStruct(shape, jnp.float32)}
        return step.lower(abstract, batch).compile().as_text()

    one = hlo.matmul_flops(compiled("data:-1", 1))
    text = compiled(mesh_spec, 4)
    ratio = hlo.matmul_flops(text) / one
    counts = hlo.collective_counts(text)
    print(f"{mesh_spec}: per-device matmul FLOPs {ratio:.3f} of one device's; collectives {counts}")
    assert ratio <= 0.3, (mesh_spec, ratio)
    if mesh_spec == "fsdp:4":
        assert counts["all-gather"] > 0 and counts["reduce-scatter"] + counts["all-reduce"] > 0


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted one-device run the moved runs are compared with."""
    tmp = tmp_path_factory.mktemp("straight")
    train_lib.train(tiny_config(tmp), tmp / "straight")
    return tmp / "straight"


@pytest.mark.parametrize("before, after", [
    ({"train.num_devices": 4, "train.mesh": "fsdp:4"}, {}),
    pytest.param({}, {"train.num_devices": 4, "train.mesh": "data:2,tensor:2"}, marks=pytest.mark.slow)],
    ids=["fsdp4_to_1", "1_to_data2_tensor2"])
def test_checkpoint_moves_between_meshes(tmp_path, straight_run, kill_train_step, before, after):
    """A run killed on one mesh resumes on another and continues with the same losses as an uninterrupted
    one-device run (float tolerance: the reduction order differs between meshes)."""
    with kill_train_step(7):  # dies after step 6; the last checkpoint is step 4
        train_lib.train(tiny_config(tmp_path, **before), tmp_path / "moved")
    train_lib.train(tiny_config(tmp_path, **after), tmp_path / "moved")
    got, want = losses(tmp_path / "moved"), losses(straight_run)
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([loss for _, loss in got], [loss for _, loss in want], rtol=0, atol=LOSS_TOL)


EIGHT_DEVICES = textwrap.dedent("""
    import os, sys, pathlib
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {tests!r})
    import numpy as np
    from test_fsdp import _run_steps, tiny_config
    config = tiny_config(pathlib.Path({tmp!r}), **{{"train.grad_accum": 2, "model.n_kv_head": 2}})
    ref, _ = _run_steps(config, "data:-1", 1, 20)
    for spec in ("data:8", "fsdp:8", "data:2,fsdp:4", "data:4,tensor:2"):
        got, _ = _run_steps(config, spec, 8, 20)
        print(spec, float(np.abs(got - ref).max()), flush=True)
""")


@pytest.mark.slow  # ~40 s: a fresh process with 8 simulated devices
def test_eight_device_meshes_train_like_one_device(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    script = EIGHT_DEVICES.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(line.split() for line in out.stdout.splitlines())
    assert set(rows) == {"data:8", "fsdp:8", "data:2,fsdp:4", "data:4,tensor:2"}, out.stdout
    for spec, diff in rows.items():
        assert float(diff) <= LOSS_TOL, (spec, diff)


@pytest.mark.slow  # ~35-55 s: two stages, twice
def test_two_stage_run_with_lora_on_sharded_meshes(tmp_path):
    """Pretraining on fsdp:4, then a LoRA fine-tune on data:2,tensor:2 with MathQA scoring: the fine-tune's
    losses equal the same fine-tune's on one device (float tolerance), from the same pretrained checkpoint."""
    from test_stages import staged_config

    from jaxllm import finetune as finetune_lib

    config = staged_config(tmp_path, **{"train.num_devices": 4, "train.mesh": "fsdp:4", "finetune.train.steps": 3,
                                        "finetune.lora.rank": 2, "mathqa.eval_shots": "0",
                                        "finetune.train.num_devices": 4, "finetune.train.mesh": "data:2,tensor:2"})
    summary = train_lib.run_stages(config, tmp_path / "run")
    assert summary["finetune"]["mathqa_0shot"]["n"] == 4
    one = config_lib.stage_config(staged_config(tmp_path, **{"finetune.train.steps": 3, "finetune.lora.rank": 2,
                                                             "mathqa.eval_shots": ""}), "finetune")
    finetune_lib.finetune(one, tmp_path / "one", tmp_path / "run" / "pretrain")
    got, want = losses(tmp_path / "run" / "finetune"), losses(tmp_path / "one")
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=0, atol=LOSS_TOL)


@pytest.mark.slow  # ~30-50 s: three runs on four devices
def test_fsdp_resume_on_the_same_mesh_is_bit_exact(tmp_path, kill_train_step):
    """Killed and resumed on the same fsdp:2,tensor:2 mesh: the uninterrupted run's losses bit for bit (the
    reduction order is the mesh's, so nothing changes)."""
    mesh = {"train.num_devices": 4, "train.mesh": "fsdp:2,tensor:2"}
    train_lib.train(tiny_config(tmp_path, **mesh), tmp_path / "straight")
    with kill_train_step(7):
        train_lib.train(tiny_config(tmp_path, **mesh), tmp_path / "resumed")
    train_lib.train(tiny_config(tmp_path, **mesh), tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert losses(tmp_path / "resumed", "val") == losses(tmp_path / "straight", "val")
