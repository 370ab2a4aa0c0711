"""Task loaders on real file slices (tests/assets/data) and answer extraction on literal strings."""

from pathlib import Path

import pytest

from eva_lora.app.tasks import TASKS, DataError, eval_tasks, get_task
from eva_lora.app.tasks.generation import (
    extract_boxed,
    extract_choice,
    extract_number,
    latex_equal,
    numbers_equal,
)

DATA = Path(__file__).parent / "assets/data"


@pytest.mark.parametrize(
    "name,n_train,n_eval,first_label",
    [
        ("sst2", 30, 20, None),
        ("cola", 30, 20, 1),
        ("rte", 30, 20, 1),
        ("mrpc", 30, 20, 1),
        ("stsb", 30, 20, 5.0),
    ],
)
def test_glue_loaders_read_the_real_layouts(name, n_train, n_eval, first_label):
    task = get_task(name)
    train, dev = task.load("train", DATA), task.load("eval", DATA)
    assert (len(train), len(dev)) == (n_train, n_eval)
    assert {"text", "label"} <= set(train.column_names)
    if first_label is not None:
        assert dev[0]["label"] == first_label
    if name in ("rte", "mrpc", "stsb"):
        assert train[0]["text_pair"]


def test_limit_keeps_a_fixed_random_subset_not_a_biased_prefix(tmp_path):
    # A file sorted by label, like the GLUE files sorted by genre:
    # a prefix would hold one class only.
    rows = [f"0\tbad film {i}" for i in range(50)] + [f"1\tgood film {i}" for i in range(50)]
    (tmp_path / "sorted.tsv").write_text("\n".join(rows) + "\n")
    task = get_task("sst2")
    first = task.load("eval", file=tmp_path / "sorted.tsv", limit=20)
    again = task.load("eval", file=tmp_path / "sorted.tsv", limit=20)
    assert len(first) == 20 and first["text"] == again["text"]  # same rows for every run
    assert 5 <= sum(first["label"]) <= 15  # both classes, unlike the first 20 rows
    numbers = [
        int(t.rsplit(" ", 1)[1]) + 50 * label for t, label in zip(first["text"], first["label"])
    ]
    assert numbers == sorted(numbers)  # file order is kept
    # a limit above the size
    assert len(task.load("eval", file=tmp_path / "sorted.tsv", limit=500)) == 100
    with pytest.raises(DataError, match="limit must be >= 1"):
        task.load("eval", file=tmp_path / "sorted.tsv", limit=0)


