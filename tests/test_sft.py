"""Instruction data: chat rows tokenized as transformers' apply_chat_template tokenizes them, with weight 1 on
exactly the assistant tokens and their end-of-turn (checked against transformers' own assistant mask); the
built-in template and prompt/completion rows; bad rows counted by reason; the fine-tune stage on a jsonl file,
packed, end to end and resumed after a kill."""

import json
import pathlib

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import finetune as finetune_lib
from jaxllm import train as train_lib
from jaxllm.data import mathqa, sft
from jaxllm.data.sources import DataError
from jaxllm.metrics import read_metrics
from jaxllm.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")
from test_hf_tokenizer import write_model_tokenizer  # noqa: E402

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "chat_example.jsonl"

# SmolLM2-135M-Instruct's chat template, as its chat_template.jinja holds it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The same template with transformers' {% generation %} markers around what an assistant turn trains on: its
# content and <|im_end|>. It renders the same text; transformers derives its assistant mask from the markers.
SMOLLM2_TAGGED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3 style: the template writes the BOS, trims content, ends turns with <|eot_id|>
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim }}<|eot_id|>"
                   "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
LLAMA3_TAGGED = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'assistant: ' }}"
                 "{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}{% else %}"
                 "{{ m['role'] + ': ' + m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

CHAT = [{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "3 + 3 = 6, so the answer is 6."}]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}] + CHAT


def hf_folder(path, template, *, bos=None, bos_token="<|im_start|>", eos_token="<|im_end|>"):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token}
    write_model_tokenizer(path, bos=bos, config=config, files={"chat_template.jinja": template})
    return path


def transformers_ids_and_mask(folder, tagged_template, messages):
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = auto.apply_chat_template(messages, chat_template=tagged_template, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    plain = auto.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert plain == out["input_ids"]  # the markers change nothing in the text
    return out["input_ids"], out["assistant_masks"]


def as_messages(chat):
    return tuple((m["role"], m["content"]) for m in chat)


@pytest.mark.parametrize("chat", [CHAT, WITH_SYSTEM], ids=["default-system", "own-system"])
def test_smollm2_chat_mask_is_exactly_the_assistant_tokens_and_im_end(tmp_path, chat):
    folder = hf_folder(tmp_path, SMOLLM2_TEMPLATE)
    tokenizer = get_tokenizer("hf", str(folder))
    ids, mask = sft.Encoder(tokenizer).encode(as_messages(chat))
    expected_ids, expected_mask = transformers_ids_and_mask(folder, SMOLLM2_TAGGED, chat)
    assert ids.tolist() == expected_ids
    assert mask.tolist() == [float(m) for m in expected_mask]
    # read back: the trained tokens are each answer followed by <|im_end|>, and nothing else
    im_end = tokenizer.eot_id
    trained = [int(i) for i, m in zip(ids, mask) if m]
    answers = [m["content"] for m in chat if m["role"] == "assistant"]
    expected = [t for a in answers for t in tokenizer.encode_with_special_tokens(a) + [im_end]]
    assert trained == expected
    assert int(mask.sum()) < len(ids) // 2  # system prompt, user turns and headers carry no weight


def test_llama3_style_template_bos_and_trimmed_content(tmp_path):
    folder = hf_folder(tmp_path, LLAMA3_TEMPLATE, bos="<|begin_of_text|>", bos_token="<|begin_of_text|>",
                       eos_token="<|eot_id|>")
    tokenizer = get_tokenizer("hf", str(folder))
    chat = [dict(m, content=f"  {m['content']} ") for m in CHAT]  # the template trims; the mask follows
    ids, mask = sft.Encoder(tokenizer).encode(as_messages(chat))
    expected_ids, expected_mask = transformers_ids_and_mask(folder, LLAMA3_TAGGED, chat)
    assert ids.tolist() == expected_ids and ids[0] == tokenizer.bos_id and list(ids).count(tokenizer.bos_id) == 1
    assert mask.tolist() == [float(m) for m in expected_mask]


def test_builtin_template_and_prompt_completion_rows(tmp_path):
    byte = get_tokenizer("byte")
    encoder = sft.Encoder(byte)
    assert not encoder.uses_chat_template
    ids, mask = encoder.encode(as_messages(WITH_SYSTEM))
    text = ("System: Answer briefly.\n\nUser: What is 2+2?\n\nAssistant:", " 2 + 2 = 4.", "User: And 3+3?\n\nAssistant:",
            " 3 + 3 = 6, so the answer is 6.")
    eot = [byte.eot_id]
    assert ids.tolist() == (byte.encode(text[0]) + byte.encode(text[1]) + eot + byte.encode(text[2])
                            + byte.encode(text[3]) + eot)
    assert [i for i, m in zip(ids.tolist(), mask) if m] == byte.encode(text[1]) + eot + byte.encode(text[3]) + eot
    # a prompt/completion row is MathQA's example; a one-turn chat is the prompt/completion row of its text
    row = sft.parse_row({"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"})
    pc_ids, pc_mask = encoder.encode(row)
    mq_ids, mq_mask = mathqa.tokenize_example(byte, row.prompt, row.completion, max_length=100)
    assert pc_ids.tolist() == mq_ids.tolist() and pc_mask.tolist() == mq_mask.tolist()
    one_turn = encoder.encode((("user", "2+2?"), ("assistant", "4")))
    same = encoder.encode(sft.PromptCompletion("User: 2+2?\n\nAssistant:", " 4"))
    assert one_turn[0].tolist() == same[0].tolist() and one_turn[1].tolist() == same[1].tolist()
    # template=builtin on a tokenizer that has a chat template and a BOS: BOS first, built-in text
    folder = hf_folder(tmp_path, LLAMA3_TEMPLATE, bos="<|begin_of_text|>", bos_token="<|begin_of_text|>",
                       eos_token="<|eot_id|>")
    hf = get_tokenizer("hf", str(folder))
    ids, mask = sft.Encoder(hf, "builtin").encode((("user", "hi"), ("assistant", "yo")))
    assert ids.tolist() == [hf.bos_id] + hf.encode("User: hi\n\nAssistant:") + hf.encode(" yo") + [hf.eot_id]
    assert mask.tolist() == [0.0] * (1 + len(hf.encode("User: hi\n\nAssistant:"))) + [1.0] * 4


BAD_ROWS = [
    ('{"prompt": "a", "completion": " b"}', None),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', None),
    ('{"prompt": "a"', "broken json line"),
    ('[1, 2]', "row not an object"),
    ('{"text": "no fields"}', "missing messages or prompt/completion"),
    ('{"prompt": "a"}', "missing completion"),
    ('{"completion": "b"}', "missing prompt"),
    ('{"prompt": "a", "completion": 3}', "completion not text"),
    ('{"prompt": "a", "completion": "  "}', "empty content"),
    ('{"messages": "hi"}', "messages not a list"),
    ('{"messages": ["hi"]}', "message not an object"),
    ('{"messages": [{"role": "user"}]}', "message without role or content"),
    ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}', "empty content"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant turn"),
    ('{"prompt": "' + "x" * 300 + '", "completion": " y"}', "longer than max_length"),
]


