"""Every setting of a config with its value, rule and meaning, made from
:data:`asd_ray.config_ranges.RUN_RANGES` (``asd-ray config show --explain``): the help
is the table that validates, so the two cannot drift apart. The markdown form is the
README's configuration table (a test checks the README against it).
"""

from __future__ import annotations

import textwrap
from typing import NamedTuple

import yaml

from asd_ray.config import PRESETS, RunConfig
from asd_ray.config_ranges import RUN_RANGES

_INDENT = "    "
_WIDTH = 100  # columns of the text form


class Explained(NamedTuple):
    """One setting as the help shows it."""

    key: str  # section.field as --set names it ("epochs" at the top level)
    value: str  # as YAML writes it in a --set value
    rule: str
    meaning: str


def explained_settings(config: RunConfig) -> list[Explained]:
    """Every setting of ``config``, in the order of :data:`RUN_RANGES`."""
    values = config.to_dict()
    rows = []
    for section, settings in RUN_RANGES.items():
        for key, setting in settings.items():
            value = values[section][key] if section else values[key]
            name = f"{section}.{key}" if section else key
            rows.append(Explained(name, _flow_yaml(value), setting.rule[1], setting.meaning))
    return rows


def explain_text(config: RunConfig) -> str:
    """The settings as text: a line ``key: value`` each, its meaning and rule indented below,
    a blank line between sections."""
    lines = textwrap.wrap(_preset_line(config.preset, ""), _WIDTH)
    section = None
    for row in explained_settings(config):
        if row.key.rpartition(".")[0] != section:
            section = row.key.rpartition(".")[0]
            lines.append("")
        lines.append(f"{row.key}: {row.value}")
        for text in (row.meaning, f"rule: {row.rule}"):
            lines += textwrap.wrap(text, _WIDTH, initial_indent=_INDENT, subsequent_indent=_INDENT)
    return "\n".join(lines) + "\n"


def explain_markdown(config: RunConfig) -> str:
    """The settings as a markdown table (the README's configuration table)."""
    lines = [
        _preset_line(config.preset, "`"),
        "",
        "| key | default | meaning | rule |",
        "| --- | --- | --- | --- |",
    ]
    for row in explained_settings(config):
        cells = (f"`{row.key}`", f"`{row.value}`", row.meaning, row.rule)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _preset_line(preset: str, quote: str) -> str:
    """The preset: not a setting (--set cannot change it), the base the settings start from."""
    names = ", ".join(f"{quote}{name}{quote}" for name in PRESETS)
    return (
        f"preset: {quote}{preset}{quote}, the paper's settings the values below start from "
        f"({quote}--preset{quote}, one of {names}; {quote}--config{quote} and {quote}--set{quote} "
        "change the values, never the preset)"
    )


def _flow_yaml(value: object) -> str:
    """``value`` on one line as YAML writes it, so it can be passed back with ``--set``."""
    return yaml.safe_dump(value, default_flow_style=True, width=2**31).removesuffix("\n...\n").strip()
