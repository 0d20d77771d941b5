"""The configuration schema: every field, its default and its meaning, and the checks run at start-up.

Configs are Python files (`configs/*.py`) whose `get_config()` starts from `default_config()` and changes
what differs. Command-line overrides (`--config.model.n_layer=4`) are applied by `apply_overrides`.
`validate` turns every mistake a user is likely to make into one `ConfigError` sentence that names the
field and what to do.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import pathlib
import sys
from typing import Any

import ml_collections

MODEL_NAMES = ("llama", "gpt2")
ROPE_SCALINGS = ("none", "llama3")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "cudnn", "xla", "jaxllm")  # jaxllm/models/attention.py: attention_impl
RESIDUAL_DTYPES = ("float32", "compute")
DATA_SOURCES = ("synthetic", "hub", "local")
TOKENIZERS = ("gpt2", "byte", "hf")
OPTIMIZERS = ("adamw", "lion", "sgd", "muon")
MLP_ACTIVATIONS = ("swiglu", "relu2")  # llama's MLP: gated SiLU (the reference) or non-gated relu(x)^2
# The recipe's llama options and their "off" values (what configs saved before they existed mean).
RECIPE_MODEL_OFF = {"qk_norm": False, "mlp_activation": "swiglu", "zero_init_proj": False, "logit_softcap": 0.0}
SCHEDULES = ("cos", "linear", "cosine", "wsd", "constant")
MOE_MODES = ("dropless", "capacity")
STAGES = ("pretrain", "finetune")
MATHQA_SOURCES = ("synthetic", "hub", "local")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_QUANTIZE = ("none", "nf4", "int8")  # models/quant.py
LORA_INITS = ("default", "loftq")
ASYNC_CHECKPOINT = ("auto", "on", "off")
FINETUNE_DATA = ("mathqa", "sft")
SFT_SOURCES = ("local", "hub")
SFT_TEMPLATES = ("auto", "builtin")


class ConfigError(ValueError):
    """A configuration mistake, described in one sentence for the user."""


def default_config() -> ml_collections.ConfigDict:
    """Every field jaxllm understands, with the reference system's defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout; data order has its own seed (data.seed)

    c.model = m = ml_collections.ConfigDict()
    m.name = "llama"  # one of MODEL_NAMES
    m.n_layer = 12
    m.n_embd = 768
    m.n_head = 12
    m.n_kv_head = 0  # grouped-query attention: key/value heads; 0 = n_head (plain multi-head)
    m.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
    m.sequence_length = 512  # context length; gpt2 learns this many positions
    m.mlp_hidden = 0  # MLP hidden width; 0 = the reference rule (gpt2: 4*d; llama: SwiGLU rule below)
    m.mlp_multiple_of = 256  # llama: hidden = multiple_of rounding of int(2 * 4 * d / 3)
    m.norm_eps = 1e-5
    m.rope_theta = 10000.0
    m.rope_scaling = "none"  # none, or llama3 (Llama 3.1+ long-context scaling with the four fields below)
    m.rope_scaling_factor = 8.0
    m.rope_low_freq_factor = 1.0
    m.rope_high_freq_factor = 4.0
    m.rope_original_max_len = 8192  # original_max_position_embeddings
    m.head_dim = 0  # size of each attention head; 0 = n_embd / n_head (imported Hugging Face models may differ)
    m.tie_embeddings = True  # LM head shares the token embedding
    m.init_std = 0.02  # N(0, std); residual output projections use std / sqrt(2 * n_layer)
    m.dropout = 0.0
    m.dtype = "float32"  # compute dtype: float32 or bfloat16 (norms, softmax, logits, loss stay float32)
    m.param_dtype = "float32"
    m.remat = "none"  # rematerialise each block in the backward pass: none, full, dots (save matmuls)
    m.attention = "auto"  # auto (CPU: jaxllm; GPU: cudnn where it fits, else xla), cudnn, xla, jaxllm: models/attention.py
    m.residual_dtype = "float32"  # residual stream: float32 (PyTorch autocast's, even under bf16) or compute (= dtype)
    # The modern recipe's model options (llama only; all off by default, the reference model unchanged):
    m.qk_norm = False  # RMSNorm over each head's K dims of queries and keys (learned scale [K]), before RoPE
    m.mlp_activation = "swiglu"  # swiglu, or relu2: non-gated w2(relu(w3 x)^2), hidden 4 * n_embd unless mlp_hidden
    m.zero_init_proj = False  # attention output (o) and MLP down (w2) projections start at zero
    m.logit_softcap = 0.0  # > 0: logits = cap * tanh(logits / cap) (plain and fused heads); 0 = off
    m.head_init_std = -1.0  # untied LM head's init std: < 0 = init_std (the reference), 0 = zeros (modded-nanogpt)

    c.moe = e = ml_collections.ConfigDict()  # mixture-of-experts MLPs (llama only; jaxllm/models/moe.py)
    e.n_experts = 0  # experts per MoE layer; 0 = dense model
    e.top_k = 2  # experts each token is routed to (softmax over all experts, then top-k)
    e.every = 1  # layer i (0-based) is MoE when i % every == every - 1: 1 = every layer, 2 = layers 1, 3, ...
    e.renormalize = False  # rescale the top-k probabilities to sum to 1 (the reference does not)
    e.mode = "dropless"  # dropless (sort by expert + grouped matmuls) or capacity (GShard, drops overflow)
    e.capacity_factor = 1.25  # capacity mode: each expert takes ceil(factor * G * top_k / E) per group
    e.group_size = 0  # capacity mode: G, positions per routing group (divides sequence_length); 0 = all
    e.aux_loss_coef = 1e-2  # load-balance loss n_experts * sum_i f_i * P_i, mean over MoE layers
    e.z_loss_coef = 1e-3  # router z-loss mean(logsumexp(router logits)^2), mean over MoE layers

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"  # synthetic (built-in, no download), hub (Hugging Face dataset), local (files)
    d.path = ""  # hub: dataset name (DKYoon/SlimPajama-6B); local: parquet/jsonl file or folder
    d.text_field = "text"
    d.val_split = ""  # "" = carve validation documents out of train (the reference); else a split name
    d.val_fraction = 0.0005  # reference: train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    d.split_seed = 2357
    d.max_documents = 0  # use only the first N training documents; 0 = all
    d.synthetic_documents = 20000  # size of the built-in synthetic corpus (train + validation)
    # gpt2 (tiktoken BPE, 50257 ids), byte (256 bytes + EOT, for fast tests) or hf (a Hugging Face tokenizer.json,
    # e.g. an imported model's; its EOS is the end-of-text, its BOS goes first at generation)
    d.tokenizer = "gpt2"
    d.tokenizer_path = ""  # gpt2: a local gpt2.tiktoken (also JAXLLM_GPT2_TIKTOKEN); hf: the folder or tokenizer.json
    d.cache_dir = ""  # where prepared token memmaps live; "" = $JAXLLM_CACHE or ~/.cache/jaxllm
    d.num_proc = 2  # tokenizer processes in prepare
    d.seed = 1337  # the order of training windows is a pure function of (data.seed, step)

    c.loss = lo = ml_collections.ConfigDict()
    lo.label_smoothing = 0.0
    lo.z_loss = 0.0  # coefficient of mean(logsumexp(logits)^2)
    # Train step: fused LM head + cross-entropy over chunks of this many tokens (never the [B, L, V] logits);
    # 0 = full logits; -1 = auto: fused for vocabularies >= 8192, 256-token chunks on CPU, 4096 on GPU/TPU.
    lo.head_chunk = -1

    c.optim = o = ml_collections.ConfigDict()
    o.name = "adamw"  # one of OPTIMIZERS
    o.lr = 1e-3  # peak learning rate
    o.beta1 = 0.9
    o.beta2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1  # decoupled; only on linear-layer weight matrices
    o.momentum = 0.9  # sgd only
    o.grad_clip = 1.0  # global-norm clipping; 0 = off
    o.schedule = "cos"  # cos/linear: the reference one-cycle; cosine: warmup + cosine; wsd; constant
    o.warmup_pct = 0.05  # one-cycle pct_start; also the warm-up of cosine/wsd/constant when warmup_steps=0
    o.warmup_steps = 0  # cosine/wsd/constant: explicit warm-up steps (overrides warmup_pct)
    o.div_factor = 100.0  # one-cycle: start at lr / div_factor
    o.final_div_factor = 0.1  # one-cycle: end at lr / div_factor / final_div_factor
    o.min_lr_ratio = 0.1  # cosine/wsd: final lr = lr * min_lr_ratio
    o.decay_pct = 0.2  # wsd: fraction of steps spent decaying at the end
    # muon (jaxllm/optim.py): Muon on the blocks' 2-D projection kernels (and stacked expert kernels), AdamW with
    # lr / betas / eps / weight_decay above on everything else (embedding, LM head, norms, MoE routers).
    o.muon_lr = 0.02  # the Muon group's peak lr; its schedule has the same shape as optim.lr's
    o.muon_momentum = 0.95  # Muon's momentum (EMA) coefficient
    o.muon_momentum_start = 0.85  # with muon_momentum_warmup_steps > 0: the momentum ramps linearly from this
    o.muon_momentum_warmup_steps = 0  # steps of that ramp (modded-nanogpt: 300); 0 = muon_momentum throughout
    o.muon_nesterov = True  # Nesterov momentum (Keller Jordan's default)
    o.muon_ns_steps = 5  # Newton-Schulz iterations
    o.muon_weight_decay = 0.0  # decoupled, lr-scaled weight decay of the Muon group

    c.train = t = ml_collections.ConfigDict()
    t.steps = 10000  # optimizer steps
    t.batch_size = 32  # sequences per micro-batch, over all devices
    t.grad_accum = 4  # micro-batches per optimizer step (token-mean, = one batch grad_accum times bigger)
    t.log_every = 10
    t.eval_every = 200
    t.eval_batches = 24  # the fixed validation batches used at every evaluation; 0 = every validation window
    t.full_eval_at_end = True  # evaluate every validation window once after the last step (or the budget's stop)
    t.checkpoint_every = 1000
    t.keep_checkpoints = 2
    t.max_duration_s = 0.0  # wall-clock budget of the run in seconds (the hackathon: 3 h), across resumes; reaching it finishes the run; 0 = none
    t.fit_steps_to_budget = False  # measure the step time early, then end the schedule at the steps max_duration_s holds (<= steps)
    t.async_checkpoint = "auto"  # write checkpoints in a background thread: auto (on off-CPU), on, off
    t.prefetch = 2  # host batches prepared (and put on the devices) ahead by a background thread; 0 = none
    t.progress = True  # console progress bar
    t.num_devices = 0  # devices the mesh uses (of every process's); 0 = all visible devices
    # The device mesh (jaxllm/sharding.py): axis sizes of data (batch only), fsdp (batch, and parameters and
    # optimizer state sharded, ZeRO-3) and tensor (heads and MLP units split); -1 = the remaining devices.
    t.mesh = "data:-1,fsdp:1,tensor:1"

    # Stages run in order; with more than one, each runs in its own subfolder of the workdir (workdir/<stage>).
    c.stages = "pretrain"  # comma-separated, from STAGES: "pretrain", "finetune" or "pretrain,finetune"

    c.mathqa = q = ml_collections.ConfigDict()  # the MathQA data of the finetune stage and of jaxllm.eval
    q.source = "synthetic"  # synthetic (built-in problems), hub (allenai/math_qa), local (files)
    q.path = ""  # hub: dataset name ("" = allenai/math_qa); local: a folder such as ../shared/data/mathqa
    q.train_split = "train"  # a split name, or (local) a file or folder path; few-shot examples come from it
    q.val_split = "validation"  # likewise; "" = carve mathqa.val_fraction out of train
    q.test_split = "test"  # likewise; what the multiple-choice evaluation scores
    q.val_fraction = 0.05
    q.synthetic_problems = 5000  # synthetic: training problems (validation and test get a tenth each)
    q.rationale = False  # append "\nRationale: ..." to the answer in the training target
    q.max_length = 0  # tokens per example (prompts are cut from the left); 0 = model.sequence_length
    # Tokens of a scored multiple-choice context + option (whole shots are dropped to fit); 0 = max_length.
    # llama (RoPE, no learned positions) can score longer contexts than it trained on; gpt2 cannot.
    q.eval_max_length = 0
    q.pad_multiple = 64  # batches are padded to their longest example rounded up to this; 0 = to max_length
    q.eval_shots = "0,5"  # multiple-choice evaluations run at the end of the finetune stage (shot counts)
    q.eval_questions = 0  # score only the first N test questions; 0 = all
    q.eval_batch_size = 40  # rows (question x option) per scoring batch
    q.seed = 0  # order of training examples, the validation carve-out and the few-shot draws

    c.finetune = f = ml_collections.ConfigDict()  # the finetune stage: its optim and train replace the base ones
    f.init_from = ""  # "" = the pretrain stage's last checkpoint; else a workdir, checkpoints/ or step folder
    f.data = "mathqa"  # the fine-tune's data: mathqa (the `mathqa` section, scored at the end) or sft (`sft` section)
    # Several whole examples per training row (segment ids + per-example positions; llama only): no compute on
    # padding. finetune.train.batch_size then counts rows, not examples. Validation batches are never packed.
    f.packing = False
    f.optim = ml_collections.ConfigDict(o.to_dict())  # every field as in `optim`
    f.optim.lr = 5e-6  # the 2025 team's full fine-tune
    f.optim.schedule = "cosine"
    f.optim.warmup_pct = 0.05
    f.train = ml_collections.ConfigDict(t.to_dict())  # every field as in `train`
    f.train.steps = 1000
    f.train.batch_size = 64
    f.train.grad_accum = 1
    f.train.eval_every = 100
    f.train.eval_batches = 0  # 0 = every validation example at each evaluation
    f.train.checkpoint_every = 200
    f.train.max_duration_s = 3600.0  # the hackathon's fine-tuning hour
    f.lora = lr = ml_collections.ConfigDict()
    # LoRA / QLoRA (jaxllm/models/lora.py). Unsloth's starting point: rank=16, alpha=16, dropout=0, all seven
    # targets (alpha and targets are the defaults here; rank 0 keeps full fine-tuning the default).
    lr.rank = 0  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank, base weights frozen
    lr.alpha = 16.0  # adapter output scaled by alpha / rank (rslora: alpha / sqrt(rank))
    lr.dropout = 0.0  # dropout on the adapters' input
    lr.targets = "q,k,v,o,gate,up,down"  # comma-separated, from LORA_TARGETS
    lr.rslora = False  # rank-stabilised LoRA: scale alpha / sqrt(rank) instead of alpha / rank
    lr.quantize = "none"  # QLoRA: store the frozen base's q,k,v,o,gate,up,down kernels as LORA_QUANTIZE (llama)
    lr.init = "default"  # adapters: "default" (b = 0) or "loftq" (fitted to the quantization error; needs quantize)
    lr.loftq_iters = 1  # LoftQ alternations of quantize / rank-r SVD (PEFT's default; the first gives most of it)

    # Your own instruction data for the finetune stage (finetune.data=sft; jaxllm/data/sft.py). Rows are
    # {"prompt", "completion"} (plain text) or {"messages": [{"role": system|user|assistant, "content"}, ...]}
    # (rendered with the chat template); the loss covers only completion / assistant tokens and their end-of-turn.
    c.sft = s = ml_collections.ConfigDict()
    s.source = "local"  # local (files) or hub (a Hugging Face dataset; needs the network)
    s.path = ""  # local: a .jsonl/.json/.parquet file or a folder of them; hub: the dataset name
    s.split = "train"  # hub: the split; local folder: files named train.* / train-* (else every file)
    s.val_split = ""  # "" = carve sft.val_fraction out of the train rows; else a split name or a file path
    s.val_fraction = 0.05
    s.max_rows = 0  # read only the first N train rows (before the carve-out); 0 = all
    s.max_length = 0  # tokens per example; longer rows are skipped and counted; 0 = model.sequence_length
    s.pad_multiple = 64  # batches are padded to their longest row rounded up to this; 0 = to max_length
    s.template = "auto"  # auto: the tokenizer's chat template when it has one, else the built-in; builtin: always it
    s.seed = 0  # order of training examples (and packing) and the validation carve-out
    s.messages_field = "messages"  # the row fields read
    s.prompt_field = "prompt"
    s.completion_field = "completion"
    return c


