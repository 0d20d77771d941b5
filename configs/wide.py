"""The 2024 winner: llama 10L/1024/16h (179.98M params), 64 x 4 x 512 tokens per step.

AdamW lr 1.25e-3, clipping at 1.0, one-cycle cosine over 10000 steps, 3-hour budget on SlimPajama-6B; then
the 2025 MathQA stage: a full fine-tune on allenai/math_qa (lr 5e-6, 64 x 4 sequences of up to 512 tokens per
step, 1-hour budget), scored 0- and 5-shot on its test split. `python -m jaxllm.train --config configs/wide.py`
(LoRA instead: --config.finetune.lora.rank=16).

Accelerator settings (issue 9): micro-batches of 32 x 512 with grad_accum 8 (the same tokens per step),
remat=dots and the fused LM head in 4096-token chunks keep the step under 36 GB on a 40 GB A100; the
pretraining schedule is fitted to the 3-hour budget (train.fit_steps_to_budget).
"""

import llama


def get_config():
    c = llama.get_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head = 10, 1024, 16
    c.optim.lr = 1.25e-3
    c.optim.grad_clip = 1.0
    c.train.steps = 10000
    # The reference's 64 x 4 x 512 tokens per step, as 32 x 8 x 512: a 64 x 512 micro-batch needs ~44 GB
    # even with the fused head, over a 40 GB A100. With remat=dots and 4096-token head chunks the step fits
    # in well under 36 GB (docs/benchmarks.md: `scripts/bench.py --config configs/wide.py --compile_only`).
    c.train.batch_size = 32
    c.train.grad_accum = 8
    c.model.remat = "dots"
    c.loss.head_chunk = 4096  # what auto picks on a GPU, set here so a CPU --compile_only measures the same
    # End the one-cycle decay where the 3-hour budget ends (10,000 steps need ~121k tokens/s): after a short
    # timed probe the run fixes the steps that fit, at most 10,000 (jaxllm/loop.py).
    c.train.fit_steps_to_budget = True

    c.stages = "pretrain,finetune"
    c.mathqa.source = "hub"
    c.mathqa.path = "allenai/math_qa"
    c.mathqa.eval_batch_size = 160
    c.finetune.optim.update(c.optim.to_dict())  # as pretraining, except:
    c.finetune.optim.lr = 5e-6
    c.finetune.optim.schedule = "cosine"
    c.finetune.train.update(c.train.to_dict())
    c.finetune.train.update(steps=2000, batch_size=32, grad_accum=8, eval_every=100, eval_batches=0,
                            checkpoint_every=200, max_duration_s=3600.0)
    return c
