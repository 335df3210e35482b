"""What every ``python -m eval`` command shares: usage errors, list flags, checkpoint loading,
markdown tables, and the thinking flags.

The thinking flags are generated from the fields of ``ebt.configuration_ebt.ThinkingConfig``
(name, type and help text), so every command exposes every setting under the same names:
``--think-<field>`` (the ``think_<field>`` of ``forward``, ``generate`` and the lm-eval model
args), plus the bare ``--<field>`` where the command has no flag of that name already (e.g.
``--steps``; ``eval reasoning``'s ``--seed`` is the seed of its problems, so its thinking seed is
``--think-seed`` only). A setting left unset is the checkpoint's default. Each value is checked
by ``ThinkingConfig`` itself, so a bad one fails while parsing, with the config's message.
Settings a command sweeps take comma (or space) separated lists, ``--steps 1,2,4``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebt.configuration_ebt import ThinkingConfig

FLAG_PREFIX = "think"  # --think-<field>, dest think_<field>: the names forward/generate/lm-eval use


class UsageError(ValueError):
    """A setting that cannot run: ``python -m eval`` prints ``error: <message>`` and exits with 2."""


# ------------------------------------------------------------------------------------ list flags


def comma_list(kind: Callable[[str], Any] = str, *, minimum: float | None = None) -> Callable[[str], list]:
    """An argparse ``type``: ``"1,2,4"`` -> ``[1, 2, 4]``, each item converted by ``kind``.

    An empty list, an item ``kind`` cannot convert and (with ``minimum``) an item below it are
    usage errors that name the flag's text.
    """
    name = getattr(kind, "__name__", "value")

    def parse(text: str) -> list:
        try:
            values = [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {name}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {name}, got {text!r}")
        if minimum is not None and any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= {minimum:g}, got {text!r}")
        return values

    parse.__name__ = f"{name} list"  # argparse names the type in its messages
    return parse


def flatten_unique(groups: Iterable[Iterable]) -> list:
    """``[[1, 2], [4], [2]]`` -> ``[1, 2, 4]``: the values of a repeated list flag, first occurrence kept."""
    return list(dict.fromkeys(itertools.chain.from_iterable(groups)))


# ------------------------------------------------------------------------------------ checkpoints


@dataclass
class Checkpoint:
    """A loaded model folder with its tokenizer; ``label`` names it in tables."""

    path: str
    model: Any
    tokenizer: Any
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = "EBT" if self.can_think else "Transformer++"

    @property
    def can_think(self) -> bool:
        """Whether thinking settings apply (an energy-based model)."""
        return getattr(self.model.config, "model_type", None) == "ebt"


def load_checkpoint(path: str, *, ebt: bool | None = None, flag: str = "--model", dtype: str = "float32") -> Checkpoint:
    """Model (eval mode, ``dtype``) and tokenizer of a saved folder.

    ``ebt=True`` refuses a model that cannot think, ``ebt=False`` refuses an EBT (a twin must be an
    ordinary causal LM); the message names ``flag`` and says what to pass instead.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import ebt as _ebt  # noqa: F401  (registers the "ebt" model type with the Auto classes)

    if not Path(path, "config.json").is_file():
        raise UsageError(f"{flag} {path} is not a model folder (no config.json); pass e.g. runs/NAME/final")
    model_type = AutoConfig.from_pretrained(path).model_type
    if ebt is True and model_type != "ebt":
        raise UsageError(
            f"{flag} {path} is a {model_type!r} checkpoint, not an EBT: thinking needs an energy-based model. "
            "Pass a Transformer++ checkpoint as --twin."
        )
    if ebt is False and model_type == "ebt":
        raise UsageError(f"{flag} {path} is an EBT; {flag} takes the Transformer++ (e.g. llama) checkpoint to compare with.")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return Checkpoint(path=path, model=model, tokenizer=AutoTokenizer.from_pretrained(path))


# ------------------------------------------------------------------------------------ tables


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[int] = ()) -> str:
    """A GitHub markdown table; cells are ``str()``-ed (``None`` -> ``-``), columns in ``right`` right-aligned."""
    right = set(right)

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join("-" if c is None else str(c).replace("|", "\\|") for c in cells) + " |"

    rows = [list(r) for r in rows]
    if any(len(r) != len(header) for r in rows):
        raise ValueError("markdown_table: every row needs one cell per header column")
    rule = "| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |"
    return "\n".join([line(header), rule, *map(line, rows)])


# ------------------------------------------------------------------------------------ thinking flags


