"""The reference recipe at this machine's scale, the baseline of the modern recipe's proof (docs/results.md).

configs/bench_cpu.py's shape and compute settings (llama 4L/256/4h, SwiGLU, tied embeddings, seq 256,
batch 8, vocab 50304, bf16 matmuls, the fused LM head) trained the way the hackathon winners trained:
AdamW (lr 1e-3, betas 0.9 / 0.95, weight decay 0.1 on the linear weights), the one-cycle cosine schedule
(5% warm-up from lr / 100, down to lr / 10), clipping at 1.0: llm-baselines' defaults. Same data, tokens and
evaluations as configs/speedrun_cpu.py: textmix, 600 steps (1.23M tokens), the validation split.
`python -m jaxllm.train --config configs/reference_cpu.py --workdir runs/reference_cpu`
"""

import bench_cpu


def get_config():
    c = bench_cpu.get_config()
    c.data.source = "local"
    c.data.path = "../shared/data/textmix"  # relative to the repository root, as the README's examples
    c.data.val_split = "validation"  # tune on train / validation only, never on the test split

    c.train.steps = 600  # 600 x 8 x 256 = 1.23M tokens
    c.train.eval_every = 50
    c.train.eval_batches = 16
    c.train.checkpoint_every = 600
    return c
