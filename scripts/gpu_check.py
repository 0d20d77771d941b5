"""Everything the GPU questions need, measured in one call: `bash scripts/gpu_check.sh [--install] [--dry]`.

Runs each check as its own subprocess with its own timeout, inside an overall budget (`--budget_s`, 8 min),
and records a failure, a timeout or a step skipped for want of time in the report instead of stopping
(in the order below, except that the GPU tiny run comes right after `pytest -m gpu`):

  setup   `pip install -e ".[test]"` (only with `--install`); versions of python/jax/jaxlib/the CUDA
          plugin and libraries, jax's devices, `nvidia-smi` (when present)
  tests   `pytest -m gpu` (exit code 5, no test collected, counts as "none") and a fast, representative
          subset of the suite (FAST_TESTS) on the GPU
  bench   scripts/bench.py: configs/wide.py as shipped and at micro-batch 64 (64 x 4), `--compile_only` of
          wide (XLA's memory analysis), configs/llama.py, configs/moe.py dropless and capacity
  tiny    100 float32 steps of configs/tiny.py pretraining on the GPU and on the CPU (the CPU run in the
          background from the start), every step's train loss compared (max |difference| <= 1e-3); both
          with `JAX_DEFAULT_MATMUL_PRECISION=highest`, since XLA's GPU default would use TF32 for float32 dots

and writes, under `$OUT` (default ./gpu_check_out): `report.json` (for every step its command, return
code, wall seconds, status, parsed output or the tail of its error), `summary.md` (one table to read) and
`logs.txt` (each step's output, tail only). Scratch work (run folders, data caches) goes to a temporary
folder, so $OUT holds only these three files.

`--dry` rehearses the same steps on the CPU with tiny shapes (2 layers, width 64, sequence 64, 2 timed bench
steps, 5 tiny steps CPU vs CPU, two quick tests), with doubled step timeouts and a 20-minute budget: what
tests/test_gpu_check.py runs. Its time is the fixed cost of 12 processes (imports, compiles): 8 minutes on a
2-core VM at load 6-9.
Without `--dry` on a machine without a GPU it says so and exits 1. Exit status: 0 when every step passed
(or found no GPU tests), else 1. The huge-page tunable (jaxllm/hugepages.py) is set once here, so the children
inherit it instead of each re-running itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not
from jaxllm import hugepages  # noqa: E402  (standard library only)

# The fast subset of the suite run on the GPU: determinism, resume, loss, primitives, models.
FAST_TESTS = [
    "tests/test_train.py::test_same_seed_same_losses_bit_for_bit",
    "tests/test_train.py::test_resume_after_kill_equals_uninterrupted",
    "tests/test_loss.py",
    "tests/test_primitives.py",
    "tests/test_models.py",
]
DRY_TESTS = [  # --dry: two quick ones, so the rehearsal stays short on a small CPU
    "tests/test_loss.py::test_hand_computed_single_token",
    "tests/test_loss.py::test_matches_numpy_reference",
]
# --dry: every model shrunk to this (and one device, whatever XLA_FLAGS simulates).
DRY_MODEL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.sequence_length=64",
             "model.vocab_size=512", "train.num_devices=1"]
TINY_STEPS, DRY_TINY_STEPS = 100, 5
LOSS_TOLERANCE = 1e-3
STATUS_OK = ("ok", "none")
TAIL_LINES = 30


@dataclasses.dataclass
class Step:
    """One check: a subprocess (`command`), or a comparison of earlier steps' results (`command` None)."""
    name: str
    group: str
    command: list[str] | None
    timeout_s: float
    parse: str = "json"  # json (last JSON line of stdout), pytest, train (metrics.jsonl), text, compare
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    workdir: str = ""  # train: the run folder whose metrics.jsonl holds the losses; pytest: its JUnit XML
    background: bool = False  # started at the beginning, collected where it stands in the list


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="output folder (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--dry", action="store_true", help="rehearse every step on the CPU with tiny shapes")
    parser.add_argument("--install", action="store_true", help='first run pip install -e ".[test]"')
    parser.add_argument("--budget_s", type=float, default=None,
                        help="overall wall-clock budget in seconds (default 480; 1200 with --dry)")
    parser.add_argument("--scratch", default="", help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.dry else 480.0
    return args


def _bench(name, config, overrides, dry_overrides, args, timeout_s, compile_only=False) -> Step:
    """scripts/bench.py on `config` with `overrides` (with --dry: DRY_MODEL + `dry_overrides`, 2 steps)."""
    command = [sys.executable, "scripts/bench.py", "--config", config]
    command += ["--compile_only"] if compile_only else (
        ["--steps", "2", "--warmup", "1"] if args.dry else ["--steps", "10", "--warmup", "2"])
    command += [f"--config.{o}" for o in (DRY_MODEL + dry_overrides if args.dry else overrides)]
    return Step(name, "bench", command, timeout_s, env={"JAX_PLATFORMS": "cpu" if args.dry else "cuda"})


def _pytest(name, selection, args, scratch, timeout_s) -> Step:
    junit = scratch / f"{name}.xml"  # the counts are read from here, whatever pytest's verbosity
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}"] + selection
    return Step(name, "tests", command, timeout_s, parse="pytest", workdir=str(junit),
                env={"JAX_PLATFORMS": "cpu" if args.dry else "cuda"})


