"""The modern recipe (issue 14) at the hackathon's budget: one A100, 3 hours of pretraining, then MathQA.

Shape: the 2024 winner's llama 10L/1024/16h (head size 64) at its 64 x 4 x 512 tokens per step, as
configs/wide.py runs it (micro-batches 32 x 512, grad_accum 8, remat=dots, 4096-token head chunks,
the schedule fitted to the 3-hour budget). Why keep it:
- relu^2 at 4 x 1024 hidden has 2 x 1024 x 4096 = 8.39M MLP weights per layer against SwiGLU's
  3 x 1024 x 2816 = 8.65M, and the qk norms add 2 x 64 scalars per layer, so the block FLOPs per token, and
  with them the measured step time and the tokens the budget buys (~1.3B), stay within 2% of wide.py's
  (models.flops_per_token: 1.096e9 against 1.111e9): ~7 tokens per non-head parameter, the winner's ratio; the untied head adds V x D = 51.5M parameters (params and
  AdamW state ~0.6 GB) but no FLOPs (the head matmul is counted tied or not);
- Muon's Newton-Schulz costs ~3 TFLOP per step on these matrices (5 iterations over the 6 matrices of each
  of 10 layers), against ~1e17 FLOPs of forward and backward: negligible;
- a faster optimizer favours more tokens per parameter over a larger model (the speedrun records train
  124M-parameter models on ~0.7-3B tokens), so there is no case for a wider model at equal time.
The planner agrees: `python -m jaxllm.plan --budget_hours 3 --device a100 --mfu 0.4` recommends 10L/1024/16h
(180M parameters, 1.21B tokens, 6.7 per parameter; Chinchilla's ~20 would be 10L/768/12h on 1.98B tokens);
re-run it with the throughput a first run of this config measured (`--measured RUN`).

Recipe values as configs/speedrun_cpu.py (Muon 0.05 with momentum warm-up, AdamW 0.008 on embedding / head /
norms, wsd decaying over the last third to 0.05, qk_norm, relu^2, zero-init o / w2 and head, softcap 15);
the fine-tune stage keeps wide.py's AdamW (lr 5e-6, cosine).
`python -m jaxllm.train --config configs/speedrun.py --workdir runs/speedrun`
"""

import wide


def get_config():
    return apply_recipe(wide.get_config())


def apply_recipe(c):
    """The recipe's model and optimizer settings on config `c` (also configs/speedrun_cpu.py's)."""
    c.model.qk_norm = True
    c.model.mlp_activation = "relu2"
    c.model.zero_init_proj = True
    c.model.tie_embeddings = False
    c.model.head_init_std = 0.0
    c.model.logit_softcap = 15.0

    c.optim.name = "muon"
    c.optim.muon_lr = 0.05
    c.optim.muon_momentum = 0.95
    c.optim.muon_momentum_start = 0.85
    c.optim.muon_momentum_warmup_steps = 300
    c.optim.lr = 0.008  # the AdamW group: embedding, LM head, norms
    c.optim.beta1, c.optim.beta2 = 0.8, 0.95
    c.optim.weight_decay = 0.0
    c.optim.schedule = "wsd"
    c.optim.warmup_pct = 0.01
    c.optim.decay_pct = 1 / 3
    c.optim.min_lr_ratio = 0.05
    return c
