"""``evaluate`` modules shipped with the package, loaded from their folder.

``evaluate.load("accuracy")`` needs the network (the wheel ships no metric scripts), while
``evaluate.load(<local folder>)`` does not: every metric of ``python -m eval`` lives here as
``metrics/<name>/<name>.py`` and is loaded with :func:`load`.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent


def load(name: str) -> evaluate.EvaluationModule:
    """The local ``evaluate`` module ``name`` (a folder of this package)."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no local metric {name!r}; available: {', '.join(known)}")
    return evaluate.load(str(folder))
