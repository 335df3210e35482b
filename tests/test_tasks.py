"""Tests for ebt.tasks: determinism, independent checking, disjoint splits, harder split,
length budget, argument validation. Whole file runs in a few seconds on one CPU core."""

from __future__ import annotations

import random
import re

import pytest

from ebt.tasks import (
    DIFFICULTY_LIMITS,
    MAX_CHARS,
    SPLITS,
    TASK_NAMES,
    TRAIN_MAX_CHARS,
    check_answer,
    difficulty_ranges,
    make_task,
    task_text,
)

# Shapes of a well-formed prompt / answer, written here independently of the module.
PROMPT_RE = {
    "addition": re.compile(r"(0|[1-9]\d*)\+(0|[1-9]\d*)="),
    "dyck": re.compile(r"[()\[\]{}]+="),
    "sorting": re.compile(r"\d+="),
    "sudoku": re.compile(r"[1-4.]{16}="),
}
ANSWER_ALPHABET = {"addition": "0123456789", "dyck": ")]}", "sorting": "0123456789", "sudoku": "1234"}


def measure(name: str, prompt: str) -> int:
    """Re-derive the stated difficulty measure from the prompt alone."""
    body = prompt[:-1]
    if name == "addition":
        return max(len(x) for x in body.split("+"))
    if name == "dyck":
        depth = best = 0
        for c in body:
            depth += 1 if c in "([{" else -1
            best = max(best, depth)
        return best
    if name == "sorting":
        return len(body)
    return body.count(".")


def corrupt(name: str, answer: str, rng: random.Random) -> str:
    """Replace one character of the answer by another character of the answer alphabet."""
    i = rng.randrange(len(answer))
    choices = [c for c in ANSWER_ALPHABET[name] if c != answer[i]]
    return answer[:i] + rng.choice(choices) + answer[i + 1 :]


@pytest.fixture(scope="module")
def data() -> dict[tuple[str, str], object]:
    """One dataset per (task, split), shared by the tests below."""
    sizes = {"train": 2000, "validation": 300, "test": 300, "harder": 300}
    return {(n, s): make_task(n, s, sizes[s], seed=0) for n in TASK_NAMES for s in SPLITS}


def test_public_constants() -> None:
    assert TASK_NAMES == ("addition", "dyck", "sorting", "sudoku")
    assert SPLITS == ("train", "validation", "test", "harder")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_columns_and_shapes(name: str, data) -> None:
    for split in SPLITS:
        ds = data[name, split]
        assert ds.column_names == ["prompt", "answer", "difficulty"]
        for prompt, answer in zip(ds["prompt"], ds["answer"]):
            assert PROMPT_RE[name].fullmatch(prompt), prompt
            assert answer and set(answer) <= set(ANSWER_ALPHABET[name]), answer
            assert "\n" not in prompt + answer


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("split", SPLITS)
def test_deterministic_by_seed(name: str, split: str) -> None:
    a = make_task(name, split, 100, seed=7).to_dict()
    b = make_task(name, split, 100, seed=7).to_dict()
    c = make_task(name, split, 100, seed=8).to_dict()
    assert a == b
    assert a["prompt"] != c["prompt"]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_answers_pass_checker_and_corruptions_fail(name: str, data) -> None:
    rng = random.Random(0)
    for split in SPLITS:
        ds = data[name, split]
        for prompt, answer in zip(ds["prompt"], ds["answer"]):
            assert check_answer(name, prompt, answer), (split, prompt, answer)
            assert check_answer(name, prompt, answer + "\n")  # a trailing eos is ignored
            assert not check_answer(name, prompt, corrupt(name, answer, rng)), (prompt, answer)
            assert not check_answer(name, prompt, answer[:-1])
            assert not check_answer(name, prompt, answer + answer[-1])
            assert not check_answer(name, prompt, "")