def _tiny(name, platform, args, scratch, timeout_s, background=False) -> Step:
    """Float32 pretraining of configs/tiny.py on `platform`, a train loss logged every step."""
    workdir = str(scratch / name)
    steps = DRY_TINY_STEPS if args.dry else TINY_STEPS
    overrides = ["stages=pretrain", f"train.steps={steps}", "model.dtype=float32", "train.log_every=1",
                 f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.progress=False",
                 f"data.cache_dir={scratch / (name + '_cache')}"]
    if args.dry:
        overrides += DRY_MODEL + ["data.synthetic_documents=300", "train.batch_size=4"]
    command = [sys.executable, "-m", "jaxllm.train", "--config", "configs/tiny.py", "--workdir", workdir]
    command += [f"--config.{o}" for o in overrides]
    env = {"JAX_PLATFORMS": platform, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    return Step(name, "tiny", command, timeout_s, parse="train", env=env, workdir=workdir, background=background)


def plan(args, scratch: pathlib.Path) -> list[Step]:
    """The steps, in the order they are collected (background ones start as soon as setup is done)."""
    steps = []
    if args.install:
        steps.append(Step("install", "setup", [sys.executable, "-m", "pip", "install", "-e", ".[test]"], 300,
                          parse="text"))
    steps.append(Step("environment", "setup", [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--probe"],
                      60, env={"JAX_PLATFORMS": "cpu" if args.dry else ""}))  # "": jax picks its best backend
    steps.append(_pytest("pytest-gpu-marked", ["-m", "gpu"], args, scratch, 120))
    # The GPU half of the loss comparison early, so that slow benchmarks cannot push it out of the budget.
    steps.append(_tiny("tiny-cpu-again" if args.dry else "tiny-gpu", "cpu" if args.dry else "cuda", args, scratch,
                       180))
    steps.append(_pytest("pytest-fast-subset", DRY_TESTS if args.dry else FAST_TESTS, args, scratch, 180))
    mb64 = ["train.batch_size=64", "train.grad_accum=4"]
    steps += [
        _bench("wide", "configs/wide.py", [], ["train.batch_size=2"], args, 150),
        _bench("wide-mb64", "configs/wide.py", mb64, ["train.batch_size=4", "train.grad_accum=2"], args, 150),
        _bench("wide-compile-only", "configs/wide.py", [], ["train.batch_size=2"], args, 120, compile_only=True),
        _bench("llama", "configs/llama.py", [], ["train.batch_size=2"], args, 120),
        _bench("moe-dropless", "configs/moe.py", ["moe.mode=dropless"], ["moe.mode=dropless", "train.batch_size=2"],
               args, 150),
        _bench("moe-capacity", "configs/moe.py", ["moe.mode=capacity"], ["moe.mode=capacity", "train.batch_size=2"],
               args, 150),
    ]
    steps.append(_tiny("tiny-cpu", "cpu", args, scratch, 420, background=True))  # runs from the start
    steps.append(Step("tiny-loss-match", "tiny", None, 0, parse="compare"))
    if args.dry:  # a small, shared CPU compiles slowly: the shapes are tiny, the fixed costs are not
        for step in steps:
            step.timeout_s *= 2
    return steps


# --- running -----------------------------------------------------------------------------------------------


def command_text(step: Step) -> str:
    """The step's command as one shell line, environment settings first, the interpreter as `python`."""
    words = ["python" if w == sys.executable else w for w in step.command]
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in step.env.items()] + [shlex.join(words)])


