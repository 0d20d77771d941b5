"""End-to-end properties of the training loop on a tiny model: determinism, exact resume, the CLI's errors."""

import json
import os
import signal
import struct

import jax
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import loop as loop_lib
from jaxllm import models, optim, sharding, step as step_lib
from jaxllm import train as train_lib
from jaxllm.data import batches as batches_lib
from jaxllm.data.prepare import prepare
from jaxllm.metrics import read_metrics
from jaxllm.tokenizer import get_tokenizer


def tiny_config(tmp_path, **overrides):
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head = 2, 64, 4
    c.model.vocab_size, c.model.sequence_length = 320, 32
    c.data.source, c.data.tokenizer = "synthetic", "byte"
    c.data.synthetic_documents = 300
    c.data.num_proc = 1
    c.data.cache_dir = str(tmp_path / "cache")
    c.optim.lr = 3e-3
    c.train.steps, c.train.batch_size, c.train.grad_accum = 8, 8, 1
    c.train.log_every, c.train.eval_every, c.train.eval_batches = 1, 4, 2
    c.train.checkpoint_every, c.train.keep_checkpoints = 4, 3
    c.train.num_devices, c.train.progress = 1, False
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return config_lib.validate(c)


def losses(workdir, split="train"):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir / "metrics.jsonl")
            if r["split"] == split and not r.get("full")]


def test_same_seed_same_losses_bit_for_bit(tmp_path):
    first = train_lib.train(tiny_config(tmp_path), tmp_path / "a")
    second = train_lib.train(tiny_config(tmp_path), tmp_path / "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a", "val") == losses(tmp_path / "b", "val")
    assert len(losses(tmp_path / "a")) == 8
    assert first["val_full"]["loss"] == second["val_full"]["loss"]


