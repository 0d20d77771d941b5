"""The speed levers keep the numbers: fused chunked LM head + loss = plain path, bf16 close to f32, and the
benchmark and MFU report what they claim."""

import importlib.util
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import hardware, loss as loss_lib, models, optim, sharding, stage as stage_lib, step as step_lib
from jaxllm import train as train_lib
from jaxllm.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent


def small_config(tmp_path=None, **overrides):
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head = 2, 64, 4
    c.model.vocab_size, c.model.sequence_length = 320, 32
    c.data.source, c.data.tokenizer = "synthetic", "byte"
    c.data.synthetic_documents, c.data.num_proc = 300, 1
    if tmp_path is not None:
        c.data.cache_dir = str(tmp_path / "cache")
    c.optim.lr = 3e-3
    c.train.steps, c.train.batch_size, c.train.grad_accum = 8, 8, 1
    c.train.log_every, c.train.eval_every, c.train.eval_batches = 1, 8, 2
    c.train.checkpoint_every, c.train.num_devices, c.train.progress = 8, 1, False
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return config_lib.validate(c)


# --- fused, chunked LM head + cross-entropy -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [pytest.param(7, marks=pytest.mark.slow), 24, 64])  # 7, 24: padded chunks count 0
def test_chunked_cross_entropy_equals_plain_sums_and_grads(chunk):
    b, l, d, v = 3, 16, 8, 50
    keys = jax.random.split(jax.random.key(0), 4)
    hidden_BxLxD = jax.random.normal(keys[0], (b, l, d))
    head_DxV = jax.random.normal(keys[1], (d, v))
    targets_BxL = jax.random.randint(keys[2], (b, l), 0, v)
    weights_BxL = (jax.random.uniform(keys[3], (b, l)) > 0.3).astype(jnp.float32)
    options = dict(label_smoothing=0.1, z_loss=1e-3)

    def plain(h, w):
        return loss_lib.cross_entropy(jnp.einsum("bld,dv->blv", h, w), targets_BxL, weights_BxL, **options)

    def chunked(h, w):
        return loss_lib.chunked_cross_entropy(h, w, targets_BxL, weights_BxL, chunk=chunk, **options)

    for want, got in zip(plain(hidden_BxLxD, head_DxV), chunked(hidden_BxLxD, head_DxV)):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    grad = jax.grad(lambda h, w, f: f(h, w).loss, argnums=(0, 1))
    fused_grads = jax.jit(grad, static_argnums=2)(hidden_BxLxD, head_DxV, chunked)
    for want, got in zip(grad(hidden_BxLxD, head_DxV, plain), fused_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Only `loss` carries a gradient; the reported sums are under stop_gradient, as documented.
    nll_grad = jax.grad(lambda h: chunked(h, head_DxV).nll)(hidden_BxLxD)
    assert not np.any(nll_grad)


@pytest.mark.slow
def test_chunked_cross_entropy_bf16_hidden_keeps_float32_head_grad():
    hidden_BxLxD = jax.random.normal(jax.random.key(0), (2, 8, 16)).astype(jnp.bfloat16)
    head_DxV = jax.random.normal(jax.random.key(1), (16, 40))
    targets_BxL, weights_BxL = jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8))
    grads = jax.grad(lambda h, w: loss_lib.chunked_cross_entropy(h, w, targets_BxL, weights_BxL, chunk=4).loss,
                     argnums=(0, 1))(hidden_BxLxD, head_DxV)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
    want = jax.grad(lambda w: loss_lib.cross_entropy(
        jnp.einsum("bld,dv->blv", hidden_BxLxD, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32),
        targets_BxL, weights_BxL).loss)(head_DxV)
    np.testing.assert_allclose(grads[1], want, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("transposed_head", [False, True])
@pytest.mark.parametrize("chunk", [128, 32])  # one chunk, four chunks
def test_chunked_cross_entropy_bf16_at_model_sizes(transposed_head, chunk):
    """bf16 at sizes where XLA:CPU's fast dot kernels engage (a folded transpose once sent a bf16 dot to a
    fallback that could not run it), with the head stored [D, V] (untied) or as an embedding's transpose
    (tied): the fused sums and gradients track the float32 plain path."""
    b, l, d, v = 2, 64, 64, 320
    keys = jax.random.split(jax.random.key(0), 3)
    hidden_BxLxD = jax.random.normal(keys[0], (b, l, d))
    table = jax.random.normal(keys[1], (v, d) if transposed_head else (d, v)) * 0.1
    targets_BxL = jax.random.randint(keys[2], (b, l), 0, v)
    weights_BxL = jnp.ones((b, l))

    def head(table):
        return table.T if transposed_head else table

    def fused(h, t):
        return loss_lib.chunked_cross_entropy(h.astype(jnp.bfloat16), head(t), targets_BxL, weights_BxL, chunk=chunk)

    def plain(h, t):
        return loss_lib.cross_entropy(jnp.einsum("bld,dv->blv", h, head(t)), targets_BxL, weights_BxL)

    got, got_grads = jax.jit(jax.value_and_grad(lambda h, t: fused(h, t).loss, argnums=(0, 1)))(hidden_BxLxD, table)
    want, want_grads = jax.value_and_grad(lambda h, t: plain(h, t).loss, argnums=(0, 1))(hidden_BxLxD, table)
    np.testing.assert_allclose(got, want, rtol=1e-2)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=5e-2, atol=5e-3 * float(jnp.max(jnp.abs(w))))


