"""Speed levers measured against each other fairly on a shared, noisy machine:
`python scripts/bench_levers.py --config configs/bench_cpu.py --rounds 8 --variant NAME:a.b=v,c.d=w ...`

Every variant (a name and config overrides on top of --config) is compiled first; then the timed steps
run round-robin, one step of each variant per round, so background load hits all variants alike. Prints
one JSON line per variant (scripts/bench.py's fields plus `variant` and `ratio`, its tokens/s over the
first variant's) and the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import hugepages  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_levers.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:field=value,field=value (config overrides; NAME: alone = the config as is)")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        config = config_lib.load_config(args.config, [o for o in overrides.split(",") if o])
        state, train_step, device_batch, mesh, _ = bench.build(config)
        state, _, compile_s, _ = bench.timed_step(state, train_step, device_batch, 0)
        runs.append({"name": name, "config": config, "state": state, "step": train_step, "batch": device_batch,
                     "n_devices": mesh.size, "compile_s": compile_s, "times": []})
    print(f"load before: {os.getloadavg()}", file=sys.stderr)
    for round_number in range(1, 1 + args.warmup + args.rounds):
        for run in runs:
            run["state"], run["metrics"], seconds, _ = bench.timed_step(run["state"], run["step"], run["batch"],
                                                                        round_number)
            if round_number > args.warmup:
                run["times"].append(seconds)
    print(f"load after: {os.getloadavg()}", file=sys.stderr)
    first = None
    for run in runs:
        line = {"variant": run["name"], **bench.summary(run["config"], run["times"], run["compile_s"],
                                                        run["n_devices"])}
        first = first or line["tokens_per_s"]
        line["ratio"] = round(line["tokens_per_s"] / first, 3)
        line["loss"] = round(float(run["metrics"]["loss"]), 4)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    sys.exit(main())
