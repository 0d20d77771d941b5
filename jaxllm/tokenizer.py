"""Tokenizers: text -> token ids (python ints) and back, and Hugging Face tokenizer files in and out.

Three tokenizers share one small interface (`name`, `n_vocab`, `eot_id`, `bos_id`, `chat_template`, `encode`,
`encode_batch`, `decode`):

- "gpt2": GPT-2 BPE through tiktoken (r50k_base, 50257 ids, end-of-text 50256), the reference tokenizer.
  It is built offline from a local `gpt2.tiktoken` file; see `gpt2_file` for where that file comes from.
- "byte": UTF-8 bytes 0..255 plus end-of-text 256 (257 ids), for fast tests without any download.
- "hf": a Hugging Face tokenizer.json (an imported model's own tokenizer, e.g. Llama 3 or SmolLM2) through
  the `tokenizers` package; its end-of-text is the model's EOS and `bos_id` the id its post-processor puts
  first (Llama 3's <|begin_of_text|>), None when it puts none.

`encode` is tiktoken's `encode_ordinary`: no end-of-text or BOS is added and special-token text such as
"<|endoftext|>" inside a document is encoded as plain text. The data pipeline appends `eot_id` itself.
Tokenizers are small values that cross process boundaries cheaply (the BPE tables are rebuilt lazily in
each process), so prepare's tokenizer workers (jaxllm/data/encode.py) receive them as arguments.

`save_hf_tokenizer` writes any of the three as tokenizer.json + tokenizer_config.json +
special_tokens_map.json, so an exported model folder loads with transformers' AutoTokenizer and encodes every
text exactly as jaxllm does.
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
import json
import shutil
import threading
import typing

import tiktoken
import tokenizers

TOKENIZER_NAMES = ("gpt2", "byte", "hf")
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
    bos_id: int | None = None  # GPT-2 was trained without a BOS
    chat_template: str | None = None

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
    bos_id: int | None = None
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`; no end-of-text added."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids) -> str:
        """Text of the byte ids; end-of-text and out-of-range ids are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- Hugging Face tokenizer.json

HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template here; it beats the config's
HF_MODEL_FILES = ("generation_config.json", "config.json")  # a model folder's eos_token_id, in order of trust


class _HFState(typing.NamedTuple):
    """What a process knows of an HFTokenizer's files, read once per process and path (see `_hf_state`)."""

    plain: tokenizers.Tokenizer  # encode_special_tokens=True: "<|im_end|>" in a text stays plain text
    n_vocab: int
    eot_id: int
    bos_id: int | None
    chat_template: str | None
    digest: str  # sha256 of tokenizer.json: two tokenizers of one size must not share prepared data


