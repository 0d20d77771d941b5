"""Start a multi-process run on this machine: `python -m jaxllm.launch --num_processes 2 [--devices_per_process 2]
-- python -m jaxllm.train --config configs/tiny.py ...`.

For tests, and for one big box where one process per GPU (or per group of GPUs) is wanted. It picks a free
port for process 0's coordinator on localhost and starts the command N times, each with the environment
jaxllm/distributed.py reads: JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i.
`--devices_per_process D` gives each process D CPU devices (JAX_NUM_CPU_DEVICES and XLA's
--xla_force_host_platform_device_count; they only matter when JAX runs on the CPU), and with `--split_gpus`
also GPUs i*D .. i*D+D-1 (JAX_LOCAL_DEVICE_IDS).

Each child's output lines come out prefixed with `[i] `. SIGINT (Ctrl-C) and SIGTERM are forwarded to every
child (which then checkpoint together and exit); the children run in their own session, so a terminal's
Ctrl-C reaches them once, through here. When a child fails, the others are killed (they could only wait for
it in their next collective) and the launcher exits with the first non-zero exit code (128 + the signal
number for a child killed by a signal); 0 when every child succeeded.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(base: dict[str, str], *, process_id: int, num_processes: int, port: int,
              devices_per_process: int | None, split_gpus: bool) -> dict[str, str]:
    """The environment of child `process_id`: `base` plus the JAX_* settings of the run."""
    env = dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    if devices_per_process:
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        if split_gpus:
            first = process_id * devices_per_process
            env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(first + d) for d in range(devices_per_process))
    return env


def _forward_output(stream, prefix: str, out) -> None:
    """Copy `stream`'s lines to `out`, each prefixed."""
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace")
        out.write("".join(prefix + part for part in text.splitlines(keepends=True)))
        out.flush()
    stream.close()


def launch(command: list[str], num_processes: int, devices_per_process: int | None = None,
           split_gpus: bool = False, port: int | None = None) -> int:
    """Run `command` as `num_processes` processes of one run; the exit code as described in the module docstring."""
    port = port or free_port()
    children, pumps = [], []
    for i in range(num_processes):
        env = child_env(dict(os.environ), process_id=i, num_processes=num_processes, port=port,
                        devices_per_process=devices_per_process, split_gpus=split_gpus)
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
        children.append(child)
        for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
            pump = threading.Thread(target=_forward_output, args=(stream, f"[{i}] ", out), daemon=True)
            pump.start()
            pumps.append(pump)

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        while [child.poll() for child in children].count(None):  # every child polled each time round
            failed = [child for child in children if child.returncode not in (None, 0)]
            if failed and not exit_code:
                exit_code = _exit_code(failed[0].returncode)
                for child in children:
                    if child.poll() is None:
                        child.kill()
            time.sleep(0.1)
        if not exit_code:
            exit_code = next((_exit_code(c.returncode) for c in children if c.returncode), 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for pump in pumps:
            pump.join(timeout=5)
    return exit_code


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("error: put the command after --, e.g. python -m jaxllm.launch --num_processes 2 -- "
              "python -m jaxllm.train --config configs/tiny.py", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m jaxllm.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, required=True, help="how many processes to start")
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="CPU devices per process (JAX_NUM_CPU_DEVICES); with --split_gpus, GPUs per process")
    parser.add_argument("--split_gpus", action="store_true",
                        help="give process i the GPUs i*D..i*D+D-1 (D = --devices_per_process)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after --")
    if args.num_processes < 1:
        parser.error("--num_processes must be at least 1")
    if args.split_gpus and not args.devices_per_process:
        parser.error("--split_gpus needs --devices_per_process")
    return launch(command, args.num_processes, args.devices_per_process, args.split_gpus, args.port)


if __name__ == "__main__":
    sys.exit(main())