def test_glue_metrics_match_hand_computed_values():
    assert get_task("sst2").score([1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    mrpc = get_task("mrpc").score([1, 0, 1, 1], [1, 0, 0, 1])
    assert mrpc["f1"] == pytest.approx(0.8)
    assert get_task("cola").score([1, 0, 1, 0], [1, 0, 1, 0])["matthews"] == pytest.approx(1.0)
    # cov = 4.5, var_x = 2, var_y = 10.1667 (sums of squares about the means)
    pearson = get_task("stsb").score([1.0, 2.0, 3.0], [2.0, 4.0, 6.5])["pearson"]
    assert pearson == pytest.approx(4.5 / (2 * 10.1666667) ** 0.5, abs=1e-6)


def test_bundled_sst2_needs_no_data_dir():
    assert len(get_task("sst2").load("train")) == 1000 and len(get_task("sst2").load("eval")) == 300


def test_gsm8k_becomes_metamath_schema_with_alpaca_prompt():
    data = get_task("gsm8k").load("train", DATA)
    row = data[0]
    assert row["prompt"].startswith("Below is an instruction") and row["prompt"].endswith(
        "### Response:\n"
    )
    assert row["response"].endswith("The answer is: 72") and row["answer"] == "72"
    assert "<<" not in row["response"]  # calculator annotations removed


def test_metamath_schema_is_accepted(tmp_path):
    file = tmp_path / "mm.jsonl"
    file.write_text('{"query": "What is 2+3?", "response": "2+3=5. The answer is: 5"}\n')
    row = get_task("gsm8k").load("train", file=file)[0]
    assert row["answer"] == "5" and "What is 2+3?" in row["prompt"]


def test_math_answers_come_from_boxed():
    data = get_task("math").load("eval", DATA)
    assert data[0]["answer"] == "2"  # "How many vertical asymptotes ..." -> \boxed{2}


def test_commonsense_joint_training_set_and_seven_eval_tasks():
    train = get_task("commonsense").load("train", DATA)
    assert len(train) == 32 and set(train["answer"]) <= {
        "true",
        "false",
        "answer1",
        "answer2",
        "answer3",
        "answer4",
    }
    tests = eval_tasks("commonsense")
    assert [t.name for t in tests] == [
        "boolq",
        "piqa",
        "siqa",
        "winogrande",
        "arc-e",
        "arc-c",
        "obqa",
    ]
    assert all(len(t.load("eval", DATA)) == 3 for t in tests)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She pays 5 + 7 = 12 dollars.\nThe answer is: 12", "12"),
        ("#### 1,234", "1234"),
        ("so the total is 18.0 apples", "18"),
        ("The answer is -3.5.", "-3.5"),
        ("no number here", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numbers_equal_is_numeric():
    assert (
        numbers_equal("72.0", "72")
        and numbers_equal("1234", "1234")
        and not numbers_equal("7", "72")
    )
    assert not numbers_equal(None, "1")


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (
            r"\boxed{a} then \boxed{\left( 3, \frac{\pi}{2} \right)}",
            r"\left( 3, \frac{\pi}{2} \right)",
        ),
        ("The answer is: 7", "7"),
        ("nothing", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_latex_equivalence_uses_math_verify():
    assert latex_equal(r"\frac{1}{2}", "0.5")
    assert latex_equal(r"\dfrac{2}{4}", r"\frac{1}{2}")
    assert not latex_equal("3", r"\frac{1}{2}")
    assert not latex_equal(None, "1")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("the correct answer is solution2", "solution2"),
        ("The correct answer is: True.", "true"),
        ("I think answer3 because ...", "answer3"),
        ("the correct answer is option1 and not option2", "option1"),
        ("no idea", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_unknown_task_lists_choices_and_missing_columns_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'qnli'; choose one of: sst2, cola"):
        get_task("qnli")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_text": "x", "solution": "y"}\n')
    with pytest.raises(DataError, match="needs columns question/answer"):
        get_task("gsm8k").load("train", file=bad)
    with pytest.raises(DataError, match="data file not found"):
        get_task("rte").load("train", tmp_path)
    with pytest.raises(DataError, match="no data directory given"):
        get_task("rte").load("train")
    assert len(TASKS) == 18  # 5 GLUE, gsm8k, math, commonsense + its 7 parts, code, humaneval, mbpp


def test_over_long_examples_are_dropped_or_truncated_and_counted(tiny_llama_dir):
    """drop_long=True drops exactly the examples over max_length; otherwise they are cut to
    max_length with a warning giving the count. Either way the count is reported."""
    import warnings

    from transformers import AutoTokenizer

    from eva_lora.app.preprocess import tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = get_task("gsm8k").load("train", DATA, limit=12)
    full = tokenize(data, tokenizer, "generation", 10_000, drop_long=False)
    lengths = [len(ids) for ids in full.dataset["input_ids"]]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the examples are longer
    long = sum(n > limit for n in lengths)
    dropped = tokenize(data, tokenizer, "generation", limit, drop_long=True)
    assert (dropped.kept, dropped.dropped, dropped.truncated) == (12 - long, long, 0)
    assert max(len(ids) for ids in dropped.dataset["input_ids"]) <= limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = tokenize(data, tokenizer, "generation", limit, drop_long=False)
    assert (cut.kept, cut.dropped, cut.truncated) == (12, 0, long)
    assert [len(ids) for ids in cut.dataset["input_ids"]] == [min(n, limit) for n in lengths]
    assert all(len(r["labels"]) == len(r["input_ids"]) for r in cut.dataset)
    assert any(
        f"{long} of 12 examples are longer than max_length={limit}" in str(w.message)
        for w in caught
    )
