"""jaxllm.plan: the budget arithmetic on configs/wide.py's shape (worked by hand), the recommendation rule on a
tiny grid, and --measured on a hand-written run."""

import json
import pathlib

import pytest

from jaxllm import config as config_lib
from jaxllm import models, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
A100_BF16 = 312e12  # NVIDIA's dense bf16 peak of an A100 (SXM), FLOP/s
THREE_HOURS = 3 * 3600.0

# configs/wide.py (llama 10L/1024/16h, vocab 50304, sequence 512, tied), by hand: 179,983,360 params, of which
# 50304 x 1024 = 51,511,296 the embedding; FLOPs/token = 6 x (128,472,064 + 51,511,296) + 6 x 10 x 512 x 1024
# (attention, causal half) = 1,079,900,160 + 31,457,280.
WIDE_PARAMS = 179_983_360
WIDE_FLOPS_PER_TOKEN = 1_111_357_440.0


def test_budget_arithmetic_on_the_wide_shape():
    base = config_lib.default_config().model
    (shape,) = plan.shape_costs(base, depths=[10], widths=[1024], head_dim=64)
    wide = config_lib.load_config(str(ROOT / "configs" / "wide.py")).model
    # The per-block extrapolation equals the model code's own count at 10 layers, and the hand count.
    assert (shape.params, shape.flops_per_token) == (models.param_count(wide), models.flops_per_token(wide))
    assert (shape.params, shape.flops_per_token) == (WIDE_PARAMS, WIDE_FLOPS_PER_TOKEN)
    assert (shape.n_layer, shape.n_embd, shape.n_head) == (10, 1024, 16)

    peak, precision = plan.device_peak("a100", "bfloat16")
    assert (peak, precision) == (A100_BF16, "bfloat16")
    (planned,) = plan.with_budget([shape], THREE_HOURS, peak * 0.4)
    tokens = 10_800 * 312e12 * 0.4 / 1_111_357_440  # ~1.213e9: the winner's ~1.08B at his ~36% MFU
    assert planned.tokens == pytest.approx(tokens, rel=1e-12)
    assert planned.tokens_per_s == pytest.approx(312e12 * 0.4 / 1_111_357_440, rel=1e-12)
    assert planned.ratio == pytest.approx(tokens / 179_983_360, rel=1e-12)  # ~6.7 tokens per parameter


def test_cli_plans_the_winners_budget_and_prints_the_overrides(capsys):
    assert plan.main(["--budget_hours", "3", "--device", "a100", "--mfu", "0.4", "--depths", "8,10,12",
                      "--widths", "768,1024"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "budget: 3 h at one a100's bfloat16 peak 312 TFLOP/s x MFU 0.4 = 1.35e+18 FLOPs"
    row = next(line for line in out if line.startswith("10L/1024/16h"))
    assert row.split()[:7] == ["10L/1024/16h", "180M", "1.11e+09", "112k", "1.21B", "6.74",
                               str(int(10_800 * 312e12 * 0.4 / 1_111_357_440 // (64 * 4 * 512)))]
    assert "2024 winner ~6:1" in row and "recommended (6:1)" in row
    assert out[-2].startswith("recommended at 6 tokens/param: 10L/1024/16h")
    assert out[-1].strip() == "--config.model.n_layer=10 --config.model.n_embd=1024 --config.model.n_head=16 " \
                              "--config.train.steps=9252"


def shape(n_layer, n_embd, ratio, params=1000):
    return plan.Shape(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64, params=params, flops_per_token=1.0,
                      tokens=ratio * params)


def test_recommendation_rule_on_a_tiny_grid():
    narrow = shape(4, 256, 6.1)  # width/depth 64, on target
    wider = shape(8, 512, 6.6)  # 64, within 15% of 6 and wider: the rule's pick
    too_flat = shape(2, 512, 6.0)  # 256: outside the width/depth range, however exact
    chinchilla = shape(10, 384, 19.0)  # 38.4
    grid = [narrow, wider, too_flat, chinchilla]
    assert plan.recommend(grid, 6.0) == wider
    assert plan.recommend(grid, 20.0) == chinchilla
    assert plan.recommend([narrow, shape(8, 512, 7.0)], 6.0) == narrow  # 7.0 is 17% off: only narrow is near
    # Nothing within 15% of 40: the closest on a log scale (19 is 0.74 away, 6.6 is 1.8).
    assert plan.recommend(grid, 40.0) == chinchilla
    assert plan.recommend([too_flat], 6.0) == too_flat  # no shape in the range: all compete


def write_measured_run(folder: pathlib.Path, rates) -> pathlib.Path:
    """A run folder as jaxllm.train leaves it: config.json (a tiny llama) and metrics.jsonl's train rows."""
    config = config_lib.default_config()
    config.model.n_layer, config.model.n_embd, config.model.n_head = 2, 64, 4
    config.model.vocab_size, config.model.sequence_length = 320, 32
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config_lib.to_json(config))
    rows = [{"step": i + 1, "split": "train", "loss": 5.0, "tokens_per_s": rate, "tokens_seen": 256 * (i + 1)}
            for i, rate in enumerate(rates)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return config.model


def test_measured_run_sets_the_flops_rate_and_scales_it_by_flops_per_token(tmp_path, capsys):
    tiny = write_measured_run(tmp_path / "run" / "pretrain", [float("nan"), 1000.0, 3000.0, 2000.0])
    achieved, how = plan.measured_flops(str(tmp_path / "run"))  # a two-stage run: its pretrain stage
    assert how["tokens_per_s"] == 2000.0  # the median of the finite rates (the first interval is NaN)
    assert achieved == pytest.approx(2000.0 * models.flops_per_token(tiny), rel=1e-12)

    assert plan.main(["--budget_hours", "0.5", "--measured", str(tmp_path / "run"), "--depths", "2,4",
                      "--widths", "64,128", "--all"]) == 0
    out = capsys.readouterr().out.splitlines()
    # The measured shape itself (2 layers of 64: 1 head of 64 here, 4 of 16 there, the same FLOPs) runs at
    # the measured 2000 tokens/s; 4 layers of 128 at 2000 x its FLOPs/token ratio.
    assert next(line for line in out if line.startswith("2L/64/1h")).split()[3:5] == ["2k", "3.6M"]
    bigger = tiny.copy_and_resolve_references()
    bigger.n_layer, bigger.n_embd, bigger.n_head = 4, 128, 2
    rate = 2000.0 * models.flops_per_token(tiny) / models.flops_per_token(bigger)
    assert next(line for line in out if line.startswith("4L/128/2h")).split()[3] == f"{rate:.3g}"
    assert "vocab 320, sequence 32" in out[1]  # the shapes are the measured run's model, resized


def test_a_run_that_cannot_be_measured_is_one_sentence(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "val", "loss": 5.0}) + "\n")
    assert plan.main(["--measured", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds no train row with a tokens_per_s" in err and err.count("\n") == 0
    assert plan.main(["--device", "tpu"]) == 2
    assert "choose one of a100, h100, h200" in capsys.readouterr().err