def test_checker_known_cases() -> None:
    # addition: least-significant digit first, no padding
    assert check_answer("addition", "357+68=", "524")
    assert not check_answer("addition", "357+68=", "425")
    assert check_answer("addition", "999+1=", "0001")
    assert not check_answer("addition", "999+1=", "00010")
    # dyck: innermost closer first
    assert check_answer("dyck", "([]{(=", ")})")
    assert not check_answer("dyck", "([]{(=", ")}]")
    assert not check_answer("dyck", "([]{(=", "(})")
    # sorting: ascending, digits kept
    assert check_answer("sorting", "5203=", "0235")
    assert not check_answer("sorting", "5203=", "5320")
    assert not check_answer("sorting", "5203=", "0234")
    # sudoku: rules only, so any valid completion of an ambiguous board passes
    blank_top = "........21434321="
    assert check_answer("sudoku", blank_top, "1234341221434321")
    assert check_answer("sudoku", blank_top, "3412123421434321")
    assert not check_answer("sudoku", blank_top, "1234123421434321")  # columns clash
    assert not check_answer("sudoku", "1.2...3.3.4..413=", "2314423131422413")  # given changed
    assert not check_answer("sudoku", "1.2...3.3.4..413=", "1324423131422413x")
    assert not check_answer("sudoku", "1.2...3.3.4..413=", 1324423131422413)  # type: ignore[arg-type]


def count_sudoku_solutions(board: str, limit: int = 2) -> int:
    """Plain backtracking over the blanks of a 4x4 board; stops counting at ``limit``."""
    cells = list(board)

    def ok(i: int, v: str) -> bool:
        r, c = divmod(i, 4)
        peers = {4 * r + k for k in range(4)} | {4 * k + c for k in range(4)}
        br, bc = r - r % 2, c - c % 2
        peers |= {4 * (br + a) + bc + b for a in (0, 1) for b in (0, 1)}
        return all(cells[j] != v for j in peers if j != i)

    def solve() -> int:
        if "." not in cells:
            return 1
        i = cells.index(".")
        found = 0
        for v in "1234":
            if ok(i, v):
                cells[i] = v
                found += solve()
                cells[i] = "."
                if found >= limit:
                    break
        return found

    return solve()


def test_sudoku_puzzles_have_exactly_one_solution(data) -> None:
    assert count_sudoku_solutions("........21434321") == 2  # the solver can see ambiguity
    for split in ("train", "harder"):
        for prompt in data["sudoku", split]["prompt"][:300]:
            assert count_sudoku_solutions(prompt[:-1]) == 1, prompt


@pytest.mark.parametrize(
    "name, prompt",
    [
        ("addition", "12+3"),  # no separator
        ("addition", "12-3="),
        ("dyck", "(]="),
        ("dyck", "(a="),
        ("sorting", "12a="),
        ("sudoku", "123="),
        ("sudoku", "1.2...3.3.4..415="),
    ],
)
def test_checker_rejects_malformed_prompt(name: str, prompt: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(prompt[:-1] + "=")) + "|ending with"):
        check_answer(name, prompt, "0")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_disjoint(name: str, data) -> None:
    prompts = {split: set(data[name, split]["prompt"]) for split in SPLITS}
    # a different seed must not leak either: the split of a problem does not depend on the seed
    prompts["test_seed1"] = set(make_task(name, "test", 300, seed=1)["prompt"])
    prompts["validation_seed2"] = set(make_task(name, "validation", 300, seed=2)["prompt"])
    held_out = prompts["validation"] | prompts["validation_seed2"], prompts["test"] | prompts["test_seed1"]
    assert not prompts["train"] & held_out[0]
    assert not prompts["train"] & held_out[1]
    assert not held_out[0] & held_out[1]
    for split in ("train", "validation", "test"):
        assert not prompts["harder"] & prompts[split]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_evaluation_splits_hold_distinct_problems(name: str, data) -> None:
    for split in ("validation", "test", "harder"):
        prompts = data[name, split]["prompt"]
        assert len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_harder_is_harder_by_the_stated_measure(name: str, data) -> None:
    ranges = difficulty_ranges(name)
    assert set(ranges) == set(SPLITS)
    assert ranges["validation"] == ranges["test"] == ranges["train"]
    assert ranges["harder"][0] > ranges["train"][1]
    for split in SPLITS:
        ds = data[name, split]
        lo, hi = ranges[split]
        for prompt, level in zip(ds["prompt"], ds["difficulty"]):
            assert measure(name, prompt) == level, (prompt, level)
            assert lo <= level <= hi
        assert set(ds["difficulty"]) == set(range(lo, hi + 1))  # the whole range is used
    assert min(data[name, "harder"]["difficulty"]) > max(data[name, "train"]["difficulty"])
    if name == "dyck":  # harder Dyck prefixes are also longer
        assert min(map(len, data[name, "harder"]["prompt"])) > max(map(len, data[name, "train"]["prompt"]))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_length_budget(name: str, data) -> None:
    for split in SPLITS:
        ds = data[name, split]
        longest = max(len(task_text(p, a)) for p, a in zip(ds["prompt"], ds["answer"]))
        assert longest < MAX_CHARS
        if split != "harder":
            assert longest <= TRAIN_MAX_CHARS, (split, longest)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_length_budget_holds_at_the_limits(name: str) -> None:
    lo, hi = DIFFICULTY_LIMITS[name]
    assert lo <= difficulty_ranges(name)["train"][0] and difficulty_ranges(name)["harder"][1] <= hi
    ds = make_task(name, "harder", 20, min_difficulty=hi, max_difficulty=hi)
    assert set(ds["difficulty"]) == {hi}
    assert max(len(task_text(p, a)) for p, a in zip(ds["prompt"], ds["answer"])) < MAX_CHARS
    with pytest.raises(ValueError, match=rf"<= {hi}"):
        make_task(name, "harder", 1, max_difficulty=hi + 1)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_difficulty_override(name: str) -> None:
    lo, hi = difficulty_ranges(name)["train"]
    ds = make_task(name, "test", 30, min_difficulty=hi, max_difficulty=hi)
    assert set(ds["difficulty"]) == {hi}
    ds = make_task(name, "train", 30, max_difficulty=lo + 1)
    assert set(ds["difficulty"]) <= {lo, lo + 1}


