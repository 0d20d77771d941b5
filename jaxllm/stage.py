"""Where a training stage is assembled: mesh, checkpoints, train state, compiled step, the loop around it.

Pretraining (jaxllm/train.py) and fine-tuning (jaxllm/finetune.py) differ in their data, their model (LoRA
wraps it) and what they do at the end. Everything between is here, in the order it happens:

    mesh = stage.make_mesh(config, batch_sizes)          # train.mesh over the devices of every process
    run = stage.open_stage(config, workdir, build, mesh, initial_params=...)
        # the checkpointer; the state restored from the newest checkpoint (onto this mesh's shardings,
        # whatever mesh wrote it) or made fresh; the compiled train and eval steps; the metrics writer
    result = stage.train(run, host_batch=..., evaluate_params=..., save_meta=...)
        # jaxllm.loop's step loop: a checkpoint every train.checkpoint_every steps and on a signal
    ... the stage's own final evaluations, then run.close()    # and curves.png (jaxllm/curves.py)

`build(config) -> (model, optimizer, schedule)` is the stage's model and optimizer for a config; it is
called again when fit_steps_to_budget changes the schedule's length. With several processes every process
runs all of this; each builds only its own rows of a batch (`Stage.rows`), only process 0 writes metrics
and files, and every process takes part in each checkpoint save.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import curves, distributed, loop, sharding, step as step_lib
from jaxllm.config import ConfigError
from jaxllm.metrics import MetricsWriter

Build = Callable[[Any], tuple[Any, Any, Any]]  # config -> (model, optimizer, schedule)


def make_mesh(config, batch_sizes: dict[str, int]):
    """The mesh of `train.mesh` over `train.num_devices` devices; each of `batch_sizes` ({"field": size})
    must split evenly over the mesh's batch shards (data x fsdp)."""
    t = config.train
    try:
        mesh = sharding.make_mesh(t.num_devices, t.get("mesh", "data:-1"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    shards = sharding.batch_shards(mesh)
    for name, size in batch_sizes.items():
        if size % shards:
            raise ConfigError(f"{name} ({size}) must be divisible by the {shards} batch shards of the mesh "
                              f"({sharding.describe(mesh)}); change it, train.mesh or train.num_devices")
    return mesh


@dataclasses.dataclass
class Stage:
    """An opened stage: what `train` and the stage's own end need."""

    config: Any
    workdir: pathlib.Path
    mesh: Any
    build: Build
    model: Any
    optimizer: Any
    checkpointer: checkpoint_lib.Checkpointer
    latest: int | None  # the checkpoint resumed from (None: a fresh start)
    state: step_lib.TrainState
    shardings: step_lib.TrainState  # where every array of the state lives on the mesh
    meta: dict[str, Any]  # the resumed checkpoint's metadata ({} when fresh)
    eval_step: Callable
    writer: MetricsWriter  # several processes: only process 0's writes files
    rows: tuple[int, int]  # [start, stop): this process's rows of each micro-batch (all of them in one process)

    def close(self) -> None:
        """Close the metrics writer and checkpointer, then draw `curves.png` (process 0; a failure to draw is
        a warning). Every stage ends here: after its final evaluations, or on a signal stop (`train`)."""
        self.writer.close()
        self.checkpointer.close()
        if distributed.is_primary():
            curves.write_curves(self.workdir, self.writer.rows)


def state_shardings(config, model, optimizer, mesh) -> tuple[step_lib.TrainState, step_lib.TrainState]:
    """(abstract state, its shardings on `mesh`); ConfigError when a sharded dimension does not split
    (tensor parallelism splits whole heads: n_head and n_kv_head must be multiples of the tensor axis)."""
    m, tensor = config.model, mesh.shape["tensor"]
    for name, count in (("model.n_head", m.n_head), ("model.n_kv_head", m.n_kv_head or m.n_head)):
        if count % tensor:
            raise ConfigError(f"{name} ({count}) must be divisible by the mesh's tensor axis ({tensor}): tensor "
                              f"parallelism splits whole heads; change train.mesh")
    abstract = step_lib.abstract_state(model, optimizer, config)
    try:
        return abstract, step_lib.state_shardings(abstract, mesh)
    except ValueError as error:
        raise ConfigError(f"the model does not fit mesh {sharding.describe(mesh)}: {error}; change train.mesh "
                          f"or the model's sizes") from None


def open_stage(config, workdir: pathlib.Path, build: Build, mesh, *,
               initial_params: Callable[[], Any] | None = None) -> Stage:
    """Open the stage in `workdir`: restore its newest checkpoint onto `mesh` (any mesh may have written it),
    or start fresh, from `initial_params()` when given (the fine-tune), else from `config.seed`."""
    m = config.model
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                               async_save=checkpoint_lib.use_async(config.train.async_checkpoint))
    latest = checkpointer.latest_step()
    if latest is not None:
        checkpointer.check_compatible(latest, m)
        checkpoint_lib.check_moe_compatible(checkpointer, latest, config)
    model, optimizer, _ = build(config)  # the optimizer state's structure does not depend on train.steps
    abstract, shardings = state_shardings(config, model, optimizer, mesh)
    if latest is not None:
        state, meta = checkpointer.restore(latest, abstract, shardings)
    elif initial_params is not None:
        params = sharding.put_global(initial_params(), shardings.params)
        state = jax.jit(lambda p: step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                      opt_state=optimizer.init(p)), out_shardings=shardings)(params)
        meta = {}
    else:
        state = jax.jit(lambda: step_lib.init_state(model, optimizer, config), out_shardings=shardings)()
        meta = {}
    eval_step = step_lib.make_eval_step(model, config, mesh, shardings.params)
    t = config.train
    rows = sharding.process_rows(mesh, (t.grad_accum, t.batch_size), batch_axis=1)
    return Stage(config=config, workdir=workdir, mesh=mesh, build=build, model=model, optimizer=optimizer,
                 checkpointer=checkpointer, latest=latest, state=state, shardings=shardings, meta=meta,
                 eval_step=eval_step, writer=MetricsWriter(workdir, resume_step=latest), rows=rows)


