"""Instruction data for the fine-tune stage: rows -> (token ids, loss mask) examples -> padded or packed batches.

MathQA (jaxllm/data/mathqa.py) is one user of this module: it formats each question as a (prompt,
completion) pair and hands the pairs to `tokenize_example`, `ExampleBatches` and the batch makers here;
`finetune.data=sft` reads the user's own rows (`load_data`) into the same `ExampleBatches`.

Rows (`sft.path`: .jsonl, a .json list, .parquet, a folder of them, or a Hub dataset with `sft.source=hub`):

    {"prompt": str, "completion": str}
    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

Prompt/completion rows are plain text, like MathQA: [BOS] + prompt + completion + EOT, the prompt and the
completion tokenized separately (the completion usually starts with its own space or newline). The loss
covers the completion and the EOT. Write a row as `messages` to have it rendered as a chat.

Chat rows are rendered with the tokenizer's chat template when it has one (`sft.template=auto`; a Hugging
Face tokenizer's chat_template.jinja / tokenizer_config.json), through a sandboxed jinja2 environment set up
as transformers' `_compile_jinja_template` is (`messages`, `add_generation_prompt`, the special-token strings
`bos_token`, `eos_token`, ..., `raise_exception`, `tojson`, `namespace`, loop controls; `{% generation %}`
blocks render their body). `strftime_now` is left out on purpose: the same row must give the same tokens on
any day, and templates that print today's date fall back to their own fixed one. The whole rendered text is
tokenized once, special-token text becoming its id, as `apply_chat_template(..., tokenize=True)` does (no BOS
is added: a template that wants one writes `bos_token`). Which tokens train is read off the template itself:
for assistant message i, `render(messages[:i], add_generation_prompt=True)` must be a prefix of
`render(messages[:i + 1])`, which must be a prefix of the whole chat; the message's content is found after
that prefix, and its tokens plus the first token after it (the template's end-of-turn: `<|im_end|>` for
SmolLM2/ChatML, `<|eot_id|>` for Llama 3) get weight 1. Everything else (system and user turns, role
headers, the default system prompt a template inserts, BOS, padding) gets 0; every assistant turn trains.

Without a chat template (the gpt2 and byte tokenizers, or `sft.template=builtin`) the built-in template is

    [BOS]System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}<EOT>User: {user}\\n\\nAssistant: ...

(BOS only where the tokenizer has one), tokenized as prompt/completion pairs: all text up to and including
"Assistant:" is one untrained piece, " {assistant}" + EOT (the tokenizer's end-of-text) the trained one,
so a single-turn chat is exactly the prompt/completion row ("User: ...\\n\\nAssistant:", " ...").

Bad rows are skipped and counted by reason (`RowReport`), never a crash: a broken jsonl line, bytes that are
not UTF-8, a row that is not an object, missing fields, a non-list `messages`, a message that is not an object
or lacks role/content, content that is not text, an unknown role, empty content, no assistant turn, a row the
chat template refuses (its `raise_exception`) or renders in a way the mask cannot be read from (not
prefix-stable, the answer not in its text, no trained token), and a row longer than `sft.max_length` tokens (skipped, not
cut: a cut chat would teach a truncated answer or an answer to a missing question).

Batches (the layout of jaxllm/data/batches.py, numpy):
    inputs       int32   [B, L]  token ids (padding: 0)
    targets      int32   [B, L]  the next token of each input position (padding: 0)
    weights      float32 [B, L]  the loss mask shifted to the targets (1: assistant/completion token or its EOT)
    segment_ids  int32   [B, L]  packed batches only: 1, 2, ... for the examples of a row, 0 for padding
    positions    int32   [B, L]  packed batches only: each token's position within its example
L is the longest row of the batch rounded up to `pad_multiple` (at most max_length). Unpacked, each row is
one example. Packed (`finetune.packing`), each row holds whole examples: every epoch's shuffled examples are
placed in order by best fit (each goes into the open row with the least room that still holds it, ties to the
oldest row; a new row when none does), rows in the order they were opened; step s takes the next B x K rows.
Both the epoch order and its packing are pure functions of (seed, epoch), so batch s is a function of (seed,
s) and a resumed run trains on exactly the batches of an uninterrupted one. Validation batches are never
packed, so validation loss does not depend on the packing.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import json
import pathlib
from typing import Iterable

import numpy as np

from jaxllm.data import sources
from jaxllm.data.sources import DataError

ROLES = ("system", "user", "assistant")
SOURCES = ("local", "hub")
TEMPLATES = ("auto", "builtin")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
BUILTIN_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant:"}
BUILTIN_TURN_END = "\n\n"  # after a system or user message; an assistant message ends with the EOT token
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # strings a chat template may print


class RowError(ValueError):
    """A row that cannot become an example; `reason` is a short stable key for counting."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class UnreadableRow:
    """A row a file holds but that could not be decoded (a broken jsonl line, bytes that are not UTF-8):
    counted under `reason` like any other bad row."""

    reason: str


