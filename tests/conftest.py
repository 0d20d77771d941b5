"""Test-wide settings: offline, four simulated CPU devices, a private cache; tests marked `gpu` run only on
a GPU backend (JAX_PLATFORMS defaults to cpu here: run them with JAX_PLATFORMS=cuda)."""

import atexit
import contextlib
import os
import shutil
import tempfile

# Set before JAX is imported anywhere: tests may build meshes of up to 4 simulated devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for the session, shared with the subprocesses tests start: many tests compile the
# same tiny steps again (a run and its resume, one seed twice, train then eval), and loading an executable is
# far cheaper than compiling it (tests/test_train.py: 40% less CPU time). Loaded executables are the compiled
# ones, so results are bit for bit the same. A test-only setting: jaxllm itself leaves JAX's cache alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE = tempfile.mkdtemp(prefix="jaxllm-tests-xla-cache-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` unless JAX's default backend is a GPU."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return  # do not initialise a backend for runs that have no GPU tests
    import jax

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU backend, this one is {jax.default_backend()} "
                                   "(tests/conftest.py defaults JAX_PLATFORMS to cpu: set JAX_PLATFORMS=cuda)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


class Killed(Exception):
    """A kill in the middle of a run (`kill_train_step`)."""


@contextlib.contextmanager
def _interrupted(monkeypatch, call_number, action):
    """Inside the block, every compiled train step is wrapped so that `action()` runs just before the
    `call_number`-th call, counted over all of them (a two-stage run: pretrain's calls, then the fine-tune's)."""
    from jaxllm import step as step_lib  # here, not at the top: JAX must first see the flags above

    original, calls = step_lib.compile_train_step, {"n": 0}

    def patched(step_fn, mesh, *placement):
        compiled = original(step_fn, mesh, *placement)

        def wrapper(state, batch):
            calls["n"] += 1
            if calls["n"] == call_number:
                action()
            return compiled(state, batch)

        return wrapper

    with monkeypatch.context() as patch:
        patch.setattr(step_lib, "compile_train_step", patched)
        yield


@pytest.fixture
def interrupt_train_step(monkeypatch):
    """`with interrupt_train_step(n, action): run()`: `action()` (a signal, an exception) runs just before the
    n-th train-step call of the block; outside it the step is the real one."""
    return lambda call_number, action: _interrupted(monkeypatch, call_number, action)


@pytest.fixture
def kill_train_step(monkeypatch):
    """`with kill_train_step(n): run()`: the run dies (Killed) just before its n-th train-step call, and the
    block checks that it did."""

    def kill():
        raise Killed()

    @contextlib.contextmanager
    def killed(call_number):
        with _interrupted(monkeypatch, call_number, kill), pytest.raises(Killed):
            yield

    return killed
