"""scripts/reference_torch.py: the reference PyTorch code's flags come from the jaxllm config, recipes it cannot
run are refused, and its wandb logs land as metrics rows jaxllm.compare reads. Running the reference itself
needs a checkout of epfml/llm-baselines (JAXLLM_LLM_BASELINES=PATH): then the slow test trains it 4 steps."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxllm import compare
from jaxllm import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reference_torch", ROOT / "scripts" / "reference_torch.py")
reference_torch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference_torch)


def flag_values(flags):
    return dict(zip(flags[::2], flags[1::2]))


def test_flags_are_the_reference_recipe_of_the_config():
    config = config_lib.load_config(str(ROOT / "configs" / "reference_cpu.py"), ["seed=3", "train.grad_accum=2"])
    flags = reference_torch.reference_flags(config)
    assert flags[-1] == "--wandb"
    got = flag_values(flags[:-1])
    assert got == {"--model": "llama2", "--n_layer": "4", "--n_embd": "256", "--n_head": "4",
                   "--sequence_length": "256", "--vocab_size": "50304", "--batch_size": "8", "--acc_steps": "2",
                   "--iterations": "600", "--lr": "0.001", "--beta1": "0.9", "--beta2": "0.95",
                   "--weight_decay": "0.1", "--grad_clip": "1.0", "--scheduler": "cos", "--warmup_percent": "0.05",
                   "--eval_freq": "50", "--seed": "3", "--data_seed": "1337", "--dropout": "0.0", "--device": "cpu"}


@pytest.mark.parametrize("overrides", [[], ["model.qk_norm=True"], ["optim.schedule=wsd"], ["model.n_kv_head=2"]])
def test_recipes_the_reference_cannot_run_are_refused(overrides):
    config_file = "speedrun_cpu.py" if not overrides else "reference_cpu.py"
    config = config_lib.load_config(str(ROOT / "configs" / config_file), overrides)
    with pytest.raises(reference_torch.BaselinesError, match="reference"):
        reference_torch.reference_flags(config)


def test_wandb_logs_become_rows_compare_reads(tmp_path):
    recorder = reference_torch.MetricsRecorder(tmp_path / "metrics.jsonl", tokens_per_iter=2048)
    recorder.init(project="p", name="n", config={})
    recorder.log({"iter": 50, "train/loss": 6.5, "val/loss": 6.6, "val/perplexity": 735.1, "val/acc": 0.1,
                  "lr": 1e-3})
    recorder.log({"generated-text": recorder.Table(columns=["itr", "val-pp", "text"])})  # not a metrics log
    recorder.log({"iter": 100, "train/loss": 6.0, "val/loss": 6.1, "val/perplexity": 445.9, "val/acc": 0.12,
                  "lr": 1e-4, "val/final-loss": 6.1, "val/final-ppl": 445.9, "val/final-acc": 0.12})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r.get("full", False)) for r in rows] == [
        (50, "train", False), (50, "val", False), (100, "train", False), (100, "val", True)]
    summary = compare.summarize(rows, "reference")
    assert (summary.steps, summary.tokens, summary.final_val_loss, summary.final_val_full) == (100, 204800, 6.1, True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("JAXLLM_LLM_BASELINES"),
                    reason="set JAXLLM_LLM_BASELINES to a checkout of epfml/llm-baselines at f016ae5")
def test_the_reference_trains_on_jaxllm_data(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "reference_torch.py"),
                          "--baselines", os.environ["JAXLLM_LLM_BASELINES"], "--workdir", str(tmp_path),
                          "--config.train.steps=4", "--config.train.eval_every=2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and val[-1]["full"] and val[-1]["loss"] < 10.9  # below log(50304)
    assert not list(tmp_path.rglob("*.pt"))  # its torch.save checkpoint is not written
