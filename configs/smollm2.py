"""Fine-tune SmolLM2-135M-Instruct (a pretrained Llama: 30 layers, d=576, 9 heads, 3 KV heads, vocab 49152) on
MathQA's dev split and score it on test, 0- and 5-shot.

`finetune.init_from` names the Hub model (needs the network once); offline, point it at a local copy:
  --config.finetune.init_from=hf:/path/to/SmolLM2-135M-Instruct     (a Hugging Face folder)
  --config.finetune.init_from=gguf:/path/to/SmolLM2-135M-Instruct.Q4_1.gguf
The model's shape and tokenizer come from there (jaxllm/pretrained.py); this file sets how it trains. LoRA:
  --config.finetune.lora.rank=16 --config.finetune.optim.lr=1e-3
README ("Hugging Face and llama.cpp: models in and out") walks through it with the times it took on a 2-core CPU.
"""

from jaxllm.config import default_config


def get_config():
    c = default_config()
    c.stages = "finetune"
    c.finetune.init_from = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"

    c.mathqa.source = "local"
    c.mathqa.path = "../shared/data/mathqa"
    c.mathqa.train_split = "dev"  # 4,475 questions; the validation questions are carved out of it
    c.mathqa.val_split = ""
    c.mathqa.test_split = "test"
    c.mathqa.max_length = 256  # a question, its options and the answer fit in ~150 SmolLM2 tokens
    c.mathqa.eval_max_length = 768  # room for all five shots
    c.mathqa.eval_batch_size = 40
    c.mathqa.eval_shots = "0,5"

    c.finetune.optim.lr = 2e-5  # full fine-tuning of a pretrained model; LoRA takes ~1e-3
    c.finetune.optim.schedule = "cosine"
    c.finetune.optim.weight_decay = 0.0
    c.finetune.train.update(steps=200, batch_size=8, grad_accum=1, log_every=10, eval_every=100, eval_batches=8,
                            checkpoint_every=100, max_duration_s=0.0, num_devices=1)
    c.finetune.lora.alpha = 16.0  # Unsloth's defaults with rank 16: r=16, alpha=16, no dropout, all projections
    return c
