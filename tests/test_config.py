"""The config schema: presets load, overrides parse by type, mistakes get one sentence naming the field."""

import pytest

from jaxllm import config as config_lib
from jaxllm.config import ConfigError


@pytest.mark.parametrize("name", ["tiny", "baseline", "llama", "wide"])
def test_presets_load_and_validate(name):
    config = config_lib.load_config(f"configs/{name}.py")
    assert config_lib.from_json(config_lib.to_json(config)).to_dict() == config.to_dict()


def test_wide_is_the_2024_winner():
    c = config_lib.load_config("configs/wide.py")
    assert (c.model.name, c.model.n_layer, c.model.n_embd, c.model.n_head) == ("llama", 10, 1024, 16)
    # The reference's 64 x 4 x 512 tokens per step, as micro-batches that fit a 40 GB card.
    assert (c.train.batch_size * c.train.grad_accum, c.model.sequence_length) == (64 * 4, 512)
    assert c.train.batch_size * c.train.grad_accum == c.finetune.train.batch_size * c.finetune.train.grad_accum
    assert (c.optim.lr, c.optim.grad_clip, c.optim.schedule, c.train.steps) == (1.25e-3, 1.0, "cos", 10000)
    assert c.data.path == "DKYoon/SlimPajama-6B" and c.train.max_duration_s == 3 * 3600


def test_overrides_are_parsed_by_field_type():
    c = config_lib.apply_overrides(config_lib.default_config(), [
        "model.n_layer=3", "optim.lr=2e-4", "train.progress=false", "data.path=x=y", "train.steps=1e3"])
    assert c.model.n_layer == 3 and isinstance(c.model.n_layer, int)
    assert c.optim.lr == 2e-4 and c.train.progress is False and c.data.path == "x=y" and c.train.steps == 1000


@pytest.mark.parametrize("override, message", [
    ("model.n_layers=2", "did you mean 'model.n_layer'"),
    ("modle.n_layer=2", "did you mean 'model'"),
    ("model.n_layer=two", "'model.n_layer' is an integer"),
    ("train.progress=maybe", "true/false"),
    ("model=3", "is a section"),
    ("model.n_layer", "has no value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_lib.apply_overrides(config_lib.default_config(), [override])


@pytest.mark.parametrize("override, message", [
    ("model.name=gpt3", "choose one of llama, gpt2"),
    ("model.n_head=5", "divisible by model.n_head"),
    ("model.n_kv_head=5", "multiple of model.n_kv_head"),
    ("train.steps=0", "'train.steps' is 0; it must be > 0"),
    ("optim.warmup_pct=1.5", "warmup_pct"),
    ("model.dtype=float16", "choose one of float32, bfloat16"),
])
def test_bad_values(override, message):
    c = config_lib.apply_overrides(config_lib.default_config(), [override])
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c)


def test_unknown_field_in_a_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from jaxllm.config import default_config\n"
                    "def get_config():\n    c = default_config()\n    c.optim.learning_rate = 1.0\n    return c\n")
    with pytest.raises(ConfigError, match="unknown config field 'optim.learning_rate'"):
        config_lib.load_config(str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load_config("configs/nope.py")