def sft_section(path, **fields):
    c = config_lib.default_config()
    c.sft.path = str(path)
    for name, value in fields.items():
        c.sft[name] = value
    return c.sft


def test_bad_rows_are_counted_by_reason_never_a_crash(tmp_path):
    train = tmp_path / "rows.jsonl"
    train.write_bytes(("\n".join(line for line, _ in BAD_ROWS) + "\n").encode() + b'{"prompt": "\xff"}\n')
    val = tmp_path / "val.jsonl"
    val.write_text(BAD_ROWS[0][0] + "\n" + BAD_ROWS[4][0] + "\n")
    data, reports = sft.load_data(sft_section(train, val_split=str(val)), get_tokenizer("byte"), max_length=64)
    expected = {}
    for _, reason in BAD_ROWS:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    expected["not UTF-8"] = 1
    assert reports["train"] == {"rows": len(BAD_ROWS) + 1, "read": 2, "skipped": expected}
    assert reports["val"] == {"rows": 2, "read": 1, "skipped": {"missing messages or prompt/completion": 1}}
    assert len(data.train) == 2 and len(data.val) == 1


def test_validation_carve_out_is_seeded_and_folders_and_json_lists_read(tmp_path):
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    byte = get_tokenizer("byte")
    a, _ = sft.load_data(sft_section(tmp_path, seed=3), byte, max_length=512)
    b, _ = sft.load_data(sft_section(EXAMPLE, seed=3), byte, max_length=512)
    c, _ = sft.load_data(sft_section(EXAMPLE, seed=4), byte, max_length=512)
    assert len(a.val) == len(b.val) == round(0.05 * len(rows)) and len(a.train) + len(a.val) == len(rows)
    assert [x.tolist() for x, _ in a.val] == [x.tolist() for x, _ in b.val]
    assert [x.tolist() for x, _ in a.val] != [x.tolist() for x, _ in c.val]


