"""Where a train step's time goes, op by op: `python scripts/profile_step.py --config configs/X.py [--steps N]
[--top K] [--config.a.b=v ...]`.

Builds the step exactly as scripts/bench.py does, runs a few steps under `jax.profiler`, and prints, for the
XLA ops of the compiled step: the total time per step by kind of root instruction (dot, convert, reduce,
...), the K slowest ops with what they compute (the fusion's root instruction, its shape and the jax op it
came from), and the operand dtypes of every dot (a float32 dot in a bf16 model is one XLA upcast: see
jaxllm/models/primitives.py). Times are summed over the executor's threads, so concurrent ops add up to
more than the wall time, which is printed beside them. This is how the levers in docs/benchmarks.md
were found; on GPU use the profiler's own viewer instead.
"""

from __future__ import annotations

import argparse
import collections
import glob
import pathlib
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import hugepages  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: the same state, step and batches)


def op_times(trace_dir: str) -> collections.Counter:
    """Total nanoseconds per XLA op name over the profiled steps, from the trace's XLA executor threads."""
    from jax._src.lib import _profile_data  # the reader jax's own profiler tests use

    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    totals = collections.Counter()
    for plane in _profile_data.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "Slinky", "end: ")):
                    totals[event.name] += event.duration_ns
    return totals


def describe_ops(hlo: str) -> dict[str, tuple[str, str]]:
    """op name -> (root instruction of what it computes, jax op name from the metadata)."""
    called = dict(re.findall(r"%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)", hlo))
    roots = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) \([^\n]*\{\n(?:.*\n)*?\s*ROOT ([^\n]*)", hlo, re.M)}
    described = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = ([^\n]*)", hlo, re.M):
        name, line = m.group(1), m.group(2)
        root = roots.get(called.get(name, ""), line)
        jax_op = re.search(r'op_name="([^"]*)"', root) or re.search(r'op_name="([^"]*)"', line)
        described[name] = (re.sub(r",? metadata=\{.*", "", root).strip(), jax_op.group(1) if jax_op else "")
    return described


def dot_operand_dtypes(hlo: str) -> collections.Counter:
    """How many dots of the compiled step take each (lhs, rhs) dtype pair."""
    dtypes = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    pairs = re.findall(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return collections.Counter((dtypes.get(a, "?"), dtypes.get(b, "?")) for a, b in pairs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/profile_step.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=30, help="how many of the slowest ops to list")
    args, rest = parser.parse_known_args(argv)
    try:
        config = config_lib.load_config(args.config, [item[len("--config."):] for item in rest
                                                      if item.startswith("--config.")])
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state, train_step, device_batch, *_ = bench.build(config)
    hlo = train_step.lower(state, device_batch(0)).compile().as_text()
    for step_number in range(2):
        state, *_ = bench.timed_step(state, train_step, device_batch, step_number)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for step_number in range(2, 2 + args.steps):
            state, *_ = bench.timed_step(state, train_step, device_batch, step_number)
        wall_ms = 1e3 * (time.perf_counter() - start) / args.steps
        jax.profiler.stop_trace()
        totals = op_times(trace_dir)
    described = describe_ops(hlo)
    per_step = {name: ns / 1e6 / args.steps for name, ns in totals.items()}
    by_kind = collections.Counter()
    for name, ms in per_step.items():
        root = described.get(name, ("", ""))[0]
        kind = re.search(r"\} ([a-z][\w\-]*)\(", root)
        by_kind[kind.group(1) if kind else "other"] += ms
    print(f"wall {wall_ms:.1f} ms/step; op time {sum(per_step.values()):.1f} ms/step (summed over threads)")
    print("by root instruction (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in by_kind.most_common()))
    print("dot operand dtypes: " + ", ".join(f"{a} x {b}: {n}" for (a, b), n in dot_operand_dtypes(hlo).most_common()))
    for name, ms in sorted(per_step.items(), key=lambda item: -item[1])[:args.top]:
        root, jax_op = described.get(name, ("", ""))
        print(f"{ms:8.2f}  {name:32s} {root[:90]:90s} {jax_op[-60:]}")
    return 0


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    sys.exit(main())
