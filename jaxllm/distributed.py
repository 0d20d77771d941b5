"""Several processes, one run: JAX's multi-controller runtime (`jax.distributed`), set up before any device
is touched.

A run spans several processes (one per GPU, one per host, or N on one box through `jaxllm.launch`) when the
environment says so, read by `settings_from`:
- explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I` on `python -m jaxllm.train`
  (optionally `--local_device_ids 0,1`), or the environment variables JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID (and JAX_LOCAL_DEVICE_IDS), which `jaxllm.launch` sets;
- SLURM: a job step of more than one task (`srun`), whose variables JAX reads itself;
- a Cloud TPU VM (a pod slice: the same command on every host), which JAX also detects itself.
Otherwise the run is the plain single process and nothing here runs.

`initialize` calls `jax.distributed.initialize`: afterwards `jax.devices()` lists the devices of every
process and a mesh over them spans the processes. On CPU the cross-process collectives go through gloo
(`jax_cpu_collectives_implementation`, set before the backend starts). JAX itself aborts the process (a
C++ fatal error, not an exception) when its coordinator does not answer within the timeout, so a process
other than 0 first knocks at the coordinator's port for up to `--initialization_timeout` seconds and stops
with a DistributedError sentence when nothing listens there; process 0 first checks that it can open the
port. After that, a process that dies makes JAX end the others (its heartbeat check).

The helpers below let the rest of jaxllm stay single-process code: `is_primary` (process 0 writes metrics,
reports and markers), `barrier` (everyone waits for everyone), `primary_first` (process 0 does a job, for
instance tokenizing the data, while the others wait, then they use its result). They cost nothing in a
single-process run and never start JAX's backend there.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import socket
import time
from typing import Callable, Mapping, TypeVar

import jax

DEFAULT_TIMEOUT_S = 300  # seconds to wait for the coordinator (and for all processes to connect)

T = TypeVar("T")


class DistributedError(RuntimeError):
    """The processes of a run cannot be connected; the message says what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to call `jax.distributed.initialize`. None fields are left to JAX's cluster detection (SLURM,
    Cloud TPU); `detected` names that environment ("" when every value is explicit)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S
    detected: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of a multi-process run (each defaults to its JAX_* environment variable)."""
    group = parser.add_argument_group("several processes (jax.distributed; see README 'Several processes')")
    group.add_argument("--coordinator_address", default=None,
                       help="HOST:PORT of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num_processes", type=int, default=None, help="processes in the run (env JAX_NUM_PROCESSES)")
    group.add_argument("--process_id", type=int, default=None, help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    group.add_argument("--local_device_ids", default=None,
                       help="comma-separated GPU ids this process uses, e.g. 0,1 (env JAX_LOCAL_DEVICE_IDS)")
    group.add_argument("--initialization_timeout", type=int, default=None,
                       help=f"seconds to wait for the coordinator and the other processes (default {DEFAULT_TIMEOUT_S}; "
                            f"env JAX_INITIALIZATION_TIMEOUT)")


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings | None:
    """The multi-process settings of this launch (flags first, then JAX_* variables, then SLURM / Cloud TPU
    detection), or None for a plain single-process run. DistributedError for incomplete or invalid values."""
    def pick(flag, name: str, convert):
        value = flag if flag is not None else environ.get(name) or None
        try:
            return None if value is None else convert(value)
        except ValueError:
            raise DistributedError(f"{name.lower().removeprefix('jax_')} must be "
                                   f"{'an integer' if convert is int else 'comma-separated integers'}, not "
                                   f"'{value}'") from None

    address = args.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = pick(args.num_processes, "JAX_NUM_PROCESSES", int)
    process_id = pick(args.process_id, "JAX_PROCESS_ID", int)
    local_ids = pick(args.local_device_ids, "JAX_LOCAL_DEVICE_IDS",
                     lambda v: tuple(int(i) for i in str(v).split(",") if i.strip()))
    timeout_s = pick(args.initialization_timeout, "JAX_INITIALIZATION_TIMEOUT", int) or DEFAULT_TIMEOUT_S
    if address is not None or num_processes is not None or process_id is not None:
        missing = [flag for flag, value in (("--coordinator_address", address), ("--num_processes", num_processes),
                                            ("--process_id", process_id)) if value is None]
        if missing:
            raise DistributedError(f"a multi-process run needs --coordinator_address, --num_processes and --process_id "
                                   f"(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); "
                                   f"{', '.join(missing)} missing")
        _split_address(address)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process_id ({process_id}) must be in 0..num_processes-1 and --num_processes "
                                   f"({num_processes}) at least 1")
        return Settings(address, num_processes, process_id, local_ids, timeout_s)
    detected = _detect_cluster(environ)
    if detected:
        return Settings(local_device_ids=local_ids, timeout_s=timeout_s, detected=detected)
    return None


def _detect_cluster(environ: Mapping[str, str]) -> str:
    """"slurm" inside a SLURM job step of several tasks, "tpu" on a Cloud TPU VM, else ""."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in environ for name in slurm):
        # The batch script itself is a one-task step (SLURM_STEP_NUM_TASKS=1) even in a job of many tasks.
        if int(environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"])) > 1:
            return "slurm"
    if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu"
    return ""


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"the coordinator address must look like HOST:PORT (e.g. 10.0.0.1:1234), not '{address}'")
    return host.strip("[]"), int(port)


