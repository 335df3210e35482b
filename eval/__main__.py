"""``python -m eval <command> ...``: one entry point, one module per command.

Each command module exposes ``add_arguments(parser)`` and ``main(args) -> int``; modules are
imported only when their command runs, so a missing optional extra (lm-eval) breaks only the
command that needs it. A command raises ``eval.common.UsageError`` for a setting that cannot
run: it is printed as ``error: ...`` and the exit status is 2, as for a flag argparse refuses.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from eval.common import UsageError

COMMANDS = {
    "thinking": ("eval.thinking", "perplexity against thinking steps and samples (and a Transformer++ twin)"),
    "reasoning": ("eval.reasoning", "exact-match accuracy on reasoning tasks against thinking settings"),
    "bench": ("eval.bench", "speed and memory of EBT training/generation against Transformer++"),
    "harness": ("eval.harness", "lm-evaluation-harness tasks swept over thinking settings"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"python -m eval {name}", description=COMMANDS[name][1])
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
