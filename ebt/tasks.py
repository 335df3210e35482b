"""Seeded, deterministic reasoning tasks with a training distribution and a harder split.

These tasks are (a) the embedded default training data of ``python -m train`` (no files, no
network) and (b) the yardstick for "does thinking longer help": a model is trained on the
``train`` split and its accuracy is measured on ``test`` (same distribution) and on ``harder``
(strictly harder by a stated measure) as a function of inference-time optimisation steps.

Format (shared by all tasks, chosen for tiny character-level models)
--------------------------------------------------------------------
One example is one line: ``prompt + answer + "\\n"`` (see :func:`task_text`). Every prompt ends
with the separator ``=``, which occurs nowhere else, so "the answer starts here" is a single
character the model can key on, and the newline tells it where the answer stops. The alphabet is
small (digits, ``+``, ``=``, ``.``, three bracket pairs, newline). Every training example of the
four small tasks fits in a 64-character context (:data:`TRAIN_MAX_CHARS`); ``sudoku6`` is the
exception: every one of its lines is 74 characters (36 cells, ``=``, 36 digits, newline), so it
needs a context of at least 74 to see a whole puzzle (:func:`train_max_chars` gives the bound per
task). Every line of every task stays below :data:`MAX_CHARS` characters. The tasks use disjoint
prompt shapes (``+`` only in addition, brackets only in Dyck, ``.`` only in the two Sudokus, bare
digits only in sorting; a 4x4 Sudoku prompt has 16 cells of ``1-4.``, a 6x6 one 36 cells of
``1-6.``, so the two never share a prompt even when a 6x6 board's givens use only 1-4), so they can
be mixed in one training stream without a task tag.

==========  =======================  =====================  =========================================
task        example line             difficulty measure     why this format
==========  =======================  =====================  =========================================
addition    ``357+68=524\\n``         digits of the longer   sum written least-significant digit first
                                     operand                (425 -> "524"): output digit i needs only
                                                            the operands' digit i and the carry of the
                                                            digit just written, which a small causal
                                                            model learns; most-significant-first would
                                                            need the whole carry chain up front.
dyck        ``([]{(=)})\\n``          maximum nesting depth  the answer is the closing sequence of the
                                     of the prefix          open brackets, innermost first; harder
                                                            prefixes are deeper *and* longer.
sorting     ``5203=0235\\n``          list length            bare digits, no commas: one token per item.
sudoku      ``1.2...3.3.4..413=``    number of blanks       4x4 board row by row, ``.`` = blank; the
            ``1324423131422413\\n``                          answer is the full board so answer cell i
                                                            sits at a fixed offset from prompt cell i.
sudoku6     (74 characters, below)   number of blanks       the same on a 6x6 board, digits 1-6,
                                                            boxes of 2 rows x 3 columns.
==========  =======================  =====================  =========================================

A ``sudoku6`` line, whole and then cut after each board row of the prompt::

    6214..534....62.14.1.26..4.156156.42=621435534621362514415263243156156342\\n

    6214..
    534...
    .62.14
    .1.26.
    .4.156
    156.42=621435534621362514415263243156156342\\n

Sudoku is the "checking is easy, solving is search" task: every generated puzzle has exactly one
solution (so the training target is unambiguous), while :func:`check_answer` only checks the rules
(givens kept, every row, column and box holds each digit once: 2x2 boxes and 1-4 on the 4x4
board, 2x3 boxes and 1-6 on the 6x6 one) and therefore accepts any valid completion. The 6x6 task
is the larger search: up to 24 blanks by default against the 4x4's 12.

Splits and disjointness
-----------------------
``train``, ``validation`` and ``test`` are drawn from the same distribution and are disjoint by
construction: a keyed hash of the problem (the prompt) puts every problem in exactly one bucket
(80 % train, 10 % validation, 10 % test), independent of the seed, and a split only keeps problems
from its own bucket. ``harder`` uses a difficulty range strictly above training's, and in
addition only keeps problems from the held-out (validation/test) buckets, so no harder problem can
be trained on whatever ranges are passed. ``train`` is a stream of samples and may repeat a
problem; ``validation``, ``test`` and ``harder`` hold distinct problems so accuracy is not
weighted by repeats. A draw that repeats a problem is redrawn from scratch (difficulty too), so
where a difficulty has few problems (e.g. 1-digit addition: 100 in all, ~10 per held-out bucket)
the evaluation splits hold fewer of that difficulty; the ``difficulty`` column says how many.

Difficulty is drawn uniformly from the split's range (see :func:`difficulty_ranges`), then the
problem uniformly at that difficulty. ``make_task`` accepts ``min_difficulty=`` and/or
``max_difficulty=`` to override the range within the task's limits (``harder`` must stay strictly
above the default training range).

Determinism: the random stream is seeded by the string ``"{name}|{split}|{seed}"`` (Python's
``random`` hashes string seeds with SHA-512, so it does not depend on ``PYTHONHASHSEED``); the same
arguments give the same dataset on every run and machine.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable
from functools import cache, lru_cache, partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily in make_task: checkers and formats need no `datasets`
    import datasets

__all__ = [
    "TASK_NAMES",
    "SPLITS",
    "TRAIN_MAX_CHARS",
    "MAX_CHARS",
    "DIFFICULTY_LIMITS",
    "train_max_chars",
    "make_task",
    "check_answer",
    "difficulty_ranges",
    "task_text",
]

TASK_NAMES: tuple[str, ...] = ("addition", "dyck", "sorting", "sudoku", "sudoku6")
SPLITS: tuple[str, ...] = ("train", "validation", "test", "harder")

#: Every default ``train``/``validation``/``test`` line, ``task_text(prompt, answer)`` including
#: the newline, of addition, dyck, sorting and sudoku is at most this long (fits a 64-character
#: context with room to spare). ``sudoku6`` lines are longer: see :func:`train_max_chars`.
TRAIN_MAX_CHARS = 48
#: Every ``sudoku6`` line of every split: 36 cells + ``=`` + 36 digits + newline.
_SUDOKU6_LINE_CHARS = 36 + 1 + 36 + 1
#: Every line of every split, at any difficulty the task accepts, is shorter than this.
MAX_CHARS = 128

SEPARATOR = "="

# Default difficulty ranges (inclusive) of the stated measure; validation/test share train's.
# ``limits`` bounds any override so that every line stays below MAX_CHARS.
_RANGES: dict[str, dict[str, tuple[int, int]]] = {
    # measure: number of digits of the longer operand
    "addition": {"train": (1, 4), "harder": (5, 8), "limits": (1, 30)},
    # measure: maximum nesting depth of the prefix
    "dyck": {"train": (1, 4), "harder": (5, 8), "limits": (1, 16)},
    # measure: number of digits in the list
    "sorting": {"train": (2, 12), "harder": (13, 24), "limits": (1, 60)},
    # measure: number of blank cells on the 4x4 board (at most 12: 4 givens is the minimum
    # for a unique 4x4 Sudoku)
    "sudoku": {"train": (1, 8), "harder": (9, 12), "limits": (1, 12)},
    # measure: number of blank cells on the 6x6 board. 8 givens is the minimum for a unique 6x6
    # Sudoku (28 blanks); 26 still generates in ~2 ms (see _gen_sudoku6), 27 would need ~5 restarts.
    "sudoku6": {"train": (4, 14), "harder": (15, 24), "limits": (1, 26)},
}

# Dyck prefix length (in brackets): training-distribution splits vs harder. Harder prefixes
# are strictly longer as well as strictly deeper.
_DYCK_LENGTH = {"in_distribution": (1, 24), "harder": (25, 48)}

#: Widest difficulty range ``make_task`` accepts per task (``min_difficulty=``/``max_difficulty=``);
#: every line at these difficulties is still shorter than :data:`MAX_CHARS`.
DIFFICULTY_LIMITS: dict[str, tuple[int, int]] = {name: r["limits"] for name, r in _RANGES.items()}

_BUCKET_OF_SPLIT = {"train": 0, "validation": 1, "test": 2}
_DIFFICULTY_KWARGS = ("min_difficulty", "max_difficulty")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def difficulty_ranges(name: str) -> dict[str, tuple[int, int]]:
    """Default inclusive range of the task's difficulty measure for every split.

    Measures: ``addition`` = digits of the longer operand, ``dyck`` = maximum nesting depth,
    ``sorting`` = list length, ``sudoku`` and ``sudoku6`` = number of blanks. ``validation`` and
    ``test`` share ``train``'s range (same distribution); ``harder`` starts strictly above it.
    """
    _check_name(name)
    r = _RANGES[name]
    return {"train": r["train"], "validation": r["train"], "test": r["train"], "harder": r["harder"]}


def train_max_chars(name: str) -> int:
    """Longest default ``train``/``validation``/``test`` line of task ``name`` (newline included).

    :data:`TRAIN_MAX_CHARS` (48, a 64-character context) for the four small tasks; 74 for
    ``sudoku6``, whose lines all have exactly that length, so a context (``data.block_size``)
    that should hold a whole 6x6 puzzle must be at least 74 long.
    """
    _check_name(name)
    return _SUDOKU6_LINE_CHARS if name == "sudoku6" else TRAIN_MAX_CHARS


def task_text(prompt: str, answer: str, eos: str = "\n") -> str:
    """The training text of one example: ``prompt + answer + eos``.

    The prompt already ends with the ``=`` separator, so no extra delimiter is needed; the
    ``eos`` (a newline by default) teaches the model where the answer ends, so generation can
    stop there and the evaluator can cut the model's output at the first ``eos``.
    """
    return f"{prompt}{answer}{eos}"


def make_task(name: str, split: str, num_examples: int, seed: int = 0, **difficulty: int) -> datasets.Dataset:
    """Build ``num_examples`` examples of task ``name`` for ``split``.

    Returns a :class:`datasets.Dataset` with columns ``prompt`` (str, ends with ``=``),
    ``answer`` (str) and ``difficulty`` (int, the task's stated measure, see
    :func:`difficulty_ranges`). Optional ``min_difficulty=`` / ``max_difficulty=`` narrow or move
    the split's range within the task's limits; for ``harder`` the range must stay strictly above
    the default training range. Same arguments -> identical dataset.

    Raises ``ValueError`` for an unknown task, split or keyword, a bad ``num_examples`` or range,
    or when an evaluation split cannot find ``num_examples`` distinct problems.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed splits: {', '.join(SPLITS)}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    lo, hi = _resolve_range(name, split, difficulty)

    rng = random.Random(f"{name}|{split}|{seed}")
    sample = _SAMPLERS[name]
    harder = split == "harder"
    wanted_bucket = None if harder else _BUCKET_OF_SPLIT[split]
    distinct = split != "train"

    prompts: list[str] = []
    answers: list[str] = []
    levels: list[int] = []
    seen: set[str] = set()
    # Generous budget: covers hash-bucket rejection (5x for harder, 10x for validation/test)
    # and duplicate rejection in small pools; only exhausted when the pool is really too small.
    budget = 200 * num_examples + 10_000
    attempts = 0
    while len(prompts) < num_examples:
        attempts += 1
        if attempts > budget:
            raise ValueError(
                f"could only find {len(prompts)} distinct {name!r} problems for split {split!r} "
                f"with difficulty in [{lo}, {hi}] (asked for {num_examples}); ask for fewer "
                f"examples or widen the range with min_difficulty=/max_difficulty="
            )
        level = rng.randint(lo, hi)
        prompt, answer = sample(rng, level, harder)
        bucket = _bucket(name, prompt)
        if harder:
            if bucket == _BUCKET_OF_SPLIT["train"]:
                continue
        elif bucket != wanted_bucket:
            continue
        if distinct:
            if prompt in seen:
                continue
            seen.add(prompt)
        prompts.append(prompt)
        answers.append(answer)
        levels.append(level)

    import datasets

    features = datasets.Features(
        {"prompt": datasets.Value("string"), "answer": datasets.Value("string"), "difficulty": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({"prompt": prompts, "answer": answers, "difficulty": levels}, features=features)


def check_answer(name: str, prompt: str, answer: str) -> bool:
    """Is ``answer`` correct for ``prompt``? Independent of the generators.

    The truth is re-derived from the prompt text alone (integer sum, bracket stack, ``sorted``,
    Sudoku rules), so a generator bug cannot hide behind a checker that shares its code.
    Leading/trailing whitespace of ``answer`` (e.g. the newline ``eos``) is ignored; anything
    else must match the format exactly (addition: sum least-significant digit first, no
    padding). Both Sudokus accept any completion that keeps the givens and obeys the rules.

    Returns ``False`` for a wrong or malformed answer; raises ``ValueError`` for an unknown task
    or a prompt that is not a well-formed problem of that task (that is a caller bug, not a
    wrong answer).
    """
    _check_name(name)
    if not isinstance(prompt, str) or not prompt.endswith(SEPARATOR):
        raise ValueError(f"a {name!r} prompt must be a str ending with {SEPARATOR!r}, got {prompt!r}")
    if not isinstance(answer, str):
        return False
    return _CHECKERS[name](prompt[: -len(SEPARATOR)], answer.strip())


# --------------------------------------------------------------------------------------------
# Argument handling and split assignment
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in _RANGES:
        raise ValueError(f"unknown task {name!r}; allowed tasks: {', '.join(TASK_NAMES)}")


def _resolve_range(name: str, split: str, difficulty: dict[str, int]) -> tuple[int, int]:
    unknown = sorted(set(difficulty) - set(_DIFFICULTY_KWARGS))
    if unknown:
        raise ValueError(f"unknown keyword(s) {', '.join(unknown)} for make_task; allowed: {', '.join(_DIFFICULTY_KWARGS)}")
    lo, hi = difficulty_ranges(name)[split]
    lo = difficulty.get("min_difficulty", lo)
    hi = difficulty.get("max_difficulty", hi)
    for key, value in (("min_difficulty", lo), ("max_difficulty", hi)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an int, got {value!r}")
    lim_lo, lim_hi = DIFFICULTY_LIMITS[name]
    if not lim_lo <= lo <= hi <= lim_hi:
        raise ValueError(
            f"difficulty range [{lo}, {hi}] is invalid for {name!r}: need "
            f"{lim_lo} <= min_difficulty <= max_difficulty <= {lim_hi}"
        )
    train_hi = _RANGES[name]["train"][1]
    if split == "harder" and lo <= train_hi:
        raise ValueError(
            f"the 'harder' split of {name!r} must stay above the training range (max {train_hi}); got min_difficulty={lo}"
        )
    return lo, hi


def _bucket(name: str, prompt: str) -> int:
    """0 = train (80 %), 1 = validation (10 %), 2 = test (10 %); a fixed keyed hash, no seed."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8, person=b"ebt-split", salt=name.encode()[:16]).digest()
    r = int.from_bytes(digest, "little") % 10
    return 0 if r < 8 else (1 if r == 8 else 2)


# --------------------------------------------------------------------------------------------
# Generators: (rng, difficulty, harder) -> (prompt, answer)
# --------------------------------------------------------------------------------------------


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10**digits)


def _gen_addition(rng: random.Random, digits: int, harder: bool) -> tuple[str, str]:
    """The longer operand has exactly ``digits`` digits, the other 1..digits (order random)."""
    a = _number(rng, digits)
    b = _number(rng, rng.randint(1, digits))
    if rng.random() < 0.5:
        a, b = b, a
    # Schoolbook addition, emitting the least-significant digit first (that is the answer format).
    xa, xb = str(a)[::-1], str(b)[::-1]
    out, carry = [], 0
    for i in range(max(len(xa), len(xb))):
        s = carry + (int(xa[i]) if i < len(xa) else 0) + (int(xb[i]) if i < len(xb) else 0)
        out.append(str(s % 10))
        carry = s // 10
    if carry:
        out.append("1")
    return f"{a}+{b}{SEPARATOR}", "".join(out)


_OPEN, _CLOSE = "([{", ")]}"


@cache
def _dyck_up_probabilities(length: int, depth: int) -> tuple[tuple[float, ...], ...] | None:
    """Uniform sampler table for bracket walks of ``length`` steps whose maximum height is
    exactly ``depth`` and that end at height >= 1 (at least one bracket left open).

    ``ways[i][h][t]`` counts the ways to finish from step ``i`` at height ``h`` (``t``: height
    ``depth`` already reached); the returned ``p[i][2*h+t]`` is the probability that step ``i``
    opens a bracket, so that every valid walk is equally likely without rejection. ``None`` if
    no walk exists (e.g. depth 1 with an even length cannot end open)."""
    ways = [[(0, 1 if h >= 1 else 0) for h in range(depth + 1)]]  # ways at step == length
    for _ in range(length):
        nxt = ways[-1]
        cur = []
        for h in range(depth + 1):
            w = [0, 0]
            for t in (0, 1):
                if h < depth:
                    w[t] += nxt[h + 1][1 if h + 1 == depth else t]
                if h > 0:
                    w[t] += nxt[h - 1][t]
            cur.append((w[0], w[1]))
        ways.append(cur)
    ways.reverse()  # ways[i] = ways to finish from step i
    if ways[0][0][0] == 0:
        return None
    table = []
    for i in range(length):
        row = []
        for h in range(depth + 1):
            for t in (0, 1):
                up = ways[i + 1][h + 1][1 if h + 1 == depth else t] if h < depth else 0
                total = ways[i][h][t]
                row.append(up / total if total else 0.0)
        table.append(tuple(row))
    return tuple(table)


def _gen_dyck(rng: random.Random, depth: int, harder: bool) -> tuple[str, str]:
    """A uniformly random bracket walk with maximum depth ``depth`` that ends open; prefix
    length uniform in the split's length range; bracket types uniform."""
    len_lo, len_hi = _DYCK_LENGTH["harder" if harder else "in_distribution"]
    while True:
        length = rng.randint(max(len_lo, depth), len_hi)
        table = _dyck_up_probabilities(length, depth)
        if table is not None:
            break
    stack: list[str] = []
    chars: list[str] = []
    reached = 0
    for row in table:
        h = len(stack)
        p_up = row[2 * h + reached]
        u = rng.random()
        if u < p_up:
            k = min(2, int(u / p_up * 3))  # u / p_up is uniform on [0, 1) given u < p_up
            stack.append(_CLOSE[k])
            chars.append(_OPEN[k])
            if h + 1 == depth:
                reached = 1
        else:
            chars.append(stack.pop())
    return "".join(chars) + SEPARATOR, "".join(reversed(stack))


def _gen_sorting(rng: random.Random, length: int, harder: bool) -> tuple[str, str]:
    digits = [rng.randrange(10) for _ in range(length)]
    counts = [0] * 10
    for d in digits:
        counts[d] += 1
    answer = "".join(str(d) * c for d, c in enumerate(counts))  # counting sort
    return "".join(map(str, digits)) + SEPARATOR, answer


def _sudoku_boards() -> list[str]:
    """All 288 solved 4x4 boards (row-major strings), by row-wise backtracking."""
    boards: list[str] = []
    perms = ["".join(p) for p in itertools.permutations("1234")]

    def fits(rows: list[str], row: str) -> bool:
        r = len(rows)
        if any(row[c] == prev[c] for prev in rows for c in range(4)):
            return False  # column clash
        if r % 2 == 1:  # second row of a 2x2 box band
            above = rows[-1]
            return set(row[:2]) == set("1234") - set(above[:2])
        return True

    def extend(rows: list[str]) -> None:
        if len(rows) == 4:
            boards.append("".join(rows))
            return
        for row in perms:
            if fits(rows, row):
                extend(rows + [row])

    extend([])
    return boards


@lru_cache(maxsize=1)
def _sudoku_tables() -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """The solved boards, and for each (cell, value) a bitset of the boards that have that
    value there: the boards consistent with a set of givens are the AND of their bitsets, so a
    uniqueness test is a handful of integer ANDs."""
    boards = _sudoku_boards()
    masks = [[0] * 5 for _ in range(16)]
    for i, board in enumerate(boards):
        for cell, v in enumerate(board):
            masks[cell][int(v)] |= 1 << i
    return tuple(boards), tuple(tuple(m) for m in masks)


def _sudoku_unique(board: str, hidden: set[int] | tuple[int, ...]) -> bool:
    _, masks = _sudoku_tables()
    consistent = -1  # all ones
    for cell in range(16):
        if cell not in hidden:
            consistent &= masks[cell][ord(board[cell]) - 48]
    return consistent & (consistent - 1) == 0  # exactly one board (the true one) fits


# Above this many blanks fewer than ~1 in 4 random puzzles is unique, so we enumerate instead.
_SUDOKU_ENUMERATE_FROM = 11
_RELABELINGS = tuple(str.maketrans("1234", "".join(p)) for p in itertools.permutations("1234"))


@cache
def _sudoku_unique_patterns(blanks: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every (board up to relabelling the digits, blank set) with a unique solution.

    Renaming the digits maps solved boards to solved boards and keeps uniqueness, and the 24
    renamings of a board are distinct, so a uniform pattern plus a uniform renaming is a
    uniform unique puzzle. 12 boards x C(16, blanks) checks, done once per blank count."""
    boards, _ = _sudoku_tables()
    reps = sorted({min(b.translate(t) for t in _RELABELINGS) for b in boards})
    return tuple(
        (rep, hidden) for rep in reps for hidden in itertools.combinations(range(16), blanks) if _sudoku_unique(rep, hidden)
    )


def _gen_sudoku(rng: random.Random, blanks: int, harder: bool) -> tuple[str, str]:
    """A uniformly random 4x4 puzzle with ``blanks`` blanks among those with exactly one
    solution (so the training target is unambiguous): rejection sampling over (solved board,
    blank set), or, for many blanks where few puzzles are unique, a draw from the enumerated
    unique patterns followed by a random renaming of the digits (the same distribution)."""
    if blanks >= _SUDOKU_ENUMERATE_FROM:
        patterns = _sudoku_unique_patterns(blanks)
        rep, hidden = patterns[rng.randrange(len(patterns))]
        board = rep.translate(_RELABELINGS[rng.randrange(len(_RELABELINGS))])
    else:
        boards, _ = _sudoku_tables()
        while True:
            board = boards[rng.randrange(len(boards))]
            hidden = set(rng.sample(range(16), blanks))
            if _sudoku_unique(board, hidden):
                break
    prompt = "".join("." if c in hidden else board[c] for c in range(16))
    return prompt + SEPARATOR, board


# 6x6 board, row-major cells 0..35; boxes are 2 rows x 3 columns, numbered band by band.
_S6_ROW = tuple(i // 6 for i in range(36))
_S6_COL = tuple(i % 6 for i in range(36))
_S6_BOX = tuple(i // 12 * 2 + i % 6 // 3 for i in range(36))
_S6_DIGITS = 0b1111110  # bit v set = digit v (1..6) still allowed


def _sudoku6_solutions(cells: list[int], limit: int) -> list[str]:
    """Up to ``limit`` solutions (row-major digit strings) of a 6x6 board given as 36 ints, 0 =
    blank, whose givens do not clash. Backtracking on row/column/box bitmasks that always fills
    the blank with the fewest candidates first, so a forced cell costs no branching: a
    uniqueness test (``limit=2``) of a 24-blank puzzle takes well under a millisecond."""
    rows, cols, boxes = [0] * 6, [0] * 6, [0] * 6
    grid = list(cells)
    blanks = []
    for i, v in enumerate(grid):
        if v:
            rows[_S6_ROW[i]] |= 1 << v
            cols[_S6_COL[i]] |= 1 << v
            boxes[_S6_BOX[i]] |= 1 << v
        else:
            blanks.append(i)
    found: list[str] = []

    def search() -> None:
        if not blanks:
            found.append("".join(map(str, grid)))
            return
        k, free, fewest = 0, 0, 7
        for j, i in enumerate(blanks):
            f = _S6_DIGITS & ~(rows[_S6_ROW[i]] | cols[_S6_COL[i]] | boxes[_S6_BOX[i]])
            n = f.bit_count()
            if n < fewest:
                k, free, fewest = j, f, n
                if n <= 1:
                    break
        if not free:
            return  # a blank with no candidate: dead end
        i = blanks[k]
        last = blanks.pop()  # take blank k out (the last one fills its slot) ...
        if k < len(blanks):
            blanks[k] = last
        r, c, b = _S6_ROW[i], _S6_COL[i], _S6_BOX[i]
        while free and len(found) < limit:
            bit = free & -free
            free ^= bit
            grid[i] = bit.bit_length() - 1
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            search()
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
        grid[i] = 0
        if k < len(blanks):  # ... and put it back where it was
            blanks.append(blanks[k])
            blanks[k] = i
        else:
            blanks.append(i)

    search()
    return found


@lru_cache(maxsize=1)
def _sudoku6_boards() -> tuple[str, ...]:
    """The 39,168 solved 6x6 boards whose first row is ``123456`` (~0.6 s, once per process).

    Every solved board is exactly one of these with its digits renamed (the renaming that turns
    its first row into ``123456``), so one of these uniformly times one of the 720 renamings
    uniformly is a uniformly random solved board among all 28,200,960 = 720 x 39,168."""
    return tuple(_sudoku6_solutions([1, 2, 3, 4, 5, 6] + [0] * 30, limit=40_000))


# Up to this many blanks a uniform blank set is unique often enough (>= 4.5 % at 24, ~88 % at 14)
# for rejection sampling; above it, uniqueness-preserving removal (0.2 % of 26-blank sets are
# unique, so rejection would need ~460 solver calls per puzzle).
_SUDOKU6_REJECT_UP_TO = 24


def _gen_sudoku6(rng: random.Random, blanks: int, harder: bool) -> tuple[str, str]:
    """A 6x6 puzzle with ``blanks`` blanks and exactly one solution (an unambiguous target).

    The solved board is uniform over all 6x6 boards (see :func:`_sudoku6_boards`). Up to
    ``_SUDOKU6_REJECT_UP_TO`` blanks (every default split) the blank set is uniform and redrawn,
    board too, until the puzzle is unique: that is a uniformly random puzzle among the unique
    ones with that many blanks. Above it the cells are blanked one at a time in a random order,
    skipping a cell whose removal would allow a second solution (it would for every later set
    too), restarting with a new board if the order runs out first; these puzzles are unique but
    *not* uniform among unique puzzles (removal order favours some blank sets)."""
    boards = _sudoku6_boards()
    while True:
        digits = list("123456")
        rng.shuffle(digits)
        board = boards[rng.randrange(len(boards))].translate(str.maketrans("123456", "".join(digits)))
        cells = [ord(ch) - 48 for ch in board]
        if blanks <= _SUDOKU6_REJECT_UP_TO:
            hidden = set(rng.sample(range(36), blanks))
            if len(_sudoku6_solutions([0 if i in hidden else v for i, v in enumerate(cells)], limit=2)) == 1:
                break
            continue
        hidden = set()
        for i in rng.sample(range(36), 36):
            given, cells[i] = cells[i], 0
            if len(_sudoku6_solutions(cells, limit=2)) == 1:
                hidden.add(i)
                if len(hidden) == blanks:
                    break
            else:
                cells[i] = given
        if len(hidden) == blanks:
            break
    prompt = "".join("." if c in hidden else board[c] for c in range(36))
    return prompt + SEPARATOR, board


_SAMPLERS: dict[str, Callable[[random.Random, int, bool], tuple[str, str]]] = {
    "addition": _gen_addition,
    "dyck": _gen_dyck,
    "sorting": _gen_sorting,
    "sudoku": _gen_sudoku,
    "sudoku6": _gen_sudoku6,
}


# --------------------------------------------------------------------------------------------
# Independent checkers: (prompt without separator, stripped answer) -> bool
# --------------------------------------------------------------------------------------------


def _is_decimal(s: str) -> bool:
    return s != "" and all("0" <= c <= "9" for c in s)


def _check_addition(body: str, answer: str) -> bool:
    parts = body.split("+")
    if len(parts) != 2 or not all(_is_decimal(p) for p in parts):
        raise ValueError(f"not an addition prompt: {body + SEPARATOR!r} (expected like '357+68=')")
    return answer == str(int(parts[0]) + int(parts[1]))[::-1]


def _check_dyck(body: str, answer: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for c in body:
        if c in "([{":
            stack.append(c)
        elif c in pairs and stack and stack[-1] == pairs[c]:
            stack.pop()
        else:
            raise ValueError(f"not a Dyck prefix: {body + SEPARATOR!r}")
    closing = {"(": ")", "[": "]", "{": "}"}
    return answer == "".join(closing[c] for c in reversed(stack))


def _check_sorting(body: str, answer: str) -> bool:
    if not _is_decimal(body):
        raise ValueError(f"not a sorting prompt: {body + SEPARATOR!r} (expected digits like '5203=')")
    return answer == "".join(sorted(body))


def _check_sudoku(box_rows: int, box_cols: int, body: str, answer: str) -> bool:
    """The rules of a Sudoku whose boxes are ``box_rows`` x ``box_cols`` (side = their product)."""
    n = box_rows * box_cols
    digits = "".join(str(d) for d in range(1, n + 1))
    if len(body) != n * n or any(c not in digits + "." for c in body):
        raise ValueError(f"not a {n}x{n} Sudoku prompt: {body + SEPARATOR!r} (expected {n * n} of {digits + '.'!r})")
    if len(answer) != n * n or any(c not in digits for c in answer):
        return False
    if any(g != "." and g != a for g, a in zip(body, answer)):
        return False  # a given was changed
    rows = [answer[n * r : n * r + n] for r in range(n)]
    units = rows + ["".join(row[c] for row in rows) for c in range(n)]
    corners = [(r, c) for r in range(0, n, box_rows) for c in range(0, n, box_cols)]
    units += ["".join(rows[r + a][c : c + box_cols] for a in range(box_rows)) for r, c in corners]
    return all(set(u) == set(digits) for u in units)


_CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "addition": _check_addition,
    "dyck": _check_dyck,
    "sorting": _check_sorting,
    "sudoku": partial(_check_sudoku, 2, 2),
    "sudoku6": partial(_check_sudoku, 2, 3),
}