def test_task_text() -> None:
    assert task_text("357+68=", "524") == "357+68=524\n"
    assert task_text("5203=", "0235", eos="|") == "5203=0235|"


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("multiplication", "train", 10), {}, r"unknown task 'multiplication'.*addition, dyck, sorting, sudoku"),
        (("addition", "dev", 10), {}, r"unknown split 'dev'.*train, validation, test, harder"),
        (("addition", "train", 0), {}, r"num_examples must be a positive int, got 0"),
        (("addition", "train", -3), {}, r"num_examples must be a positive int"),
        (("addition", "train", 2.5), {}, r"num_examples must be a positive int"),
        (("addition", "train", True), {}, r"num_examples must be a positive int"),
        (("addition", "train", 10, "0"), {}, r"seed must be an int"),
        (("addition", "train", 10), {"digits": 3}, r"unknown keyword\(s\) digits.*min_difficulty, max_difficulty"),
        (("addition", "train", 10), {"min_difficulty": 3, "max_difficulty": 2}, r"difficulty range \[3, 2\]"),
        (("addition", "train", 10), {"max_difficulty": 99}, r"<= 30"),
        (("addition", "train", 10), {"min_difficulty": 0}, r"1 <= min_difficulty"),
        (("sudoku", "harder", 10), {"min_difficulty": 8}, r"'harder' split .* above the training range \(max 8\)"),
        (("sorting", "validation", 5), {"min_difficulty": 1, "max_difficulty": 1}, r"could only find \d+ distinct"),
    ],
)
def test_bad_arguments_raise_helpful_value_error(args, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_task(*args, **kwargs)


def test_bad_names_elsewhere_raise() -> None:
    with pytest.raises(ValueError, match=r"allowed tasks: addition, dyck, sorting, sudoku"):
        difficulty_ranges("sudoku9x9")
    with pytest.raises(ValueError, match=r"allowed tasks"):
        check_answer("sudoku9x9", "1=", "1")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_large_train_stream_builds_correctly(name: str) -> None:
    """The training stream is drawn by the tens of thousands: every example must still be valid."""
    ds = make_task(name, "train", 10_000, seed=1)
    assert len(ds) == 10_000
    lo, hi = difficulty_ranges(name)["train"]
    for prompt, answer, level in zip(ds["prompt"], ds["answer"], ds["difficulty"]):
        assert check_answer(name, prompt, answer), (prompt, answer)
        assert lo <= level <= hi