def test_user_errors_are_one_sentence(tmp_path, monkeypatch):
    byte = get_tokenizer("byte")
    with pytest.raises(DataError, match="sft.path .* does not exist"):
        sft.load_data(sft_section(tmp_path / "missing.jsonl"), byte, max_length=64)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        sft.load_data(sft_section(tmp_path / "empty.jsonl"), byte, max_length=64)
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n' * 30)
    with pytest.raises(DataError, match="no usable rows"):
        sft.load_data(sft_section(tmp_path / "bad.jsonl"), byte, max_length=64)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub .*sft.source=local"):
        sft.load_data(sft_section("someone/chats", source="hub"), byte, max_length=64)
    c = config_lib.default_config()
    c.stages, c.finetune.init_from, c.finetune.data = "finetune", "runs/x", "sft"
    with pytest.raises(config_lib.ConfigError, match="sft.path is empty"):
        config_lib.validate(c)
    c.sft.path, c.sft.template = "x.jsonl", "chatml"
    with pytest.raises(config_lib.ConfigError, match="sft.template"):
        config_lib.validate(c)


# ------------------------------------------------------------------------------- the stage, end to end


def sft_stage_config(tmp_path, **overrides):
    from test_stages import staged_config

    fields = {"finetune.data": "sft", "sft.path": str(EXAMPLE), "sft.max_length": 256, "sft.val_fraction": 0.1,
              "finetune.packing": True, "finetune.train.steps": 4,
              "finetune.train.checkpoint_every": 2, "finetune.train.eval_every": 2, **overrides}
    return staged_config(tmp_path, **fields)


def test_sft_stage_trains_on_a_jsonl_file_packed(tmp_path):
    config = sft_stage_config(tmp_path)
    summary = train_lib.run_stages(config, tmp_path / "run")
    stage = tmp_path / "run" / "finetune"
    report = json.loads((stage / "sft_parse.json").read_text())
    assert report["train"] == {"rows": 45, "read": 45, "skipped": {}} and report["template"] == "builtin"
    written = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in written if r["split"] == "train"] == [1, 2, 3, 4]
    assert not [r for r in written if r["split"] == "mathqa"] and not (stage / "mathqa_parse.json").exists()
    assert summary["finetune"]["step"] == 4 and np.isfinite(summary["finetune"]["val"]["loss"])
    # packed rows: each step's tokens_seen counts every example it packed (4 rows of up to 256 tokens)
    data, _ = sft.load_data(config.sft, get_tokenizer("byte"), max_length=256, packing=True)
    batches = [data.train_batch(seed=0, step=s, batch_size=4, grad_accum=1) for s in range(4)]
    assert [r["tokens_seen"] for r in written if r["split"] == "train"][-1] == sum(
        int((b["segment_ids"] > 0).sum()) for b in batches)
    assert max(int(b["segment_ids"].max()) for b in batches) >= 2



@pytest.mark.slow  # ~30-60 s here
def test_killed_packed_sft_stage_resumes_exactly(tmp_path, kill_train_step):
    config = sft_stage_config(tmp_path, **{"finetune.train.log_every": 1})
    train_lib.run_stages(config, tmp_path / "straight")
    with kill_train_step(3 + 4):  # pretrain's 3 steps, then die before fine-tune step 4 (checkpoint at 2)
        train_lib.run_stages(config, tmp_path / "resumed")
    train_lib.run_stages(config, tmp_path / "resumed")
    for split in ("train", "val"):
        a, b = [[{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "elapsed_s")}  # timings
                 for r in read_metrics(tmp_path / run / "finetune" / "metrics.jsonl") if r["split"] == split]
                for run in ("straight", "resumed")]
        assert a == b and a, split


def test_finetune_load_data_keeps_mathqa_batches_unchanged(tmp_path):
    """finetune.data=mathqa (the default) builds the same FinetuneData as before the sft path existed."""
    from test_stages import staged_config

    config = config_lib.stage_config(staged_config(tmp_path), "finetune")
    data, questions = finetune_lib.load_data(config, get_tokenizer("byte"), tmp_path)
    direct = mathqa.FinetuneData(questions, get_tokenizer("byte"), max_length=128, pad_multiple=64)
    a = data.train_batch(seed=0, step=3, batch_size=4, grad_accum=2)
    b = direct.train_batch(seed=0, step=3, batch_size=4, grad_accum=2)
    assert set(a) == {"inputs", "targets", "weights"} and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "mathqa_parse.json").read_text())["train"]["read"] == 60
