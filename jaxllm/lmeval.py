"""lm-evaluation-harness's definitions, reproduced so jaxllm's numbers compare with the harness's (no JAX here).

Checked against lm-eval 0.4.13 (EleutherAI/lm-evaluation-harness: lm_eval/tasks/mathqa/{mathqa.yaml,utils.py},
lm_eval/api/{task.py,samplers.py,metrics.py,model.py}, lm_eval/models/huggingface.py, lm_eval/utils.py);
tests/test_lmeval.py compares against the harness itself where it is installed.

MathQA (task `mathqa`, output_type multiple_choice). A document is one raw record (the harness reads every row
of the split, unfiltered):
  query        "Question: {Problem}\\nAnswer:"                                    (doc_to_text)
  choices      [c[4:].rstrip(" ,") for c in re.findall(r"[abcd] \\) .*?, |e \\) .*?$", options)]   (doc_to_choice)
  gold         "abcde".index(correct): it may fall outside the choices, and the doc then scores 0 (as there)
  continuation " " + choice                                                        (target_delimiter " ")
The regex quirks are kept: a Python-list `options` ("['a ) 4', 'b ) 4 π', ...]") gives choices with a
trailing "'" (and "']" for e); a value holding ", " is cut there; a row may parse to fewer or more than five.
K-shot context: K train docs, each "query choices[gold]" + "\\n\\n", then the query (no description). The
shots come from the whole train split in its order, drawn by one `random.Random(1234)` for the run:
`rnd.sample(train, K)` for each test doc in turn (`--limit N` keeps the first N docs; their shots do not
change). The same doc can be drawn as its own shot only when train and test are one split (then the
harness draws K + 1 and drops it; not reproduced: jaxllm refuses that).
Tokens (`encode_pairs`, the harness's `_encode_pair`): trailing whitespace of the context moves to the
continuation; context_ids = encode(context), continuation_ids = encode(context + continuation)[len(context_ids):];
a tokenizer with a `bos_id` (not None) gets it in front of every context, as HFLM's tokenizer adds it.
Metrics (`mc_metrics`): acc = mean(argmax(ll) == gold); acc_norm = mean(argmax(ll / len(choice)) == gold)
with len in characters (Python str length, not bytes: the harness's `completion_len`; bytes would be its
`acc_bytes`), the choice without the delimiter space; their stderr is `mean_stderr` (sample stddev / sqrt(n)).

Perplexity (output_type loglikelihood_rolling, as `wikitext`): a document's log-likelihood is the sum over
its tokens of log p(token | preceding tokens of its window). The token sequence is [prefix] + encode(doc)
(prefix: `bos_id`, else the end-of-text id); windows (`rolling_windows`, from get_rolling_token_windows +
make_disjoint_window with context_len 1) each predict `max_length` new tokens from the last max_length
inputs, so every token is predicted exactly once and a window never looks into the previous one, except the
last, which is filled back to max_length inputs. Metrics (`perplexity_metrics`): word_perplexity =
exp(-sum ll / sum words), byte_perplexity = exp(-sum ll / sum bytes), bits_per_byte = -sum ll / sum bytes /
ln 2, with words = len(re.split(r"\\s+", doc)) and bytes = len(doc.encode("utf-8")); jaxllm adds
token_perplexity = exp(-sum ll / sum tokens) and the counts. One difference, on purpose: with a tokenizer
that adds a BOS itself (Llama's), lm-eval 0.4.13's HFLM encodes the document with it and also prefixes it,
so it scores [BOS, BOS, doc] and adds log p(BOS | BOS) to every document (even an empty one); jaxllm scores
[BOS, doc]. With tokenizers that add nothing (GPT-2's) the two agree exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
import re

import numpy as np

from jaxllm.data.mathqa import LETTERS, OptionsError
from jaxllm.data.sources import DataError

CHOICE_RE = re.compile(r"[abcd] \) .*?, |e \) .*?$")  # lm_eval/tasks/mathqa/utils.py
FEWSHOT_SEED = 1234  # lm_eval.evaluator.simple_evaluate(fewshot_random_seed=1234)
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


# ------------------------------------------------------------------------------------------------ MathQA


@dataclasses.dataclass(frozen=True)
class MathQADoc:
    """One MathQA test or train document as the harness sees it: its query, its parsed choices, the gold index."""

    query: str
    choices: tuple[str, ...]
    gold: int  # "abcde".index(correct); >= len(choices) when the options parse short (the doc then scores 0)


def doc_to_choice(options: str) -> list[str]:
    """The harness's choices of a MathQA `options` string, quirks included (see the module docstring)."""
    return [c[4:].rstrip(" ,") for c in CHOICE_RE.findall(options)]


