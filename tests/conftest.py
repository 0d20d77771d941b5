"""Test-wide settings: offline, four simulated CPU devices, a private cache; tests marked `gpu` run only on
a GPU backend (JAX_PLATFORMS defaults to cpu here: run them with JAX_PLATFORMS=cuda)."""

import os

# Set before JAX is imported anywhere: tests may build meshes of up to 4 simulated devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
