"""Orbax checkpoints of the train state, with the model's shape written beside them.

Each checkpoint is a step folder holding the `TrainState` pytree and a small JSON of metadata (the model
config, tokens seen, wall-clock time used). Orbax writes a step into a temporary folder and renames it when
complete, so a kill in the middle of a save leaves the previous checkpoint as the newest valid one.

With `async_save` (train.async_checkpoint; on by default off-CPU) `save` returns once the arrays are on the
host and a background thread writes them. That is safe with the train step's buffer donation: with
orbax's default options (no `save_device_host_concurrent_gb`) every array is a "prioritized" key whose
device-to-host copy completes before `save` returns (orbax `jax_array_handlers`,
`replica_slices.transfer_arrays_to_host` blocks). A save waits for the previous one to finish, and so do
reading, restoring and `close`; the temporary-folder-then-rename commit is the same as a blocking save's.

Faults, and what the user sees:
- A write that fails (a full disk: OSError, or tensorstore's `ValueError ... OUT_OF_RANGE ... Failed
  writing`; any error of orbax's commit, which an asynchronous save raises in the next `save`,
  `wait_until_finished` or `close`) becomes one CheckpointError sentence: what failed, free disk space or
  choose another workdir, and the step of the previous checkpoint, which is intact. The step's temporary
  folder is removed (orbax never renamed it, so no reader sees it either).
- `latest_step()` is the newest step that loads: each step not written by this Checkpointer is read back
  once (its metadata JSON, its array index and every array, into host memory: one extra read of the
  newest checkpoint when a run resumes). A step that fails (a truncated, missing or unreadable file) is
  passed over with a one-line warning naming it and the step used instead; a writable Checkpointer moves
  it aside to `corrupt-<step>` in the same folder, so that the resumed run can write that step again.
  Steps that exist but none of which loads raise CheckpointError: a run never starts from scratch over
  checkpoints it could not read. Bytes overwritten inside array data without a change of length are not
  detected (the stored chunks carry no checksum).
- `locate` (init_from, jaxllm.eval, jaxllm.generate) picks the newest step whose metadata and params load,
  with the same warning; it moves nothing.
- Several processes (jaxllm/distributed.py): every process calls save and restore (orbax writes each
  array's shards from the processes that hold them, and process 0 the metadata and the final rename);
  each reads a step back in `latest_step` and reaches the same verdict, and process 0 alone moves a
  corrupt step aside, between two barriers. The checkpoints folder must be one every process sees.
- `restore_params` reads only the `params` subtree (orbax partial restore), with a target built from the
  saved tree's metadata and placed on this process's devices: a checkpoint written on 4 devices loads on 1,
  and the optimizer state is never read.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxllm import distributed

# Model fields that change parameter shapes: a checkpoint can only be restored into the same values.
SHAPE_FIELDS = ("name", "n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "mlp_hidden",
                "mlp_multiple_of", "tie_embeddings", "param_dtype", "head_dim", "qk_norm", "mlp_activation")

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step folder being written


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with this config, described for the user."""


class _OrbaxNoise(logging.Filter):
    """Drops orbax's log of an exception in its writer threads (orbax raises it again where the save is
    waited for, and there it becomes a CheckpointError; the log would print its traceback twice first),
    and its warning that a reader's folder is read-only."""

    MESSAGES = ("_SignalingThread.run() raised an exception", "in background save thread",
                "Save Finalize thread", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.MESSAGES)


_ORBAX_NOISE = _OrbaxNoise()


def shape_signature(model_cfg) -> dict[str, Any]:
    """The model fields a checkpoint must agree on (plus sequence_length for gpt2's learned positions)."""
    fields = SHAPE_FIELDS + (("sequence_length",) if model_cfg.name == "gpt2" else ())
    return {name: model_cfg[name] for name in fields}


