"""Spellings from before the encoder options were grouped, accepted in one place.

The encoder options were once flat model settings (``r_min``, ``d_state``, ``n_heads``); they are
grouped now (``lru: {r_min: ...}``). Old checkpoints (their ``hyper_parameters``), old command lines
(``--model.r_min 0.8``) and old config files still work: each is rewritten here to the grouped
form before anything else reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from recsys.nn.encoders import ENCODER_OPTIONS

__all__ = ["FLAT_OPTION_GROUPS", "nest_flat_args", "nest_flat_options"]

# The flat names the options had before they were grouped (``r_min`` -> ``lru``), for old
# checkpoints and command lines.
FLAT_OPTION_GROUPS: dict[str, str] = {f.name: name for name, cls in ENCODER_OPTIONS.items() for f in fields(cls)}


def nest_flat_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Model settings with the old flat encoder options (``r_min: 0.8``) moved into their groups
    (``lru: {r_min: 0.8}``); settings already grouped are kept, and win over flat ones."""
    nested = {k: v for k, v in options.items() if k not in FLAT_OPTION_GROUPS}
    for key, group in FLAT_OPTION_GROUPS.items():
        if key in options:
            grouped = nested.get(group)
            grouped = {} if grouped is None else dict(grouped if isinstance(grouped, Mapping) else asdict(grouped))
            nested[group] = {key: options[key], **grouped}
    return nested


def _flat_flag(arg: str) -> str:
    name, eq, value = arg.partition("=")
    key = name[len("--model."):] if name.startswith("--model.") else None
    if key in FLAT_OPTION_GROUPS:
        return f"--model.{FLAT_OPTION_GROUPS[key]}.{key}{eq}{value}"
    return arg


def _config_with_groups(path: str) -> str:
    """A config file whose ``model:`` has flat encoder options, as YAML text with them grouped
    (jsonargparse's ``--config`` takes a file or its text); any other config: the path itself."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path  # let the parser report it
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not set(model) & set(FLAT_OPTION_GROUPS):
        return path
    return yaml.safe_dump({**config, "model": nest_flat_options(model)}, sort_keys=False)


def nest_flat_args(args: list[str]) -> list[str]:
    """Command-line arguments with the flat encoder options (``--model.r_min 0.8``, also inside a
    ``--config`` file) rewritten to their groups (``--model.lru.r_min 0.8``)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] == "--config":
            out.append(_config_with_groups(arg))
        elif arg.startswith("--config="):
            out.append("--config=" + _config_with_groups(arg[len("--config="):]))
        else:
            out.append(_flat_flag(arg))
    return out
