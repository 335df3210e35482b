"""Energy as an out-of-distribution score, as an ``evaluate`` metric.

AUROC of a per-text score (mean energy) for telling out-of-distribution texts (positives) from
in-distribution ones: 0.5 = no separation, 1 = OOD texts always score higher. The arithmetic is
``eval.uncertainty``'s.
"""

import datasets
import evaluate
import torch

from eval.uncertainty import auroc

_DESCRIPTION = "AUROC of a score separating out-of-distribution (1) from in-distribution (0) texts."
_INPUTS = """
score: list of float, one score per text (higher = more likely out of distribution).
is_ood: list of int, 1 for out-of-distribution texts, 0 for in-distribution ones.
Returns: auroc, positives, negatives.
"""


class EnergyAuroc(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"score": datasets.Value("float64"), "is_ood": datasets.Value("int64")}),
        )

    def _compute(self, score: list[float], is_ood: list[int]) -> dict:
        s, y = torch.tensor(score, dtype=torch.float64), torch.tensor(is_ood, dtype=torch.bool)
        return {"auroc": auroc(s[~y], s[y]), "positives": int(y.sum()), "negatives": int((~y).sum())}
