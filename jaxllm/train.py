"""Command line and training loop: `python -m jaxllm.train --config configs/tiny.py [--config.a.b=v ...]`.

The loop is a thin shell around the pure, compiled `train_step`: it builds the batch for step n from
(data.seed, n) alone, dispatches step n+1 before it reads step n's metrics, evaluates on a fixed set of
validation batches, and checkpoints every `train.checkpoint_every` steps, at the end, on SIGTERM/SIGINT and
when the wall-clock budget runs out. Running the same command on the same workdir resumes from the newest
checkpoint and reproduces the uninterrupted run's losses bit for bit on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import hardware
from jaxllm import finetune as finetune_lib
from jaxllm import loss as loss_lib
from jaxllm import models, optim, sharding, step as step_lib
from jaxllm.config import ConfigError
from jaxllm.data import batches as batches_lib
from jaxllm.data.prepare import prepare
from jaxllm.data.sources import DataError
from jaxllm.metrics import MetricsWriter
from jaxllm.tokenizer import TokenizerError, get_tokenizer


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the message says why and what survives."""


USER_ERRORS = (ConfigError, DataError, TokenizerError, checkpoint_lib.CheckpointError, TrainingError,
               finetune_lib.FinetuneError)


def describe(config) -> dict[str, Any]:
    """What `--dry_run` prints: sizes and costs derived from the config alone, touching no data."""
    m, t = config.model, config.train
    params = models.param_count(m, config.moe)
    embedding = m.vocab_size * m.n_embd + (m.sequence_length * m.n_embd if m.name == "gpt2" else 0)
    return {
        "model": m.name,
        "params": params,
        "non_embedding_params": params - embedding,
        "active_params": models.active_param_count(m, config.moe),  # all params, less unrouted experts (MoE)
        "flops_per_token": models.flops_per_token(m, config.moe),
        "tokens_per_step": t.batch_size * t.grad_accum * m.sequence_length,
        "steps": t.steps,
    }


def check_batch_layout(config, mesh) -> None:
    if config.train.batch_size % mesh.size:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be divisible by the {mesh.size} devices "
                          f"of the mesh; change it or set train.num_devices")


def check_vocab(config, tokenizer) -> None:
    if config.model.vocab_size < tokenizer.n_vocab:
        padded = -(-tokenizer.n_vocab // 64) * 64
        raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) is smaller than the {tokenizer.name} "
                          f"tokenizer's {tokenizer.n_vocab} ids; set --config.model.vocab_size={padded}")


def moe_shape_signature(config) -> dict[str, int]:
    """The moe fields that shape the parameters (a dense model: n_experts 0 only)."""
    e = config.moe
    return {"n_experts": e.n_experts, "every": e.every} if e.n_experts else {"n_experts": 0}


def check_moe_compatible(checkpointer, step: int, config) -> None:
    """Refuse to resume a checkpoint whose experts differ (checkpoints without the field were dense)."""
    saved = checkpointer.read_meta(step).get("moe_shape", {"n_experts": 0})
    for name, value in moe_shape_signature(config).items():
        if saved.get(name) != value:
            raise checkpoint_lib.CheckpointError(
                f"{checkpointer.directory} holds a checkpoint of a different model (moe.{name} is {saved.get(name)} "
                f"there, {value} here); use a new --workdir or the same model settings")


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it checkpoints and exits)."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their owner
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _evaluate(eval_step, params, batches) -> dict[str, float]:
    sums = None
    for batch in batches:
        out = eval_step(params, batch)
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    return loss_lib.summarize(jax.device_get(sums))


