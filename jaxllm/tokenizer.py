"""Tokenizers: text -> token ids (python ints) and back.

Two tokenizers share one small interface (`name`, `n_vocab`, `eot_id`, `encode`, `encode_batch`, `decode`):

- "gpt2": GPT-2 BPE through tiktoken (r50k_base, 50257 ids, end-of-text 50256), the reference tokenizer.
  It is built offline from a local `gpt2.tiktoken` file; see `gpt2_file` for where that file comes from.
- "byte": UTF-8 bytes 0..255 plus end-of-text 256 (257 ids), for fast tests without any download.

`encode` is tiktoken's `encode_ordinary`: no end-of-text is added and special-token text such as
"<|endoftext|>" inside a document is encoded as plain text. The data pipeline appends `eot_id` itself.
Tokenizers are small values that cross process boundaries cheaply (the BPE tables are rebuilt lazily in
each process), so prepare's tokenizer workers (jaxllm/data/encode.py) receive them as arguments.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import threading

import tiktoken

TOKENIZER_NAMES = ("gpt2", "byte")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_ENV = "JAXLLM_GPT2_TIKTOKEN"
GPT2_EOT = 50256
GPT2_N_VOCAB = 50257
# The same file tiktoken downloads for r50k_base ships inside this MIT-licensed sdist (we never install it).
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
PIP_COMMAND = f"pip download --no-deps --no-binary :all: {WHISPER_SDIST}"
# The known ids of a short string: a wrong merge table would still load, so check it once.
GPT2_PROBE = ("hello world", [31373, 995])


class TokenizerError(RuntimeError):
    """A tokenizer cannot be built; the message says what is wrong and what to do."""


def cache_dir() -> pathlib.Path:
    """jaxllm's cache folder: $JAXLLM_CACHE, else ~/.cache/jaxllm (not created here)."""
    return pathlib.Path(os.environ.get("JAXLLM_CACHE") or pathlib.Path.home() / ".cache" / "jaxllm").expanduser()


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_gpt2_file(path: pathlib.Path, origin: str) -> pathlib.Path:
    if not path.is_file():
        raise TokenizerError(f"the gpt2 BPE file {path} (from {origin}) does not exist; "
                             f"point {origin} at a gpt2.tiktoken file or unset it")
    digest = _sha256(path)
    if digest != GPT2_SHA256:
        raise TokenizerError(f"the gpt2 BPE file {path} (from {origin}) has sha256 {digest}, not {GPT2_SHA256}; "
                             f"replace it with the gpt2.tiktoken from {WHISPER_SDIST}")
    return path


def _download_gpt2_file(target: pathlib.Path) -> pathlib.Path | None:
    """Fetch gpt2.tiktoken out of the openai-whisper sdist with pip into `target`; None if that fails."""
    with tempfile.TemporaryDirectory(prefix="jaxllm-whisper-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--timeout", "30", "--retries", "1", WHISPER_SDIST, "-d", tmp]
        try:
            # Short network timeouts: offline machines should fall through quickly, not hang.
            subprocess.run(command, check=True, capture_output=True, timeout=600)
            sdist = next(pathlib.Path(tmp).glob("openai_whisper-*.tar.gz"))
            with tarfile.open(sdist, "r:gz") as archive:
                member = next(m for m in archive.getmembers() if m.name.endswith("/" + WHISPER_MEMBER))
                data = archive.extractfile(member).read()
        except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError):
            return None
    if hashlib.sha256(data).hexdigest() != GPT2_SHA256:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, target)  # atomic: a killed download never leaves a half file under the real name
    return target


