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
    train_max_chars,
)

# Shapes of a well-formed prompt / answer, written here independently of the module.
PROMPT_RE = {
    "addition": re.compile(r"(0|[1-9]\d*)\+(0|[1-9]\d*)="),
    "dyck": re.compile(r"[()\[\]{}]+="),
    "sorting": re.compile(r"\d+="),
    "sudoku": re.compile(r"[1-4.]{16}="),
    "sudoku6": re.compile(r"[1-6.]{36}="),
}
ANSWER_ALPHABET = {"addition": "0123456789", "dyck": ")]}", "sorting": "0123456789", "sudoku": "1234", "sudoku6": "123456"}
SUDOKU_BOX = {"sudoku": (2, 2), "sudoku6": (2, 3)}  # (rows, columns) of a box


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
    return body.count(".")  # both Sudokus


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
    assert TASK_NAMES == ("addition", "dyck", "sorting", "sudoku", "sudoku6")
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


SOLVED6 = "123456456123231564564231312645645312"  # a valid 6x6 board (2x3 boxes), checked below


def test_sudoku6_checker_known_cases() -> None:
    blank = "." * 36 + "="
    assert check_answer("sudoku6", blank, SOLVED6)
    relabelled = SOLVED6.translate(str.maketrans("123456", "645231"))
    assert check_answer("sudoku6", blank, relabelled)  # rules only: any valid board completes a blank one
    assert not check_answer("sudoku6", SOLVED6[:35] + ".=", relabelled)  # givens changed
    latin = "".join(str((r + c) % 6 + 1) for r in range(6) for c in range(6))  # rows and columns fine ...
    assert not check_answer("sudoku6", blank, latin)  # ... but the first box holds 1,2,3 and 2,3,4
    swapped = SOLVED6[1] + SOLVED6[0] + SOLVED6[2:]  # row and box still hold 1-6, two columns don't
    assert not check_answer("sudoku6", blank, swapped)
    for bad in (SOLVED6[:-1], SOLVED6 + "1", SOLVED6[:-1] + "7", SOLVED6[:-1] + "."):
        assert not check_answer("sudoku6", blank, bad), bad


def test_sudoku6_boards_are_all_boards_up_to_renaming() -> None:
    """The generator's uniformity argument: its table holds every solved 6x6 board with first row
    123456, i.e. all 28,200,960 boards (a published count) divided by the 720 digit renamings."""
    from ebt.tasks import _sudoku6_boards

    boards = _sudoku6_boards()
    assert len(boards) == len(set(boards)) == 28_200_960 // 720
    assert all(b.startswith("123456") and check_answer("sudoku6", "." * 36 + "=", b) for b in boards)


def count_sudoku_solutions(board: str, box: tuple[int, int] = (2, 2), limit: int = 2) -> int:
    """Plain backtracking over the blanks of a square board, first blank first (the module fills
    the most constrained blank first instead); stops counting at ``limit``."""
    box_rows, box_cols = box
    n = box_rows * box_cols
    cells = list(board)

    def ok(i: int, v: str) -> bool:
        r, c = divmod(i, n)
        peers = {n * r + k for k in range(n)} | {n * k + c for k in range(n)}
        br, bc = r - r % box_rows, c - c % box_cols
        peers |= {n * (br + a) + bc + b for a in range(box_rows) for b in range(box_cols)}
        return all(cells[j] != v for j in peers if j != i)

    def solve() -> int:
        if "." not in cells:
            return 1
        i = cells.index(".")
        found = 0
        for v in "123456"[:n]:
            if ok(i, v):
                cells[i] = v
                found += solve()
                cells[i] = "."
                if found >= limit:
                    break
        return found

    return solve()


@pytest.mark.parametrize("name", ["sudoku", "sudoku6"])
def test_sudoku_puzzles_have_exactly_one_solution(name: str, data) -> None:
    box = SUDOKU_BOX[name]
    assert count_sudoku_solutions("........21434321") == 2  # the solver can see ambiguity
    assert count_sudoku_solutions(SOLVED6, box=(2, 3)) == 1
    assert count_sudoku_solutions("." * 12 + SOLVED6[12:], box=(2, 3)) == 2  # rows 0 and 1 may swap
    prompts = data[name, "train"]["prompt"][:300] + data[name, "harder"]["prompt"][:300]
    if name == "sudoku6":  # above 24 blanks the generator takes its other path (removal, not rejection)
        hi = DIFFICULTY_LIMITS[name][1]
        prompts += make_task(name, "harder", 20, min_difficulty=hi - 1, max_difficulty=hi)["prompt"]
    for prompt in prompts:
        assert count_sudoku_solutions(prompt[:-1], box=box) == 1, prompt


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
        ("sudoku", "." * 36 + "="),  # a 6x6 prompt is not a 4x4 one ...
        ("sudoku6", "1.2...3.3.4..413="),  # ... nor the reverse
        ("sudoku6", "." * 35 + "="),
        ("sudoku6", "7" + "." * 35 + "="),
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
            assert longest <= train_max_chars(name), (split, longest)


def test_train_max_chars() -> None:
    assert [train_max_chars(n) for n in TASK_NAMES] == [TRAIN_MAX_CHARS] * 4 + [74]
    for split in SPLITS:  # every 6x6 line: 36 cells, "=", 36 digits, newline
        ds = make_task("sudoku6", split, 50)
        assert {len(task_text(p, a)) for p, a in zip(ds["prompt"], ds["answer"])} == {74}
    with pytest.raises(ValueError, match=r"allowed tasks"):
        train_max_chars("sudoku9x9")


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
        (("multiplication", "train", 10), {}, r"unknown task 'multiplication'.*addition, dyck, sorting, sudoku, sudoku6"),
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
        (("sudoku6", "harder", 10), {"min_difficulty": 14}, r"'harder' split .* above the training range \(max 14\)"),
        (("sudoku6", "train", 10), {"max_difficulty": 27}, r"<= 26"),
        (("sorting", "validation", 5), {"min_difficulty": 1, "max_difficulty": 1}, r"could only find \d+ distinct"),
    ],
)
def test_bad_arguments_raise_helpful_value_error(args, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_task(*args, **kwargs)


def test_bad_names_elsewhere_raise() -> None:
    with pytest.raises(ValueError, match=r"allowed tasks: addition, dyck, sorting, sudoku, sudoku6"):
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
