"""Throughput of the real jaxllm train step: `python scripts/bench.py --config configs/X.py [--steps N]
[--warmup W] [--config.a.b=v ...]`.

Builds the model, optimizer and compiled train step exactly as `jaxllm.train` does, feeds it batches cut
by the real loader (`data.batches.train_batch`) from a random-token array (no dataset needed), and prints
one JSON line:

  tokens_per_s     tokens per optimizer step / median step time of the timed steps (after warm-up)
  step_ms          {"median", "min", "max"} wall time of one step, host batch included, in ms
  compile_s        wall time from the first call to the end of the first step (trace + compile + run)
  flops_per_token  models.flops_per_token: 6 * (non-embedding params + LM head V*D) + causal attention
  mfu              tokens_per_s * flops_per_token / peak (jaxllm.hardware: GPU table, or this CPU's matmul)
  peak_memory_mb   device peak bytes in use on GPU, peak host RSS on CPU
  device, jax      where it ran and the jax version
  input_share      median host batch + device_put time / median step time (the stderr line's share)

Each step is timed to completion (`block_until_ready`), so nothing overlaps across the timed boundary.
On stderr: the input pipeline's share (host batch + device_put time against step time), to show it
does not stall the step, and the peak FLOP/s source.

`--compile_only` compiles the step ahead of time without allocating the state and prints XLA's memory
analysis instead (`argument_mb`, `output_mb`, `temp_mb`, `total_mb`, `compile_s`): whether a config fits a
card, checked on any machine (the figure is for the backend it runs on).

Both lines end with what the compiled step costs each device (jaxllm/hlo.py):

  xla_flops_per_device     XLA's cost analysis of the partitioned step; it counts a while-loop body once,
                           so the micro-batch loop (grad_accum > 1) and the LM head's chunk loop count once
  matmul_flops_per_device  FLOPs of every dot of the compiled step, loops counted once per trip
  collective_bytes         {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"}:
                           bytes per optimizer step, parsed from the compiled HLO, loops counted per trip
  collective_counts        how many of each per optimizer step, counted the same way

`--stage finetune` measures the fine-tune stage's step instead (`finetune.optim` / `finetune.train`, and with
`finetune.lora.rank > 0` the LoRA model, its frozen-base optimizer and, with `finetune.lora.quantize`, the
quantized base: jaxllm/finetune.py's `build`), on the same random tokens with every target trained. Both
lines then also give the state's own sizes, which do not depend on the backend: `params_mb` (all params as
stored: a QLoRA base at 4.127 bits per weight), `trainable_mb` and `opt_state_mb`.

`--num_devices N` runs on a mesh of N devices (sets train.num_devices); on CPU, N > 1 simulates N host
devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax is imported, hence the argv
scan at the top of this file): `python scripts/bench.py --config configs/bench_cpu.py --num_devices 4
--compile_only`.

The mesh is the stage's `train.mesh` (`--mesh SPEC` sets it for the measured stage, i.e. `finetune.train.mesh`
with `--stage finetune`; or `--config.train.mesh=fsdp:8`), and the state is placed on it as `jaxllm.train`
places it (jaxllm/stage.py's `state_shardings`: replicated over `data`, split over `fsdp` and `tensor`). Every
figure of XLA's memory analysis is per device (the partitioned program of one device), and both lines say
what one device holds of the state, computed from each array's shard shape (so also for --compile_only,
where nothing is allocated):

  mesh                     the mesh as "data:2,fsdp:4,tensor:1"
  params_mb_per_device     one device's shards of params_mb / trainable_mb / opt_state_mb (= them on a
  trainable_mb_per_device  data-parallel mesh)
  opt_state_mb_per_device

`python scripts/bench.py --config configs/llama1b.py --num_devices 8 --compile_only --mesh fsdp:8`: what a
1B model's step needs per device with the state sharded 8 ways (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time


def _simulate_host_devices(argv) -> None:
    """`--num_devices N` (N > 1): have XLA:CPU make N host devices. XLA reads the flag when jax starts, so
    this runs before `import jax`; it only affects the CPU platform, so it is harmless on a GPU machine."""
    for i, item in enumerate(argv):
        value = argv[i + 1] if item == "--num_devices" and i + 1 < len(argv) else item.partition("=")[2]
        if (item == "--num_devices" or item.startswith("--num_devices=")) and value.isdigit() and int(value) > 1:
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={value}".strip()


if __name__ == "__main__":
    _simulate_host_devices(sys.argv[1:])

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import finetune as finetune_lib  # noqa: E402
from jaxllm import hardware, hlo, hugepages, models, sharding, step as step_lib  # noqa: E402
from jaxllm import stage as stage_lib  # noqa: E402
from jaxllm import train as train_lib  # noqa: E402
from jaxllm.data import batches as batches_lib  # noqa: E402
from jaxllm.models import lora as lora_lib  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a config file, e.g. configs/bench_cpu.py")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    parser.add_argument("--compile_only", action="store_true", help="print XLA's memory analysis, run nothing")
    parser.add_argument("--stage", default="pretrain", choices=("pretrain", "finetune"),
                        help="finetune: the fine-tune stage's step (LoRA/QLoRA as finetune.lora says)")
    parser.add_argument("--num_devices", type=int, default=None,
                        help="devices in the mesh (train.num_devices); on CPU, N > 1 simulates N host devices")
    parser.add_argument("--mesh", default=None,
                        help="the mesh (train.mesh, e.g. fsdp:8 or data:2,fsdp:4; with --stage finetune "
                             "finetune.train.mesh)")
    args, rest = parser.parse_known_args(argv)
    bad = [item for item in rest if not item.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised argument '{bad[0]}'; config overrides look like --config.train.batch_size=8")
    return args, [item[len("--config."):] for item in rest]


def step_parts(config):
    """(model, optimizer, schedule, fresh state function) of the config's stage: `config.stages` is "pretrain"
    (the model and optimizer `jaxllm.train` builds) or "finetune" (a stage config: jaxllm/finetune.py's
    `build`, LoRA and a quantized base included)."""
    build = finetune_lib.build if config.stages == "finetune" else train_lib.build
    model, optimizer, schedule = build(config)
    return model, optimizer, schedule, lambda: step_lib.init_state(model, optimizer, config)


def state_sizes(state, shardings, mesh) -> dict:
    """The state's sizes in MiB: as stored (all params, the trained ones, the optimizer state: the whole
    arrays) and what one device holds of each by `shardings` (its shards; = the whole on a data-parallel mesh);
    `state` may be abstract (ShapeDtypeStructs). With the mesh that places it ("data:2,fsdp:4,tensor:1")."""
    def trained(tree):
        return tree["lora"] if lora_lib.is_lora(state.params) else tree

    parts = {"params": (state.params, shardings.params), "trainable": (trained(state.params), trained(shardings.params)),
             "opt_state": (state.opt_state, shardings.opt_state)}
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    sizes = {f"{name}_mb": mib(lora_lib.tree_bytes(tree)) for name, (tree, _) in parts.items()}
    per_device = {f"{name}_mb_per_device": mib(bytes_per_device(tree, placed)) for name, (tree, placed) in parts.items()}
    return {**sizes, "mesh": sharding.describe(mesh), **per_device}


def bytes_per_device(tree, shardings) -> int:
    """Bytes of `tree`'s arrays (real or abstract) that one device holds when placed by `shardings` (a tree of
    NamedShardings of the same structure): the shard shape of every array. Every device holds the same amount
    (sharded dimensions split evenly: jaxllm/sharding.py refuses the others)."""
    return int(sum(math.prod(placed.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
                   for leaf, placed in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def make_mesh(config):
    """The stage's mesh (`train.mesh` over `train.num_devices`), as `jaxllm.train` makes it: ConfigError when
    the batch does not split over its batch shards."""
    return stage_lib.make_mesh(config, {"train.batch_size": config.train.batch_size})


def build(config):
    """(state, jitted train step, `device_batch(step_number)`, mesh, state shardings) for `config`, as
    `jaxllm.train` builds them (the state placed on the mesh by its shardings), with batches cut by the real
    loader from random tokens."""
    m, t = config.model, config.train
    L, B, K = m.sequence_length, t.batch_size, t.grad_accum
    mesh = make_mesh(config)
    model, optimizer, schedule, fresh = step_parts(config)
    _, shardings = stage_lib.state_shardings(config, model, optimizer, mesh)
    train_step = step_lib.compile_train_step(step_lib.make_train_step(model, optimizer, schedule, config, mesh), mesh,
                                             shardings)
    state = jax.jit(fresh, out_shardings=shardings)()
    # Enough windows for a long benchmark; the loader wraps around into a new epoch after that.
    tokens = np.random.default_rng(0).integers(0, min(m.vocab_size, 2**16), size=256 * B * K * L + 1,
                                               dtype=np.uint16)

    def device_batch(step_number):
        flat = batches_lib.train_batch(tokens, seed=0, step=step_number, batch_size=B * K, seq_len=L)
        host = {name: a.reshape(K, B, *a.shape[1:]) for name, a in flat.items()}
        return sharding.shard_batch(host, mesh, batch_axis=1)

    return jax.block_until_ready(state), train_step, device_batch, mesh, shardings


def step_costs(compiled) -> dict:
    """What the compiled step costs each device: XLA's FLOPs and the collectives' bytes and counts per step."""
    text = compiled.as_text()
    return {"xla_flops_per_device": hlo.flops_per_device(compiled), "matmul_flops_per_device": hlo.matmul_flops(text),
            "collective_bytes": hlo.collective_bytes(text), "collective_counts": hlo.collective_counts(text)}


def timed_step(state, train_step, device_batch, step_number):
    """Run one step to completion: (state, metrics, seconds for the whole step, seconds to feed the batch)."""
    start = time.perf_counter()
    batch = jax.block_until_ready(device_batch(step_number))
    fed = time.perf_counter()
    state, metrics = jax.block_until_ready(train_step(state, batch))
    end = time.perf_counter()
    return state, metrics, end - start, fed - start


def summary(config, step_s, compile_s, n_devices) -> dict:
    """The JSON line's fields from the timed steps' durations (seconds)."""
    m, t = config.model, config.train
    median = statistics.median(step_s)
    tokens_per_s = t.batch_size * t.grad_accum * m.sequence_length / median
    flops = models.flops_per_token(m)
    peak, _ = hardware.peak_flops(m.dtype, n_devices)
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": {"median": round(1e3 * median, 2), "min": round(1e3 * min(step_s), 2),
                    "max": round(1e3 * max(step_s), 2)},
        "compile_s": round(compile_s, 2),
        "flops_per_token": flops,
        "mfu": round(hardware.mfu(tokens_per_s, flops, peak), 4),
        "peak_memory_mb": round(hardware.peak_memory_mb(), 1),
        "device": hardware.device_description(),
        "jax": jax.__version__,
    }


def bench(config, steps: int = 10, warmup: int = 2) -> dict:
    """Run 1 + warmup + steps train steps of `config` on random tokens; return the JSON line's fields."""
    state, train_step, device_batch, mesh, shardings = build(config)
    n_devices = mesh.size
    start = time.perf_counter()
    # Compiled ahead of time (the same program the first call would compile) to read its costs.
    compiled = train_step.lower(state, device_batch(0)).compile()
    lower_compile_s = time.perf_counter() - start
    step_s, input_s, compile_s = [], [], 0.0
    for step_number in range(1 + warmup + steps):
        state, metrics, seconds, feed_seconds = timed_step(state, compiled, device_batch, step_number)
        if step_number == 0:
            compile_s = lower_compile_s + seconds
        elif step_number > warmup:
            step_s.append(seconds)
            input_s.append(feed_seconds)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"the benchmark's loss is {float(metrics['loss'])}; the step is broken")
    line = {**summary(config, step_s, compile_s, n_devices), **state_sizes(state, shardings, mesh), **step_costs(compiled)}
    line["input_share"] = round(statistics.median(input_s) / statistics.median(step_s), 4)  # host batch + device_put
    _, source = hardware.peak_flops(config.model.dtype, n_devices)
    print(f"input pipeline: median {1e3 * statistics.median(input_s):.2f} ms per batch "
          f"({100 * statistics.median(input_s) / statistics.median(step_s):.2f}% of the step); peak FLOP/s from "
          f"{source}; final loss {float(metrics['loss']):.4f}; GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '')!r} (jaxllm/hugepages.py)", file=sys.stderr)
    return line


