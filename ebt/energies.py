"""Energies to add to a joint-mode EBT's learned energy: task constraints, another EBT, an LM prior.

In the joint continuation mode the model refines a block of m candidate positions after a prompt
together, by gradient descent on an energy; ``think(energy_terms=[(weight, term), ...])`` (and
``generate``) add weighted extra terms to that energy. Energies compose by addition, a product of
experts (``exp(-E_model - w1 E_1 - w2 E_2 ...)``): the model supplies what it learned, each term
another opinion on the same block. This module builds three kinds:

- task constraints (``task_energy``, for the tasks of ``TASKS_WITH_ENERGY``): what is known for
  sure about the task (the rules of Sudoku, that a sorted list is a permutation in ascending
  order), zero exactly at the true answer;
- another EBT (``ebt_energy``): a second joint-mode model's energy of the block, an ensemble;
- an LM prior (``lm_prior``): a causal LM's cross-entropy of the block fed as soft inputs, which
  favours text that LM finds likely.

A weight sets how much a term counts against the model's energy and the others: the inner step
moves along the weighted sum's gradient, so a weight w scales that term's pull by w (a large one
may need a smaller ``step_size``). Cost: every term runs at every inner step of every sample, on
top of the model's own candidate stream: the task constraints are a few small tensor products,
another EBT one candidate-stream pass (its prompt is encoded once per batch of prompts) and
its backward, the LM prior one forward of the LM over prompt + block and its backward.

Convention of a term: ``term(probs, input_ids, attention_mask) -> (B,) or (B, m)``

- ``probs`` (B, m, V): the candidate distributions of the block (softmax over the vocabulary),
  float32 or float64. Block position j holds answer character j; after the answer comes EOS (the
  block is the answer, then EOS padding up to m).
- ``input_ids`` (B, T): the prompt token ids, left-padded (``attention_mask`` (B, T): 1 = token,
  0 = padding); for the task constraints each row ends with the prompt's last character ``=``.
  Evaluation feeds ``EOS + prompt``, so an EOS may precede the prompt.
- return: lower = better, in ``probs``' dtype: one energy per problem (the task constraints, zero
  exactly at the true answer) or one per block position (another EBT, the LM prior).

The result is differentiated with autograd inside the inner loop, and in training possibly twice
(the loss differentiates through the inner steps), so a term is built from smooth torch ops only
(a model's attention included: the LM prior's second derivative needs an LM with eager attention).

The task constraints are polynomials in ``probs``; the prompt is read with integer comparisons,
which carry no gradient. Such a term checks that every row ends with ``=`` and holds a
well-formed problem and raises ``ValueError`` otherwise: it reads the answer from block position
0, so it only fits a block that starts the answer (the joint block must hold the whole answer,
not a later piece of it).

Both constraint energies are quadratic in ``probs``: squared linear residuals (each unit holds each
digit once, the answer's digit counts equal the prompt's, a given keeps its digit, EOS follows the
answer) plus, for sorting, the bilinear probability of a descent between neighbours. They are zero
at the one-hot true answer (every residual is a sum of exact zeros and ones) and positive at any
other one-hot block (sorting: the answer and the EOS after it; Sudoku: the cells, it reads nothing
after them). Sudoku's is also zero at fractional points whose unit sums are all 1 with the givens
certain (an average of valid boards is one), so it does not by itself force a one-hot board: it is
meant to be added to the model's energy, not to replace it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from ebt.modeling_ebt import EnergyTerm  # the one definition, next to think() that calls terms
from ebt.tasks import TASK_NAMES

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ebt.modeling_ebt import EBTForCausalLM

__all__ = ["TASKS_WITH_ENERGY", "EnergyTerm", "ebt_energy", "lm_prior", "sudoku_energy", "sorting_energy", "task_energy"]

_SEPARATOR = "="
_BLANK = "."
_SUDOKU_BOXES = {4: (2, 2), 6: (2, 3)}  # board side -> (rows, columns) of a box


class CharTokenizer(Protocol):
    """What a term reads from a tokenizer (a ``transformers`` tokenizer has all three)."""

    eos_token_id: int | None
    unk_token_id: int | None

    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...


def _ids(tokenizer: CharTokenizer, chars: str, task: str) -> list[int]:
    """The token id of every character; a character-level vocabulary must know each of them, or
    the term would silently read ``<unk>`` where the prompt has that character."""
    ids = [tokenizer.convert_tokens_to_ids(ch) for ch in chars]
    missing = [ch for ch, i in zip(chars, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(
            f"the {task} energy needs a token for each of {chars!r} (one per character); the tokenizer has none for "
            f"{''.join(missing)!r}: build it from text that contains them (e.g. ebt.tasks.make_task('{task}', ...))"
        )
    return ids


def _check_shapes(probs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, separator: int) -> None:
    if probs.dim() != 3 or input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected probs (B, m, V), input_ids (B, T) and attention_mask (B, T); got {tuple(probs.shape)}, "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if probs.shape[0] != input_ids.shape[0]:
        raise ValueError(f"probs has {probs.shape[0]} rows but input_ids has {input_ids.shape[0]}")
    if not bool(((input_ids[:, -1] == separator) & (attention_mask[:, -1] == 1)).all()):
        raise ValueError(
            f"every prompt row must end with {_SEPARATOR!r} (left padding): the term reads the answer from block position 0"
        )


def sudoku_energy(tokenizer: CharTokenizer, size: int = 4) -> EnergyTerm:
    """The rules of a ``size`` x ``size`` Sudoku (size 4: 2x2 boxes, task ``sudoku``; size 6: 2x3
    boxes, task ``sudoku6``) as an energy on the block's first ``size**2`` positions (the cells,
    row by row; later positions are not read).

    ``E = sum over units u (rows, columns, boxes) and digits d of (sum_{c in u} p_c(d) - 1)^2
    + sum over given cells c of (1 - p_c(given))^2``: every unit must hold every digit once and a
    given must keep its digit. The givens are the last ``size**2`` tokens before the final ``=``
    (digits, ``.`` = blank). Probability a cell puts outside the digits leaves its units short.
    """
    if size not in _SUDOKU_BOXES:
        raise ValueError(f"sudoku_energy supports size 4 (2x2 boxes) or 6 (2x3 boxes), got {size!r}")
    task = "sudoku" if size == 4 else "sudoku6"
    box_rows, box_cols = _SUDOKU_BOXES[size]
    cells = size * size
    digits = torch.tensor(_ids(tokenizer, "123456"[:size], task))
    blank, separator = _ids(tokenizer, _BLANK + _SEPARATOR, task)
    # membership (3 * size units, cells): unit u contains cell c
    units = [[size * r + c for c in range(size)] for r in range(size)]
    units += [[size * r + c for r in range(size)] for c in range(size)]
    corners = itertools.product(range(0, size, box_rows), range(0, size, box_cols))
    units += [[size * (r + a) + c + b for a in range(box_rows) for b in range(box_cols)] for r, c in corners]
    membership = torch.zeros(len(units), cells)
    for u, members in enumerate(units):
        membership[u, members] = 1.0

    def term(probs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _check_shapes(probs, input_ids, attention_mask, separator)
        if probs.shape[1] < cells or input_ids.shape[1] < cells + 1:
            raise ValueError(
                f"a {size}x{size} Sudoku needs a block of at least {cells} positions and a prompt of {cells} cells + "
                f"{_SEPARATOR!r}; got a block of {probs.shape[1]} and prompts of {input_ids.shape[1]} tokens"
            )
        givens = input_ids[:, -cells - 1 : -1]  # (B, cells)
        is_given = givens[..., None] == digits.to(givens.device)  # (B, cells, size), one-hot or all False
        well_formed = (is_given.any(-1) | (givens == blank)) & (attention_mask[:, -cells - 1 : -1] == 1)
        if not bool(well_formed.all()):
            raise ValueError(f"every prompt must end with {cells} cells (digits 1-{size} or {_BLANK!r}) and {_SEPARATOR!r}")
        p = probs[:, :cells].index_select(-1, digits.to(probs.device))  # (B, cells, size): p_c(d)
        unit_sums = torch.einsum("uc,bcd->bud", membership.to(p), p)  # (B, units, size)
        rules = (unit_sums - 1).square().sum((1, 2))
        kept = ((1 - p).square() * is_given.to(p)).sum((1, 2))
        return rules + kept

    return term


def sorting_energy(tokenizer: CharTokenizer) -> EnergyTerm:
    """Sorting as an energy: the answer is the prompt's digits in ascending order, then EOS.

    The prompt's digits are the digit tokens of a row after its last non-digit token (EOS or
    padding) before the final ``=``; with k of them (rows may differ), block positions 0..k-1
    are the answer and position k, if the block has it, is EOS:
    ``E = sum_d (sum_{j<k} p_j(d) - count_d)^2 + sum_{j<k-1} sum_{d>d'} p_j(d) p_{j+1}(d')
    + (1 - p_k(EOS))^2``: same digit counts as the prompt, no descent between neighbours (its
    probability under independent positions), and the answer stops. The only one-hot answer
    with no count error and no descent is the sorted list.
    """
    digits = torch.tensor(_ids(tokenizer, "0123456789", "sorting"))
    (separator,) = _ids(tokenizer, _SEPARATOR, "sorting")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the sorting energy needs the tokenizer's eos_token_id (the token after the answer)")
    # below[d', d] = 1 if d' < d: (p_{j+1} @ below)[d] = probability that position j+1 is below d
    below = torch.ones(10, 10).triu(1)

    def term(probs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _check_shapes(probs, input_ids, attention_mask, separator)
        m = probs.shape[1]
        body = input_ids[:, :-1]
        is_digit = body[..., None] == digits.to(body.device)  # (B, T-1, 10)
        digit_mask = is_digit.any(-1) & (attention_mask[:, :-1] == 1)
        # the run of digits that ends at "=": cumulative product from the right
        in_prompt = digit_mask.flip(1).long().cumprod(1).flip(1)  # (B, T-1), 1 on the prompt's digits
        k = in_prompt.sum(1)  # (B,)
        if not bool(((k >= 1) & (k <= m)).all()):
            raise ValueError(
                f"every sorting prompt needs 1 to {m} digits before {_SEPARATOR!r} (the block holds {m} positions); "
                f"got {k.tolist()}"
            )
        counts = (is_digit * in_prompt[..., None]).sum(1).to(probs.dtype)  # (B, 10)
        position = torch.arange(m, device=probs.device)
        answer = (position[None] < k[:, None].to(probs.device)).to(probs.dtype)  # (B, m)
        p = probs.index_select(-1, digits.to(probs.device))  # (B, m, 10)
        histogram = (p * answer[..., None]).sum(1)  # (B, 10)
        multiset = (histogram - counts.to(probs.device)).square().sum(1)
        descents = (p[:, :-1] * (p[:, 1:] @ below.to(p))).sum(-1)  # (B, m-1): P(digit at j > digit at j + 1)
        order = (descents * answer[:, 1:]).sum(1)  # pairs (j, j+1) with j + 1 < k
        stop = position[None] == k[:, None].to(probs.device)  # (B, m), all False where k == m
        end = ((1 - probs[..., eos]).square() * stop.to(probs.dtype)).sum(1)
        return multiset + order + end

    return term


_TASK_ENERGIES: dict[str, Callable[[CharTokenizer], EnergyTerm]] = {
    "sorting": sorting_energy,
    "sudoku": lambda tokenizer: sudoku_energy(tokenizer, size=4),
    "sudoku6": lambda tokenizer: sudoku_energy(tokenizer, size=6),
}
#: The ``ebt.tasks`` tasks that ``task_energy`` has a constraint energy for (help texts, checks).
TASKS_WITH_ENERGY: tuple[str, ...] = tuple(_TASK_ENERGIES)


def task_energy(task: str, tokenizer: CharTokenizer) -> EnergyTerm:
    """The built-in constraint energy of an ``ebt.tasks`` task, so that a caller (an evaluation
    script, a config) can name a task instead of building the term: those of ``TASKS_WITH_ENERGY``,
    ``sorting``, ``sudoku`` (size 4) and ``sudoku6`` (size 6); addition and Dyck have none."""
    if task not in TASKS_WITH_ENERGY:
        what = "has no built-in energy" if task in TASK_NAMES else f"is not a task of ebt.tasks ({', '.join(TASK_NAMES)})"
        raise ValueError(f"task {task!r} {what}; tasks with a built-in energy: {', '.join(TASKS_WITH_ENERGY)}")
    return _TASK_ENERGIES[task](tokenizer)


def ebt_energy(model: EBTForCausalLM) -> EnergyTerm:
    """Another joint-mode EBT's energy of the same block, per position (B, m): an ensemble of EBTs.

    The term encodes ``input_ids``/``attention_mask`` with ``model``'s context stream and scores the
    block with its ``block_energy_function`` at inner step 0 (the term convention carries no step:
    with step embeddings, the landscape ``model`` learned for its first step). The context does not
    depend on ``probs``, and one ``think()`` call scores the same prompts at every inner step, so it
    is encoded once: the term keeps a copy of the last ``(input_ids, attention_mask)`` with their
    context and reuses it while a call's tensors equal them (a shape check, then ``torch.equal``; a
    copy, so that a tensor changed in place is not mistaken for the one encoded). Its keys/values
    stay alive until the next prompt.

    ``model`` runs in its own dtype; the energy is returned in ``probs``' dtype. It is a fixed
    expert: its context and fused weights are built without gradient, so training through thinking
    does not train it (freeze it, ``model.requires_grad_(False)``, so that no gradient reaches its
    other parameters either), and a change of its weights needs a new term (the cache holds the old
    ones). Its
    vocabulary and block size must be ``probs``' V and m (checked at each call, before encoding).
    """
    block = getattr(model.config, "joint_block_size", None)
    if block is None:
        raise ValueError(f"ebt_energy needs an EBT (EBTForCausalLM); got a {type(model).__name__}")
    if block == 0:
        raise ValueError(
            "ebt_energy needs a joint-mode EBT (joint_block_size > 0) to score a block; this one is autoregressive "
            "(joint_block_size=0)"
        )
    # the last prompts (a copy) and their block energy, whose context and tables are built once
    last: tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]] | None = None

    def block_energy(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
        nonlocal last
        if last is not None:
            ids, mask, energy = last
            same = ids.shape == input_ids.shape and mask.shape == attention_mask.shape and ids.device == input_ids.device
            if same and torch.equal(ids, input_ids) and torch.equal(mask, attention_mask):
                return energy
        with torch.no_grad():
            energy = model.model.block_energy_function(model.model.encode(input_ids, attention_mask), block)
        last = (input_ids.clone(), attention_mask.clone(), energy)
        return energy

    def term(probs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m, vocab = probs.shape[1:]
        if (block, model.config.vocab_size) != (m, vocab):
            raise ValueError(
                f"ebt_energy's EBT scores blocks of joint_block_size={block} positions over a vocabulary of "
                f"{model.config.vocab_size}; the block has {m} positions over {vocab}: use an EBT trained with the "
                "thinking model's block size and tokenizer"
            )
        return block_energy(input_ids, attention_mask)(probs, 0).to(probs.dtype)

    return term


def lm_prior(model: PreTrainedModel) -> EnergyTerm:
    """A causal LM as a prior on the block: its cross-entropy with soft inputs, per position (B, m).

    ``E_j = -sum_v p_j(v) log q_j(v)``, where q_j is ``model``'s next-token distribution after the
    prompt and the candidate distributions of block positions 0..j-1, fed as expected embeddings
    ``p_i @ embedding matrix`` (``inputs_embeds``). At a one-hot block this is the LM's ordinary
    teacher-forced negative log-likelihood of those tokens; in between it is smooth, so a large
    weight pulls the block towards text the LM finds likely. ``model`` is any transformers causal
    LM that takes ``inputs_embeds`` and has ``get_input_embeddings()`` (e.g. the ``LlamaForCausalLM``
    twin) with the thinking model's tokenizer (the vocabulary size is checked at each call, the
    tokens cannot be). It runs in its own dtype, the energy in ``probs``' dtype.

    The prompt is left-padded, so the positions are counted over real tokens (``position_ids`` =
    cumulative mask - 1): a row scores the same alone or in a padded batch. One LM forward over
    prompt + m - 1 block positions per call (the last block position is never an input); its
    backward in the inner loop. A second derivative (training through thinking) needs an attention
    with a double backward: torch's fused SDPA kernels (transformers' default ``sdpa``) have none,
    so load the LM with ``attn_implementation="eager"`` for that.
    """

    def term(probs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bsz, m, vocab = probs.shape
        embed = model.get_input_embeddings()
        embeddings = embed.weight  # (V, D)
        if embeddings.shape[0] != vocab:
            raise ValueError(
                f"lm_prior's LM has a vocabulary of {embeddings.shape[0]} tokens and the block's is {vocab}: the LM must "
                "use the thinking model's tokenizer"
            )
        prompt = input_ids.shape[1]
        block = probs[:, :-1].to(embeddings.dtype) @ embeddings  # (B, m - 1, D): expected embeddings
        inputs = torch.cat((embed(input_ids), block), 1)
        mask = torch.cat((attention_mask, attention_mask.new_ones(bsz, m - 1)), 1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False).logits
        log_q = torch.log_softmax(logits[:, prompt - 1 :].to(probs.dtype), -1)  # (B, m, V): predicts block 0..m-1
        return -(probs * log_q).sum(-1)

    return term