def doc_to_text(problem: str) -> str:
    """The harness's query: "Question: {Problem}\\nAnswer:"."""
    return f"Question: {problem}\nAnswer:"


def read_doc(record) -> MathQADoc:
    """A `MathQADoc` from one raw MathQA record; OptionsError(reason) for rows the harness itself cannot read
    (not a dict, Problem or options not text, `correct` not one of a-e, options that parse to no choice)."""
    if not isinstance(record, dict):
        raise OptionsError("row not an object", type(record).__name__)
    problem, options, correct = record.get("Problem"), record.get("options"), record.get("correct")
    if not isinstance(problem, str):
        raise OptionsError("Problem not text")
    if not isinstance(options, str):
        raise OptionsError("options not text")
    if correct not in tuple(LETTERS):  # the harness's ['a', ..., 'e'].index(correct): exact, case-sensitive
        raise OptionsError("answer not a-e", str(correct)[:10])
    choices = doc_to_choice(options)
    if not choices:
        raise OptionsError("no choices parsed")
    return MathQADoc(query=doc_to_text(problem), choices=tuple(choices), gold=LETTERS.index(correct))


def read_docs(records) -> tuple[list[MathQADoc | None], dict[str, int]]:
    """`read_doc` of each record, None where unreadable (kept so positions match the harness's doc ids), and
    the unreadable ones counted by reason."""
    docs, skipped = [], {}
    for record in records:
        try:
            docs.append(read_doc(record))
        except OptionsError as error:
            docs.append(None)
            skipped[error.reason] = skipped.get(error.reason, 0) + 1
    return docs, skipped


def fewshot_indices(n_docs: int, n_pool: int, shots: int, seed: int = FEWSHOT_SEED) -> list[list[int]]:
    """Pool indices of the shots of test docs 0 .. n_docs-1: the harness's ContextSampler, one
    `random.Random(seed)` drawing `rnd.sample(pool, shots)` per doc in order (which indices it picks depends
    only on len(pool), so sampling range(n_pool) picks the same ones)."""
    if shots <= 0:
        return [[] for _ in range(n_docs)]
    if shots > n_pool:
        raise DataError(f"{shots} shots asked but the few-shot split has only {n_pool} readable questions; "
                        f"ask for fewer shots or name a larger split")
    rnd = random.Random(seed)
    return [rnd.sample(range(n_pool), shots) for _ in range(n_docs)]


def fewshot_context(doc: MathQADoc, shots: list[MathQADoc]) -> str:
    """The harness's context: each shot "query choice\\n\\n" (its gold choice), then the doc's query.

    A shot whose gold index is past its choices has no answer text (the harness fails on it): DataError.
    """
    parts = []
    for shot in shots:
        if shot.gold >= len(shot.choices):
            raise DataError(f"a few-shot example's answer ({LETTERS[shot.gold]}) is not among its {len(shot.choices)} "
                            f"parsed choices ({shot.query[:60]!r}); lm-eval cannot format it either: remove the row")
        parts.append(shot.query + TARGET_DELIMITER + shot.choices[shot.gold] + FEWSHOT_DELIMITER)
    return "".join(parts) + doc.query


