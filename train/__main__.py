"""``python -m train [CONFIG.yaml] [section.key=value ...]`` (also under ``accelerate launch -m train``).

Exit codes: 0 done (or already finished), 2 bad input (config, data, output folder, a folder locked by
another run, checkpoint), 3 non-finite loss or weights (nothing saved, not exported).
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m train [CONFIG.yaml] [section.key=value ...]

Trains an EBT (model.kind=ebt, a recipe: model.recipe=s1|s2) or its Transformer++ twin (model.kind=llama).
With no arguments: a tiny EBT on the embedded reasoning tasks (no files, no network), written to
runs/default/. Re-running a command resumes its run (or says it is finished).
Values are YAML: train.max_steps=100  train.lr=1e-3  eval.think_steps=[1,2,8]  data.val_split=null
Multi-process: accelerate launch [--config_file configs/accelerate/multi_gpu.yaml] -m train ...

Config keys (type) = default: help
"""


def main(argv: list[str]) -> int:
    from train.config import ConfigError, load_config, reference

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + reference())
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from train.checkpoint import CheckpointError
    from train.loop import NonFiniteLoss, Trainer

    try:
        Trainer(cfg).run()
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
