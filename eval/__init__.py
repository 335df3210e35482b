"""Evaluation of EBT checkpoints: thinking curves, reasoning tasks, benchmarks, harnesses."""