def encode_pairs(tokenizer, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """(context_ids, [continuation_ids]) as the harness tokenizes each (context, continuation) pair for a
    causal model (`_encode_pair`; the context's ids do not depend on the continuation, so they are shared).

    Trailing whitespace of the context moves to the continuation; a continuation's ids are those of the
    whole text past the context's (so a merge across the boundary is split where the harness splits it);
    `tokenizer.bos_id`, when there is one, starts the context.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, moved = context[:-n_spaces], context[-n_spaces:]
        continuations = [moved + text for text in continuations]
    context_ids = list(tokenizer.encode(context))
    continuation_ids = [list(tokenizer.encode(context + text))[len(context_ids):] for text in continuations]
    bos = getattr(tokenizer, "bos_id", None)
    return ([bos] if bos is not None else []) + context_ids, continuation_ids


def mean_stderr(values) -> float | None:
    """The harness's `mean_stderr`: sample standard deviation (n - 1) / sqrt(n); None below two values."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return None
    return float(np.sqrt(np.sum((values - values.mean()) ** 2) / (len(values) - 1)) / np.sqrt(len(values)))


def mc_outcomes(lls: list[np.ndarray], docs: list[MathQADoc]) -> tuple[np.ndarray, np.ndarray]:
    """Per doc, float64 [N] acc and acc_norm (1.0 or 0.0), as the harness's process_results decides them.

    lls[i] float64 [len(docs[i].choices)] is each choice's summed log-likelihood. Ties go to the first choice
    (np.argmax); an empty choice divides by zero as numpy does (-inf, or nan, which argmax picks).
    """
    acc, acc_norm = np.zeros(len(docs)), np.zeros(len(docs))
    for i, (ll, doc) in enumerate(zip(lls, docs)):
        ll = np.asarray(ll, np.float64)
        lengths = np.asarray([float(len(choice)) for choice in doc.choices])
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = ll / lengths
        gold = doc.gold if doc.gold < len(doc.choices) else -100
        acc[i] = float(np.argmax(ll) == gold)
        acc_norm[i] = float(np.argmax(norm) == gold)
    return acc, acc_norm


def mc_metrics(lls: list[np.ndarray], docs: list[MathQADoc]) -> dict:
    """{"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}: `mc_outcomes` aggregated by mean, with
    `mean_stderr` (the harness's "acc,none", "acc_stderr,none", ...)."""
    acc, acc_norm = mc_outcomes(lls, docs)
    return {"n": len(docs), "acc": float(np.mean(acc)) if len(docs) else None, "acc_stderr": mean_stderr(acc),
            "acc_norm": float(np.mean(acc_norm)) if len(docs) else None, "acc_norm_stderr": mean_stderr(acc_norm)}


# ------------------------------------------------------------------------------------------- perplexity


def rolling_windows(token_ids: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int], int]]:
    """The windows that score a document: (ids, n) pairs; a window's inputs are ids[:-1] (at most max_length),
    its targets ids[1:], and only its last n targets are scored.

    With seq = [prefix_id] + token_ids, each token seq[e] (e = 1 .. len(token_ids)) is scored exactly once.
    Windows end at targets max_length, 2 max_length, ... and len(token_ids); a window ending at target e
    has inputs seq[max(0, e - max_length) : e]. That is the harness's get_rolling_token_windows +
    make_disjoint_window (context_len 1) after its (context + continuation)[-(max_length + 1):][:-1] cut:
    disjoint windows, except that the last one is filled back to max_length inputs. An empty document has none.
    """
    seq, n = [prefix_id] + list(token_ids), len(token_ids)
    windows = []
    for begin in range(0, n, max_length):
        end = min(begin + max_length, n)  # this window scores targets seq[begin + 1 .. end]
        windows.append((seq[max(0, end - max_length):end + 1], end - begin))
    return windows