@dataclasses.dataclass
class RowReport:
    """How many rows a source held, how many were read, and the skipped ones counted by reason."""

    rows: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def read(self) -> int:
        return self.rows - sum(self.skipped.values())

    def summary(self) -> dict:
        return {"rows": self.rows, "read": self.read, "skipped": dict(self.skipped)}


@dataclasses.dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


Messages = tuple  # ((role, content), ...) with roles from ROLES


# ---------------------------------------------------------------------------------------------- reading


def jsonl_records(data: bytes) -> list:
    """One record per non-blank line; a line that is not UTF-8 or not JSON is an UnreadableRow."""
    records = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError:
            records.append(UnreadableRow("not UTF-8"))
        except ValueError:
            records.append(UnreadableRow("broken json line"))
    return records


def read_file(path: pathlib.Path) -> list:
    """The rows of one .jsonl, .json (a list, or an object holding one) or .parquet file; DataError when the
    file as a whole cannot be read."""
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(f"the sft file {path} is not .jsonl, .json or .parquet; convert it")
    try:
        data = path.read_bytes()
        if not data.strip():
            raise DataError(f"the sft file {path} is empty; fill it with rows or point sft.path elsewhere")
        if path.suffix == ".jsonl":
            return jsonl_records(data)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        value = json.loads(data.decode("utf-8"))
        if isinstance(value, dict):  # {"data": [...]}-style wrappers
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if not isinstance(value, list):
            raise DataError(f"the sft file {path} holds no JSON list of rows; write one row per line as .jsonl")
        return value
    except DataError:
        raise
    except (OSError, ValueError, TypeError) as error:  # pyarrow's ArrowInvalid is a ValueError
        first_line = (str(error).strip().splitlines() or [""])[0][:120]
        raise DataError(f"cannot read the sft file {path} ({type(error).__name__}: {first_line}); check that it "
                        f"is complete .jsonl, .json or .parquet") from error


def _data_files(folder: pathlib.Path) -> list[pathlib.Path]:
    for suffix in (".parquet", ".jsonl", ".json"):
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found
    return []


def split_files(path: str, split: str, train_split: str) -> list[pathlib.Path]:
    """The local files of `split`: `split` itself when it is a file or folder path; else, in the folder
    `path`, data/{split}-*, {split}-*, data/{split}.*, {split}.* (parquet, jsonl, json); a folder without
    files named for the train split is all train. A file `path` is the train split."""
    direct = pathlib.Path(split).expanduser()
    if split and (direct.is_file() or direct.is_dir()):
        return [direct] if direct.is_file() else _data_files(direct)
    root = pathlib.Path(path).expanduser()
    if not root.exists():
        raise DataError(f"sft.path {root} does not exist; set --config.sft.path to a .jsonl/.json/.parquet file "
                        f"or a folder of them")
    if root.is_file():
        if split == train_split:
            return [root]
        raise DataError(f"sft.path is the file {root}, so sft.val_split '{split}' must be a file path; "
                        f"or set sft.val_split='' to carve validation out of it")
    found = sources._split_files(root, split)
    if not found and split == train_split and not sources._split_files(root, "validation"):
        found = _data_files(root)
    if not found:
        raise DataError(f"no sft '{split}' files in {root} (looked for {split}.jsonl/.json/.parquet and "
                        f"{split}-*); name the file in --config.sft.path or --config.sft.val_split")
    return found


def load_rows(sft_cfg, split: str) -> list:
    """The raw rows of `split` (a split name, or a local path) in source order, unparsed."""
    if sft_cfg.source == "hub":
        return [dict(row) for row in _hub_rows(sft_cfg.path, split)]
    return [row for file in split_files(sft_cfg.path, split, sft_cfg.split) for row in read_file(file)]


