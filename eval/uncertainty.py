"""Energy as uncertainty: per-token energies against per-token loss, and as an OOD score.

An EBT's final energy E_r is its own judgement of how well the candidate for token r+1 fits the
context. If that judgement is informative, tokens with high energy should be the ones it gets
wrong (positive energy/loss correlation), and text unlike the training data should get higher
mean energy (AUROC > 0.5 with "out of distribution" as the positive class).

Raw energies carry a per-context offset: training only ever uses the energy's gradient with
respect to the candidate, so E(x, p) = f(x) + g(x, p) with f free, and f can dominate (on the tiny
Shakespeare S2 model the raw final energy is *anti*-correlated with loss). The offset cancels in
the *relative energy* E(x, p_final) - E(x, uniform): how far thinking got below an uninformed
candidate on the same context, for one extra energy pass per token. Both are reported.

Energy as a verifier (``rerank_top`` k): the k most likely tokens of the predicted distribution
(with ``steps=0, init="draft"``: the draft head's top k) are scored as one-hot candidates and the
lowest energy wins. If the energy ranks, that choice is right more often than the argmax; the
offset f(x) is the same for all k candidates of a position, so raw energies compare fairly here.

The statistics are written out in torch (ranks with ties averaged) so that this module needs
nothing beyond the model's own dependencies; the tests check them against scipy/scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ebt.configuration_ebt import ThinkingConfig


@dataclass
class TokenScores:
    """Per predicted token of unpadded sequences (B, L): column r scores token r+1.

    energy: (B, L-1) final energy of the chosen candidate; reference_energy: (B, L-1) energy of
    the uniform candidate on the same context; nll: (B, L-1) the chosen candidate's cross-entropy
    against the true token; steps_taken: (B, L-1) inner steps spent; function_evaluations: energy
    passes spent per token by thinking (the reference pass not included).
    """

    energy: torch.Tensor
    reference_energy: torch.Tensor
    nll: torch.Tensor
    steps_taken: torch.Tensor
    function_evaluations: int
    argmax: torch.Tensor | None = None
    reranked: torch.Tensor | None = None

    @property
    def relative_energy(self) -> torch.Tensor:
        """(B, L-1) final minus uniform-candidate energy: the per-context offset cancels."""
        return self.energy - self.reference_energy


def score_tokens(
    model, input_ids: torch.Tensor, thinking: ThinkingConfig | None = None, rerank_top: int = 0, **settings
) -> TokenScores:
    """Think over ``input_ids`` (B, L) once and score every next token.

    ``thinking`` and ``settings`` (``ThinkingConfig`` field names, e.g. ``steps=4``) go to ``think()``.
    ``rerank_top`` k > 0 also re-ranks the k most likely tokens by energy (k more passes per token).
    """
    with torch.no_grad():
        context = model.model.encode(input_ids)
        out = model.think(context=context, thinking=thinking, **settings)
        logits = out.logits[:, :-1]  # (B, L-1, V): the last position has no target
        targets = input_ids[:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), reduction="none")
        bsz, length = input_ids.shape
        vocab = model.config.vocab_size
        query = torch.arange(length, device=input_ids.device)
        steps = out.energies.shape[-1] - 1  # the final energy is taken at this step index (step embeddings)
        energy_of = model.model.energy_function(context, query)
        uniform = torch.full((bsz, length, vocab), 1.0 / vocab, device=input_ids.device)
        reference = energy_of(uniform, steps)
        argmax = reranked = None
        if rerank_top > 0:
            top = out.logits.topk(min(rerank_top, vocab), dim=-1).indices  # (B, L, k), best first
            energies = torch.stack(
                [energy_of(F.one_hot(top[..., j], vocab).to(uniform.dtype), steps) for j in range(top.shape[-1])], -1
            )  # (B, L, k): one pass per one-hot candidate
            argmax = top[:, :-1, 0]
            reranked = top.gather(-1, energies.argmin(-1, keepdim=True))[:, :-1, 0]  # (B, L-1)
    return TokenScores(
        energy=out.energies[:, :-1, -1],
        reference_energy=reference[:, :-1],
        nll=nll.view_as(targets),
        steps_taken=out.steps_taken[:, :-1],
        function_evaluations=out.function_evaluations,
        argmax=argmax,
        reranked=reranked,
    )


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a flat tensor, ties sharing their average rank (as scipy's rankdata)."""
    _, inverse, counts = torch.unique(x.flatten(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each group of equal values
    return (last - (counts - 1) / 2)[inverse]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two equally long flat samples."""
    x, y = x.flatten().double(), y.flatten().double()
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"pearson needs two samples of the same size >= 2, got {x.numel()} and {y.numel()}")
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: robust to the arbitrary scale of energies."""
    return pearson(average_ranks(x), average_ranks(y))


def auroc(negative: torch.Tensor, positive: torch.Tensor) -> float:
    """P(a positive scores higher than a negative), ties counting half (Mann-Whitney U / n+ n-)."""
    n_neg, n_pos = negative.numel(), positive.numel()
    if n_neg == 0 or n_pos == 0:
        raise ValueError("auroc needs at least one negative and one positive score")
    ranks = average_ranks(torch.cat((negative.flatten().double(), positive.flatten().double())))
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
