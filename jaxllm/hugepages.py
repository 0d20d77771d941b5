"""Large host allocations on transparent huge pages: a CPU speed lever that lives outside XLA.

XLA:CPU allocates a step's temporary buffers afresh on every execution (about 370 MB for
configs/bench_cpu.py), and glibc serves every allocation over 32 MB with a new mmap, so each step
page-faults and zero-fills all of it again in 4 KiB pages: ~93,000 faults, 10-15 % of a CPU train
step here (docs/benchmarks.md). glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) asks the kernel
for transparent huge pages for those mappings, 512 times fewer faults. A tunable is read once, when
the process starts, so the command-line entry points (`python -m jaxllm.train`, scripts/bench*.py) call
`reexec_with_huge_pages()` first thing, which starts the same command again with the tunable set.
`JAXLLM_HUGEPAGES=0` turns this off; it is a no-op where it cannot help (not Linux/glibc, an old glibc,
THP disabled), when the tunable is already set, and when JAX will not run on the CPU: JAX_PLATFORMS names
another platform first, or (JAX_PLATFORMS unset or not starting with cpu) an accelerator is visible. That is
decided from the environment and device files alone, before JAX is imported, so no backend starts twice.
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Device files that mean JAX will pick an accelerator: NVIDIA GPUs, AMD GPUs (ROCm), TPUs (v4: accel, v5e+:
# vfio). A false positive only skips this CPU lever.
ACCELERATOR_FILES = ("/dev/nvidia0", "/proc/driver/nvidia/gpus", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return ()
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _thp_mode() -> str:
    """The kernel's THP mode ("always", "madvise" or "never"; "" when unknown)."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def accelerator_visible() -> bool:
    """Whether a GPU or TPU device file exists (what JAX would use instead of the CPU)."""
    return any(pathlib.Path(path).exists() for path in ACCELERATOR_FILES)


def runs_on_cpu(environ: dict[str, str], accelerator: bool) -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS' first entry, else no visible `accelerator`."""
    first = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    return first == "cpu" if first else not accelerator


def environment_with_huge_pages(environ: dict[str, str], glibc: tuple[int, ...], thp_mode: str,
                                system: str = "Linux", accelerator: bool = False) -> dict[str, str] | None:
    """The environment to re-run the process in, or None when there is nothing to do.

    None when switched off (JAXLLM_HUGEPAGES=0), already done (the tunable set, or JAXLLM_HUGEPAGES=1 from
    an earlier re-run), pointless (not Linux, glibc older than 2.35, THP off or unknown), or when JAX will
    not run on the CPU (`runs_on_cpu`; `accelerator`: a GPU/TPU device file exists).
    """
    if environ.get("JAXLLM_HUGEPAGES") in ("0", "1") or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    if not runs_on_cpu(environ, accelerator):
        return None
    if system != "Linux" or glibc < (2, 35) or thp_mode not in ("always", "madvise"):
        return None
    tunables = ":".join(part for part in (environ.get("GLIBC_TUNABLES", ""), TUNABLE) if part)
    return {**environ, "GLIBC_TUNABLES": tunables, "JAXLLM_HUGEPAGES": "1"}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with `glibc.malloc.hugetlb=1`, if that helps (see above).

    Call it only from a command-line entry point, before it has printed or started anything.
    """
    environ = environment_with_huge_pages(dict(os.environ), _glibc_version(), _thp_mode(), platform.system(),
                                          accelerator_visible())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
