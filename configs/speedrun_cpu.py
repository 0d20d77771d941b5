"""The modern recipe (issue 14) at this machine's scale: configs/bench_cpu.py's shape on textmix.

llama 4L/256/4h, seq 256, batch 8, vocab 50304 (gpt2 tokenizer), bf16 matmuls, the fused LM head; what
changes against the reference recipe (AdamW 1e-3 on everything, one-cycle cosine, tied head, SwiGLU):

- optimizer: Muon on the blocks' projection matrices (lr 0.05, momentum 0.85 -> 0.95 over the first 300
  steps, Nesterov), AdamW (lr 0.008, betas 0.8 / 0.95, no weight decay) on the embedding, the LM head and
  the norms: modded-nanogpt's values (its head lr 0.008; its embedding lr 0.6 is not taken, one AdamW lr
  serves both here);
- schedule: wsd, i.e. a 1% warm-up, flat, then a linear decay over the last third to 0.05 of the peak;
- model: qk_norm, relu^2 MLP (4 x 256 hidden), zero-initialised o / w2 projections, an untied head
  initialised to zero, logits soft-capped at 15 (modded-nanogpt's 2024 records used 30, later 15).

Untuned starting values; the proof runs against the reference recipe (docs/results.md) come later.
`python -m jaxllm.train --config configs/speedrun_cpu.py --workdir runs/speedrun_cpu`
"""

import bench_cpu
import speedrun


def get_config():
    c = bench_cpu.get_config()
    c.data.source = "local"
    c.data.path = "../shared/data/textmix"  # relative to the repository root, as the README's examples
    c.data.val_split = "validation"  # tune on train / validation only, never on the test split

    speedrun.apply_recipe(c)  # bench_cpu keeps its grad_clip of 1.0

    c.train.steps = 600  # the proof's token count: 600 x 8 x 256 = 1.23M tokens
    c.train.eval_every = 50
    c.train.eval_batches = 16
    c.train.checkpoint_every = 600
    return c
