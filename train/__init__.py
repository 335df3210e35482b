"""Training for EBTs and their Transformer++ twins: ``python -m train [CONFIG] [key=value ...]``."""