def initialize(settings: Settings) -> None:
    """Connect this process to the others (`jax.distributed.initialize`); call before any device is used.

    DistributedError when the coordinator cannot be reached within `settings.timeout_s` (processes other
    than 0) or its port cannot be opened (process 0)."""
    timeout_s = settings.timeout_s
    if settings.coordinator_address is not None and settings.process_id is not None:
        host, port = _split_address(settings.coordinator_address)
        began = time.monotonic()
        if settings.process_id == 0:
            _check_port_free(port, settings.coordinator_address)
        else:
            _wait_for_coordinator(host, port, settings.coordinator_address, timeout_s)
        timeout_s = max(1, int(timeout_s - (time.monotonic() - began)))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
        process_id=settings.process_id,
        local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        initialization_timeout=timeout_s)


def setup(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings | None:
    """`initialize` when `settings_from(args, environ)` finds a multi-process launch; its settings, or None."""
    settings = settings_from(args, environ)
    if settings is not None:
        initialize(settings)
    return settings


def _wait_for_coordinator(host: str, port: int, address: str, timeout_s: float) -> None:
    """Return once something accepts connections at (host, port); DistributedError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                reason = error.strerror or type(error).__name__
                raise DistributedError(
                    f"the coordinator at {address} could not be reached within {timeout_s:g} s ({reason}); start "
                    f"process 0 there first, check the address and port (and the firewall), or raise "
                    f"--initialization_timeout") from None
            time.sleep(0.25)


def _check_port_free(port: int, address: str) -> None:
    """DistributedError when process 0 cannot listen on `port` (another program holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise DistributedError(f"process 0 cannot open the coordinator port of {address} "
                                   f"({error.strerror or error}); choose another port") from None


def is_multiprocess() -> bool:
    """True in a run of more than one process (starts JAX's backend only when jax.distributed is set up)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
    """True in process 0 (and in a single-process run): the one that writes shared files."""
    return not is_multiprocess() or jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op in a single process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def primary_first(job: Callable[[], T], name: str) -> T | None:
    """Run `job` in process 0 while the others wait at barrier `name`; return its result there (None in
    the other processes, which then read what it wrote). A job that raises in process 0 still releases
    the others (and raises there); a single process just runs `job`."""
    if not is_multiprocess():
        return job()
    if jax.process_index() != 0:
        barrier(name)
        return None
    try:
        return job()
    finally:
        barrier(name)