def locate(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """(checkpoints folder, step) named by `path`: a workdir (its newest step whose metadata and params
    load, see the module docstring), its checkpoints/ folder, or one step folder (checkpoints/400).
    Raises CheckpointError when there is none."""
    path = pathlib.Path(path).expanduser().absolute()
    if path.name.isdigit() and path.is_dir():
        return path.parent, int(path.name)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not (folder.is_dir() and any(p.name.isdigit() and p.is_dir() for p in folder.iterdir())):
        raise CheckpointError(f"no checkpoint found at {path}; name a workdir, its checkpoints/ folder or a step "
                              f"folder such as checkpoints/400")
    checkpointer = Checkpointer(folder, read_only=True)
    try:
        return folder, checkpointer.newest_loadable(part="params")
    finally:
        checkpointer.close()


def use_async(setting: str) -> bool:
    """train.async_checkpoint as a bool: "on", "off", or "auto" = on unless JAX runs on the CPU."""
    return setting == "on" or (setting == "auto" and jax.default_backend() != "cpu")


def _short(error: BaseException) -> str:
    """A few words on a storage error: the operating system's reason where there is one."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
        return os.strerror(int(code.group(1)))
    array = re.search(r'([A-Z_]{4,}): Error (reading|writing) "([^"/]+)', str(error))  # tensorstore's form
    if array:
        return f"{array.group(1)} {array.group(2)} {array.group(3)}"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


class Checkpointer:
    """Saves and restores `TrainState` under `directory`, keeping the newest `keep` steps.

    `async_save`: `save` returns once the state is copied to host memory (see the module docstring).
    `read_only`: only reads (eval, generate, init_from): no folder created, no temporary folder of a run
    writing there removed, no corrupt step moved aside.
    """

    def __init__(self, directory: str | pathlib.Path, keep: int = 2, async_save: bool = False,
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.async_save = async_save
        self.read_only = read_only
        self._loadable: set[int] = set()  # steps written by this Checkpointer or read back whole
        self._rejected: dict[int, str] = {}  # step -> why it does not load (warned once)
        self._writing: int | None = None  # the step of a save not yet waited for
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                   save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                                   enable_async_checkpointing=async_save)
        logging.getLogger("absl").addFilter(_ORBAX_NOISE)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def wait_until_finished(self) -> None:
        """Block until a save in flight is written and committed (a no-op for blocking saves).

        Raises CheckpointError when that save failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_failed(self._writing, error) from error
        if self._writing is not None:
            self._loadable.add(self._writing)
            self._writing = None

    def latest_step(self) -> int | None:
        """The newest step whose whole checkpoint loads (None when there is no checkpoint); see the module
        docstring for what a step that does not load causes."""
        return self.newest_loadable(part=None)

    def newest_loadable(self, part: str | None = None) -> int | None:
        """The newest step whose metadata and state (only its `part` subtree, e.g. "params", when given)
        load; a newer one that does not is named in a warning (and, writable, moved aside)."""
        self.wait_until_finished()
        steps = sorted(self._manager.all_steps(), reverse=True)
        passed_over = []
        for step in steps:
            if step not in self._loadable:
                problem = self._rejected.get(step) or self._problem(step, part)
                if problem:
                    passed_over.append((step, problem))
                    continue
                if part is None:
                    self._loadable.add(step)
            for bad, problem in passed_over:
                if bad not in self._rejected:
                    self._rejected[bad] = problem
                    print(f"warning: checkpoint {self.directory / str(bad)} does not load ({problem}); "
                          f"{self._set_aside(bad)}using step {step} instead", file=sys.stderr)
            return step
        if passed_over:
            raise CheckpointError(
                f"no checkpoint in {self.directory} loads (steps {', '.join(str(s) for s, _ in passed_over)}; "
                f"step {passed_over[0][0]}: {passed_over[0][1]}); restore them from a copy, or move the folder "
                f"away to start from scratch")
        return None

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Write `state` and `meta` as checkpoint `step` (a no-op if that step is already saved).

        Blocking, or with `async_save` returning once the arrays are on the host (after waiting for the
        previous save, which orbax would wait for anyway). A failed write raises CheckpointError (see the
        module docstring)."""
        self.wait_until_finished()
        if step in self._manager.all_steps():
            return
        self._writing = step
        try:
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as error:
            raise self._write_failed(step, error) from error
        if not self.async_save:
            self.wait_until_finished()

    def _write_failed(self, step: int | None, error: BaseException) -> CheckpointError:
        """The CheckpointError of a failed save of `step`, its temporary folder removed."""
        self._writing = None
        try:
            self._manager.wait_until_finished()  # orbax's other writer threads, before their folder goes
        except Exception:
            pass  # the same failure, raised again
        # A writer thread orbax does not wait for may still create files: remove until the folder stays gone.
        for _ in range(50):
            partials = list(self.directory.glob(f"{step}{TMP_SUFFIX}*"))
            if not partials:
                break
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)
            time.sleep(0.1)
        self._manager.reload()
        previous = [s for s in self._manager.all_steps() if s != step]
        kept = (f"the previous checkpoint (step {max(previous)}) is intact" if previous
                else "there is no earlier checkpoint")
        return CheckpointError(f"could not write checkpoint {step} to {self.directory} ({_short(error)}); free disk "
                               f"space or choose another --workdir; {kept}")

    def _problem(self, step: int, part: str | None) -> str | None:
        """Why checkpoint `step` does not load (its metadata, then its arrays read to host memory), or None."""
        try:
            self.read_meta(step)
        except Exception as error:
            return f"its metadata cannot be read: {_short(error)}"
        try:
            tree = self._saved_tree(step)
            if part is not None:
                tree = {part: tree[part]}
        except Exception as error:
            return f"its array index cannot be read: {_short(error)}"
        try:
            to_host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            with ocp.PyTreeCheckpointer() as reader:
                reader.restore(self._state_path(step), args=ocp.args.PyTreeRestore(
                    item=tree, restore_args=to_host, partial_restore=part is not None))
        except Exception as error:
            return f"its arrays cannot be read (a truncated or missing file?): {_short(error)}"
        return None

    def _set_aside(self, step: int) -> str:
        """Move the step that does not load out of orbax's sight (writable only); the warning's words."""
        if self.read_only:
            return ""
        target = self.directory / f"corrupt-{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"corrupt-{step}-{n}"
        # Several processes: each found the same step unreadable; process 0 alone moves it, the others wait.
        distributed.barrier(f"jaxllm-set-aside-{step}-start")  # no process still reading it, none past the check
        if distributed.is_primary():
            os.replace(self.directory / str(step), target)
        distributed.barrier(f"jaxllm-set-aside-{step}-done")
        self._manager.reload()
        return f"moved it to {target.name}, "

    def _state_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step) / "state"

    def _saved_tree(self, step: int):
        """The saved state's tree of orbax array metadata (shape, dtype, the sharding it was written with)."""
        return ocp.PyTreeCheckpointHandler().metadata(self._state_path(step)).tree

    def read_meta(self, step: int) -> dict[str, Any]:
        self.wait_until_finished()
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, abstract_state, shardings=None):
        """Restore checkpoint `step` into arrays shaped like `abstract_state` (placed with `shardings`)."""
        if shardings is not None:
            abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                          abstract_state, shardings)
        self.wait_until_finished()
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                       meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_params(self, step: int, sharding: jax.sharding.Sharding | None = None):
        """The `params` subtree of checkpoint `step` (float32 as saved; LoRA runs: {"base", "lora"}).

        Shapes and dtypes come from the saved tree's metadata; every array is placed with `sharding`
        (default: this process's first local device), whatever devices wrote it. The optimizer state is not read.
        """
        self.wait_until_finished()
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            saved = self._saved_tree(step)["params"]
            target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                             saved)}
            with ocp.PyTreeCheckpointer() as reader:
                restored = reader.restore(self._state_path(step), args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))
        except Exception as error:
            raise CheckpointError(f"the params of checkpoint {self.directory / str(step)} cannot be read "
                                  f"({_short(error)}); name another step folder or restore this one from a copy") from error
        return restored["params"]

    def restore_saved(self, step: int):
        """Checkpoint `step` as saved, without knowing its structure: (state as a dict of arrays, meta).

        Only on the devices that wrote it (orbax refuses another topology); readers of the params use
        `restore_params`.
        """
        self.wait_until_finished()
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                       meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def check_compatible(self, step: int, model_cfg) -> None:
        """Raise CheckpointError naming the first model field that differs from checkpoint `step`'s."""
        saved = self.read_meta(step).get("model_shape", {})
        current = shape_signature(model_cfg)
        for name, value in current.items():
            if name in saved and saved[name] != value:
                raise CheckpointError(
                    f"{self.directory} holds a checkpoint of a different model (model.{name} is {saved[name]} there, "
                    f"{value} here); use a new --workdir or the same model settings")

    def close(self) -> None:
        """Finish a save in flight (CheckpointError if it fails), then release orbax's threads."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()


def moe_shape_signature(config) -> dict[str, int]:
    """The moe fields that shape the parameters (a dense model: n_experts 0 only)."""
    e = config.get("moe")
    return {"n_experts": e.n_experts, "every": e.every} if e is not None and e.n_experts else {"n_experts": 0}


def check_moe_compatible(checkpointer: Checkpointer, step: int, config) -> None:
    """Refuse a checkpoint whose experts differ from `config`'s (checkpoints without the field were dense)."""
    saved = checkpointer.read_meta(step).get("moe_shape", {"n_experts": 0})
    for name, value in moe_shape_signature(config).items():
        if saved.get(name) != value:
            raise CheckpointError(
                f"{checkpointer.directory} holds a checkpoint of a different model (moe.{name} is {saved.get(name)} "
                f"there, {value} here); use a new --workdir or the same model settings")
