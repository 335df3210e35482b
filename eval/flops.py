"""Matmul FLOPs of EBT and its Transformer++ twin, counted by hand: what the timings should be.

Why a hand count: a ratio of wall-clock times mixes arithmetic with overheads (Python, kernel
launches, elementwise ops). The FLOP ratio says what the arithmetic alone predicts, so a measured
ratio far above it points at overhead, and one below it at an inefficient baseline.

The model. Only matrix products count (2 FLOPs per multiply-add); everything is per token of a
training sequence of length L (or per generated token), for N layers of width D, SwiGLU hidden
F and vocabulary V. One layer with each query attending to ``keys`` keys costs

    block(keys) = 8 D^2 (q, k, v, o projections) + 6 D F (gate, up, down) + 4 D keys
                  (scores and weighted values over all heads)

Forward passes:
- Transformer++: ``N block((L+1)/2) + 2 D V``. Causal attention: position r sees r+1 keys, and
  the fused kernels skip the masked half. 2 D V is the output head.
- EBT context stream: ``(N-1) block((L+1)/2) + 6 D^2``. The last layer's keys and values are all
  the candidates need, so only its q/k/v projections run (q is computed and unused).
- EBT candidate stream: ``2 V D + N block(L) + 2 D``. Candidate embedding Linear(V, D); each
  candidate's scores are computed against all L observed keys and masked afterwards (the
  attention is written out so that it can be differentiated twice); its own key is an
  elementwise product, not counted; 2 D is the energy head.
- The plain way (the paper's layout, ``ebt.reference``): per token two rows (observed and
  candidate) of a doubled sequence of 2L with a dense masked 2L x 2L attention:
  ``2 V D + 2 N (8 D^2 + 6 D F) + 2 N 4 D (2L) + 2 D``.

Passes of a training step:
- an ordinary backward costs twice its forward (input and weight gradients);
- an inner step that builds the second-order graph costs 6x its forward: the forward (1x), the
  inner gradient dE/dp with ``create_graph`` (1x: input gradients only, no weight gradients) and
  the outer backward through both graphs (2x each);
- an inner step without a graph (S2's early steps) costs 2x: forward and inner gradient;
- in the plain way every key and value of the doubled sequence depends on the candidates (the
  sequence is one tensor through every layer), so the inner gradient also flows into the
  attention's keys and values: its attention products cost 2x in the inner gradient, hence 3x
  per step without graph and 9x with one (the outer backward of 1x + 2x is 2x + 4x);
- the context stream is first order: forward once, backward once (3x), whatever the step count.

So a Transformer++ step is ``3 T``, an EBT step ``3 C + sum over steps (6 or 2) P`` and the plain
EBT step ``sum over steps of (6 or 2) X_dense + (9 or 3) X_attention``. This count matches
``torch.utils.flop_counter.FlopCounterMode`` on the real training steps to within about 1 %
(``tests/test_bench.py``), which checks the 6x and 9x rules above rather than assuming them.

Generation (one new token at context T, batch 1): Transformer++ runs one token through N layers
(``N block(T) + 2 D V``); cached EBT appends the token to the context (``(N-1) block(T) + 6 D^2``)
and runs one candidate per random start for k steps (forward and inner gradient, 1x each):
``2k (2 V D + N block(T + 1) + 2 D)`` per start, plus one more forward (1x) when the final
energies are needed: returned (``generate(return_dict_in_generate=True)``) or choosing between
several starts; plain one-start ``generate`` skips it.
Hence the ``2k + 2`` times Transformer++ that the latency target (one start) allows. Uncached
EBT generation runs the context stream over all T + 1 tokens again instead of appending one.

The paper estimates one optimisation step at about 3.33x a Transformer++ step and the 2-step
S1 recipe at 6.66x (sequence doubled, no reuse); ``train_step_flops`` gives the same quantities
for our layout and for the plain one, so the three can be put side by side.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    """The dimensions the count depends on (shared by an EBT and its Llama twin)."""

    layers: int
    width: int
    ffn: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        """From an ``EBTConfig`` or ``LlamaConfig`` (same field names)."""
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size)

    def dense(self) -> float:
        """Projections and SwiGLU of one layer for one token."""
        return 8 * self.width**2 + 6 * self.width * self.ffn

    def attention(self, keys: float) -> float:
        """Scores and weighted values of one query over ``keys`` keys, all heads."""
        return 4 * self.width * keys


@dataclass(frozen=True)
class Recipe:
    """Which inner steps of a training step build the second-order graph."""

    steps: int
    graph_steps: int  # S1 ("all"): every step; S2 ("last"): the last one only

    @classmethod
    def of(cls, config) -> Recipe:
        """The (fixed) step count of an ``EBTConfig``; S2's random 2-3 is timed at ``train_steps``."""
        graph = config.train_steps if config.second_order == "all" else 1
        return cls(config.train_steps, graph)


