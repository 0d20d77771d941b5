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

Everything but the model and optimizer is configs/reference_cpu.py's: the same data, shape, tokens (600 steps)
and evaluations. Untuned; the comparison with the reference recipe is in docs/results.md.
`python -m jaxllm.train --config configs/speedrun_cpu.py --workdir runs/speedrun_cpu`
"""

import reference_cpu
import speedrun


def get_config():
    # The reference recipe's config (data, shape, tokens, evaluations) with the recipe's model and optimizer.
    return speedrun.apply_recipe(reference_cpu.get_config())  # bench_cpu's grad_clip of 1.0 stays
