"""MoE through every stage: pretrain -> finetune -> the eval CLI -> the generate CLI on a tiny MoE llama."""

from __future__ import annotations

import json

import pytest

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import eval as eval_lib
from jaxllm import finetune as finetune_lib
from jaxllm import generate as generate_lib
from jaxllm import train as train_lib
from jaxllm.metrics import read_metrics
from test_stages import staged_config


@pytest.mark.parametrize("mode, lora_rank, shots", [
    ("capacity", 0, ""),  # ~65 s of CPU: the eval CLI below runs the same scoring as the stage's own
    pytest.param("dropless", 2, "0", marks=pytest.mark.slow),  # LoRA on every expert kernel, the stage's scoring
])
def test_moe_run_goes_through_finetune_eval_and_generate(tmp_path, capsys, mode, lora_rank, shots):
    """On main the finetune stage refused the MoE checkpoint ("does not fit model llama") and eval/generate
    read the stacked expert kernels [E, D, F] as dense ones."""
    overrides = {"moe.n_experts": 4, "moe.top_k": 2, "moe.mode": mode, "moe.every": 2, "moe.group_size": 16,
                 "mathqa.pad_multiple": 16, "finetune.train.steps": 2, "mathqa.eval_shots": shots,
                 "finetune.lora.rank": lora_rank}
    config = staged_config(tmp_path, **overrides)
    summary = train_lib.run_stages(config, tmp_path / "run")
    assert summary["finetune"]["step"] == 2
    stage = tmp_path / "run" / "finetune"
    scored = [r for r in read_metrics(stage / "metrics.jsonl") if r["split"] == "mathqa"]
    assert [r["n"] for r in scored] == ([4] if shots else [])
    capsys.readouterr()
    assert eval_lib.main(["--workdir", str(tmp_path / "run"), "--shots", "1", "--max_questions", "3"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["n"] == 3 and 0 <= row["acc"] <= 1 and row["step"] == 2
    assert generate_lib.main(["--workdir", str(tmp_path / "run"), "--prompt", "Question: 1 + 1",
                              "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Question: 1 + 1")
    # A dense fine-tune of this MoE checkpoint is refused by name, before anything is restored.
    dense = config_lib.stage_config(staged_config(tmp_path, **{**overrides, "moe.n_experts": 0}), "finetune")
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"moe.n_experts is 4 there, 0 here"):
        finetune_lib.initial_params(dense, tmp_path / "run" / "pretrain")