def tensorboard_scalars(workdir, tag):
    """[(step, value)] of one TensorBoard tag in the event files of workdir/tensorboard (in name order), read
    record by record: uint64 length, uint32 CRC, an Event proto, uint32 CRC."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted((workdir / "tensorboard").glob("*tfevents*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            found += [(event.step, value.simple_value) for value in event.summary.value if value.tag == tag]
    return found


def test_resume_after_kill_equals_uninterrupted_in_metrics_and_tensorboard(tmp_path, kill_train_step):
    train_lib.train(tiny_config(tmp_path), tmp_path / "straight")
    with kill_train_step(7):  # dies after step 6, between checkpoints (the last one is step 4)
        train_lib.train(tiny_config(tmp_path), tmp_path / "resumed")
    assert train_lib.checkpoint_lib.Checkpointer(tmp_path / "resumed" / "checkpoints").latest_step() == 4
    train_lib.train(tiny_config(tmp_path), tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert losses(tmp_path / "resumed", "val") == losses(tmp_path / "straight", "val")
    # TensorBoard shows each step once (the killed run's steps 5 and 6 are gone), with metrics.jsonl's values.
    for tag, split in (("train/loss", "train"), ("val/loss", "val")):
        assert tensorboard_scalars(tmp_path / "resumed", tag) == [
            (step, float(np.float32(loss))) for step, loss in losses(tmp_path / "resumed", split)]


@pytest.mark.slow  # ~45-85 s here (resume is also covered by test_resume_after_kill_equals_uninterrupted); run with -m slow
def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, interrupt_train_step):
    train_lib.train(tiny_config(tmp_path), tmp_path / "straight")
    with interrupt_train_step(3, lambda: os.kill(os.getpid(), signal.SIGTERM)):
        summary = train_lib.train(tiny_config(tmp_path), tmp_path / "stopped")
    assert summary["stopped"] == "received SIGTERM" and summary["step"] == 3
    assert 3 in train_lib.checkpoint_lib.Checkpointer(tmp_path / "stopped" / "checkpoints").all_steps()
    assert (tmp_path / "stopped" / "curves.png").is_file()  # drawn at the signal stop too
    train_lib.train(tiny_config(tmp_path), tmp_path / "stopped")
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_finished_run_is_not_retrained(tmp_path):
    train_lib.train(tiny_config(tmp_path), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    summary = train_lib.train(tiny_config(tmp_path), tmp_path / "run")
    assert summary["step"] == 8
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == rows


def test_eval_batches_zero_evaluates_every_validation_window(tmp_path, monkeypatch):
    """train.eval_batches=0 means every validation window (as in the fine-tune): the evaluation at the last
    step weighs n_windows x L targets, and the final full evaluation is that same one, not a second pass."""
    weights = []
    original = loop_lib.evaluate

    def counting(eval_step, params, batches):
        batches = list(batches)
        weights.append(sum(float(np.sum(np.asarray(b["weights"]))) for b in batches))
        return original(eval_step, params, batches)

    monkeypatch.setattr(loop_lib, "evaluate", counting)
    config = tiny_config(tmp_path, **{"train.eval_batches": 0, "train.steps": 2, "train.eval_every": 2,
                                      "train.checkpoint_every": 2, "train.full_eval_at_end": True})
    summary = train_lib.train(config, tmp_path / "run")
    val_tokens = batches_lib.open_tokens(prepare(config.data, get_tokenizer("byte"), progress=False) / "val.bin")
    assert weights == [batches_lib.num_windows(len(val_tokens), 32) * 32]
    assert summary["step"] == 2 and summary["val_full"]["loss"] == summary["val"]["loss"]


def _one_step(config, batch_KxBxL, num_devices):
    mesh = sharding.make_mesh(num_devices)
    model = models.build_model(config.model)
    optimizer = optim.make_optimizer(config)
    step = step_lib.compile_train_step(
        step_lib.make_train_step(model, optimizer, optim.make_schedule(config), config, mesh), mesh)
    state = jax.jit(lambda: step_lib.init_state(model, optimizer, config),
                    out_shardings=sharding.replicated(mesh))()
    batch = sharding.shard_batch(batch_KxBxL, mesh, batch_axis=1)
    state, metrics = step(state, batch)
    return jax.device_get(state.params), jax.device_get(metrics)


def _random_batch(k, b, length, vocab=320, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(k, b, length + 1), dtype=np.int32)
    weights = np.ones((k, b, length), np.float32)
    weights[..., : length // 4] = rng.integers(0, 2, size=(k, b, length // 4))  # uneven token counts
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "weights": weights}


# SGD makes the first update linear in the gradient; AdamW's g / (|g| + eps) would amplify float rounding of
# gradients near eps into visible parameter differences and hide what these tests compare: the gradients.
SGD = {"optim.name": "sgd", "optim.lr": 0.5}


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    big = _random_batch(1, 8, 32)
    split = {name: array.reshape(2, 4, 32) for name, array in big.items()}
    params_big, metrics_big = _one_step(tiny_config(tmp_path, **SGD, **{"train.grad_accum": 1}), big, 1)
    params_acc, metrics_acc = _one_step(tiny_config(tmp_path, **SGD, **{"train.grad_accum": 2}), split, 1)
    np.testing.assert_allclose(metrics_acc["loss"], metrics_big["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_acc["grad_norm"], metrics_big["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params_acc, params_big)


def test_one_device_equals_four_devices(tmp_path):
    assert len(jax.devices()) >= 4, "conftest sets 4 simulated CPU devices"
    batch = _random_batch(2, 8, 32, seed=1)
    config = tiny_config(tmp_path, **SGD, **{"train.grad_accum": 2})
    params_1, metrics_1 = _one_step(config, batch, 1)
    params_4, metrics_4 = _one_step(config, batch, 4)
    np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params_4, params_1)


@pytest.mark.slow
def test_training_on_four_devices_runs(tmp_path):
    summary = train_lib.train(tiny_config(tmp_path, **{"train.num_devices": 4, "train.steps": 2}), tmp_path / "run")
    assert summary["step"] == 2


def test_workdir_holds_config_metrics_tensorboard_and_checkpoints(tmp_path):
    train_lib.train(tiny_config(tmp_path), tmp_path / "run")
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["model"]["n_layer"] == 2
    rows = read_metrics(run / "metrics.jsonl")
    train_row = next(r for r in rows if r["split"] == "train")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "elapsed_s"} <= train_row.keys()
    val_row = next(r for r in rows if r["split"] == "val")
    assert {"step", "loss", "perplexity", "accuracy"} <= val_row.keys()
    assert any(r.get("full") for r in rows)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert train_lib.checkpoint_lib.Checkpointer(run / "checkpoints").latest_step() == 8
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")  # drawn when the stage closed


# --- the CLI: one clear sentence for each mistake a user makes ---------------------------------------------

def _cli(capsys, tmp_path, *args):
    # tiny.py runs pretrain then finetune (in workdir/<stage>); these tests are about the pretraining CLI.
    code = train_lib.main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "cli"), "--config.stages=pretrain",
                           f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.progress=false", *args])
    return code, capsys.readouterr()


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_prints_params_and_flops(capsys, tmp_path):
    code, out = _cli(capsys, tmp_path, "--dry_run")
    assert code == 0
    info = json.loads(out.out.strip().splitlines()[-1])
    assert info["params"] == models.param_count(config_lib.load_config("configs/tiny.py").model)
    assert info["flops_per_token"] > 6 * info["non_embedding_params"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args, message", [
    (["--config.model.n_layers=2"], "unknown config field 'model.n_layers'; did you mean 'model.n_layer'"),
    (["--config.model.n_embd=100", "--config.model.n_head=3"], "must be divisible by model.n_head"),
    (["--config.model.vocab_size=128"], "smaller than the byte tokenizer's 257 ids"),
    (["--config.data.source=local", "--config.data.path=/nonexistent/data"], "/nonexistent/data"),
    (["--config.data.source=hub", "--config.data.path=DKYoon/SlimPajama-6B"], "local"),
    (["--config.model.sequence_length=100000", "--config.data.synthetic_documents=50"], "sequence_length"),
    (["--config.optim.name=adam"], "choose one of adamw, lion, sgd"),
])
def test_cli_errors_are_one_clear_sentence(capsys, tmp_path, args, message):
    code, out = _cli(capsys, tmp_path, *args)
    assert code == 2
    assert message in out.err
    assert "Traceback" not in out.err


@pytest.mark.slow  # ~30-60 s here (trains a model first)
def test_checkpoint_of_another_model_shape_is_refused(capsys, tmp_path):
    config = tiny_config(tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2})
    train_lib.train(config, tmp_path / "cli")
    code, out = _cli(capsys, tmp_path, "--config.model.n_layer=3")
    assert code == 2
    assert "different model" in out.err and "n_layer" in out.err


def test_bfloat16_params_keep_their_dtype_through_a_step(tmp_path):
    """param_dtype=bfloat16: the step returns bf16 params and bf16 AdamW moments (the gradient's division by
    the token count must not promote them to float32, or a resumed run would restore other dtypes)."""
    config = tiny_config(tmp_path)
    config.model.param_dtype = "bfloat16"
    mesh = sharding.make_mesh(1)
    model, optimizer = models.build_model(config.model, config.moe), optim.make_optimizer(config)
    train_step = step_lib.make_train_step(model, optimizer, optim.make_schedule(config), config, mesh)
    state = step_lib.abstract_state(model, optimizer, config)
    shape = (1, 2, config.model.sequence_length)
    batch = {"inputs": jax.ShapeDtypeStruct(shape, np.int32), "targets": jax.ShapeDtypeStruct(shape, np.int32),
             "weights": jax.ShapeDtypeStruct(shape, np.float32)}
    after, _ = jax.eval_shape(train_step, state, batch)
    before_dtypes = [leaf.dtype for leaf in jax.tree.leaves(state)]
    assert jax.numpy.bfloat16 in before_dtypes
    assert [leaf.dtype for leaf in jax.tree.leaves(after)] == before_dtypes
