"""scripts/gpu_check.py: the dry rehearsal runs every step on the CPU and writes a complete report; without
a GPU and without --dry it refuses in one sentence; the loss comparison and pytest's "no tests" are read right."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)

# scripts/bench.py on this branch builds the model without `config.moe` (a dense model), so its train step
# finds no router statistics and MoE benchmarks fail with KeyError 'intermediates'; branch `shard` fixes it.
# Until that is merged the dry run must report exactly those two steps as failed.
BENCH_MOE_BROKEN = "config.moe" not in (REPO / "scripts" / "bench.py").read_text()
MOE_STEPS = ("moe-dropless", "moe-capacity")
STEPS = ["environment", "pytest-gpu-marked", "tiny-cpu-again", "pytest-fast-subset", "wide", "wide-mb64",
         "wide-compile-only", "llama", "moe-dropless", "moe-capacity", "tiny-cpu", "tiny-loss-match"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env.pop("OUT", None)
    return env


@pytest.mark.slow
def test_dry_run_writes_a_complete_report_with_every_step_passed(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == (1 if BENCH_MOE_BROKEN else 0), result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["logs.txt", "report.json", "summary.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dry" and report["ok"] is (not BENCH_MOE_BROKEN)
    assert [r["name"] for r in report["steps"]] == STEPS
    for record in report["steps"]:
        assert set(record) >= {"name", "group", "command", "returncode", "wall_s", "status"}
        assert isinstance(record["wall_s"], float)
        if BENCH_MOE_BROKEN and record["name"] in MOE_STEPS:
            assert record["status"] == "failed" and "KeyError: 'intermediates'" in record["error_tail"]
        else:
            assert record["status"] in ("ok", "none"), (record["name"], record.get("error_tail"))
    steps = {r["name"]: r for r in report["steps"]}
    assert steps["environment"]["output"]["devices"][0].startswith("cpu")
    assert "jax" in steps["environment"]["output"]["packages"]
    assert steps["pytest-gpu-marked"]["status"] in ("ok", "none")  # "none" until a test carries the marker
    assert steps["pytest-fast-subset"]["output"]["passed"] == len(gpu_check.DRY_TESTS)
    for name in ("wide", "wide-mb64", "llama") + (() if BENCH_MOE_BROKEN else MOE_STEPS):
        output = steps[name]["output"]
        assert output["tokens_per_s"] > 0 and output["peak_memory_mb"] > 0 and output["compile_s"] > 0, name
        assert "mfu" in output, name
    assert "--config.train.grad_accum=2" in steps["wide-mb64"]["command"]
    assert "--config.moe.mode=dropless" in steps["moe-dropless"]["command"]
    assert steps["wide-compile-only"]["output"]["total_mb"] > 0
    match = steps["tiny-loss-match"]["output"]
    assert match["steps_compared"] == gpu_check.DRY_TINY_STEPS
    assert match["max_abs_diff"] == 0.0  # CPU against CPU: bit for bit
    summary = (out / "summary.md").read_text()
    assert "| wide-mb64 | ok |" in summary and ("FAILURES" if BENCH_MOE_BROKEN else "all passed") in summary


def test_without_a_gpu_it_refuses_in_one_sentence(tmp_path):
    env = {**_env(), "JAX_PLATFORMS": "cpu"}  # whatever this machine has, jax may only see its CPU
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("No GPU here: jax sees cpu") and last.count(". ") == 0, last
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["name"] for r in report["steps"]] == ["environment"] and report["ok"] is False


def test_loss_comparison_reports_the_worst_step():
    def run(losses):
        return {"status": "ok", "output": {"train_loss": {str(i): v for i, v in enumerate(losses, 1)},
                                           "val_loss": losses[-1]}}
    records = {"a": run([3.0, 2.5, 2.0]), "b": run([3.0, 2.5004, 2.0])}
    record = gpu_check.compare_losses(records, "a", "b", expected_steps=3)
    assert record["status"] == "ok" and record["output"]["worst_step"] == "2"
    assert record["output"]["max_abs_diff"] == pytest.approx(4e-4)
    records["b"] = run([3.0, 2.51, 2.0])
    assert gpu_check.compare_losses(records, "a", "b", expected_steps=3)["status"] == "failed"
    assert gpu_check.compare_losses(records, "a", "b", expected_steps=4)["status"] == "failed"  # a step missing
    records["b"] = {"status": "timeout"}
    assert gpu_check.compare_losses(records, "a", "b", expected_steps=3)["status"] == "skipped"


def test_pytest_exit_code_5_counts_as_none_and_a_timeout_is_recorded(tmp_path):
    def record(step):
        log = tmp_path / f"{step.name}.log"
        return gpu_check.finish(step, gpu_check.start(step, log), time.perf_counter(), step.timeout_s, log)

    no_tests = gpu_check.Step("t", "tests", [sys.executable, "-c", "print('no tests ran'); raise SystemExit(5)"],
                              30, parse="pytest")
    assert record(no_tests)["status"] == "none"
    slow = gpu_check.Step("s", "bench", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    result = record(slow)
    assert result["status"] == "timeout" and result["wall_s"] < 10
    broken = gpu_check.Step("b", "bench", [sys.executable, "-c", "raise ValueError('boom')"], 30)
    result = record(broken)
    assert result["status"] == "failed" and "ValueError: boom" in result["error_tail"]