@pytest.mark.parametrize("name,tie", [("llama", True), ("llama", False), ("gpt2", True)])
def test_hidden_times_head_matrix_is_the_logits(name, tie):
    c = small_config(**{"model.name": name, "model.tie_embeddings": tie})
    model = models.build_model(c.model)
    tokens_BxL = jnp.arange(2 * 32).reshape(2, 32) % 320
    params = model.init(jax.random.key(0), tokens_BxL)["params"]
    logits_BxLxV = model.apply({"params": params}, tokens_BxL)
    hidden_BxLxD = model.apply({"params": params}, tokens_BxL, return_hidden=True)
    head_DxV = models.lm_head_matrix(params, c.model)
    assert hidden_BxLxD.shape == (2, 32, 64) and head_DxV.shape == (64, 320)
    np.testing.assert_allclose(hidden_BxLxD @ head_DxV, logits_BxLxV, rtol=1e-5, atol=1e-5)


def _one_step(config):
    model = models.build_model(config.model)
    optimizer = optim.make_optimizer(config)
    step = jax.jit(step_lib.make_train_step(model, optimizer, optim.make_schedule(config), config))
    state = step_lib.init_state(model, optimizer, config)
    tokens = jax.random.randint(jax.random.key(1), (2, 4, 33), 0, 320)  # grad_accum 2 micro-batches of 4
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "weights": jnp.ones((2, 4, 32))}
    return step(state, batch)