@functools.cache
def thinking_fields() -> tuple[tuple[str, type, str], ...]:
    """``(name, type, help)`` of every ``ThinkingConfig`` field; type is int, float, str or bool."""
    hints = typing.get_type_hints(ThinkingConfig)
    out = []
    for f in dataclasses.fields(ThinkingConfig):
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
            raise TypeError(f"ThinkingConfig.{f.name}: cannot make a command-line flag of type {hints[f.name]}")
        out.append((f.name, kinds[0], f.metadata.get("help", "")))
    return tuple(out)


def _convert(kind: type, text: str) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    return kind(text.strip())


def thinking_value(name: str, value: Any) -> Any:
    """``value`` of field ``name`` converted from text if it is text, then checked by ``ThinkingConfig``.

    Raises ``ValueError`` naming the field (``ThinkingConfig``'s own message).
    """
    kinds = {n: k for n, k, _ in thinking_fields()}
    if name not in kinds:
        raise ValueError(f"unknown thinking setting {name!r}; valid: {', '.join(kinds)}.")
    if isinstance(value, str) and kinds[name] is not str:
        try:
            value = _convert(kinds[name], value)
        except ValueError:
            expected = {int: "an integer", float: "a number", bool: "true or false"}[kinds[name]]
            raise ValueError(f"ThinkingConfig.{name}={value!r} is invalid: must be {expected}.") from None
    if kinds[name] is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ThinkingConfig(**{name: value})  # validates, naming the field
    return value


def _flag_type(name: str, sweep: bool) -> Callable[[str], Any]:
    def parse_one(text: str) -> Any:
        try:
            return thinking_value(name, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    def parse_list(text: str) -> list:
        values = [parse_one(item) for item in text.split(",") if item.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values

    parse = parse_list if sweep else parse_one
    parse.__name__ = name
    return parse


def add_thinking_arguments(
    parser: argparse.ArgumentParser, *, sweep: Sequence[str] = (), defaults: dict[str, Any] | None = None
) -> None:
    """One flag per ``ThinkingConfig`` field (call after the command's own flags).

    ``sweep``: fields the command sweeps; their flags take lists (``--steps 1,2,4`` or ``--steps
    1 2 4``) and default to ``defaults[field]`` (a list) or the checkpoint's default. Other fields
    take one value; ``defaults`` may give them a command default too (else None = the checkpoint's).
    """
    defaults = dict(defaults or {})
    fields = thinking_fields()
    unknown = (set(sweep) | set(defaults)) - {n for n, _, _ in fields}
    if unknown:
        raise ValueError(f"not ThinkingConfig fields: {sorted(unknown)}")
    group = parser.add_argument_group(
        "thinking", "every ThinkingConfig setting; unset = the checkpoint's default (config.inference_<setting>)"
    )
    for name, kind, help_text in fields:
        dash = name.replace("_", "-")
        flags = [f"--{FLAG_PREFIX}-{dash}", f"--{dash}"]
        options: dict[str, Any] = {"dest": f"{FLAG_PREFIX}_{name}", "help": help_text}
        if name in sweep:
            default = defaults.get(name)
            options.update(type=_flag_type(name, sweep=True), nargs="+", metavar=name.upper(), default=[default or [None]])
            given = ",".join(map(str, default)) if default else "the checkpoint's"
            options["help"] = f"{help_text}. Swept: a comma list (default {given})"
        elif kind is bool:
            options.update(action=argparse.BooleanOptionalAction, default=defaults.get(name))
        else:
            options.update(type=_flag_type(name, sweep=False), metavar=name.upper(), default=defaults.get(name))
        try:
            group.add_argument(*flags, **options)
        except argparse.ArgumentError:  # the command has its own --<field> (reasoning's --seed)
            group.add_argument(flags[0], **options)


def thinking_settings(args: argparse.Namespace) -> list[ThinkingConfig]:
    """Every ``ThinkingConfig`` of the command line's sweep, in order: the product of the swept
    fields' lists (in field order, the first outermost); the other fields are the same in all."""
    names = ThinkingConfig.field_names()
    values = {name: getattr(args, f"{FLAG_PREFIX}_{name}") for name in names}
    swept = [name for name in names if isinstance(values[name], list)]
    fixed = {name: value for name, value in values.items() if name not in swept}
    lists = [flatten_unique(values[name]) for name in swept]
    return [ThinkingConfig(**fixed, **dict(zip(swept, combo))) for combo in itertools.product(*lists)]


def given_settings(thinking: ThinkingConfig | None) -> dict[str, Any]:
    """The fields of ``thinking`` that are set (not None): what a record or a label should show."""
    return {} if thinking is None else {k: v for k, v in thinking.to_dict().items() if v is not None}


def setting_label(thinking: ThinkingConfig, names: Sequence[str]) -> str:
    """``"steps=2, samples=4"`` for the set fields among ``names``; ``"checkpoint default"`` if none."""
    given = given_settings(thinking)
    return ", ".join(f"{n}={given[n]}" for n in names if n in given) or "checkpoint default"