def gpt2_file(path: str = "") -> pathlib.Path | None:
    """The local gpt2.tiktoken to use, checked against its sha256; None means "use tiktoken's own download".

    Order: the explicit `path`; $JAXLLM_GPT2_TIKTOKEN; `cache_dir()/gpt2.tiktoken`; a fresh copy pulled from
    the openai-whisper sdist with pip (PyPI is reachable where the BPE host is not) and stored in the cache.
    """
    if path:
        return _check_gpt2_file(pathlib.Path(path).expanduser(), "the tokenizer path argument")
    if os.environ.get(GPT2_ENV):
        return _check_gpt2_file(pathlib.Path(os.environ[GPT2_ENV]).expanduser(), f"${GPT2_ENV}")
    cached = cache_dir() / "gpt2.tiktoken"
    if cached.is_file():
        if _sha256(cached) == GPT2_SHA256:
            return cached
        cached.unlink()  # a corrupt cached copy is ours to replace
    return _download_gpt2_file(cached)


@functools.lru_cache(maxsize=4)
def _gpt2_encoding(file: str) -> tiktoken.Encoding:
    """Build (once per process and file) the r50k encoding; file "" = tiktoken.get_encoding("gpt2")."""
    if not file:
        return tiktoken.get_encoding("gpt2")
    from tiktoken_ext.openai_public import r50k_pat_str

    # Parsed here rather than by tiktoken.load.load_tiktoken_bpe: that helper also copies local files into a
    # temp cache keyed by path, which could serve a stale copy after the file changes. The hash is checked
    # by gpt2_file already.
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in pathlib.Path(file).read_bytes().splitlines() if line)}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_N_VOCAB)


def _tiktoken_gpt2_or_none(timeout_s: float = 60.0) -> tiktoken.Encoding | None:
    """tiktoken's own gpt2 (network or its cache); None if it fails or hangs past `timeout_s`."""
    result = []

    def target():
        try:
            result.append(_gpt2_encoding(""))
        except Exception:  # any download/parse failure just means "not available"
            pass

    # A daemon thread: an offline machine with a black-holed network must not hang the caller.
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else None


@dataclasses.dataclass(frozen=True)
class BPETokenizer:
    """GPT-2 BPE (tiktoken r50k_base). `file` is the gpt2.tiktoken used ("" = tiktoken's own copy)."""

    file: str = ""
    name: str = "gpt2"
    n_vocab: int = GPT2_N_VOCAB
    eot_id: int = GPT2_EOT

    @property
    def encoding(self) -> tiktoken.Encoding:
        return _gpt2_encoding(self.file)

    def encode(self, text: str) -> list[int]:
        """Ordinary BPE ids of `text`; no end-of-text added, special tokens treated as plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and end-of-text 256 (257 ids)."""

    name: str = "byte"
    n_vocab: int = 257
    eot_id: int = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`; no end-of-text added."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids) -> str:
        """Text of the byte ids; end-of-text and out-of-range ids are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


Tokenizer = BPETokenizer | ByteTokenizer


def get_tokenizer(name: str, path: str = "") -> Tokenizer:
    """The tokenizer called `name` ("gpt2" or "byte"); `path` is an optional local gpt2.tiktoken file."""
    if name == "byte":
        return ByteTokenizer()
    if name != "gpt2":
        raise TokenizerError(f"unknown tokenizer '{name}'; choose one of {', '.join(TOKENIZER_NAMES)}")
    file = gpt2_file(path)
    if file is None:
        # Last resort, after every local option: tiktoken downloads from its own host (works online only).
        if _tiktoken_gpt2_or_none() is None:
            raise TokenizerError(
                f"cannot find the gpt2 BPE file; set {GPT2_ENV}=/path/to/gpt2.tiktoken (sha256 {GPT2_SHA256[:12]}...), "
                f"or get it with `{PIP_COMMAND}` (file {WHISPER_MEMBER} inside the sdist) when PyPI is reachable")
        tokenizer = BPETokenizer(file="")
    else:
        tokenizer = BPETokenizer(file=str(file.resolve()))
    got = tokenizer.encode(GPT2_PROBE[0])
    if got != GPT2_PROBE[1]:
        raise TokenizerError(f"the gpt2 tokenizer encodes {GPT2_PROBE[0]!r} as {got}, not {GPT2_PROBE[1]}; "
                             f"the BPE file {tokenizer.file or '(tiktoken)'} is wrong, replace it")
    return tokenizer
