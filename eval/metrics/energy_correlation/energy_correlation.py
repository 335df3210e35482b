"""How well per-token energy predicts per-token loss, as an ``evaluate`` metric.

Pearson on the raw values and Spearman on ranks (energies have no fixed scale); both positive
when high energy marks the tokens the model gets wrong. The arithmetic is ``eval.uncertainty``'s.
"""

import datasets
import evaluate
import torch

from eval.uncertainty import pearson, spearman

_DESCRIPTION = "Pearson and Spearman correlation between per-token energy and per-token loss."
_INPUTS = """
energy: list of float, the final energy of each token's candidate.
loss: list of float, that token's cross-entropy (nats).
Returns: pearson, spearman, tokens.
"""


class EnergyCorrelation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"energy": datasets.Value("float64"), "loss": datasets.Value("float64")}),
        )

    def _compute(self, energy: list[float], loss: list[float]) -> dict:
        energies, losses = torch.tensor(energy, dtype=torch.float64), torch.tensor(loss, dtype=torch.float64)
        return {"pearson": pearson(energies, losses), "spearman": spearman(energies, losses), "tokens": len(energy)}