def train(config, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; return the final metrics."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    m, t = config.model, config.train
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
    check_vocab(config, tokenizer)
    # Tokenize before JAX starts its threads: prepare forks worker processes.
    data_dir = prepare(config.data, tokenizer, progress=t.progress)
    mesh = sharding.make_mesh(t.num_devices)
    check_batch_layout(config, mesh)
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:
        checkpointer.check_compatible(latest, m)
        check_moe_compatible(checkpointer, latest, config)

    train_tokens = batches_lib.open_tokens(data_dir / "train.bin")
    val_tokens = batches_lib.open_tokens(data_dir / "val.bin")
    L, B, K = m.sequence_length, t.batch_size, t.grad_accum
    eval_batches = [sharding.shard_batch(b, mesh) for b in
                    batches_lib.eval_batches(val_tokens, n_batches=t.eval_batches, batch_size=B, seq_len=L)]
    batches_lib.train_batch(train_tokens, seed=config.data.seed, step=0, batch_size=1, seq_len=L)  # length check

    model = models.build_model(m, config.moe)
    optimizer = optim.make_optimizer(config)
    schedule = optim.make_schedule(config)
    train_step = step_lib.compile_train_step(step_lib.make_train_step(model, optimizer, schedule, config), mesh)
    eval_step = step_lib.make_eval_step(model, config, mesh)

    replicated = sharding.replicated(mesh)
    if latest is None:
        state = jax.jit(lambda: step_lib.init_state(model, optimizer, config), out_shardings=replicated)()
        meta = {}
    else:
        abstract = step_lib.abstract_state(model, optimizer, config)
        state, meta = checkpointer.restore(latest, abstract, jax.tree.map(lambda _: replicated, abstract))
    start_step = int(jax.device_get(state.step))
    (workdir / "config.json").write_text(config_lib.to_json(config))
    writer = MetricsWriter(workdir, resume_step=latest)

    tokens_per_step = B * K * L
    # MFU: model FLOPs per token over peak FLOP/s (a GPU table, or this CPU's matmul measured once).
    flops_per_token = models.flops_per_token(m, config.moe)
    peak_flops, _ = hardware.peak_flops(m.dtype, mesh.size)
    elapsed_before = float(meta.get("elapsed_s", 0.0))
    run_start = time.monotonic()

    def save(step_number: int) -> None:
        checkpointer.save(step_number, state, {
            "step": step_number, "tokens_seen": step_number * tokens_per_step,
            "elapsed_s": elapsed_before + time.monotonic() - run_start,
            "model_shape": checkpoint_lib.shape_signature(m), "moe_shape": moe_shape_signature(config)})

    def host_batch(step_number: int) -> dict[str, np.ndarray]:
        flat = batches_lib.train_batch(train_tokens, seed=config.data.seed, step=step_number,
                                       batch_size=B * K, seq_len=L)
        return {name: array.reshape(K, B, *array.shape[1:]) for name, array in flat.items()}

    progress = _progress_bar(t, start_step)
    last_metrics: dict[str, Any] = {}
    stop_reason = None
    interval_start, interval_steps = None, 0
    pending = None  # (step number after the update, device metrics) of the step in flight
    step_number = start_step

    def settle(item) -> None:
        """Read one finished step's metrics: NaN guard, logging."""
        nonlocal interval_start, interval_steps, last_metrics
        done_step, metrics = item
        metrics = jax.device_get(metrics)
        if not math.isfinite(float(metrics["loss"])):
            good = checkpointer.latest_step()
            raise TrainingError(f"the loss became {float(metrics['loss'])} at step {done_step}; stopped without "
                                f"checkpointing this state (last good checkpoint: "
                                f"{'step ' + str(good) if good is not None else 'none'}); lower optim.lr or "
                                f"set optim.grad_clip")
        interval_steps += 1
        if interval_start is None:  # the first step includes compilation: time from its end
            interval_start, interval_steps = time.monotonic(), 0
        if done_step % t.log_every == 0 or done_step == t.steps:
            now = time.monotonic()
            rate = interval_steps * tokens_per_step / (now - interval_start) if interval_steps else float("nan")
            interval_start, interval_steps = now, 0
            # Every scalar the step returns is logged (MoE adds its aux losses and loads, for instance).
            last_metrics = writer.write(done_step, "train", {
                **metrics, "tokens_per_s": rate, "mfu": hardware.mfu(rate, flops_per_token, peak_flops),
                "tokens_seen": done_step * tokens_per_step})
            progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", lr=f"{float(metrics['lr']):.2e}",
                                 tok_s=f"{rate:.0f}", refresh=False)
        progress.update(1)

    val_metrics: dict[str, Any] = {}
    try:
        with _StopRequest() as stop:
            while step_number < t.steps:
                batch = sharding.shard_batch(host_batch(step_number), mesh, batch_axis=1)
                state, metrics = train_step(state, batch)
                step_number += 1
                if pending is not None:
                    settle(pending)
                pending = (step_number, metrics)
                due_eval = step_number % t.eval_every == 0 or step_number == t.steps
                due_save = step_number % t.checkpoint_every == 0 or step_number == t.steps
                elapsed = elapsed_before + time.monotonic() - run_start
                if stop.signal_name:
                    stop_reason = f"received {stop.signal_name}"
                elif t.max_duration_s and elapsed >= t.max_duration_s:
                    stop_reason = f"wall-clock budget of {t.max_duration_s:.0f} s reached"
                if due_eval or due_save or stop_reason:
                    settle(pending)
                    pending = None
                if due_eval:
                    val_metrics = writer.write(step_number, "val", _evaluate(eval_step, state.params, eval_batches))
                if due_save or stop_reason:
                    save(step_number)
                if stop_reason:
                    break
            if pending is not None:
                settle(pending)
    finally:
        progress.close()

    if stop_reason and stop_reason.startswith("received"):
        writer.close()
        checkpointer.close()
        print(f"{stop_reason}: saved checkpoint at step {step_number} in {checkpointer.directory}; "
              f"run the same command again to resume", file=sys.stderr)
        return {"step": step_number, "stopped": stop_reason}

    summary = {"step": step_number, "train": last_metrics, "val": val_metrics}
    if stop_reason:
        summary["stopped"] = stop_reason
        print(f"{stop_reason}: stopped at step {step_number}", file=sys.stderr)
    if t.full_eval_at_end and (step_number != start_step or not _has_full_eval(writer.path, step_number)):
        full = batches_lib.all_eval_batches(val_tokens, batch_size=B, seq_len=L)
        result = _evaluate(eval_step, state.params, (sharding.shard_batch(b, mesh) for b in full))
        summary["val_full"] = writer.write(step_number, "val", {**result, "full": True}, tag="val_full")
    writer.close()
    checkpointer.close()
    return summary