def compile_step(run: Stage, steps: int):
    """The compiled train step for a schedule of `steps` steps, recorded in the workdir's config.json."""
    config = config_lib.with_train_steps(run.config, steps)
    if distributed.is_primary():
        (run.workdir / "config.json").write_text(config_lib.to_json(config))
    model, optimizer, schedule = run.build(config)
    return step_lib.compile_train_step(step_lib.make_train_step(model, optimizer, schedule, config, run.mesh),
                                       run.mesh, run.shardings)


def shard_train_batch(run: Stage) -> Callable[[dict], dict]:
    """This process's rows [K, rows, ...] of a training batch -> the global [K, B, ...] batch on the mesh."""
    return lambda batch: sharding.shard_batch(batch, run.mesh, batch_axis=1, global_rows=run.config.train.batch_size)


def train(run: Stage, *, host_batch: Callable[[int], dict], evaluate_params: Callable[[Any], dict],
          save_meta: dict[str, Any], name: str, budget_field: str, **loop_options) -> loop.LoopResult:
    """The step loop from the stage's state to its last step (jaxllm.loop.run_loop), saving checkpoints whose
    metadata is `save_meta` plus the loop's; an asynchronous save in flight is finished before this returns.

    A signal stops it with a checkpoint: the writer and checkpointer are closed and a line tells the user how
    to resume (`result.interrupted`). Otherwise the line for a stage that was already finished, or that its
    budget stopped, is printed (`name`: "the run", "the fine-tune"; `budget_field` raises that budget).
    """
    t = run.config.train
    # fit_steps_to_budget: a resume keeps the step count its run fitted (the schedule it trained with).
    fitted_steps = run.meta.get("fitted_steps") if t.fit_steps_to_budget else None

    def save(step_number: int, state, loop_meta: dict[str, Any]) -> None:
        run.checkpointer.save(step_number, state, {"step": step_number, **save_meta, **loop_meta,
                                                   "mesh": sharding.describe(run.mesh),
                                                   "model_shape": checkpoint_lib.shape_signature(run.config.model),
                                                   "moe_shape": checkpoint_lib.moe_shape_signature(run.config)})

    try:
        result = loop.run_loop(
            run.state, train_cfg=t, train_step=compile_step(run, fitted_steps or t.steps), host_batch=host_batch,
            shard=shard_train_batch(run), token_share=(run.rows[1] - run.rows[0]) / t.batch_size,
            evaluate_params=evaluate_params, save=save, writer=run.writer,
            last_good_step=run.checkpointer.latest_step, elapsed_before=float(run.meta.get("elapsed_s", 0.0)),
            fitted_steps=fitted_steps, refit=lambda steps: compile_step(run, steps), **loop_options)
    finally:
        run.checkpointer.wait_until_finished()
    run.state = result.state
    if result.interrupted:
        run.close()
        print(f"{result.stop_reason}: saved checkpoint at step {result.step} in {run.checkpointer.directory}; "
              f"run the same command again to resume", file=sys.stderr)
    else:
        loop.report_end(result, run.meta, run=name, workdir=run.workdir, budget_field=budget_field)
    return result
