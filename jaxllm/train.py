"""Command line and the pretraining stage: `python -m jaxllm.train --config configs/tiny.py [--config.a.b=v ...]`.

`train` prepares the data, builds the model, optimizer and compiled step, restores the newest checkpoint of
the workdir if there is one, and hands over to the shared step loop (`jaxllm.loop`): the batch for step n
comes from (data.seed, n) alone, so a resumed run reproduces the uninterrupted run's losses bit for bit on
CPU. `run_stages` chains pretraining and the MathQA fine-tune (`jaxllm.finetune`). The command ends with a
short summary for a person (`human_summary`), then every metric as one JSON line, the last line of stdout
(also written to workdir/summary.json) for scripts.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import compare as compare_lib
from jaxllm import config as config_lib
from jaxllm import curves, distributed, hardware, hugepages, pretrained
from jaxllm import finetune as finetune_lib
from jaxllm import loop
from jaxllm import models, optim, sharding
from jaxllm import stage as stage_lib
from jaxllm.config import ConfigError
from jaxllm.data import batches as batches_lib
from jaxllm.data.prepare import prepare
from jaxllm.data.sources import DataError
from jaxllm.loop import TrainingError
from jaxllm.tokenizer import TokenizerError, get_tokenizer


USER_ERRORS = (ConfigError, DataError, TokenizerError, checkpoint_lib.CheckpointError, TrainingError,
               finetune_lib.FinetuneError, distributed.DistributedError)


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


def check_vocab(config, tokenizer) -> None:
    if config.model.vocab_size < tokenizer.n_vocab:
        padded = -(-tokenizer.n_vocab // 64) * 64
        raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) is smaller than the {tokenizer.name} "
                          f"tokenizer's {tokenizer.n_vocab} ids; set --config.model.vocab_size={padded}")


def train(config, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; return the final metrics."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    m, t = config.model, config.train
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
    check_vocab(config, tokenizer)
    # Tokenize first: prepare's workers start from a fork server (never a fork of this JAX process).
    data_dir = prepare(config.data, tokenizer, progress=t.progress)
    mesh = stage_lib.make_mesh(config, {"train.batch_size": t.batch_size})
    train_tokens = batches_lib.open_tokens(data_dir / "train.bin")
    val_tokens = batches_lib.open_tokens(data_dir / "val.bin")
    L, B, K = m.sequence_length, t.batch_size, t.grad_accum
    batches_lib.train_batch(train_tokens, seed=config.data.seed, step=0, batch_size=1, seq_len=L)  # length check

    run = stage_lib.open_stage(config, workdir, build, mesh)
    if t.eval_batches:  # a fixed sample of the validation windows, placed on the mesh once
        eval_batches = [sharding.shard_batch(b, mesh) for b in
                        batches_lib.eval_batches(val_tokens, n_batches=t.eval_batches, batch_size=B, seq_len=L)]
        n_eval_batches = len(eval_batches)
    else:  # 0 = every validation window at each evaluation (as in the fine-tune), streamed batch by batch
        eval_batches = None
        n_eval_batches = -(-batches_lib.num_windows(len(val_tokens), L) // B)

    def evaluate_val(params) -> dict[str, float]:
        batches = eval_batches if eval_batches is not None else (
            sharding.shard_batch(b, mesh) for b in batches_lib.all_eval_batches(val_tokens, batch_size=B, seq_len=L))
        return loop.evaluate(run.eval_step, params, batches)

    first, stop = run.rows  # this process's rows of each micro-batch
    positions = (np.arange(K)[:, None] * B + np.arange(first, stop)[None, :]).ravel()  # in the flat [K * B] batch

    def host_batch(step_number: int) -> dict[str, np.ndarray]:
        flat = batches_lib.train_batch(train_tokens, seed=config.data.seed, step=step_number,
                                       batch_size=B * K, seq_len=L, rows=positions)
        return {name: array.reshape(K, stop - first, *array.shape[1:]) for name, array in flat.items()}

    full_eval_batches = -(-batches_lib.num_windows(len(val_tokens), L) // B) if t.full_eval_at_end else 0
    start_step = int(jax.device_get(run.state.step))
    result = stage_lib.train(
        run, host_batch=host_batch, evaluate_params=evaluate_val, save_meta={}, name="the run",
        budget_field="train.max_duration_s", tokens_seen=start_step * B * K * L,
        # MFU: model FLOPs per token over peak FLOP/s (a GPU table, or this CPU's matmul measured once).
        flops_per_token=models.flops_per_token(m, config.moe), peak_flops=hardware.peak_flops(m.dtype, mesh.size)[0],
        final_eval_scale=full_eval_batches / n_eval_batches)
    state, step_number, stop_reason = result.state, result.step, result.stop_reason
    if result.interrupted:
        return {"step": step_number, "stopped": stop_reason}

    summary = {"step": step_number, "train": result.train, "val": result.val}
    if stop_reason:
        summary["stopped"] = stop_reason
    if t.full_eval_at_end and not any(r.get("full") and r["step"] == step_number for r in run.writer.rows):
        if not t.eval_batches and result.val.get("step") == step_number:  # that evaluation was already the full one
            full_metrics = {k: v for k, v in result.val.items() if k not in ("step", "split")}
        else:
            full = (sharding.shard_batch(b, mesh) for b in
                    batches_lib.all_eval_batches(val_tokens, batch_size=B, seq_len=L))
            full_metrics = loop.evaluate(run.eval_step, state.params, full)
        summary["val_full"] = run.writer.write(step_number, "val", {**full_metrics, "full": True}, tag="val_full")
    run.close()
    return summary


def build(config):
    """(model, optimizer, schedule) of pretraining: optimizer and schedule from config.optim over train.steps."""
    return models.build_model(config.model, config.moe), optim.make_optimizer(config), optim.make_schedule(config)


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
    if distributed.is_primary():
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
        if distributed.is_primary():
            marker.write_text(json.dumps(summary, default=float))
    return summaries


def stage_dirs(config, workdir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """{stage name: its folder} of a run: the workdir itself for a pretraining-only run, else workdir/<stage>."""
    names, workdir = config_lib.stage_names(config), pathlib.Path(workdir)
    return {"pretrain": workdir} if names == ["pretrain"] else {name: workdir / name for name in names}


def human_summary(summary: dict[str, Any], config, workdir: str | pathlib.Path) -> list[str]:
    """What the end of a run tells a person (the JSON line after it is for scripts): per stage its steps,
    tokens, wall time, first and last validation loss and MathQA accuracy, where its checkpoints and
    curves.png are; then how to watch the TensorBoard logs. Read from each stage's metrics.jsonl; a stage
    that did not run (a signal stopped an earlier one) is left out."""
    folders = stage_dirs(config, workdir)
    single = config_lib.stage_names(config) == ["pretrain"]  # its summary is the stage's; else {stage: summary}
    per_stage = {"pretrain": summary} if single else summary
    lines = []
    for name, folder in folders.items():
        if name not in per_stage:
            continue
        stage_summary = per_stage[name]
        try:
            stats = compare_lib.summarize(compare_lib.load_rows(folder), name)
        except (compare_lib.CompareError, OSError, ValueError):  # no rows yet: say what the summary knows
            stats = compare_lib.RunSummary(name, stage_summary.get("step"), None, None, None, None, None, False)
        head = (f"{name}: {stats.steps if stats.steps is not None else stage_summary.get('step')} steps, "
                f"{compare_lib.format_count(stats.tokens)} tokens, {compare_lib.format_seconds(stats.wall_s)}")
        if stats.final_val_loss is not None:
            head += (f"; val loss {stats.first_val_loss:.4f} -> {stats.final_val_loss:.4f}"
                     f"{' (full pass)' if stats.final_val_full else ''}")
        lines.append(head)
        scores = [f"{row.get('shots', '?')}-shot acc {row['acc']:.4f} (acc_norm {row.get('acc_norm', float('nan')):.4f}"
                  f", n={row.get('n', '?')})" for key, row in stage_summary.items()
                  if key.startswith("mathqa_") and isinstance(row, dict) and "acc" in row]
        if scores:
            lines.append(f"  MathQA {config.mathqa.test_split}: " + "; ".join(scores))
        stopped = stage_summary.get("stopped")
        if stopped:
            resume = str(stopped).startswith("received")
            lines.append(f"  stopped: {stopped}{'; run the same command again to resume' if resume else ''}")
        lines.append(f"  checkpoints: {folder / 'checkpoints'}")
        if (folder / curves.FILENAME).is_file():
            lines.append(f"  curves:      {folder / curves.FILENAME}")
        lines.append(f"  tensorboard: {folder / 'tensorboard'}")
    lines.append(f"view the logs: tensorboard --logdir {workdir}  (pip install tensorboard)")
    lines.append(f"every metric: {pathlib.Path(workdir) / 'summary.json'} and the JSON line below")
    return lines


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a config file, e.g. configs/tiny.py")
    parser.add_argument("--workdir", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--dry_run", action="store_true", help="validate the config, print sizes, touch no data")
    distributed.add_arguments(parser)
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
        if not args.dry_run:
            distributed.setup(args)  # several processes (flags, JAX_* variables, SLURM, TPU): before any device
        config = config_lib.load_config(args.config, overrides)
        if pretrained.is_external(config.finetune.init_from):  # hf:/gguf: the imported model's shape and tokenizer
            config = config_lib.validate(pretrained.adopt(config, config.finetune.init_from))
        if args.dry_run:
            print(json.dumps(describe(config)))
            return 0
        workdir = args.workdir or str(pathlib.Path("runs") / pathlib.Path(args.config).stem)
        summary = run_stages(config, workdir)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    line = json.dumps(summary, default=float)
    if distributed.is_primary():
        try:  # a person first; scripts read the last line of stdout (or summary.json)
            (pathlib.Path(workdir) / "summary.json").write_text(line + "\n")
            print("\n".join(human_summary(summary, config, workdir)))
        except Exception as error:  # noqa: BLE001 -- the run is done: a summary that fails is a warning
            print(f"warning: could not write the run's summary ({type(error).__name__}: {error})", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    sys.exit(main())
