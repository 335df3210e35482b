"""Per-process memory of a (sharded) training run: ``torchrun --nproc_per_node N -m train.memory [key=value ...]``.

Runs ``train.max_steps`` steps of the run's config (no checkpoint, no validation, no export) and
prints one JSON line per process: the bytes its parameters, gradients and optimiser state hold
after the last update, before the gradients are dropped (local tensors, each storage once:
``train.sharding.memory_at_rest``), and its peak resident set size (``getrusage``: the whole
process, Python and torch included, a rough check). docs/bench.md ("Sharded training") has the
table and the command.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile


def main(argv: list[str]) -> int:
    from train.config import load_config
    from train.loop import Trainer
    from train.sharding import memory_at_rest

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"output_dir={tmp}/run", *argv])
        trainer = Trainer(cfg)
        measured: dict[str, int] = {}
        zero_grad = trainer.optimizer.zero_grad

        def probe(*args, **kwargs):  # after the update, gradients still held
            measured.update(memory_at_rest(trainer.model, trainer.sharding.local_optimizer_state(trainer.optimizer)))
            zero_grad(*args, **kwargs)

        trainer.optimizer.zero_grad = probe
        try:
            for _ in range(cfg.train.max_steps):
                metrics = trainer.train_step()
                trainer.step += 1
        finally:
            trainer.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        row = {
            "sharding": cfg.train.sharding,
            "rank": trainer.acc.process_index,
            "processes": trainer.acc.num_processes,
            "global_batch": trainer.global_batch,
            "parameters": sum(p.numel() for p in trainer.sharding.module.parameters()),
            **{f"{k}_bytes": v for k, v in measured.items()},
            "at_rest_bytes": sum(measured.values()),
            "peak_rss_bytes": peak,
            "loss": metrics["loss"],
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
