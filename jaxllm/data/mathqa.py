"""MathQA for fine-tuning and evaluation: sources, the options parser, the prompt template, masked batches.

Records. Every source yields MathQA's seven string fields (Problem, Rationale, options, correct,
annotated_formula, linear_formula, category); `parse_record` turns one into a `Question` (problem, the
five option values a-e, the index of the correct one, the rationale). A row that cannot be read is
counted in a `ParseReport` under its reason and skipped; it never crashes the run and never vanishes
silently (the report is printed and logged).

Sources (`mathqa.source`):
  synthetic  jaxllm's built-in generator (jaxllm/data/synthetic.py), seeds 1/2/3 for train/val/test;
             test (any split but train/validation) only from the held-out problem texts, so no test
             problem is in the fine-tune splits or in the synthetic pretraining corpus;
  hub        `allenai/math_qa` (fails at once, with a message, when the Hub cannot be reached);
  local      the original JSON lists (dev.json, test.json, challenge_test.json), jsonl or parquet files
             with the same fields, or the per-category CSVs (`train_by_category_csv/`, columns
             option_a..option_e). A split is a file or folder path, or a split name looked up in
             `mathqa.path` (train -> train.json/jsonl/parquet or train_by_category_csv/; validation ->
             dev.json or validation.*; test -> test.json).

Template (what the model sees; `format_prompt` / `format_target`):

    Question: {problem}
    Options: a ) {a} , b ) {b} , c ) {c} , d ) {d} , e ) {e}
    Answer:{target}

  with target = " {letter} ) {option text}" (and, with `rationale=True`, "\\nRationale: {rationale}"
  after it), then the end-of-text token. A tokenizer with a BOS (`bos_id`, e.g. Llama 3's
  <|begin_of_text|>) puts it before all of that: the model was trained with it first. The loss mask is 1 on
  every target token and on the closing end-of-text, 0 on the BOS, the prompt and padding. K-shot prompts
  put K solved examples (prompt + target, separated by a blank line) before the question.

Batches: MathQA is one instance of the instruction-data path (jaxllm/data/sft.py): each question is the
(prompt, completion) pair above, tokenized, masked and batched by sft.py's code (`FinetuneData`), padded or,
with `finetune.packing`, packed. Unpacked batches (dicts of numpy arrays, the layout of jaxllm/data/batches.py):
    inputs  int32   [B, L]  token ids (padding: 0)
    targets int32   [B, L]  the next token of each input position (padding: 0)
    weights float32 [B, L]  the loss mask shifted to the targets: 1 where the target is an answer token
                            or the closing end-of-text, else 0 (prompt, padding, pad -> pad)
L is the longest example of the batch rounded up to `pad_multiple` (at most the max length), so short
batches spend no compute on padding beyond that rounding; a few distinct L values means a few compiles.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import pathlib
import re
from typing import Iterable, Iterator

import numpy as np

from jaxllm.data import sft, synthetic
from jaxllm.data.sft import RowReport as ParseReport, UnreadableRow
from jaxllm.data.sources import DataError, _load_hub

LETTERS = "abcde"
FIELDS = ("Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category")
HUB_NAME = "allenai/math_qa"
HUB_SPLITS = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation",
              "test": "test"}
# Local split names -> file stems tried in a folder, in order.
LOCAL_STEMS = {"train": ("train",), "validation": ("dev", "validation", "val"), "val": ("dev", "validation", "val"),
               "dev": ("dev", "validation"), "test": ("test",), "challenge_test": ("challenge_test",)}
SYNTHETIC_SEEDS = {"train": 1, "validation": 2, "test": 3}  # distinct from pretraining's data.split_seed
TRAINING_SPLITS = ("train", "validation", "val", "dev")  # synthetic: every other split is held out

# One option separator: " , " followed by the next letter and ")" (never a bare comma: "rs . 27,000").
# A sixth option "f )" is split off too, so that such a row is refused rather than read into e's value.
_SPLIT_RE = re.compile(r"\s*,\s*(?=[b-f]\s*\)\s?)")
_ITEM_RE = re.compile(r"\s*([a-f])\s*\)\s*(.*?)\s*$", re.S)
_UNDECODED_RE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape keeps them


class OptionsError(ValueError):
    """A row whose options or answer cannot be read; `reason` is a short stable key for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice question: five option values a-e and the index (0-4) of the correct one."""

    problem: str
    options: tuple[str, ...]
    answer: int
    rationale: str = ""
    category: str = ""


def parse_options(text) -> tuple[str, ...]:
    """The five option values of a MathQA `options` field, in letter order a-e.

    Reads both forms: "a ) 38 , b ) 27.675 , ..." and the Python-list string "['a ) 4', 'b ) 4 π', ...]"
    (also an actual list). Commas inside values are kept. Raises OptionsError(reason) otherwise.
    """
    if isinstance(text, (list, tuple)):
        items = [str(x) for x in text]
    elif not isinstance(text, str) or not text.strip():
        raise OptionsError("empty options")
    elif text.lstrip().startswith("["):
        try:
            items = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise OptionsError("unreadable option list", text[:60]) from None
        if not isinstance(items, (list, tuple)):
            raise OptionsError("unreadable option list", text[:60])
        items = [str(x) for x in items]
    else:
        items = _SPLIT_RE.split(text.strip())
    values = {}
    for item in items:
        match = _ITEM_RE.match(item)
        if match is None:
            raise OptionsError("option without a letter", item[:60])
        letter, value = match.groups()
        if letter in values:
            raise OptionsError("repeated option letter", letter)
        values[letter] = value
    if sorted(values) != list(LETTERS):
        raise OptionsError("not five options a-e", "".join(sorted(values)))
    return tuple(values[letter] for letter in LETTERS)


def _strip_quotes(text: str) -> str:
    """Rationales often come wrapped in literal double quotes; drop one pair."""
    text = (text or "").strip()
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] == '"' else text


def parse_record(record) -> Question:
    """A `Question` from one MathQA record (the seven string fields); raises OptionsError with a reason."""
    if isinstance(record, UnreadableRow):
        raise OptionsError(record.reason)
    if not isinstance(record, dict):
        raise OptionsError("row not an object", type(record).__name__)
    for field in ("Problem", "options", "correct"):
        if record.get(field) is None:
            raise OptionsError(f"missing {field}")
    # Undecodable bytes read with errors="surrogateescape" show up as lone surrogates.
    if any(isinstance(value, str) and _UNDECODED_RE.search(value) for value in record.values()):
        raise OptionsError("not UTF-8")
    problem = record["Problem"]
    if not isinstance(problem, str):
        raise OptionsError("Problem not text", type(problem).__name__)
    if not problem.strip():
        raise OptionsError("empty problem")
    options = parse_options(record["options"])
    correct = str(record["correct"]).strip().lower()
    if correct not in LETTERS or len(correct) != 1:
        raise OptionsError("answer not a-e", correct[:10])
    return Question(problem=problem.strip(), options=options, answer=LETTERS.index(correct),
                    rationale=_strip_quotes(record.get("Rationale") or ""), category=record.get("category") or "")


def parse_records(records: Iterable[dict]) -> tuple[list[Question], ParseReport]:
    """Every readable record as a Question, plus the report that counts the others by reason."""
    questions, report = [], ParseReport()
    for record in records:
        report.rows += 1
        try:
            questions.append(parse_record(record))
        except OptionsError as error:
            report.skipped[error.reason] += 1
    return questions, report


# ---------------------------------------------------------------------------------------------- sources


def _csv_records(path: pathlib.Path) -> Iterator[dict]:
    """Rows of a per-category CSV (option_a..option_e columns) as MathQA records.

    These CSVs were made by splitting options on every comma: values keep stray spaces and, for rows that
    were Python lists, quotes and brackets, which are stripped here. Thousands commas are lost for good.
    """
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as file:
        for row in csv.DictReader(file):
            values = [(row.get(f"option_{letter}") or "").strip().strip("'[]\" ").strip() for letter in LETTERS]
            options = " , ".join(f"{letter} ) {value}" for letter, value in zip(LETTERS, values) if value)
            yield {"Problem": row.get("Problem"), "Rationale": "", "options": options,
                   "correct": row.get("correct"), "category": row.get("category") or ""}


def read_file(path: pathlib.Path) -> list:
    """Records of one local file: a JSON list, jsonl, parquet or per-category CSV.

    Rows that cannot be read are returned too (as UnreadableRow, or with their undecodable bytes kept as
    surrogates) so `parse_records` counts them; a file that cannot be read as a whole raises DataError.
    """
    if path.suffix not in (".json", ".jsonl", ".parquet", ".csv"):
        raise DataError(f"the MathQA file {path} is not .json, .jsonl, .parquet or .csv; convert it")
    try:
        data = path.read_bytes()
        if not data.strip():
            raise DataError(f"the MathQA file {path} is empty ({len(data)} bytes); replace it with a copy that holds "
                            f"MathQA records, or remove it")
        if path.suffix == ".csv":
            return list(_csv_records(path))
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if path.suffix == ".jsonl":
            return sft.jsonl_records(data)
        data = json.loads(data.decode("utf-8", errors="surrogateescape"))
        if isinstance(data, dict):  # {"data": [...]}-style wrappers
            data = next((v for v in data.values() if isinstance(v, list)), [])
        if not isinstance(data, list):
            raise DataError(f"the MathQA file {path} holds a JSON {type(data).__name__}, not a list of records; "
                            f"replace it with a JSON list of MathQA records")
        return data
    except DataError:
        raise
    except (OSError, ValueError, TypeError, csv.Error) as error:  # pyarrow's ArrowInvalid is a ValueError
        first_line = (str(error).strip().splitlines() or [""])[0][:120]
        raise DataError(f"cannot read the MathQA file {path} ({type(error).__name__}: {first_line}); check that it "
                        f"is a complete JSON list, jsonl, parquet or CSV of MathQA records") from error


def local_split_files(folder: str, split: str) -> list[pathlib.Path]:
    """The files behind `split`: itself when it is a path, else its files in `folder` by name."""
    direct = pathlib.Path(split).expanduser()
    if direct.is_file():
        return [direct]
    if direct.is_dir():
        return _files_in(direct)
    root = pathlib.Path(folder).expanduser()
    for stem in LOCAL_STEMS.get(split, (split,)):
        for candidate in (root / f"{stem}.json", root / f"{stem}.jsonl", root / f"{stem}.parquet",
                          root / f"{stem}.csv"):
            if candidate.is_file():
                return [candidate]
        for pattern in (f"{stem}-*.parquet", f"data/{stem}-*.parquet", f"{stem}_by_category_csv/*.csv"):
            found = sorted(root.glob(pattern))
            if found:
                return found
    raise DataError(f"no MathQA '{split}' files found in {root.resolve()} (looked for "
                    f"{'/'.join(LOCAL_STEMS.get(split, (split,)))}.json/.jsonl/.parquet); set --config.mathqa.path "
                    f"to a folder such as ../shared/data/mathqa, or name a file in --config.mathqa.{split}_split")


def _files_in(folder: pathlib.Path) -> list[pathlib.Path]:
    for ext in (".json", ".jsonl", ".parquet", ".csv"):
        found = sorted(folder.glob(f"*{ext}"))
        if found:
            return found
    raise DataError(f"the MathQA folder {folder} holds no .json, .jsonl, .parquet or .csv files")


def load_records(mathqa_cfg, split: str) -> list:
    """The raw records of `split` (a split name, or a local path) from the configured source, in source order,
    unparsed (dicts with MathQA's string fields, or UnreadableRow): what `load_questions` parses, and what
    lm-eval-format scoring (jaxllm/lmeval.py) reads the harness's way.

    The synthetic source generates `mathqa.synthetic_problems` for train and a tenth of that for others;
    splits other than TRAINING_SPLITS draw only held-out problems (synthetic.is_held_out).
    """
    source = mathqa_cfg.source
    if source == "synthetic":
        n = mathqa_cfg.synthetic_problems
        size = n if split == "train" else max(1, n // 10)
        held_out = split not in TRAINING_SPLITS
        records = synthetic.generate_problems(size, SYNTHETIC_SEEDS.get(split, 4), held_out=held_out)
    elif source == "hub":
        name = mathqa_cfg.path or HUB_NAME
        hub_split = HUB_SPLITS.get(split, split)
        records = _load_hub(name, hub_split)
    elif source == "local":
        records = [r for f in local_split_files(mathqa_cfg.path, split) for r in read_file(f)]
    else:
        raise DataError(f"unknown MathQA source '{source}'; set --config.mathqa.source to synthetic, hub or local")
    return records


def load_questions(mathqa_cfg, split: str) -> tuple[list[Question], ParseReport]:
    """Questions of `split` (`load_records`'s records, parsed), with the report; DataError when none is readable."""
    source = mathqa_cfg.source
    questions, report = parse_records(load_records(mathqa_cfg, split))
    if not questions:
        raise DataError(f"the MathQA {source} split '{split}' has no readable questions ({report.summary()})")
    return questions, report


def load_splits(mathqa_cfg) -> tuple[dict[str, list[Question]], dict[str, dict]]:
    """{"train", "val", "test"} questions and each split's parse report summary.

    With `mathqa.val_split == ""` validation is carved out of train (`carve_validation`).
    """
    splits, reports = {}, {}
    train, train_report = load_questions(mathqa_cfg, mathqa_cfg.train_split)
    reports["train"] = train_report.summary()
    if mathqa_cfg.val_split:
        splits["train"] = train
        splits["val"], report = load_questions(mathqa_cfg, mathqa_cfg.val_split)
        reports["val"] = report.summary()
    else:
        splits["train"], splits["val"] = carve_validation(mathqa_cfg, train)
    splits["test"], report = load_questions(mathqa_cfg, mathqa_cfg.test_split)
    reports["test"] = report.summary()
    return splits, reports


def carve_validation(mathqa_cfg, train: list[Question]) -> tuple[list[Question], list[Question]]:
    """(train, val): a seeded `mathqa.val_fraction` of the loaded train split is validation, the rest train."""
    order = np.random.default_rng([mathqa_cfg.seed, 2357]).permutation(len(train))
    n_val = max(1, int(round(len(train) * mathqa_cfg.val_fraction)))
    if n_val >= len(train):
        raise DataError(f"the MathQA train split has {len(train)} questions, too few to carve out validation; "
                        f"set --config.mathqa.val_split")
    return [train[i] for i in sorted(order[n_val:])], [train[i] for i in sorted(order[:n_val])]


def shot_pool(mathqa_cfg) -> list[Question]:
    """The questions few-shot examples are drawn from: the fine-tune train split exactly as `load_splits`
    gives it (without the validation carve-out when `mathqa.val_split == ""`). The fine-tune stage's
    evaluation and `python -m jaxllm.eval` both draw from it, so they score the same prompts."""
    train, _ = load_questions(mathqa_cfg, mathqa_cfg.train_split)
    return train if mathqa_cfg.val_split else carve_validation(mathqa_cfg, train)[0]


# --------------------------------------------------------------------------------------- formatting


def format_options(options: Iterable[str]) -> str:
    return " , ".join(f"{letter} ) {value}" for letter, value in zip(LETTERS, options))


def format_prompt(question: Question) -> str:
    """The prompt: "Question: ...\\nOptions: a ) ... , e ) ...\\nAnswer:" (the target follows directly)."""
    return f"Question: {question.problem}\nOptions: {format_options(question.options)}\nAnswer:"


def format_choice(question: Question, index: int) -> str:
    """The answer text of option `index`: " c ) 30" (what the multiple-choice scorer compares)."""
    return f" {LETTERS[index]} ) {question.options[index]}"


def format_target(question: Question, rationale: bool = False) -> str:
    """The training target: the correct choice, optionally followed by "\\nRationale: ..."."""
    target = format_choice(question, question.answer)
    if rationale and question.rationale:
        target += f"\nRationale: {question.rationale}"
    return target


def few_shot_prefix(shots: list[Question]) -> str:
    """K solved examples, each prompt + correct choice, each followed by a blank line."""
    return "".join(format_prompt(q) + format_choice(q, q.answer) + "\n\n" for q in shots)


def shot_indices(n_train: int, k: int, seed: int, question_index: int) -> np.ndarray:
    """The K train examples shown before test question `question_index`: a pure function of its inputs."""
    if k == 0:
        return np.zeros((0,), np.int64)
    return np.random.default_rng([seed, question_index]).choice(n_train, size=min(k, n_train), replace=False)


# ------------------------------------------------------------------------------------ tokens and masks


# The tokens, loss masks and batches are the instruction-data path's (jaxllm/data/sft.py): MathQA is one
# instance of it, a formatter of (prompt, completion) pairs.
tokenize_example = sft.tokenize_example
padded_length = sft.padded_length
make_batch = sft.make_batch


class FinetuneData(sft.ExampleBatches):
    """Tokenized MathQA training and validation examples and their batches (order: a function of seed, step):
    `format_prompt` / `format_target` pairs through `sft.tokenize_example`, batched by `sft.ExampleBatches`
    (`packing`: several examples per row)."""

    def __init__(self, questions: dict[str, list[Question]], tokenizer, *, max_length: int, pad_multiple: int,
                 rationale: bool = False, packing: bool = False):
        def encode(qs):
            return [tokenize_example(tokenizer, format_prompt(q), format_target(q, rationale), max_length) for q in qs]

        super().__init__(encode(questions["train"]), encode(questions["val"]), max_length=max_length,
                         pad_multiple=pad_multiple, packing=packing)