def compile_memory(config) -> dict:
    """Ahead-of-time compile of the train step on abstract inputs; XLA's memory analysis in MiB."""
    m, t = config.model, config.train
    mesh = make_mesh(config)
    model, optimizer, schedule, _ = step_parts(config)
    state, shardings = stage_lib.state_shardings(config, model, optimizer, mesh)
    train_step = step_lib.compile_train_step(step_lib.make_train_step(model, optimizer, schedule, config, mesh), mesh,
                                             shardings)
    shape = (t.grad_accum, t.batch_size, m.sequence_length)
    batch = {"inputs": jax.ShapeDtypeStruct(shape, np.int32), "targets": jax.ShapeDtypeStruct(shape, np.int32),
             "weights": jax.ShapeDtypeStruct(shape, np.float32)}
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    mb = {name: getattr(analysis, f"{name}_size_in_bytes") / 2**20 for name in ("argument", "output", "temp")}
    alias = getattr(analysis, "alias_size_in_bytes", 0) / 2**20  # donated state: counted once
    return {"argument_mb": round(mb["argument"], 1), "output_mb": round(mb["output"], 1),
            "temp_mb": round(mb["temp"], 1), "total_mb": round(mb["argument"] + mb["output"] - alias + mb["temp"], 1),
            "compile_s": round(time.perf_counter() - start, 2), "device": hardware.device_description(),
            "jax": jax.__version__, **state_sizes(state, shardings, mesh), **step_costs(compiled)}


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    section = "finetune.train" if args.stage == "finetune" else "train"  # the measured stage's train section
    if args.num_devices is not None:
        overrides.append(f"{section}.num_devices={args.num_devices}")
    if args.mesh is not None:
        overrides.append(f"{section}.mesh={args.mesh}")
    try:
        config = config_lib.load_config(args.config, overrides)
        config = config_lib.stage_config(config, args.stage)
        line = compile_memory(config) if args.compile_only else bench(config, steps=args.steps, warmup=args.warmup)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    sys.exit(main())