def stage_names(config) -> list[str]:
    """The stages of a run, in order (config.stages split on commas)."""
    return [s.strip() for s in config.stages.split(",") if s.strip()]


def stage_config(config, stage: str) -> ml_collections.ConfigDict:
    """The config one stage trains with: for "finetune", `finetune.optim` and `finetune.train` replace
    `optim` and `train`; "pretrain" is the config itself. The result has `stages = stage`."""
    c = ml_collections.ConfigDict(config.to_dict())
    if stage == "finetune":
        c.optim = ml_collections.ConfigDict(config.finetune.optim.to_dict())
        c.train = ml_collections.ConfigDict(config.finetune.train.to_dict())
    c.stages = stage
    return c


def with_train_steps(config, steps: int) -> ml_collections.ConfigDict:
    """A copy of `config` with train.steps = `steps` (the schedule's length; fit_steps_to_budget's result)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.steps = int(steps)
    return c


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return match[0] if match else ""


def check_fields(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
                 prefix: str = "") -> None:
    """Raise ConfigError for any field that the schema does not define, naming the closest valid one."""
    reference = default_config() if reference is None else reference
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in reference:
            near = _closest(key, reference.keys())
            raise ConfigError(f"unknown config field '{path}'; did you mean '{prefix}{near}'?")
        if isinstance(reference[key], ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config field '{path}' is a section; set its fields, e.g. '{path}.{next(iter(reference[key].keys()))}'")
            check_fields(value, reference[key], prefix=f"{path}.")


def _parse_value(text: str, current: Any, path: str) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config field '{path}' is true/false, got '{text}'")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"config field '{path}' is an integer, got '{text}'") from None
            if value != int(value):
                raise ConfigError(f"config field '{path}' is an integer, got '{text}'")
            return int(value)
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config field '{path}' is a number, got '{text}'") from None
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `a.b=value` overrides (the text after `--config.`), parsing each by the field's type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '--config.{item}' has no value; write --config.{item}=VALUE")
        path, text = item.split("=", 1)
        node = config
        keys = path.split(".")
        for depth, key in enumerate(keys):
            prefix = ".".join(keys[:depth])
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                options = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
                near = _closest(key, options)
                dotted = f"{prefix}.{near}" if prefix else near
                raise ConfigError(f"unknown config field '{path}'; did you mean '{dotted}'?")
            if depth < len(keys) - 1:
                node = node[key]
        current = node[keys[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config field '{path}' is a section, not a value; set one of its fields")
        with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
            node[keys[-1]] = _parse_value(text, current, path)
    return config


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_config(path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Load `get_config()` from a Python config file, apply overrides and validate."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass one of configs/*.py")
    spec = importlib.util.spec_from_file_location(f"jaxllm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    # Presets import the preset they derive from (`import baseline`): let them see their own folder.
    sys.path.insert(0, str(file.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{path}' defines no get_config(); it must return a ConfigDict")
    config = module.get_config()
    check_fields(config)
    apply_overrides(config, overrides or [])
    validate(config)
    return config


def _choice(value, options, path):
    if value not in options:
        near = _closest(str(value), options)
        raise ConfigError(f"config field '{path}' is '{value}'; choose one of {', '.join(options)} (closest: '{near}')")


def _positive(value, path, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config field '{path}' is {value}; it must be {bound}")


MESH_AXES = ("data", "fsdp", "tensor")  # train.mesh's axes (jaxllm/sharding.py)


def parse_mesh(spec: str, num_devices: int | None) -> dict[str, int]:
    """{"data": n, "fsdp": n, "tensor": n} from a spec like "data:-1,fsdp:2" over `num_devices` devices
    (None: check the spec's form only, -1 left as it is).

    Raises ValueError (one sentence) for unknown axes, bad sizes, or sizes that do not multiply to the devices.
    """
    sizes: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, value = item.partition(":")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"train.mesh names axis '{name}'; the axes are {', '.join(MESH_AXES)} (e.g. data:-1,fsdp:2)")
        if name in sizes:
            raise ValueError(f"train.mesh names axis '{name}' twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"train.mesh axis '{name}' has size '{value}'; sizes are integers, -1 for the rest") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"train.mesh axis '{name}' has size {sizes[name]}; sizes are >= 1, or -1 for the rest")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"train.mesh gives -1 to {' and '.join(free)}; at most one axis takes the remaining devices")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if num_devices is None:
        pass
    elif free:
        if num_devices % fixed:
            raise ValueError(f"train.mesh '{spec}' needs a multiple of {fixed} devices, and {num_devices} are used; "
                             f"change the mesh or train.num_devices")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"train.mesh '{spec}' has {fixed} devices in all but {num_devices} are used; use -1 for "
                         f"one axis, or set train.num_devices={fixed}")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check values and their relations; raise ConfigError with one sentence on the first problem."""
    check_fields(config)
    m, d, o, t = config.model, config.data, config.optim, config.train
    _choice(m.name, MODEL_NAMES, "model.name")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(m.param_dtype, DTYPES, "model.param_dtype")
    _choice(m.remat, REMAT_POLICIES, "model.remat")
    _choice(m.attention, ATTENTION_IMPLS, "model.attention")
    _choice(m.residual_dtype, RESIDUAL_DTYPES, "model.residual_dtype")
    _validate_recipe(config)
    _choice(d.source, DATA_SOURCES, "data.source")
    _choice(d.tokenizer, TOKENIZERS, "data.tokenizer")
    _choice(o.name, OPTIMIZERS, "optim.name")
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    _choice(t.async_checkpoint, ASYNC_CHECKPOINT, "train.async_checkpoint")
    for section in (t, config.finetune.train):
        try:
            parse_mesh(section.mesh, None)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    for path in ("model.n_layer", "model.n_embd", "model.n_head", "model.vocab_size", "model.sequence_length",
                 "model.mlp_multiple_of", "train.steps", "train.batch_size", "train.grad_accum",
                 "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                 "optim.lr", "optim.div_factor", "optim.final_div_factor"):
        section, field = path.split(".")
        _positive(config[section][field], path)
    for path in ("model.n_kv_head", "model.mlp_hidden", "model.dropout", "optim.weight_decay", "optim.grad_clip",
                 "optim.warmup_steps", "train.eval_batches", "train.num_devices", "train.max_duration_s", "train.prefetch", "loss.label_smoothing",
                 "loss.z_loss", "data.max_documents"):
        section, field = path.split(".")
        _positive(config[section][field], path, allow_zero=True)
    if config.loss.head_chunk < -1:
        raise ConfigError(f"loss.head_chunk is {config.loss.head_chunk}; use a chunk size > 0, 0 (full logits) "
                          f"or -1 (auto)")
    if m.head_dim < 0 or (m.head_dim and m.name != "llama"):
        raise ConfigError(f"model.head_dim is {m.head_dim}; it must be 0 (n_embd / n_head), or > 0 for llama")
    if not m.head_dim and m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
                          f"try n_head={_divisor_near(m.n_embd, m.n_head)}")
    head_dim = m.head_dim or m.n_embd // m.n_head
    if m.name == "llama" and head_dim % 2:
        raise ConfigError(f"RoPE needs an even head size, but the head size is {head_dim}; change model.n_head")
    _choice(m.rope_scaling, ROPE_SCALINGS, "model.rope_scaling")
    if m.rope_scaling == "llama3" and not (m.rope_scaling_factor >= 1 and 0 < m.rope_low_freq_factor
                                           < m.rope_high_freq_factor and m.rope_original_max_len > 0):
        raise ConfigError("model.rope_scaling=llama3 needs rope_scaling_factor >= 1, 0 < rope_low_freq_factor < "
                          "rope_high_freq_factor and rope_original_max_len > 0")
    n_kv = m.n_kv_head or m.n_head
    if m.n_head % n_kv:
        raise ConfigError(f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({n_kv})")
    if m.name == "gpt2" and m.n_kv_head not in (0, m.n_head):
        raise ConfigError("model.n_kv_head (grouped-query attention) is only for llama; set it to 0 for gpt2")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout is {m.dropout}; it must be in [0, 1)")
    if not 0 <= config.loss.label_smoothing < 1:
        raise ConfigError(f"loss.label_smoothing is {config.loss.label_smoothing}; it must be in [0, 1)")
    if not 0 < o.warmup_pct < 1:
        raise ConfigError(f"optim.warmup_pct is {o.warmup_pct}; it must be in (0, 1)")
    if t.fit_steps_to_budget and not t.max_duration_s:
        raise ConfigError("train.fit_steps_to_budget needs a budget to fit the steps in; set train.max_duration_s > 0 "
                          "or turn fit_steps_to_budget off")
    if not 0 <= o.decay_pct <= 1:
        raise ConfigError(f"optim.decay_pct is {o.decay_pct}; it must be in [0, 1]")
    if o.schedule in ("cosine", "wsd", "constant") and o.warmup_steps >= t.steps:
        raise ConfigError(f"optim.warmup_steps ({o.warmup_steps}) must be smaller than train.steps ({t.steps})")
    _validate_moe(config)
    if d.source in ("hub", "local") and not d.path:
        what = "a dataset name such as DKYoon/SlimPajama-6B" if d.source == "hub" else "a file or folder"
        raise ConfigError(f"data.source is '{d.source}' but data.path is empty; set --config.data.path to {what}")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction is {d.val_fraction}; it must be in (0, 1)")
    _validate_stages(config)
    return config


def _validate_recipe(config: ml_collections.ConfigDict) -> None:
    """The modern recipe's model options (llama only) and the muon optimizer's fields."""
    m, o = config.model, config.optim
    options = {field: m.get(field, off) for field, off in RECIPE_MODEL_OFF.items()}
    _choice(options["mlp_activation"], MLP_ACTIVATIONS, "model.mlp_activation")
    _positive(options["logit_softcap"], "model.logit_softcap", allow_zero=True)
    if m.name != "llama":
        for field, off in RECIPE_MODEL_OFF.items():
            if options[field] != off:
                raise ConfigError(f"model.{field} is {options[field]!r} but it is a llama option; set "
                                  f"model.name=llama or model.{field}={off!r}")
    if options["mlp_activation"] == "relu2" and config.moe.n_experts:
        raise ConfigError("model.mlp_activation=relu2 is for dense MLPs (the experts are SwiGLUs); set "
                          "moe.n_experts=0 or model.mlp_activation=swiglu")
    if o.name == "muon":
        _positive(o.muon_lr, "optim.muon_lr")
        _positive(o.muon_ns_steps, "optim.muon_ns_steps")
        _positive(o.muon_weight_decay, "optim.muon_weight_decay", allow_zero=True)
        _positive(o.muon_momentum_warmup_steps, "optim.muon_momentum_warmup_steps", allow_zero=True)
        for field in ("muon_momentum", "muon_momentum_start"):
            if not 0 <= o[field] < 1:
                raise ConfigError(f"optim.{field} is {o[field]}; it must be in [0, 1)")


def llama_incompatible_options(model_cfg) -> list[str]:
    """The recipe options of a `model` section that a Llama checkpoint (transformers' LlamaForCausalLM,
    llama.cpp's llama GGUF) cannot express, as "model.field=value"; zero-init and the head's init std only
    set initial values, so they are not listed."""
    return [f"model.{field}={model_cfg.get(field, off)!r}" for field, off in RECIPE_MODEL_OFF.items()
            if field != "zero_init_proj" and model_cfg.get(field, off) != off]


def _validate_moe(config: ml_collections.ConfigDict) -> None:
    e, m = config.moe, config.model
    _positive(e.n_experts, "moe.n_experts", allow_zero=True)
    if not e.n_experts:
        return
    _choice(e.mode, MOE_MODES, "moe.mode")
    if m.name != "llama":
        raise ConfigError(f"moe.n_experts is {e.n_experts} but mixture-of-experts MLPs are for llama; set model.name=llama or moe.n_experts=0")
    if not 1 <= e.top_k <= e.n_experts:
        raise ConfigError(f"moe.top_k is {e.top_k}; it must be between 1 and moe.n_experts ({e.n_experts})")
    if not 1 <= e.every <= m.n_layer:
        raise ConfigError(f"moe.every is {e.every}; it must be between 1 and model.n_layer ({m.n_layer})")
    _positive(e.capacity_factor, "moe.capacity_factor")
    _positive(e.group_size, "moe.group_size", allow_zero=True)
    if e.group_size and m.sequence_length % e.group_size:
        raise ConfigError(f"moe.group_size ({e.group_size}) must divide model.sequence_length ({m.sequence_length})")
    if e.mode == "capacity" and e.group_size and "finetune" in stage_names(config):
        # the finetune stage's batches are padded to multiples of its data's pad_multiple, at most max_length
        name = config.finetune.data if config.finetune.data in FINETUNE_DATA else "mathqa"
        q = config[name]
        lengths = {f"{name}.max_length": q.max_length or m.sequence_length, f"{name}.pad_multiple": q.pad_multiple}
        for path, length in lengths.items():
            if length and length % e.group_size:
                raise ConfigError(f"moe.group_size ({e.group_size}) must divide {path} ({length}), the lengths the "
                                  "finetune stage's batches are padded to; change one of them or set moe.group_size=0")
    for path in ("moe.aux_loss_coef", "moe.z_loss_coef"):
        _positive(e[path.split(".")[1]], path, allow_zero=True)


def _validate_qlora(config) -> None:
    """finetune.lora's quantize, init and loftq_iters (configs saved before they existed: defaults)."""
    lora = config.finetune.lora
    quantize, init = lora.get("quantize", "none"), lora.get("init", "default")
    _choice(quantize, LORA_QUANTIZE, "finetune.lora.quantize")
    _choice(init, LORA_INITS, "finetune.lora.init")
    if int(lora.get("loftq_iters", 1)) < 1:
        raise ConfigError(f"finetune.lora.loftq_iters is {lora.loftq_iters}; it must be at least 1")
    if quantize != "none" and not lora.rank:
        raise ConfigError(f"finetune.lora.quantize={quantize} stores the frozen base of a LoRA fine-tune; set "
                          "finetune.lora.rank > 0 (e.g. 16) or finetune.lora.quantize=none")
    if quantize != "none" and config.model.name != "llama":
        raise ConfigError(f"finetune.lora.quantize={quantize} is implemented for llama only; set finetune.lora.quantize=none")
    if quantize != "none" and config.moe.n_experts:
        raise ConfigError(f"finetune.lora.quantize={quantize} does not quantize mixture-of-experts weights (the "
                          "experts' stacked kernels would be dequantized whole); set moe.n_experts=0 or "
                          "finetune.lora.quantize=none")
    if init == "loftq" and quantize == "none":
        raise ConfigError("finetune.lora.init=loftq fits the adapters to the quantization error, so it needs "
                          "finetune.lora.quantize=nf4 or int8; use finetune.lora.init=default without quantization")


def _validate_stages(config) -> None:
    """The stage list, the mathqa section, LoRA, and the finetune stage's own optim/train values."""
    names = stage_names(config)
    for name in names:
        _choice(name, STAGES, "stages")
    if not names or len(set(names)) != len(names) or names != [s for s in STAGES if s in names]:
        raise ConfigError(f"config field 'stages' is '{config.stages}'; list each of {', '.join(STAGES)} at most "
                          f"once, in that order")
    q, lora = config.mathqa, config.finetune.lora
    _choice(q.source, MATHQA_SOURCES, "mathqa.source")
    if q.source == "local" and not q.path and not pathlib.Path(q.train_split).exists():
        raise ConfigError("mathqa.source is 'local' but mathqa.path is empty; set --config.mathqa.path to a folder "
                          "such as ../shared/data/mathqa")
    for path, value in (("mathqa.synthetic_problems", q.synthetic_problems),
                        ("mathqa.eval_batch_size", q.eval_batch_size), ("finetune.lora.alpha", lora.alpha)):
        _positive(value, path)
    for path, value in (("mathqa.max_length", q.max_length), ("mathqa.eval_max_length", q.eval_max_length),
                        ("mathqa.pad_multiple", q.pad_multiple),
                        ("mathqa.eval_questions", q.eval_questions), ("finetune.lora.rank", lora.rank)):
        _positive(value, path, allow_zero=True)
    if not 0 < q.val_fraction < 1:
        raise ConfigError(f"mathqa.val_fraction is {q.val_fraction}; it must be in (0, 1)")
    positions = config.model.sequence_length
    for path, value in (("mathqa.max_length", q.max_length), ("mathqa.eval_max_length", q.eval_max_length)):
        if config.model.name == "gpt2" and value > positions:
            raise ConfigError(f"{path} ({value}) exceeds gpt2's {positions} learned positions; set it to at most "
                              f"{positions} or use model.name=llama, whose RoPE has no length limit")
    for shots in q.eval_shots.split(","):
        if shots.strip() and not shots.strip().isdigit():
            raise ConfigError(f"mathqa.eval_shots is '{q.eval_shots}'; write shot counts like '0,5'")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"finetune.lora.dropout is {lora.dropout}; it must be in [0, 1)")
    targets = [x.strip() for x in lora.targets.split(",") if x.strip()]
    for target in targets:
        _choice(target, LORA_TARGETS, "finetune.lora.targets")
    if lora.rank and not targets:
        raise ConfigError("finetune.lora.targets is empty; name some of q,k,v,o,gate,up,down")
    if lora.rank and config.model.name != "llama":
        raise ConfigError("LoRA (finetune.lora.rank > 0) is implemented for llama only; set finetune.lora.rank=0")
    if lora.rank and lora.dropout and config.moe.n_experts and {"gate", "up", "down"} & set(targets):
        raise ConfigError(f"finetune.lora.dropout ({lora.dropout}) cannot reach the adapters of mixture-of-experts "
                          "kernels (gate, up, down adapt the expert weights themselves); set finetune.lora.dropout=0 "
                          "or finetune.lora.targets=q,k,v,o")
    _validate_sft(config, "finetune" in names)
    _validate_qlora(config)
    if "finetune" in names:
        if "pretrain" not in names and not config.finetune.init_from:
            raise ConfigError("stages has finetune without pretrain, so finetune.init_from must name a checkpoint "
                              "(a workdir, its checkpoints/ folder or a step folder)")
        staged = stage_config(config, "finetune")
        staged.stages = "pretrain"  # its own optim/train are checked as a plain run's
        try:
            validate(staged)
        except ConfigError as error:
            raise ConfigError(f"in the finetune stage (finetune.optim / finetune.train): {error}") from None


def _validate_sft(config, finetuning: bool) -> None:
    """finetune.data, finetune.packing and the sft section (its path only when a finetune stage reads it)."""
    f, s, m = config.finetune, config.sft, config.model
    _choice(f.data, FINETUNE_DATA, "finetune.data")
    _choice(s.source, SFT_SOURCES, "sft.source")
    _choice(s.template, SFT_TEMPLATES, "sft.template")
    for path, value in (("sft.max_length", s.max_length), ("sft.pad_multiple", s.pad_multiple),
                        ("sft.max_rows", s.max_rows)):
        _positive(value, path, allow_zero=True)
    if not 0 < s.val_fraction < 1:
        raise ConfigError(f"sft.val_fraction is {s.val_fraction}; it must be in (0, 1)")
    if m.name == "gpt2" and s.max_length > m.sequence_length:
        raise ConfigError(f"sft.max_length ({s.max_length}) exceeds gpt2's {m.sequence_length} learned positions; "
                          f"set it to at most {m.sequence_length}")
    if f.packing and m.name != "llama":
        raise ConfigError("finetune.packing is for llama (gpt2's learned positions and attention take no segment "
                          "ids); set finetune.packing=false")
    if finetuning and f.data == "sft" and not s.path:
        where = "a dataset name" if s.source == "hub" else "a .jsonl/.json/.parquet file or a folder of them"
        raise ConfigError(f"finetune.data is 'sft' but sft.path is empty; set --config.sft.path to {where}")


def _divisor_near(n: int, k: int) -> int:
    divisors = [x for x in range(1, n + 1) if n % x == 0]
    return min(divisors, key=lambda x: (abs(x - k), x))


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as stable, indented JSON (written to the workdir)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
