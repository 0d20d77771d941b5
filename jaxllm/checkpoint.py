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
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

# Model fields that change parameter shapes: a checkpoint can only be restored into the same values.
SHAPE_FIELDS = ("name", "n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "mlp_hidden",
                "mlp_multiple_of", "tie_embeddings", "param_dtype")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with this config, described for the user."""


def shape_signature(model_cfg) -> dict[str, Any]:
    """The model fields a checkpoint must agree on (plus sequence_length for gpt2's learned positions)."""
    fields = SHAPE_FIELDS + (("sequence_length",) if model_cfg.name == "gpt2" else ())
    return {name: model_cfg[name] for name in fields}


def locate(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """(checkpoints folder, step) named by `path`: a workdir (its newest step), its checkpoints/ folder, or
    one step folder (checkpoints/400). Raises CheckpointError when there is none."""
    path = pathlib.Path(path).expanduser().absolute()
    if path.name.isdigit() and path.is_dir():
        return path.parent, int(path.name)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit() and p.is_dir()) if folder.is_dir() else []
    if not steps:
        raise CheckpointError(f"no checkpoint found at {path}; name a workdir, its checkpoints/ folder or a step "
                              f"folder such as checkpoints/400")
    return folder, steps[-1]


def use_async(setting: str) -> bool:
    """train.async_checkpoint as a bool: "on", "off", or "auto" = on unless JAX runs on the CPU."""
    return setting == "on" or (setting == "auto" and jax.default_backend() != "cpu")


class Checkpointer:
    """Saves and restores `TrainState` under `directory`, keeping the newest `keep` steps.

    `async_save`: `save` returns once the state is copied to host memory (see the module docstring).
    """

    def __init__(self, directory: str | pathlib.Path, keep: int = 2, async_save: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def wait_until_finished(self) -> None:
        """Block until a save in flight is written and committed (a no-op for blocking saves)."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Write `state` and `meta` as checkpoint `step` (a no-op if that step is already saved).

        Blocking, or with `async_save` returning once the arrays are on the host (after waiting for the
        previous save, which orbax would wait for anyway)."""
        self._manager.wait_until_finished()
        if step in self._manager.all_steps():
            return
        try:
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
            if not self.async_save:
                self._manager.wait_until_finished()
        except OSError as error:
            raise CheckpointError(f"could not write checkpoint {step} to {self.directory} ({error.strerror or error}); "
                                  f"free disk space or choose another --workdir; the previous checkpoint is intact") from error

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

    def restore_saved(self, step: int):
        """Checkpoint `step` as saved, without knowing its structure: (state as a dict of arrays, meta).

        This is how another stage reads a checkpoint whose optimizer state it does not share.
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
        """Finish a save in flight, then release orbax's threads."""
        self._manager.wait_until_finished()
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