def count_words(text: str) -> int:
    """The harness's word count: len(re.split(r"\\s+", text)) (so "" counts 1, and leading space adds one)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def perplexity_metrics(lls, texts: list[str], token_counts) -> dict:
    """{"documents", "tokens", "words", "bytes", "word_perplexity", "byte_perplexity", "bits_per_byte",
    "token_perplexity"} of documents `texts` with summed log-likelihoods `lls` (nats) and scored tokens
    `token_counts`: the harness's weighted_perplexity and bits_per_byte aggregations (sums over documents
    first, then one ratio), plus jaxllm's token perplexity."""
    total = float(np.sum(np.asarray(lls, np.float64)))
    words = sum(count_words(text) for text in texts)
    n_bytes = sum(count_bytes(text) for text in texts)
    tokens = int(np.sum(token_counts))

    def ratio(count):
        return -total / count if count else float("nan")

    return {"documents": len(texts), "tokens": tokens, "words": words, "bytes": n_bytes, "loglikelihood": total,
            "word_perplexity": math.exp(ratio(words)), "byte_perplexity": math.exp(ratio(n_bytes)),
            "bits_per_byte": ratio(n_bytes) / math.log(2), "token_perplexity": math.exp(ratio(tokens))}


def read_texts(path: str) -> tuple[list[str], dict[str, int]]:
    """Documents of a .txt file (the whole file is one document), a .jsonl or .parquet file (its rows' `text`
    field), or a folder of them (every such file below it, sorted by path); and the rows skipped, by reason
    (a broken JSON line, a row without a string `text`). DataError when nothing can be read."""
    root = pathlib.Path(path).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"the folder {root} holds no .txt, .jsonl or .parquet files; point --data at a text file")
    elif root.is_file():
        if root.suffix not in TEXT_SUFFIXES:
            raise DataError(f"--data {root} is not a .txt, .jsonl or .parquet file (or a folder of them); convert it")
        files = [root]
    else:
        raise DataError(f"--data {root} does not exist; point it at a .txt, .jsonl or .parquet file or a folder")
    texts, skipped = [], {}

    def skip(reason):
        skipped[reason] = skipped.get(reason, 0) + 1

    for file in files:
        try:
            if file.suffix == ".txt":
                texts.append(file.read_bytes().decode("utf-8"))
                continue
            if file.suffix == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(file)
                if "text" not in table.column_names:
                    raise DataError(f"the parquet file {file} has no `text` column (it has {table.column_names}); "
                                    f"name the column holding the documents `text`")
                rows = table.column("text").to_pylist()
            else:
                rows = []
                for line in file.read_bytes().splitlines():
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except ValueError:  # UnicodeDecodeError is one too
                        skip("broken_line")
                        continue
                    rows.append(record.get("text") if isinstance(record, dict) else None)
        except DataError:
            raise
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {file} ({type(error).__name__}: {str(error)[:120]}); check that it is a "
                            f"complete UTF-8 text, jsonl or parquet file") from error
        for text in rows:
            if isinstance(text, str):
                texts.append(text)
            else:
                skip("no_text")
    if not texts:
        raise DataError(f"no documents could be read from {root} (skipped: {skipped}); jsonl and parquet rows "
                        f"need a string `text` field")
    return texts, skipped


def mathqa_requests(tokenizer, records, pool_records, *, shots: int, limit: int = 0):
    """The harness's MathQA requests: (docs, contexts, context_ids, option_ids, skipped).

    records: the test split's raw records in order (the harness's doc ids); the first `limit` (0 = all) are
    used, like its --limit. pool_records: the few-shot split's raw records, in order. Unreadable test rows
    are skipped and counted (their shot draws still happen, so later docs keep the harness's shots); the
    pool keeps its readable rows. docs [N] MathQADoc, contexts [N] strings, context_ids [N] id lists,
    option_ids [N][len(choices)] id lists (`encode_pairs` of " " + each choice).
    """
    records = list(records)[:limit] if limit else list(records)
    test_docs, skipped = read_docs(records)
    pool = [doc for doc in read_docs(pool_records)[0] if doc is not None] if shots else []
    picks = fewshot_indices(len(test_docs), len(pool), shots)
    docs, contexts, context_ids, option_ids = [], [], [], []
    for doc, shot_ids in zip(test_docs, picks):
        if doc is None:
            continue
        context = fewshot_context(doc, [pool[j] for j in shot_ids])
        ids, options = encode_pairs(tokenizer, context, [TARGET_DELIMITER + choice for choice in doc.choices])
        docs.append(doc)
        contexts.append(context)
        context_ids.append(ids)
        option_ids.append(options)
    return docs, contexts, context_ids, option_ids, skipped