def _hub_rows(name: str, split: str):
    """`sources._load_hub`'s dataset, with the sft fields named in its messages."""
    if sources._offline():
        raise DataError(f"cannot reach the Hugging Face Hub for dataset {name} (offline); download it and set "
                        f"--config.sft.source=local --config.sft.path=FILE_OR_FOLDER")
    try:
        return sources._load_hub(name, split)
    except DataError as error:
        raise DataError(f"cannot load split '{split}' of Hub dataset {name} ({error}); check --config.sft.path and "
                        f"--config.sft.split, or use --config.sft.source=local") from error


# ---------------------------------------------------------------------------------------------- parsing


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} not text")
    return value


def parse_row(row, *, messages_field: str = "messages", prompt_field: str = "prompt",
              completion_field: str = "completion") -> PromptCompletion | Messages:
    """A PromptCompletion or the messages ((role, content), ...) of one row; raises RowError(reason)."""
    if isinstance(row, UnreadableRow):
        raise RowError(row.reason)
    if not isinstance(row, dict):
        raise RowError("row not an object")
    if row.get(messages_field) is not None:
        messages = row[messages_field]
        if not isinstance(messages, (list, tuple)):
            raise RowError("messages not a list")
        parsed = []
        for message in messages:
            if not isinstance(message, dict):
                raise RowError("message not an object")
            if message.get("role") is None or message.get("content") is None:
                raise RowError("message without role or content")
            role, content = message["role"], _text(message["content"], "content")
            if role not in ROLES:
                raise RowError("unknown role")
            if not content.strip():
                raise RowError("empty content")
            parsed.append((role, content))
        if not any(role == "assistant" for role, _ in parsed):
            raise RowError("no assistant turn")
        return tuple(parsed)
    has_prompt, has_completion = row.get(prompt_field) is not None, row.get(completion_field) is not None
    if not has_prompt and not has_completion:
        raise RowError(f"missing {messages_field} or {prompt_field}/{completion_field}")
    if not has_completion:
        raise RowError(f"missing {completion_field}")
    if not has_prompt:
        raise RowError(f"missing {prompt_field}")
    prompt, completion = _text(row[prompt_field], prompt_field), _text(row[completion_field], completion_field)
    if not completion.strip():
        raise RowError("empty content")
    return PromptCompletion(prompt, completion)


# ------------------------------------------------------------------------------ tokens and loss masks