def start(step: Step, log: pathlib.Path) -> subprocess.Popen:
    """Start the step's command in its own process group, output to `log`; `process.ended` is set to the
    time it exits (so a background step's wall time is its own, not the time until it was collected)."""
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    if env.get("JAX_PLATFORMS") == "":
        del env["JAX_PLATFORMS"]  # let jax pick its best backend
    with open(log, "w") as handle:  # the child keeps its own descriptor
        process = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    process.ended = None

    def watch():
        process.wait()
        process.ended = time.perf_counter()

    threading.Thread(target=watch, daemon=True).start()
    return process


def finish(step: Step, process: subprocess.Popen, started: float, timeout_s: float, log: pathlib.Path) -> dict:
    """Wait for `process` at most `timeout_s` more seconds (killing its process group past that); the record."""
    try:
        returncode = process.wait(timeout=max(timeout_s, 0.1))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        returncode = process.wait()
        timed_out = True
    ended = process.ended or time.perf_counter()
    record = {"name": step.name, "group": step.group, "command": command_text(step), "returncode": returncode,
              "wall_s": round(ended - started, 1)}
    output = log.read_text(errors="replace")
    if timed_out:
        record.update(status="timeout", error_tail=f"timed out after {record['wall_s']} s\n" + tail(output))
        return record
    try:
        parsed = parse_output(step, output, returncode)
    except Exception as error:  # noqa: BLE001 - an unreadable output is the step's failure, not the script's
        parsed = None
        record["error_tail"] = f"could not read the output: {error!r}\n" + tail(output)
    if returncode == 5 and step.parse == "pytest":
        record["status"] = "none"  # no test carries the marker (yet)
    elif returncode == 0 and parsed is not None:
        record["status"] = "ok"
    else:
        record["status"] = "failed"
        record.setdefault("error_tail", tail(output))
    if parsed is not None:
        record["output"] = parsed
    return record


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def parse_output(step: Step, output: str, returncode: int):
    """The step's result: the last JSON line (bench, environment), pytest's counts, a run's losses."""
    if step.parse == "json":
        for line in reversed(output.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        return None
    if step.parse == "pytest":
        return pytest_counts(pathlib.Path(step.workdir), output)
    if step.parse == "train":
        if returncode != 0:
            return None
        return train_losses(pathlib.Path(step.workdir))
    return {"output_tail": tail(output, 5)}


def pytest_counts(junit: pathlib.Path, output: str) -> dict | None:
    """{"tests", "passed", "failed", "errors", "skipped"} from pytest's JUnit XML (else from its last line)."""
    if junit.is_file():
        import xml.etree.ElementTree as ElementTree

        root = ElementTree.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        return {"tests": counts["tests"], "passed": counts["passed"], "failed": counts["failures"],
                "errors": counts["errors"], "skipped": counts["skipped"]}
    counts = {word: int(n) for n, word in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", output)}
    return counts or None


def train_losses(workdir: pathlib.Path) -> dict:
    """{"train_loss": {step: loss}, "val_loss": the final full validation loss} of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in rows if r.get("split") == "train" and not r.get("full")}
    val = [r["loss"] for r in rows if r.get("split") == "val" and r.get("full")]
    return {"steps": len(train), "final_train_loss": train[max(train)] if train else None,
            "val_loss": val[-1] if val else None, "train_loss": {str(k): v for k, v in sorted(train.items())}}


def compare_losses(records: dict[str, dict], first: str, second: str, expected_steps: int) -> dict:
    """The tiny comparison: per-step train losses of runs `first` and `second`, max |difference|."""
    record = {"name": "tiny-loss-match", "group": "tiny", "command": f"compare {first} with {second}",
              "returncode": None, "wall_s": 0.0}
    missing = [name for name in (first, second) if records.get(name, {}).get("status") != "ok"]
    if missing:
        record.update(status="skipped", error_tail=f"no losses from {', '.join(missing)}")
        return record
    a, b = records[first]["output"]["train_loss"], records[second]["output"]["train_loss"]
    common = sorted(set(a) & set(b), key=int)
    max_diff = max(abs(a[s] - b[s]) for s in common) if common else float("nan")
    val_a, val_b = records[first]["output"]["val_loss"], records[second]["output"]["val_loss"]
    output = {"steps_compared": len(common), "max_abs_diff": max_diff, "tolerance": LOSS_TOLERANCE,
              "worst_step": max(common, key=lambda s: abs(a[s] - b[s]), default=None),
              "val_loss_abs_diff": abs(val_a - val_b) if None not in (val_a, val_b) else None}
    record["output"] = output
    if len(common) == expected_steps and max_diff <= LOSS_TOLERANCE:
        record["status"] = "ok"
    else:
        record["status"] = "failed"
        record["error_tail"] = (f"{len(common)} of {expected_steps} steps compared, max |difference| "
                                f"{max_diff:.3g} (tolerance {LOSS_TOLERANCE})")
    return record


def run_all(args, steps: list[Step], scratch: pathlib.Path, deadline: float) -> list[dict]:
    """Run `steps` in order inside the budget. Background steps start once setup is done (and found a GPU)
    and are collected where they stand in the list."""
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running, records, background_started = {}, {}, False
    for step in steps:
        left = deadline - time.perf_counter()
        log = logs / f"{step.name}.log"
        if step.group != "setup" and not background_started:
            background_started = True
            running = {s.name: (start(s, logs / f"{s.name}.log"), time.perf_counter()) for s in steps
                       if s.background}
        if step.parse == "compare":
            first, second = [s.name for s in steps if s.group == "tiny" and s.command][:2]
            records[step.name] = compare_losses(records, first, second, DRY_TINY_STEPS if args.dry else TINY_STEPS)
        elif step.background:
            process, started = running.pop(step.name)
            budget = min(step.timeout_s - (time.perf_counter() - started), left)
            records[step.name] = finish(step, process, started, budget, log)
        elif left < 5:
            records[step.name] = {"name": step.name, "group": step.group, "command": command_text(step),
                                  "returncode": None, "wall_s": 0.0, "status": "skipped",
                                  "error_tail": f"the {args.budget_s:.0f} s budget was spent"}
        else:
            print(f"[gpu_check] {step.name}: {command_text(step)}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            records[step.name] = finish(step, start(step, log), started, min(step.timeout_s, left), log)
        print(f"[gpu_check] {step.name}: {records[step.name]['status']} ({records[step.name]['wall_s']} s)",
              file=sys.stderr, flush=True)
        if step.name == "environment" and not args.dry and not has_gpu(records[step.name]):
            break  # nothing else can run
    for process, _ in running.values():  # left only when the loop stopped early
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return [records[s.name] for s in steps if s.name in records]


def has_gpu(environment: dict) -> bool:
    return any(d.startswith("gpu") for d in (environment.get("output") or {}).get("devices", []))


# --- the environment probe (runs as its own process: a broken jax install is recorded, not fatal) ----------


def probe() -> dict:
    """Versions of python, jax, jaxlib, the CUDA plugin and libraries; jax's devices; nvidia-smi."""
    import importlib.metadata as metadata
    import platform

    info = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if re.match(r"(jax|jaxlib|flax|optax|orbax|numpy|torch$|nvidia-|jax-cuda)", name, re.I):
            packages[name.lower()] = dist.version
    info["packages"] = dict(sorted(packages.items()))
    try:
        import jax

        info["backend"] = jax.default_backend()
        info["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
        from jax._src.lib import cuda_versions  # None without the CUDA plugin

        if cuda_versions is not None:
            info["cuda"] = {name: _call(getattr(cuda_versions, f"{name}_get_version", None)) for name in
                            ("cuda_runtime", "cuda_runtime_build", "cudnn", "cudnn_build", "cuda_driver",
                             "cublas", "cusparse", "cufft", "nccl")}
    except Exception as error:  # noqa: BLE001
        info["jax_error"] = repr(error)
        info.setdefault("devices", [])
    smi = shutil.which("nvidia-smi")
    if smi:
        result = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = result.stdout.strip() or result.stderr.strip()
    else:
        info["nvidia_smi"] = None
    return info


def _call(fn):
    try:
        return fn() if fn else None
    except Exception:  # noqa: BLE001
        return None


# --- writing -------------------------------------------------------------------------------------------------


def headline(record: dict) -> str:
    """A step's key figures, for the summary table ("" when its output lacks them)."""
    try:
        return _headline(record, record.get("output") or {})
    except (KeyError, TypeError, ValueError):
        return ""


def _headline(record: dict, out: dict) -> str:
    if record["group"] == "bench" and "total_mb" in out:
        return f"XLA total {out['total_mb']:,} MB (temp {out['temp_mb']:,}); compile {out['compile_s']} s"
    if record["group"] == "bench" and "tokens_per_s" in out:
        return (f"{out['tokens_per_s']:,} tok/s, MFU {out['mfu']:.1%}, peak {out['peak_memory_mb']:,} MB, "
                f"compile {out['compile_s']} s, step {out['step_ms']['median']} ms")
    if record["group"] == "tests":
        return ", ".join(f"{n} {w}" for w, n in out.items() if n) or "no test collected"
    if record["name"] == "tiny-loss-match" and out:
        return (f"max abs diff {out['max_abs_diff']:.2e} over {out['steps_compared']} steps "
                f"(tolerance {out['tolerance']:g}); val loss diff {out['val_loss_abs_diff']}")
    if record["group"] == "tiny" and out:
        return f"{out['steps']} steps, final train loss {out['final_train_loss']:.4f}, val {out['val_loss']:.4f}"
    if record["name"] == "environment" and out:
        return f"{', '.join(out.get('devices', [])[:2])}; jax {out.get('packages', {}).get('jax', '?')}"
    return ""


def summary_markdown(report: dict) -> str:
    env = next((r.get("output") or {} for r in report["steps"] if r["name"] == "environment"), {})
    lines = [f"# gpu_check {report['mode']} ({report['started']})", "",
             f"Devices: {', '.join(env.get('devices', [])) or 'unknown'}. "
             f"Packages: {', '.join(f'{k} {v}' for k, v in env.get('packages', {}).items() if k.startswith('jax'))}."
             f" CUDA: {env.get('cuda') or 'n/a'}.", "",
             f"Overall: **{'all passed' if report['ok'] else 'FAILURES'}** in {report['wall_s']} s "
             f"(budget {report['budget_s']:.0f} s).", "",
             "| step | status | wall s | result |", "|---|---|---|---|"]
    for record in report["steps"]:
        lines.append(f"| {record['name']} | {record['status']} | {record['wall_s']} | {headline(record)} |")
    failed = [r for r in report["steps"] if r["status"] not in STATUS_OK]
    for record in failed:
        lines += ["", f"## {record['name']}: {record['status']}", "", f"`{record['command']}`", "", "```",
                  tail(record.get("error_tail", ""), 15), "```"]
    lines += ["", "Commands: report.json (`steps[].command`); full outputs: logs.txt."]
    return "\n".join(lines) + "\n"


def write(out: pathlib.Path, report: dict, scratch: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(report))
    with open(out / "logs.txt", "w") as handle:
        for record in report["steps"]:
            log = scratch / "logs" / f"{record['name']}.log"
            handle.write(f"===== {record['name']}: {record['command']}\n")
            handle.write(tail(log.read_text(errors="replace"), 400) + "\n" if log.exists() else "(no output)\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--probe"]:
        print(json.dumps(probe()))
        return 0
    args = parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    scratch = pathlib.Path(args.scratch or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    begin = time.perf_counter()
    try:
        records = run_all(args, plan(args, scratch), scratch, begin + args.budget_s)
        environment = next(r for r in records if r["name"] == "environment")
        no_gpu = not args.dry and not has_gpu(environment)
        report = {"mode": "dry" if args.dry else "gpu", "started": started_at, "budget_s": args.budget_s,
                  "wall_s": round(time.perf_counter() - begin, 1), "repo": str(REPO),
                  "tiny_matmul_precision": "highest", "steps": records,
                  "ok": not no_gpu and all(r["status"] in STATUS_OK for r in records)}
        if no_gpu:
            devices = (environment.get("output") or {}).get("devices") or ["none"]
            report["error"] = (f"No GPU here: jax sees {', '.join(devices)}; run on a GPU machine, or pass --dry "
                               "for the CPU rehearsal.")
        write(out, report, scratch)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if "error" in report:
        print(report["error"], file=sys.stderr)
        return 1
    print(f"[gpu_check] {'all passed' if report['ok'] else 'failures'}; wrote {out / 'report.json'}, "
          f"{out / 'summary.md'}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    # Set the huge-page tunable here, once: the children inherit it and skip their own re-run (which would
    # import jax twice in each of them).
    hugepages.reexec_with_huge_pages()
    sys.exit(main())
