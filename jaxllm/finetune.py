"""The fine-tuning stage: from a pretrained checkpoint's params, train on masked answer tokens.

`finetune(stage_cfg, workdir, init_from)` takes the config of the stage (`config.stage_config(config,
"finetune")`: `finetune.optim` and `finetune.train` in place of `optim` and `train`). When `workdir` has no
checkpoint yet, the params are read from `init_from` (a workdir, checkpoints/ folder or step folder; the
optimizer state there is ignored) and the optimizer starts fresh; otherwise the stage resumes from its own
newest checkpoint. `finetune.data` chooses the examples: MathQA questions (jaxllm/data/mathqa.py) or the
user's own prompt/completion or chat rows (`sft` section, jaxllm/data/sft.py); either way data/sft.py
tokenizes, masks (loss only on answer/assistant tokens and their end-of-turn) and batches them (padded, or
packed with `finetune.packing`) as a pure function of (seed, step), so a resumed stage trains on exactly the
batches an uninterrupted one would. With `finetune.lora.rank > 0` only LoRA adapters train (models/lora.py);
the final params are exported with the adapters merged.

At the end: a validation pass over every validation example (`finetune.train.full_eval_at_end`), then, for
finetune.data=mathqa, the multiple-choice accuracy on the test split for each of `mathqa.eval_shots` (rows
with split "mathqa" in metrics.jsonl); an sft stage ends with the validation loss. A stage that was already
finished (all steps, or its budget used up) trains no further and redoes none of these.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import eval as eval_lib
from jaxllm import loop
from jaxllm import distributed, hardware, models, optim, pretrained, sharding
from jaxllm import stage as stage_lib
from jaxllm.config import ConfigError
from jaxllm.data import mathqa
from jaxllm.data import sft as sft_data
from jaxllm.models import lora as lora_lib
from jaxllm.tokenizer import get_tokenizer


class FinetuneError(RuntimeError):
    """The fine-tune cannot go on (a NaN loss, a checkpoint of another model); the message says why."""


def build(config):
    """(model, optimizer, schedule) of the stage: LoRA-wrapped with a frozen base when lora.rank > 0."""
    model = models.build(config)
    optimizer, schedule = optim.make_optimizer(config), optim.make_schedule(config)
    lora = config.finetune.lora
    if lora.rank:
        model = lora_lib.wrap(model, lora)
        optimizer = lora_lib.frozen_base_optimizer(optimizer)
    return model, optimizer, schedule


def initial_params(config, init_from: str | pathlib.Path):
    """The params of checkpoint `init_from` (any stage's), or of an imported model (`hf:PATH_OR_REPO`,
    `gguf:FILE`: jaxllm/pretrained.py), checked against the configured model (float32).

    LoRA adapters in it are merged (a quantized base dequantized); with `finetune.lora.rank > 0` the base is
    then quantized as `finetune.lora.quantize` says and adapters are added on top (fresh, or LoftQ's).
    """
    if pretrained.is_external(init_from):  # hf:PATH or gguf:FILE; train.main adopted its model section
        folder, step = init_from, "import"
        params = pretrained.load_params(init_from)
    else:
        folder, step = checkpoint_lib.locate(init_from)
        checkpointer = checkpoint_lib.Checkpointer(folder, read_only=True)
        try:
            checkpointer.check_compatible(step, config.model)
            checkpoint_lib.check_moe_compatible(checkpointer, step, config)
            params = checkpointer.restore_params(step)
        finally:
            checkpointer.close()
        params = lora_lib.merge(params, config.finetune.lora)
    expected = models.abstract_params(config.model, config.moe)
    mismatched = [f"{jax.tree_util.keystr(path)} {getattr(leaf, 'shape', None)}"
                  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
                  if _lookup(params, path) is None or tuple(_lookup(params, path).shape) != tuple(leaf.shape)]
    if mismatched or jax.tree.structure(expected) != jax.tree.structure(params):
        raise FinetuneError(f"the checkpoint {folder}/{step} does not fit model {config.model.name}: "
                            f"{', '.join(mismatched[:5]) or 'different parameter names'}; use the same model settings")
    params = jax.tree.map(lambda p, e: jnp.asarray(p, e.dtype), params, expected)
    lora = config.finetune.lora
    if lora.rank:
        params = lora_lib.wrap(models.build(config), lora).adapt(jax.random.key(config.seed), params, init=lora.init,
                                                                 loftq_iters=lora.loftq_iters)
    return params


def _lookup(tree, path):
    for key in path:
        name = getattr(key, "key", key)
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree


def finetune(config, workdir: str | pathlib.Path, init_from: str | pathlib.Path | None) -> dict[str, Any]:
    """Run (or resume) the fine-tune stage in `workdir`; return its summary. `config` is the stage config."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    m, t, q = config.model, config.train, config.mathqa
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
    if m.vocab_size < tokenizer.n_vocab:
        raise ConfigError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's {tokenizer.n_vocab} ids")
    scored = config.finetune.get("data", "mathqa") == "mathqa"  # MathQA's multiple-choice scoring at the end
    mesh = stage_lib.make_mesh(config, {"finetune.train.batch_size": t.batch_size,
                                        **({"mathqa.eval_batch_size": q.eval_batch_size} if scored else {})})
    data, questions = load_data(config, tokenizer, workdir)
    data_seed = q.seed if scored else config.sft.seed  # the order of training examples

    def fresh_params():
        if init_from is None:
            raise ConfigError("the finetune stage has nothing to start from; set finetune.init_from or run pretrain first")
        return initial_params(config, init_from)

    run = stage_lib.open_stage(config, workdir, build, mesh, initial_params=fresh_params)
    state = run.state
    opt_bytes, param_bytes = lora_lib.tree_bytes(state.opt_state), lora_lib.tree_bytes(state.params)
    if run.latest is None:
        run.writer.write(0, "memory", {"opt_state_bytes": opt_bytes, "param_bytes": param_bytes,
                                       "trainable_params": models.count_params(
                                           state.params["lora"] if lora_lib.is_lora(state.params) else state.params)})
    print(f"finetune: optimizer state {opt_bytes / 2**20:.2f} MiB, params {param_bytes / 2**20:.2f} MiB"
          f"{' (LoRA rank ' + str(config.finetune.lora.rank) + ')' if config.finetune.lora.rank else ''}", file=sys.stderr)

    val_batches = data.val_batches(t.batch_size, t.eval_batches)

    def on_mesh(batches):
        return (sharding.shard_batch(b, mesh) for b in batches)

    result = stage_lib.train(
        run, host_batch=lambda step: data.train_batch(seed=data_seed, step=step, batch_size=t.batch_size,
                                                      grad_accum=t.grad_accum, rows=run.rows),
        evaluate_params=lambda params: loop.evaluate(run.eval_step, params, on_mesh(val_batches)),
        save_meta={"stage": "finetune"}, name="the fine-tune", budget_field="finetune.train.max_duration_s",
        tokens_seen=int(run.meta.get("tokens_seen", 0)), nan_hint="lower finetune.optim.lr",
        # MFU for full fine-tuning; a LoRA step skips the frozen base's weight gradients (a third of
        # 6 * params), so the 6N count would overstate its work: its MFU is left NaN, its tokens/s stands.
        **({} if config.finetune.lora.rank else {"flops_per_token": models.flops_per_token(m, config.moe),
                                                  "peak_flops": hardware.peak_flops(m.dtype, mesh.size)[0]}),
        # The final pass over every validation example, in periodic evaluations (MathQA scoring not counted).
        final_eval_scale=(-(-len(data.val) // t.batch_size) / max(len(val_batches), 1)
                          if t.full_eval_at_end else 0.0))
    state, step_number, stop_reason = result.state, result.step, result.stop_reason
    summary: dict[str, Any] = {"step": step_number, "train": result.train, "val": result.val}
    if result.interrupted:
        return {**summary, "stopped": stop_reason}
    if stop_reason:
        summary["stopped"] = stop_reason
    writer, eval_step = run.writer, run.eval_step

    # A stage killed during these final evaluations redoes only the ones it had not written yet.
    rows = [r for r in writer.rows if r["step"] == step_number]
    done_shots = {r["shots"] for r in rows if r["split"] == "mathqa"}
    if t.full_eval_at_end and not any(r.get("full") for r in rows):
        if not t.eval_batches and result.val.get("step") == step_number:  # that evaluation was already the full one
            full = {k: v for k, v in result.val.items() if k not in ("step", "split")}
        else:
            full = loop.evaluate(eval_step, state.params, on_mesh(data.val_batches(t.batch_size)))
        summary["val_full"] = writer.write(step_number, "val", {**full, "full": True}, tag="val_full")
    params = state.params
    if lora_lib.is_lora(params):
        params = lora_lib.merge(params, config.finetune.lora)
        _export(workdir / "export", params)
    if questions is None:  # finetune.data=sft: the validation loss above is the stage's measure
        run.close()
        return summary
    base_model = models.build(config)
    # Scoring runs data-parallel over the stage's devices, the params replicated (jaxllm/eval.py).
    score_mesh = sharding.make_mesh(mesh.size)
    params = jax.jit(lambda p: p, out_shardings=sharding.replicated(score_mesh))(params)
    test = questions["test"][:q.eval_questions] if q.eval_questions else questions["test"]
    for shots in [int(s) for s in q.eval_shots.split(",") if s.strip()]:
        if shots in done_shots:
            continue
        result = eval_lib.run_mc(config, params, base_model, tokenizer, score_mesh, test, questions["train"], shots)
        summary[f"mathqa_{shots}shot"] = writer.write(step_number, "mathqa", result, tag=f"mathqa_{shots}shot")
        print(f"MathQA {q.test_split} {shots}-shot: n={result['n']} acc={result['acc']:.4f} "
              f"acc_norm={result['acc_norm']:.4f} ({result['seconds']:.0f} s)", file=sys.stderr)
    run.close()
    return summary


def load_data(config, tokenizer, workdir: pathlib.Path):
    """(the stage's batches, MathQA's {"train", "val", "test"} questions or None) for `finetune.data`.

    mathqa: the `mathqa` section's questions as (prompt, completion) pairs (data/mathqa.py), skipped rows
    in mathqa_parse.json; sft: the `sft` section's rows (data/sft.py), skipped rows in sft_parse.json. Both are
    tokenized, masked and batched by data/sft.py (`finetune.packing`: several examples per row); each skipped
    row count is printed too.
    """
    m, f = config.model, config.finetune
    packing = bool(f.get("packing", False))
    if f.get("data", "mathqa") == "sft":
        max_length = config.sft.max_length or m.sequence_length
        if m.name == "gpt2" and max_length > m.sequence_length:
            raise ConfigError(f"sft.max_length ({max_length}) exceeds gpt2's learned positions ({m.sequence_length})")
        data, reports = sft_data.load_data(config.sft, tokenizer, max_length=max_length, packing=packing)
        report_file, name, questions = workdir / "sft_parse.json", "sft", None
        print(f"sft: {len(data.train)} train and {len(data.val)} validation examples, "
              f"{'the tokenizer' if reports['template'] == 'tokenizer' else 'the built-in'} chat template",
              file=sys.stderr)
    else:
        q = config.mathqa
        max_length = q.max_length or m.sequence_length
        if m.name == "gpt2" and max_length > m.sequence_length:
            raise ConfigError(f"mathqa.max_length ({max_length}) exceeds gpt2's learned positions ({m.sequence_length})")
        questions, reports = mathqa.load_splits(q)
        data = mathqa.FinetuneData(questions, tokenizer, max_length=max_length, pad_multiple=q.pad_multiple,
                                   rationale=q.rationale, packing=packing)
        report_file, name = workdir / "mathqa_parse.json", "mathqa"
    if distributed.is_primary():  # one writer of the stage's files
        report_file.write_text(json.dumps(reports, indent=2))
    for split, report in reports.items():
        if isinstance(report, dict) and report["skipped"]:
            print(f"{name} {split}: skipped {report['rows'] - report['read']} of {report['rows']} rows: "
                  f"{report['skipped']}", file=sys.stderr)
    return data, questions


def _export(directory: pathlib.Path, params) -> None:
    """The merged params alone (orbax StandardSave), for serving without the LoRA wrapper. Several
    processes: all take part in the save; they agree on whether it exists before any of them writes."""
    exists = directory.exists()
    distributed.barrier("lora-export")
    if exists:
        return
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory.absolute(), params)
    checkpointer.wait_until_finished()