def encode_pieces(tokenizer, pieces: Iterable[tuple[str, bool]], bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 [n] and mask float32 [n] of text pieces (text, trained), each tokenized on its own; a trained
    piece is followed by the tokenizer's EOT (trained too). [BOS] first when `bos` and the tokenizer has one."""
    bos_id = getattr(tokenizer, "bos_id", None)
    ids, mask = ([bos_id], [0.0]) if bos and bos_id is not None else ([], [])
    for text, trained in pieces:
        piece = tokenizer.encode(text) + ([tokenizer.eot_id] if trained else [])
        ids += piece
        mask += [float(trained)] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def tokenize_example(tokenizer, prompt: str, target: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 [n] = [BOS] + prompt + target + EOT, and mask float32 [n]: 1 on target tokens and the EOT.

    MathQA's rule for long examples (sft rows are skipped instead, see `Encoder`): when n > max_length + 1
    the prompt is cut from the left (the answer is what is learned), after the BOS, which always stays, so the
    sequence has at most max_length + 1 tokens (inputs and targets of max_length each). The BOS is
    `tokenizer.bos_id` (None: byte, gpt2: none); the mask is 0 on it.
    """
    bos_id = getattr(tokenizer, "bos_id", None)
    bos_ids = [] if bos_id is None else [bos_id]
    room = max_length + 1 - len(bos_ids)  # tokens after the BOS
    prompt_ids = tokenizer.encode(prompt)
    target_ids = tokenizer.encode(target) + [tokenizer.eot_id]
    keep_prompt = max(0, room - len(target_ids))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:] if len(prompt_ids) > keep_prompt else prompt_ids
    target_ids = target_ids[max(0, len(target_ids) - room):]
    ids = np.asarray(bos_ids + prompt_ids + target_ids, np.int32)
    mask = np.concatenate([np.zeros(len(bos_ids) + len(prompt_ids), np.float32),
                           np.ones(len(target_ids), np.float32)])
    return ids, mask


def builtin_pieces(messages: Messages) -> list[tuple[str, bool]]:
    """The built-in chat template as (text, trained) pieces: the text up to and including each "Assistant:"
    header untrained, " {content}" of the assistant message trained (EOT follows it: `encode_pieces`)."""
    pieces, pending = [], ""
    for role, content in messages:
        if role == "assistant":
            pieces += [(pending + BUILTIN_HEADERS["assistant"], False), (" " + content, True)]
            pending = ""
        else:
            pending += BUILTIN_HEADERS[role] + content + BUILTIN_TURN_END
    if pending:  # user/system messages after the last answer: context that trains nothing
        pieces.append((pending, False))
    return pieces


def compile_template(source: str):
    """A jinja2 Template of a chat template, in a sandbox like transformers' `_compile_jinja_template`."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["namespace"] = jinja2.utils.Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as error:
        raise DataError(f"the tokenizer's chat template does not compile ({error}); fix it or set "
                        f"--config.sft.template=builtin") from None


class Encoder:
    """Rows -> (ids, mask) examples for one tokenizer and template choice (the module docstring's rules)."""

    def __init__(self, tokenizer, template: str = "auto"):
        self.tokenizer = tokenizer
        source = getattr(tokenizer, "chat_template", None) if template == "auto" else None
        self.template = compile_template(source) if source else None
        self.template_tokens = _template_tokens(tokenizer) if source else {}

    @property
    def uses_chat_template(self) -> bool:
        return self.template is not None

    def encode(self, parsed: PromptCompletion | Messages) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(parsed, PromptCompletion):
            return encode_pieces(self.tokenizer, [(parsed.prompt, False), (parsed.completion, True)])
        if self.template is None:
            return encode_pieces(self.tokenizer, builtin_pieces(parsed))
        return self._encode_chat(parsed)

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The chat template's text of `messages` (what transformers' apply_chat_template(tokenize=False) gives)."""
        import jinja2

        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            return self.template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                        **self.template_tokens)
        except jinja2.exceptions.TemplateError:
            raise RowError("rejected by the chat template") from None

    def _encode_chat(self, messages: Messages) -> tuple[np.ndarray, np.ndarray]:
        full = self.render(messages)
        spans = []  # (content start, content end, end of that turn's text) in characters of `full`
        for i, (role, content) in enumerate(messages):
            if role != "assistant":
                continue
            prefix, turn = self.render(messages[:i], add_generation_prompt=True), self.render(messages[:i + 1])
            if not (turn.startswith(prefix) and full.startswith(turn)):
                raise RowError("chat template not prefix-stable")
            start = turn.find(content, len(prefix))
            if start < 0:
                content = content.strip()
                start = turn.find(content, len(prefix))
            if start < 0:
                raise RowError("assistant content not in the rendered chat")
            spans.append((start, start + len(content), len(turn)))
        ids, offsets = _encode_with_offsets(self.tokenizer, full)
        mask = np.zeros(len(ids), np.float32)
        for start, end, turn_end in spans:
            inside = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]
            after = [t for t, (a, _) in enumerate(offsets) if a >= end and a < turn_end and t > max(inside, default=-1)]
            mask[inside + after[:1]] = 1.0  # the content and the template's end-of-turn token
        return np.asarray(ids, np.int32), mask


def _template_tokens(tokenizer) -> dict[str, str]:
    """The special-token strings transformers passes a chat template (tokenizer_config.json's bos_token, ...)."""
    from jaxllm import tokenizer as tokenizer_lib

    path = getattr(tokenizer, "path", None)
    if path is None:
        return {}
    _, folder = tokenizer_lib._hf_paths(path)
    config = tokenizer_lib._read_json(folder / tokenizer_lib.HF_CONFIG_FILE) or {}
    found = {name: tokenizer_lib._token_text(config.get(name)) for name in TEMPLATE_TOKENS}
    return {name: text for name, text in found.items() if text is not None}


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of a rendered chat (special-token text -> its id, no BOS added: transformers' tokenize=True) and each
    token's character span in `text`."""
    from jaxllm import tokenizer as tokenizer_lib

    encoding = tokenizer_lib._hf_special(tokenizer.path).encode(text, add_special_tokens=False)
    return list(encoding.ids), list(encoding.offsets)


# --------------------------------------------------------------------------------------------- batches


def padded_length(lengths: Iterable[int], pad_multiple: int, max_length: int) -> int:
    """The batch length L: the longest (ids - 1) rounded up to pad_multiple, at most max_length."""
    longest = max(max(lengths, default=1) - 1, 1)
    if pad_multiple <= 0:
        return max_length
    return min(max_length, -(-longest // pad_multiple) * pad_multiple)


def make_batch(examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, seq_len: int) -> dict:
    """Pad (ids, mask) examples into one batch of `batch_size` rows and length `seq_len`, one example a row.

    Rows past len(examples) and positions past each example's end are padding: token 0 and weight 0.
    weights[j, t] = mask[t + 1], the mask of the *target* token, so the prompt and pad -> pad targets
    carry no loss and no accuracy.
    """
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    weights = np.zeros((batch_size, seq_len), np.float32)
    for row, (ids, mask) in enumerate(examples):
        n = min(len(ids) - 1, seq_len)
        inputs[row, :n] = ids[:n]
        targets[row, :n] = ids[1:n + 1]
        weights[row, :n] = mask[1:n + 1]
    return {"inputs": inputs, "targets": targets, "weights": weights}


def make_packed_batch(rows: list[list[tuple[np.ndarray, np.ndarray]]], batch_size: int, seq_len: int) -> dict:
    """`make_batch`'s arrays plus segment_ids and positions, for rows that each hold several whole examples
    (every example's len(ids) - 1 inputs, side by side; they must fit in seq_len)."""
    batch = {name: np.zeros((batch_size, seq_len), dtype)
             for name, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32),
                                 ("segment_ids", np.int32), ("positions", np.int32))}
    for row, examples in enumerate(rows):
        offset = 0
        for segment, (ids, mask) in enumerate(examples, start=1):
            n = len(ids) - 1
            if offset + n > seq_len:
                raise ValueError(f"packed row {row} needs more than {seq_len} positions")
            at = slice(offset, offset + n)
            batch["inputs"][row, at], batch["targets"][row, at] = ids[:-1], ids[1:]
            batch["weights"][row, at], batch["segment_ids"][row, at] = mask[1:], segment
            batch["positions"][row, at] = np.arange(n)
            offset += n
    return batch


def pack_best_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` grouped into rows of at most `capacity`, by best fit in the given order: each item
    goes into the open row with the least room that holds it (ties: the oldest row), or opens a new row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index, size in enumerate(sizes):
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - size > 0:
            bisect.insort(free, (room - size, row))
    return rows


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits n training examples (read-only)."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n)
    order.flags.writeable = False
    return order


class ExampleBatches:
    """Tokenized training and validation examples [(ids, mask), ...] and their batches; the batch of a step
    is a function of (seed, step). `packing`: several whole examples per training row (module docstring)."""

    def __init__(self, train: list, val: list, *, max_length: int, pad_multiple: int, packing: bool = False):
        self.train, self.val = train, val
        self.max_length, self.pad_multiple, self.packing = max_length, pad_multiple, packing
        self._packed: dict[int, list] = {}  # seed -> [(first global row, rows of the epoch)] per epoch packed

    def _batch(self, examples, batch_size: int) -> dict:
        seq_len = padded_length((len(ids) for ids, _ in examples), self.pad_multiple, self.max_length)
        return make_batch(examples, batch_size, seq_len)

    def train_batch(self, *, seed: int, step: int, batch_size: int, grad_accum: int,
                    rows: tuple[int, int] | None = None) -> dict:
        """Batch of optimizer step `step`: arrays [K, B, L]; examples drawn without replacement per epoch.

        `rows=(start, stop)`: only rows start..stop-1 of each micro-batch, [K, stop - start, L] (a process of
        a multi-process run builds only its own rows); L is still the whole batch's padded length.
        """
        n, total = len(self.train), batch_size * grad_accum
        start, stop = rows or (0, batch_size)
        chosen = (np.arange(grad_accum)[:, None] * batch_size + np.arange(start, stop)[None, :]).ravel()
        if self.packing:
            packed = [[self.train[i] for i in self._packed_row(seed, step * total + j)] for j in range(total)]
            used = [sum(len(ids) - 1 for ids, _ in row) + 1 for row in packed]
            batch = make_packed_batch([packed[j] for j in chosen], len(chosen),
                                      padded_length(used, self.pad_multiple, self.max_length))
        else:
            samples = step * total + np.arange(total)
            examples = [self.train[epoch_order(seed, int(s // n), n)[s % n]] for s in samples]
            seq_len = padded_length((len(ids) for ids, _ in examples), self.pad_multiple, self.max_length)
            batch = make_batch([examples[j] for j in chosen], len(chosen), seq_len)
        return {name: a.reshape(grad_accum, stop - start, *a.shape[1:]) for name, a in batch.items()}

    def _packed_row(self, seed: int, row: int) -> list[int]:
        """The example indices of global packed row `row` (epochs packed in turn, each by `pack_best_fit`)."""
        epochs = self._packed.setdefault(seed, [])
        while not epochs or epochs[-1][0] + len(epochs[-1][1]) <= row:
            first = epochs[-1][0] + len(epochs[-1][1]) if epochs else 0
            order = epoch_order(seed, len(epochs), len(self.train))
            packed = pack_best_fit([len(self.train[i][0]) - 1 for i in order], self.max_length)
            epochs.append((first, [[int(order[j]) for j in indices] for indices in packed]))
        for first, rows in reversed(epochs):
            if row >= first:
                return rows[row - first]
        raise AssertionError(row)

    def val_batches(self, batch_size: int, max_batches: int = 0) -> list[dict]:
        """Validation examples in order, one a row, in batches of `batch_size` (the last padded with weight-0
        rows); never packed."""
        batches = [self._batch(self.val[i:i + batch_size], batch_size) for i in range(0, len(self.val), batch_size)]
        return batches[:max_batches] if max_batches else batches


# ------------------------------------------------------------------------------------- the sft source


def encode_rows(rows: list, encoder: Encoder, sft_cfg, max_length: int) -> tuple[list, RowReport]:
    """The (ids, mask) example of every good row, and the report that counts the others by reason."""
    examples, report = [], RowReport()
    fields = dict(messages_field=sft_cfg.messages_field, prompt_field=sft_cfg.prompt_field,
                  completion_field=sft_cfg.completion_field)
    for row in rows:
        report.rows += 1
        try:
            ids, mask = encoder.encode(parse_row(row, **fields))
            if len(ids) > max_length + 1:
                raise RowError("longer than max_length")
            if not mask[1:].any():
                raise RowError("no trained tokens")
        except RowError as error:
            report.skipped[error.reason] += 1
            continue
        examples.append((ids, mask))
    return examples, report


def carve_validation(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded `fraction` of the rows (at least one) is validation, the rest train, both in
    source order."""
    order = np.random.default_rng([seed, 2357]).permutation(len(rows))
    n_val = max(1, int(round(len(rows) * fraction)))
    if n_val >= len(rows):
        raise DataError(f"the sft train split has {len(rows)} rows, too few to carve out validation; add rows or "
                        f"set --config.sft.val_split")
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]


def load_data(sft_cfg, tokenizer, *, max_length: int, packing: bool = False) -> tuple[ExampleBatches, dict]:
    """The sft section's examples as ExampleBatches, and {"train", "val"} row reports (plus the template used).

    Validation rows come from `sft.val_split`, or (when "") a seeded `sft.val_fraction` of the train rows is
    carved out before tokenizing, so which rows validate does not depend on the tokenizer or max_length.
    """
    train_rows = load_rows(sft_cfg, sft_cfg.split)
    if sft_cfg.max_rows:
        train_rows = train_rows[:sft_cfg.max_rows]
    if sft_cfg.val_split:
        val_rows = load_rows(sft_cfg, sft_cfg.val_split)
    else:
        train_rows, val_rows = carve_validation(train_rows, sft_cfg.val_fraction, sft_cfg.seed)
    encoder = Encoder(tokenizer, sft_cfg.template)
    reports, examples = {}, {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        examples[split], report = encode_rows(rows, encoder, sft_cfg, max_length)
        reports[split] = report.summary()
        if not examples[split]:
            raise DataError(f"the sft {split} split has no usable rows ({report.summary()}); see the formats in "
                            f"README's 'Your own instruction data'")
    reports["template"] = "tokenizer" if encoder.uses_chat_template else "builtin"
    return ExampleBatches(examples["train"], examples["val"], max_length=max_length,
                          pad_multiple=sft_cfg.pad_multiple, packing=packing), reports