def llama_forward(d: Dims, length: int) -> float:
    """Transformer++ forward FLOPs per token of a length-``length`` sequence."""
    return d.layers * (d.dense() + d.attention((length + 1) / 2)) + 2 * d.width * d.vocab


def context_forward(d: Dims, length: int) -> float:
    """EBT observed stream forward FLOPs per token (last layer: keys and values only)."""
    return (d.layers - 1) * (d.dense() + d.attention((length + 1) / 2)) + 6 * d.width**2


def candidate_forward(d: Dims, keys: float) -> float:
    """EBT candidate stream forward FLOPs per candidate attending to ``keys`` observed keys."""
    return 2 * d.vocab * d.width + d.layers * (d.dense() + d.attention(keys)) + 2 * d.width


def llama_train_flops(d: Dims, length: int) -> float:
    """One Transformer++ training step (forward + backward), per token."""
    return 3 * llama_forward(d, length)


def ebt_train_flops(d: Dims, length: int, recipe: Recipe) -> float:
    """One EBT training step with the context stream computed once, per token."""
    p = candidate_forward(d, length)
    plain_steps = recipe.steps - recipe.graph_steps
    return 3 * context_forward(d, length) + (6 * recipe.graph_steps + 2 * plain_steps) * p


def plain_train_flops(d: Dims, length: int, recipe: Recipe) -> float:
    """One EBT training step the plain way (doubled sequence every step), per token."""
    dense = 2 * d.vocab * d.width + 2 * d.layers * d.dense() + 2 * d.width
    attention = 2 * d.layers * d.attention(2 * length)
    plain_steps = recipe.steps - recipe.graph_steps
    return recipe.graph_steps * (6 * dense + 9 * attention) + plain_steps * (2 * dense + 3 * attention)


def train_step_flops(d: Dims, length: int, recipe: Recipe) -> dict[str, float]:
    """Per-token FLOPs of the three training steps and the ratios the benchmark reports."""
    llama = llama_train_flops(d, length)
    ours = ebt_train_flops(d, length, recipe)
    plain = plain_train_flops(d, length, recipe)
    return {
        "llama": llama,
        "ebt": ours,
        "plain": plain,
        "ebt_over_llama": ours / llama,
        "plain_over_llama": plain / llama,
        "plain_over_ebt": plain / ours,
    }


def llama_decode_flops(d: Dims, context: int) -> float:
    """One generated token at context ``context`` with a KV cache."""
    return d.layers * (d.dense() + d.attention(context + 1)) + 2 * d.width * d.vocab


def ebt_decode_flops(
    d: Dims, context: int, steps: int, cached: bool = True, samples: int = 1, final_energy: bool = False
) -> float:
    """One generated token of EBT generation with ``steps`` thinking steps from ``samples`` starts.

    Cached: the new token joins the context stream; uncached: the whole prefix runs again. The
    context stream runs once whatever the samples; each start runs its own candidate, 2 passes
    per step (forward, inner gradient), plus the final energy's pass if ``final_energy`` or if
    several starts must be compared by it.
    """
    final_energy = final_energy or samples > 1
    if cached:
        encode = (d.layers - 1) * (d.dense() + d.attention(context + 1)) + 6 * d.width**2
    else:
        encode = (context + 1) * context_forward(d, context + 1)
    return encode + samples * (2 * steps + int(final_energy)) * candidate_forward(d, context + 1)
