"""jaxllm/hugepages.py: when the command-line entry points re-run themselves with glibc's huge-page
tunable, and that the re-run really happens, once, with the same command."""

import os
import subprocess
import sys

import pytest

from jaxllm import hugepages

GLIBC, THP = hugepages._glibc_version(), hugepages._thp_mode()


def test_sets_the_tunable_and_keeps_the_others():
    env = hugepages.environment_with_huge_pages({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
                                                (2, 36), "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
    assert env["JAXLLM_HUGEPAGES"] == "1" and env["PATH"] == "/bin"
    assert hugepages.environment_with_huge_pages({}, (2, 35), "always")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, glibc, thp, system", [
    ({"JAXLLM_HUGEPAGES": "0"}, (2, 36), "madvise", "Linux"),  # switched off
    ({"JAXLLM_HUGEPAGES": "1"}, (2, 36), "madvise", "Linux"),  # the re-run itself: never loop
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise", "Linux"),  # set by the user
    ({}, (2, 34), "madvise", "Linux"),  # glibc without the tunable
    ({}, (), "madvise", "Linux"),  # not glibc (musl)
    ({}, (2, 36), "never", "Linux"),  # THP disabled
    ({}, (2, 36), "", "Linux"),  # THP setting unreadable
    ({}, (2, 36), "madvise", "Darwin"),
])
def test_no_rerun_where_it_cannot_help_or_is_done(environ, glibc, thp, system):
    assert hugepages.environment_with_huge_pages(environ, glibc, thp, system) is None


@pytest.mark.parametrize("jax_platforms, accelerator, rerun", [
    (None, False, True),  # a CPU-only machine
    (None, True, False),  # a GPU/TPU is visible and JAX will take it
    ("cpu", True, True),  # forced onto the CPU beside an accelerator
    ("CPU,cuda", True, True),
    ("cuda", False, False),
    ("tpu,cpu", False, False),  # the first platform named is the one used
    ("", True, False),
])
def test_rerun_only_when_jax_runs_on_the_cpu(jax_platforms, accelerator, rerun):
    environ = {} if jax_platforms is None else {"JAX_PLATFORMS": jax_platforms}
    env = hugepages.environment_with_huge_pages(environ, (2, 36), "madvise", "Linux", accelerator=accelerator)
    assert (env is not None) == rerun


def test_the_decision_imports_no_jax():
    code = ("import sys; from jaxllm import hugepages; hugepages.accelerator_visible(); "
            "hugepages.environment_with_huge_pages({}, (2, 36), 'madvise'); print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(GLIBC < (2, 35) or THP not in ("always", "madvise"), reason="needs glibc >= 2.35 and THP")
def test_entry_point_reruns_itself_once_with_the_tunable():
    code = ("import os, sys; from jaxllm import hugepages; hugepages.reexec_with_huge_pages(); "
            "print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('JAXLLM_HUGEPAGES'), sys.argv[1:])")
    # JAX_PLATFORMS=cpu (conftest) keeps this a CPU run even on a machine with an accelerator.
    env = {k: v for k, v in os.environ.items() if k not in ("JAXLLM_HUGEPAGES", "GLIBC_TUNABLES")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code, "--flag", "x"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "glibc.malloc.hugetlb=1 1 ['--flag', 'x']"
    env["JAXLLM_HUGEPAGES"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None 0 []"