def run_stages(config, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Run `config.stages` in order. One stage ("pretrain") trains in `workdir` itself, as `train` does;
    several each run in `workdir/<stage>` with `config.stage_config(config, stage)`.

    The finetune stage starts from `finetune.init_from`, or else the pretrain stage's last checkpoint. A
    stage that finished (its `stage_done.json` exists) is not run again; a stage stopped by a signal
    stops the whole run, and the same command resumes it.
    """
    names = config_lib.stage_names(config)
    if names == ["pretrain"]:
        return train(config, workdir)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(config))
    summaries: dict[str, Any] = {}
    for name in names:
        stage_dir = workdir / name
        marker = stage_dir / "stage_done.json"
        if marker.is_file():
            summaries[name] = json.loads(marker.read_text())
            print(f"stage {name} already finished ({stage_dir}); skipping it", file=sys.stderr)
            continue
        stage_cfg = config_lib.stage_config(config, name)
        if name == "pretrain":
            summary = train(stage_cfg, stage_dir)
        else:
            init_from = config.finetune.init_from or (workdir / "pretrain" if "pretrain" in names else None)
            summary = finetune_lib.finetune(stage_cfg, stage_dir, init_from)
        summaries[name] = summary
        if str(summary.get("stopped", "")).startswith("received"):
            break
        marker.write_text(json.dumps(summary, default=float))
    return summaries


def _has_full_eval(metrics_path: pathlib.Path, step_number: int) -> bool:
    if not metrics_path.exists():
        return False
    with open(metrics_path) as file:
        rows = [json.loads(line) for line in file if line.strip()]
    return any(r.get("full") and r["step"] == step_number for r in rows)


def _progress_bar(train_cfg, start_step: int):
    from tqdm.auto import tqdm

    return tqdm(total=train_cfg.steps, initial=start_step, disable=not train_cfg.progress, unit="step",
                dynamic_ncols=True, file=sys.stderr)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a config file, e.g. configs/tiny.py")
    parser.add_argument("--workdir", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--dry_run", action="store_true", help="validate the config, print sizes, touch no data")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument '{item}'; config overrides look like --config.train.steps=100")
        overrides.append(item[len("--config."):])
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        config = config_lib.load_config(args.config, overrides)
        if args.dry_run:
            print(json.dumps(describe(config)))
            return 0
        workdir = args.workdir or str(pathlib.Path("runs") / pathlib.Path(args.config).stem)
        summary = run_stages(config, workdir)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
