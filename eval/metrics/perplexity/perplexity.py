"""Perplexity from summed negative log-likelihoods, as an ``evaluate`` metric.

Unlike the Hub's ``perplexity`` (which runs a model itself), this one takes what any model
already computed, so an EBT after k thinking steps and its Transformer++ twin are scored by
the same arithmetic: exp(sum of NLL / number of tokens), in nats.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "exp(total NLL / total tokens) from per-batch NLL sums (nats) and token counts."
_INPUTS = """
nll_sum: list of float, summed negative log-likelihood (nats) of each batch.
token_count: list of int, tokens scored in each batch.
Returns: perplexity, nll_per_token (nats), tokens.
"""


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "token_count": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum: list[float], token_count: list[int]) -> dict:
        tokens = sum(token_count)
        if tokens < 1:
            raise ValueError("perplexity needs at least one scored token")
        nll = sum(nll_sum) / tokens
        return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": tokens}