def _hf_paths(path: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(tokenizer.json, the folder holding it and its configs) of `path`, a folder or the file itself."""
    where = pathlib.Path(path).expanduser()
    if where.is_dir():
        where = where / HF_TOKENIZER_FILE
    if not where.is_file():
        raise TokenizerError(f"the Hugging Face tokenizer file {where} does not exist; set data.tokenizer_path to a "
                             f"folder holding {HF_TOKENIZER_FILE} or to the file itself")
    return where, where.parent


def _read_json(file: pathlib.Path) -> dict | None:
    """The JSON object in `file`; None if there is no such file."""
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"cannot read {file} as JSON ({error}); repair or remove that file") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{file} holds a JSON {type(value).__name__}, not an object; repair or remove that file")
    return value


def _token_text(value) -> str | None:
    """A special token as tokenizer configs write it: "<|im_end|>" or {"content": "<|im_end|>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _hf_eot_id(tok: tokenizers.Tokenizer, folder: pathlib.Path) -> int:
    """The EOS id: the tokenizer's own eos_token (tokenizer_config.json, then the legacy special_tokens_map.json),
    else the model's eos_token_id (generation_config.json, then config.json; a list's first entry).

    The tokenizer's word comes first because that is what transformers' AutoTokenizer reports as eos_token_id;
    an instruct model's chat turns end with it (SmolLM2-Instruct: <|im_end|>, not <|endoftext|>)."""
    for name in (HF_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE):
        text = _token_text((_read_json(folder / name) or {}).get("eos_token"))
        if text is not None:
            eot = tok.token_to_id(text)
            if eot is None:
                raise TokenizerError(f"the eos_token {text!r} of {folder / name} is not in the vocabulary of "
                                     f"{folder / HF_TOKENIZER_FILE}; set eos_token to one of its tokens")
            return eot
    for name in HF_MODEL_FILES:
        eos = (_read_json(folder / name) or {}).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and not isinstance(eos, bool):
            return eos
    raise TokenizerError(f"cannot tell the end-of-text token of {folder / HF_TOKENIZER_FILE}: no eos_token in "
                         f"{HF_CONFIG_FILE} and no eos_token_id in {' or '.join(HF_MODEL_FILES)}; add "
                         f'"eos_token": "<the EOS token>" to {folder / HF_CONFIG_FILE}')


def _hf_bos_id(tok: tokenizers.Tokenizer) -> int | None:
    """The special id the tokenizer's post-processor puts first when special tokens are added (Llama 3's
    <|begin_of_text|>); None when it puts none. transformers ignores add_bos_token once a tokenizer.json exists,
    so the post-processor is the whole truth."""
    encoding = tok.encode("a", add_special_tokens=True)
    return encoding.ids[0] if encoding.special_tokens_mask[:1] == [1] else None


def _hf_chat_template(folder: pathlib.Path, config: dict) -> str | None:
    """The default chat template: chat_template.jinja, else the config's chat_template (a string, or a list of
    {"name", "template"} of which the one named "default")."""
    if (folder / HF_CHAT_TEMPLATE_FILE).is_file():
        return (folder / HF_CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@functools.lru_cache(maxsize=8)
def _hf_state(path: str) -> _HFState:
    """Read (once per process and path) the tokenizer.json at `path` and what its folder says about EOS/BOS."""
    file, folder = _hf_paths(path)
    try:
        raw = file.read_bytes()
        tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as error:  # OSError, UnicodeDecodeError, or the bare Exception tokenizers raises
        raise TokenizerError(f"cannot read {file} as a Hugging Face tokenizer ({str(error).splitlines()[0]}); "
                             f"point data.tokenizer_path at a valid {HF_TOKENIZER_FILE}") from None
    tok.encode_special_tokens = True  # jaxllm's encode: special-token text inside a document is plain text
    # Normally get_vocab_size; the max keeps every id in range if a file's added tokens leave gaps.
    n_vocab = max(tok.get_vocab_size(with_added_tokens=True), 1 + max(tok.get_vocab(with_added_tokens=True).values()))
    config = _read_json(folder / HF_CONFIG_FILE) or {}
    return _HFState(plain=tok, n_vocab=n_vocab, eot_id=_hf_eot_id(tok, folder), bos_id=_hf_bos_id(tok),
                    chat_template=_hf_chat_template(folder, config), digest=hashlib.sha256(raw).hexdigest())


@functools.lru_cache(maxsize=8)
def _hf_special(path: str) -> tokenizers.Tokenizer:
    """The tokenizer at `path` as transformers encodes by default: special-token text becomes its id."""
    tok = tokenizers.Tokenizer.from_str(_hf_state(path).plain.to_str())
    tok.encode_special_tokens = False
    return tok


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` package (not transformers). `path` is the file or
    the folder holding it with tokenizer_config.json (and a model's generation_config.json/config.json, read for
    the EOS). The tables load lazily, once per process, so the value pickles as a path."""

    path: str
    name: str = "hf"

    @property
    def n_vocab(self) -> int:
        return _hf_state(self.path).n_vocab

    @property
    def eot_id(self) -> int:
        """The model's EOS (tokenizer_config.json's eos_token first; see _hf_eot_id)."""
        return _hf_state(self.path).eot_id

    @property
    def bos_id(self) -> int | None:
        """The id a model trained with a BOS expects first (Llama 3); None when the tokenizer adds none."""
        return _hf_state(self.path).bos_id

    @property
    def chat_template(self) -> str | None:
        return _hf_state(self.path).chat_template

    @property
    def digest(self) -> str:
        """sha256 of tokenizer.json: part of the prepared data's fingerprint (jaxllm/data/prepare.py)."""
        return _hf_state(self.path).digest

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no BOS or end-of-text added, special-token text treated as plain text."""
        return _hf_state(self.path).plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in _hf_state(self.path).plain.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Ids of `text` where special-token text ("<|im_start|>") becomes its special id, as transformers
        encodes a rendered chat template; no BOS added."""
        return _hf_special(self.path).encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens and ids out of range are dropped."""
        n_vocab = self.n_vocab
        return _hf_state(self.path).plain.decode([int(i) for i in ids if 0 <= int(i) < n_vocab],
                                                 skip_special_tokens=True)


def _hf_tokenizer(path: str) -> HFTokenizer:
    if not path:
        raise TokenizerError("data.tokenizer=hf needs data.tokenizer_path: a folder holding a Hugging Face "
                             f"{HF_TOKENIZER_FILE} or the file itself")
    where = pathlib.Path(path).expanduser()
    if not where.exists():
        raise TokenizerError(f"the Hugging Face tokenizer path {where} does not exist; set data.tokenizer_path to a "
                             f"folder holding {HF_TOKENIZER_FILE} or to the file itself")
    tokenizer = HFTokenizer(path=str(where.resolve()))  # absolute: workers may run elsewhere
    _hf_state(tokenizer.path)  # every error now, in this process, not later in a worker
    return tokenizer


# ---------------------------------------------------------------- writing tokenizer.json for jaxllm's tokenizers

EOT_TEXT = "<|endoftext|>"


def _byte_chars() -> list[str]:
    """GPT-2's byte -> character table, the alphabet of byte-level BPE in tokenizers and transformers: printable
    Latin-1 bytes stand for themselves, the other 68 for chr(256 + n) in byte order, so no token text holds
    whitespace or control characters."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    chars, n_other = [], 0
    for byte in range(256):
        chars.append(chr(byte) if byte in printable else chr(256 + n_other))
        n_other += byte not in printable
    return chars


def _bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges that reproduce tiktoken's rule (join the adjacent pair whose join has the lowest rank): every
    split of each token into two tokens, ordered by the joined token's rank. This is transformers'
    TikTokenConverter's recovery, done here so that exporting needs no transformers."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend(sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])))
    return merges


def _byte_level_bpe(ranks: dict[bytes, int], pattern: str | None) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer whose ids are tiktoken-style `ranks` (byte string -> id), then "<|endoftext|>".

    `pattern` is the pre-tokenizer regex that cuts a text into pieces before BPE (r50k's for gpt2); None keeps the
    text whole (byte: no merges, so every byte is its own token anyway). Whole pieces that are tokens are taken
    as they are (ignore_merges), as tiktoken does."""
    chars = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[byte] for byte in token)

    merges = [(text(left), text(right)) for left, right in _bpe_merges(ranks)]
    model = tokenizers.models.BPE({text(token): rank for token, rank in ranks.items()}, merges, fuse_unk=False,
                                  ignore_merges=True)
    tok = tokenizers.Tokenizer(model)
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pattern is not None:
        split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
        byte_level = tokenizers.pre_tokenizers.Sequence([split, byte_level])
    tok.pre_tokenizer = byte_level
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)  # adds no BOS/EOS
    tok.add_special_tokens([tokenizers.AddedToken(EOT_TEXT, special=True, normalized=False)])
    return tok


def _copy_hf_files(tokenizer: HFTokenizer, out: pathlib.Path) -> None:
    """Copy an HFTokenizer's files into `out`; tokenizer_config.json gains eos_token (and bos_token when one is
    added) if the original left them to the model's configs."""
    file, folder = _hf_paths(tokenizer.path)
    state = _hf_state(tokenizer.path)
    copies = [(file, out / HF_TOKENIZER_FILE), (folder / HF_CHAT_TEMPLATE_FILE, out / HF_CHAT_TEMPLATE_FILE)]
    for source, target in copies:
        if source.is_file() and source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    templates = folder / "additional_chat_templates"  # transformers' named templates, one .jinja each
    if templates.is_dir() and templates.resolve() != (out / templates.name).resolve():
        shutil.copytree(templates, out / templates.name, dirs_exist_ok=True)
    config = _read_json(folder / HF_CONFIG_FILE) or {"tokenizer_class": "PreTrainedTokenizerFast"}
    if _token_text(config.get("eos_token")) is None:
        config["eos_token"] = state.plain.id_to_token(state.eot_id)
    if state.bos_id is not None and _token_text(config.get("bos_token")) is None:
        config["bos_token"] = state.plain.id_to_token(state.bos_id)
    special = _read_json(folder / HF_SPECIAL_TOKENS_FILE) or {
        key: config[key] for key in ("bos_token", "eos_token") if key in config}
    (out / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / HF_SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")


def save_hf_tokenizer(tokenizer, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write `tokenizer` into `out_dir` (created) as tokenizer.json, tokenizer_config.json and
    special_tokens_map.json, so that transformers' AutoTokenizer.from_pretrained(out_dir) encodes every text
    as `tokenizer.encode` does (with add_special_tokens=False) and decodes it back. Returns the folder.

    gpt2 and byte become byte-level BPE (gpt2's vocabulary, merges and r50k pre-tokenizer regex; byte's 256
    single-byte tokens), "<|endoftext|>" (eot_id) their EOS and BOS, and no BOS added to a text; "<|endoftext|>"
    written inside a text stays plain text in transformers too (split_special_tokens). An HFTokenizer's own
    files are copied."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        _copy_hf_files(tokenizer, out)
        return out
    if isinstance(tokenizer, BPETokenizer):
        encoding = tokenizer.encoding
        tok = _byte_level_bpe(encoding._mergeable_ranks, encoding._pat_str)
    elif isinstance(tokenizer, ByteTokenizer):
        tok = _byte_level_bpe({bytes([byte]): byte for byte in range(256)}, None)
    else:
        raise TokenizerError(f"cannot write tokenizer '{getattr(tokenizer, 'name', tokenizer)}' as Hugging Face "
                             f"files; jaxllm writes {', '.join(TOKENIZER_NAMES)}")
    if (tok.token_to_id(EOT_TEXT), tok.get_vocab_size()) != (tokenizer.eot_id, tokenizer.n_vocab):
        raise TokenizerError(f"the {tokenizer.name} tokenizer's end-of-text is id {tokenizer.eot_id} of "
                             f"{tokenizer.n_vocab}, but its BPE table has {tok.get_vocab_size() - 1} ids before it; "
                             f"the BPE file {getattr(tokenizer, 'file', '') or '(tiktoken)'} is wrong, replace it")
    tok.save(str(out / HF_TOKENIZER_FILE))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,  # jaxllm's models are trained without a BOS
        "add_eos_token": False,
        "split_special_tokens": True,  # "<|endoftext|>" inside a text is plain text, as jaxllm's encode does
        "clean_up_tokenization_spaces": False,  # decode gives the text back (" ." stays " .")
    }
    (out / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / HF_SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out


Tokenizer = BPETokenizer | ByteTokenizer | HFTokenizer


def get_tokenizer(name: str, path: str = "") -> Tokenizer:
    """The tokenizer called `name` ("gpt2", "byte" or "hf"). `path`: for gpt2 an optional local gpt2.tiktoken
    file; for hf (required) a folder holding a Hugging Face tokenizer.json, or the file itself."""
    if name == "byte":
        return ByteTokenizer()
    if name == "hf":
        return _hf_tokenizer(path)
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