@pytest.mark.slow
def test_train_step_with_head_chunk_matches_plain_step():
    # SGD, so the updated params compare the gradients themselves: AdamW's first step divides each gradient
    # by its own magnitude, which turns float32 summation-order noise in a near-zero gradient into a
    # visible difference.
    overrides = {"train.grad_accum": 2, "loss.label_smoothing": 0.1, "loss.z_loss": 1e-4, "optim.name": "sgd"}
    plain_state, plain_metrics = _one_step(small_config(**overrides))
    fused_state, fused_metrics = _one_step(small_config(**overrides, **{"loss.head_chunk": 48}))
    for name in ("loss", "objective", "accuracy", "grad_norm"):
        np.testing.assert_allclose(fused_metrics[name], plain_metrics[name], rtol=1e-5)
    for want, got in zip(jax.tree.leaves(plain_state.params), jax.tree.leaves(fused_state.params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bf16_run_losses_within_tolerance_of_f32(tmp_path):
    """bf16 matmuls (float32 params, residual stream, norms, softmax and loss) track the float32 run: every
    logged train loss of an 8-step tiny run within 0.003 nats (measured 2026-12-02: at most 5.5e-4 with the
    float32 stream, 3.7e-4 with residual_dtype=compute; both at the noise level of 8 steps)."""
    train_lib.train(small_config(tmp_path), tmp_path / "f32")
    train_lib.train(small_config(tmp_path, **{"model.dtype": "bfloat16", "loss.head_chunk": 64}), tmp_path / "bf16")
    rows = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"]
            for name in ("f32", "bf16")}
    f32 = np.array([r["loss"] for r in rows["f32"]])
    bf16 = np.array([r["loss"] for r in rows["bf16"]])
    assert len(f32) == len(bf16) == 8
    assert f32[-1] < f32[0] - 0.5  # it learns, so the comparison is not between two constants
    np.testing.assert_allclose(bf16, f32, atol=0.003)
    assert not np.array_equal(bf16, f32)  # bf16 really ran
    # The loop logs MFU next to throughput (the first row includes compilation in no interval: nan); their
    # values against hand-computed rates: tests/test_loop.py, on a fake clock.
    later = rows["f32"][2:]
    assert all(r["mfu"] > 0 and r["tokens_per_s"] > 0 for r in later)


# --- peak FLOP/s, MFU, the benchmark --------------------------------------------------------------------


def test_peak_flops_table_by_precision_for_known_gpus_and_measured_on_cpu(monkeypatch):
    fake = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    with monkeypatch.context() as patch:
        patch.setattr(jax, "devices", lambda *a: [fake])
        assert hardware.peak_flops("bfloat16", n_devices=2) == (2 * 989e12, "table:h100-bfloat16")
        # A float32 run's dots use TF32 tensor cores under XLA's default precision: half the bf16 peak, not it.
        assert hardware.peak_flops("float32") == (494.5e12, "table:h100-tf32")
        with jax.default_matmul_precision("highest"):  # true float32 on the CUDA cores
            assert hardware.peak_flops("float32") == (67e12, "table:h100-float32")
        fake.device_kind = "NVIDIA A100-SXM4-40GB"
        assert hardware.peak_flops("bfloat16") == (312e12, "table:a100-bfloat16")
        assert hardware.peak_flops("float32", n_devices=4) == (4 * 156e12, "table:a100-tf32")
    flops, source = hardware.peak_flops("float32", n_devices=4)
    assert source == "measured:matmul-float32" and 1e8 < flops < 1e14
    assert hardware.peak_flops("float32", n_devices=4)[0] == flops  # cached: one measurement per process


def test_mfu_by_hand():
    # 20,000 tokens/s of a 1.5 GFLOP/token model on one A100 in float32 (TF32, 156 TFLOP/s): 3e13 / 1.56e14.
    assert hardware.mfu(20_000.0, 1.5e9, 156e12) == pytest.approx(0.19230769230769232, rel=1e-12)
    assert hardware.mfu(1000.0, 1e8, 1e12) == pytest.approx(0.1, rel=1e-12)
    assert np.isnan(hardware.mfu(1000.0, 1e8, 0.0)) and np.isnan(hardware.mfu(1000.0, 0.0, 1e12))


def _load_script(name):
    """scripts/NAME.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prints_the_issue_json_line(capsys):
    bench = _load_script("bench")
    code = bench.main(["--config", str(ROOT / "configs" / "bench_cpu.py"), "--steps", "3", "--warmup", "1",
                       "--config.model.n_layer=1", "--config.model.n_embd=64", "--config.model.vocab_size=320",
                       "--config.model.sequence_length=32", "--config.train.batch_size=4",
                       "--config.loss.head_chunk=0"])  # the plain head: its dots are the model's (no recompute)
    assert code == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert list(line) == ["tokens_per_s", "step_ms", "compile_s", "flops_per_token", "mfu", "peak_memory_mb",
                          "device", "jax", "params_mb", "trainable_mb", "opt_state_mb", "mesh", "params_mb_per_device",
                          "trainable_mb_per_device", "opt_state_mb_per_device", "xla_flops_per_device",
                          "matmul_flops_per_device", "collective_bytes", "collective_counts", "input_share"]
    assert line["mesh"] == "data:1,fsdp:1,tensor:1"  # bench_cpu: one device
    assert line["params_mb_per_device"] == line["params_mb"] and line["opt_state_mb_per_device"] == line["opt_state_mb"]
    assert line["collective_bytes"]["all-reduce"] == 0  # one device: nothing to exchange
    assert 0 < line["input_share"] <= 1  # the step time includes the batch
    assert set(line["step_ms"]) == {"median", "min", "max"}
    assert line["step_ms"]["min"] <= line["step_ms"]["median"] <= line["step_ms"]["max"]
    assert line["tokens_per_s"] == pytest.approx(4 * 32 / (line["step_ms"]["median"] / 1e3), rel=1e-2)  # step_ms is rounded
    # FLOPs per token by hand for llama 1L, d 64, SwiGLU hidden 256, vocab 320, T 32: non-embedding params
    # 4 d^2 + 3 x 256 d + 2 d (norm scales) + d (final norm) = 65,728, LM head V d = 20,480, so
    # 6 x (65,728 + 20,480) + 6 x 1 x 32 x 64 (causal attention, halved) = 529,536.
    d, layers, t = 64, 1, 32
    assert line["flops_per_token"] == 6 * (4 * d * d + 3 * 256 * d + 2 * d + d + 320 * d) + 6 * layers * t * d
    # XLA's count of the compiled step's dots (hlo.matmul_flops) is the same work, less the norm scales
    # (elementwise, not dots), plus the masked half of the attention scores that XLA computes anyway.
    norm_scales = layers * 2 * d + d
    assert line["matmul_flops_per_device"] == 4 * 32 * (line["flops_per_token"] - 6 * norm_scales + 6 * layers * t * d)
    assert 0 < line["mfu"] and line["peak_memory_mb"] > 0 and line["compile_s"] > 0
    assert line["jax"] == jax.__version__ and line["device"].startswith("cpu:")
    assert "input pipeline" in captured.err


def test_bench_cpu_config_is_the_issue_model():
    c = config_lib.load_config(str(ROOT / "configs" / "bench_cpu.py"))
    m = c.model
    assert (m.name, m.n_layer, m.n_embd, m.n_head, m.vocab_size, m.sequence_length) == ("llama", 4, 256, 4, 50304, 256)
    assert (c.train.batch_size, c.train.grad_accum, c.optim.name) == (8, 1, "adamw")


def test_bench_compile_only_reports_memory(capsys):
    bench = _load_script("bench")
    assert bench.main(["--config", str(ROOT / "configs" / "bench_cpu.py"), "--compile_only",
                       "--config.model.n_layer=1", "--config.model.n_embd=64", "--config.model.vocab_size=320",
                       "--config.model.sequence_length=32"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    params_mb = 4 * models.param_count(config_lib.load_config(str(ROOT / "configs" / "bench_cpu.py"), [
        "model.n_layer=1", "model.n_embd=64", "model.vocab_size=320", "model.sequence_length=32"]).model) / 2**20
    assert line["argument_mb"] >= 3 * params_mb  # params + AdamW's two moments, all float32
    assert line["temp_mb"] > 0 and line["total_mb"] >= line["argument_mb"]
    assert line["params_mb"] == line["trainable_mb"] == round(params_mb, 1)
    assert line["opt_state_mb"] == pytest.approx(2 * params_mb, abs=0.1)  # AdamW's two moments (+ its step count)


def test_bench_finetune_stage_reports_lora_and_qlora_state_sizes(capsys):
    """`--stage finetune`: the fine-tune stage's step, LoRA adapters trained, the base frozen (and quantized)."""
    bench = _load_script("bench")
    dims = ["--config.model.n_layer=2", "--config.model.n_embd=256", "--config.model.vocab_size=320",
            "--config.model.sequence_length=32", "--config.finetune.train.batch_size=2",
            "--config.finetune.train.num_devices=1"]
    lines = {}
    for quantize in ("none", "nf4"):
        assert bench.main(["--config", str(ROOT / "configs" / "bench_cpu.py"), "--stage", "finetune", "--compile_only",
                           *dims, "--config.finetune.lora.rank=8", f"--config.finetune.lora.quantize={quantize}"]) == 0
        lines[quantize] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lora, qlora = lines["none"], lines["nf4"]
    # rank 8 on the seven projections of 2 layers of d=256 (SwiGLU 768): 2 * 8 * (4*(256+256) + 3*(256+768)) weights
    adapters_mb = 4 * 2 * 8 * (4 * 512 + 3 * 1024) / 2**20
    assert lora["trainable_mb"] == qlora["trainable_mb"] == round(adapters_mb, 1)
    assert qlora["opt_state_mb"] == lora["opt_state_mb"] == pytest.approx(2 * adapters_mb, abs=0.1)
    # NF4 stores the 2 * (4 * 256^2 + 3 * 256 * 768) projection weights in ~4.1 bits instead of 32
    projections_mb = 4 * 2 * (4 * 256 * 256 + 3 * 256 * 768) / 2**20
    assert lora["params_mb"] - qlora["params_mb"] == pytest.approx(projections_mb * (1 - 4.127 / 32), abs=0.1)


PER_DEVICE_DIMS = ["model.n_layer=1", "model.n_embd=64", "model.n_head=4", "model.vocab_size=320",
                   "model.sequence_length=32", "train.batch_size=4", "train.num_devices=4"]


def test_bench_per_device_state_follows_the_mesh():
    """On 4 devices, fsdp:4 leaves each device a quarter of every matrix and the whole of each norm scale;
    data:4 the whole state. bench's per-device figures come from the shardings (no array needed, as under
    --compile_only); on fsdp:4 they equal the bytes of the real arrays' shards on one device."""
    bench = _load_script("bench")
    per_device, whole = {}, None
    for spec in ("data:4", "fsdp:4"):
        config = config_lib.load_config(str(ROOT / "configs" / "bench_cpu.py"), [*PER_DEVICE_DIMS, f"train.mesh={spec}"])
        mesh = bench.make_mesh(config)
        model, optimizer, _, fresh = bench.step_parts(config)
        abstract, placed = stage_lib.state_shardings(config, model, optimizer, mesh)
        per_device[spec] = {part: bench.bytes_per_device(getattr(abstract, part), getattr(placed, part))
                            for part in ("params", "opt_state")}
        sizes = bench.state_sizes(abstract, placed, mesh)
        assert sizes["mesh"] == sharding.describe(mesh)
        assert sizes["params_mb_per_device"] == round(per_device[spec]["params"] / 2**20, 1)
        whole = abstract.params
    state = jax.jit(fresh, out_shardings=placed)()  # fsdp:4's real arrays
    for part in ("params", "opt_state"):
        assert per_device["fsdp:4"][part] == sharding.tree_bytes_per_device(getattr(state, part)), part
    # By hand: llama 1L, d 64: three norm scales of 64 floats, everything else a matrix split 4 ways over fsdp.
    norms = 3 * 64 * 4
    matrices = 4 * models.param_count(config.model) - norms
    assert per_device["data:4"]["params"] == sum(leaf.size * 4 for leaf in jax.tree.leaves(whole)) == matrices + norms
    assert per_device["fsdp:4"]["params"] == matrices // 4 + norms
    # AdamW's two moments shaped like the params (plus a few replicated step counters).
    for spec, sizes in per_device.items():
        assert 0 <= sizes["opt_state"] - 2 * sizes["params"] <= 64, spec


@pytest.mark.slow
def test_bench_compile_only_memory_is_per_device(capsys):
    """XLA's memory analysis of the compiled fsdp:4 step is one device's program: its arguments are that
    device's shards of the state and its rows of the batch, a quarter of data:4's (the whole state)."""
    bench = _load_script("bench")
    lines = {}
    for spec in ("data:4", "fsdp:4"):
        assert bench.main(["--config", str(ROOT / "configs" / "bench_cpu.py"), "--compile_only", "--num_devices", "4",
                           "--mesh", spec, *[f"--config.{item}" for item in PER_DEVICE_DIMS[:-1]],
                           "--config.model.n_embd=256"]) == 0  # ~11 MiB of state: MiB figures to 1 part in 25
        lines[spec] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data, fsdp = lines["data:4"], lines["fsdp:4"]
    assert (data["mesh"], fsdp["mesh"]) == ("data:4,fsdp:1,tensor:1", "data:1,fsdp:4,tensor:1")
    assert data["params_mb_per_device"] == data["params_mb"] and fsdp["params_mb_per_device"] < data["params_mb"] / 2
    for line in (data, fsdp):  # state + batch rows ([1, 1, 32] x 3, 384 bytes) + step counter (+ rounding)
        state_mb = line["params_mb_per_device"] + line["opt_state_mb_per_device"]
        assert line["argument_mb"] == pytest.approx(state_mb, abs=0.15), line
    assert fsdp["argument_mb"] < 0.4 * data["argument_mb"]


TINY_BENCH = ["model.n_layer=1", "model.n_embd=64", "model.vocab_size=320", "model.sequence_length=32",
              "train.batch_size=4", "loss.head_chunk=0"]


def test_bench_levers_times_variants_round_robin_against_the_first(capsys):
    """scripts/bench_levers.py builds every variant through bench.build and prints one line each, the
    first variant's ratio 1 and every ratio its tokens/s over the first's."""
    levers = _load_script("bench_levers")
    tiny = ",".join(TINY_BENCH)
    code = levers.main(["--config", str(ROOT / "configs" / "bench_cpu.py"), "--rounds", "2", "--warmup", "1",
                        "--variant", f"base:{tiny}", "--variant", f"qk:{tiny},model.qk_norm=true"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["variant"] for line in lines] == ["base", "qk"]
    assert lines[0]["ratio"] == 1.0
    assert lines[1]["ratio"] == pytest.approx(lines[1]["tokens_per_s"] / lines[0]["tokens_per_s"], abs=1e-3)
    assert all(np.isfinite(line["loss"]) for line in lines)


def test_profile_step_attributes_the_step_time_to_ops(capsys):
    """scripts/profile_step.py profiles the real step (bench.build's) and attributes op time to kinds of
    instruction, with the dot dtypes of the compiled step."""
    profile = _load_script("profile_step")
    code = profile.main(["--config", str(ROOT / "configs" / "bench_cpu.py"), "--steps", "1", "--top", "3",
                         "--config.model.dtype=float32", *(f"--config.{item}" for item in TINY_BENCH)])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wall ") and "ms/step" in out[0]
    assert out[1].startswith("by root instruction (ms/step): ") and "dot" in out[1]
    assert out[2].startswith("dot operand dtypes: f32 x f32: ")
    assert len(out) == 3 + 3  # the three slowest ops
