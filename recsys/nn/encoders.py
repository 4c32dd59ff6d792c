"""Builds a sequence encoder by name, so configs and exports can say ``encoder: lru|mamba|sasrec``.

All encoders share one interface: ``forward(x (B, L, D), mask (B, L)) -> (B, L, D)`` over
left-padded sequences, a ``sizes`` attribute, and (for the nested ones) :func:`cut_to_size`.

Each encoder's own settings are a typed, validated config: :class:`LRUOptions`,
:class:`MambaOptions`, :class:`SASRecOptions` (``ENCODER_OPTIONS`` by name). The model holds one of
each (``--model.lru.r_min``, ``--model.mamba.d_state``, ``--model.sasrec.n_heads`` on the command
line) and passes the chosen one's fields to :func:`build_encoder` as plain keyword arguments, the
form export manifests record as ``encoder_options``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from recsys.errors import UserError

ENCODERS = ("lru", "mamba", "sasrec")


class OptionError(UserError, ValueError):
    """An invalid setting, with the settings it names written ``{name}`` in ``template``.

    ``str()`` names them plainly (``r_min``); :meth:`render` with a prefix names them as the flags a
    command line takes (``--model.lru.r_min``), so a check written once serves both.
    """

    def __init__(self, template: str, scope: str = "") -> None:
        self.template, self.scope = template, scope
        super().__init__(self.render())

    def render(self, prefix: str = "") -> str:
        return re.sub(r"\{([\w.]+)\}", lambda m: f"{prefix}{self.scope}{m.group(1)}", self.template)

    def within(self, group: str) -> OptionError:
        """The same error for settings that live in ``group`` (``r_min`` -> ``lru.r_min``)."""
        return OptionError(self.template, f"{group}.{self.scope}")


@dataclass(frozen=True)
class LRUOptions:
    """Nested LRU.

    Args:
        r_min: smallest initial ``|lambda|`` (the decay ring's inner radius).
        r_max: largest initial ``|lambda|``.
        post_norm: each block's LayerNorms after its residual sums, as LRURec's blocks, instead of
            before its LRU and FFN (the default, pre-norm).
        ffn: each block's feed-forward layer: ``gated`` (``W2(SiLU(G x) * W1 x)``, the default) or
            ``gelu`` (``W2(GELU(W1 x))``, LRURec's).
        ffn_mult: how much wider the feed-forward layer's hidden width is (LRURec's: 4).
    """

    r_min: float = 0.0
    r_max: float = 0.1
    post_norm: bool = False
    ffn: str = "gated"
    ffn_mult: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.r_min < self.r_max <= 1.0:
            raise OptionError(f"{{r_min}} {self.r_min}, {{r_max}} {self.r_max}: need 0 <= r_min < r_max <= 1")
        if not isinstance(self.post_norm, bool):
            raise OptionError(f"{{post_norm}} must be true or false, got {self.post_norm!r}")
        from recsys.nn.lru import FFN_KINDS

        if self.ffn not in FFN_KINDS:
            raise OptionError(f"{{ffn}}: unknown feed-forward layer {self.ffn!r}; choose one of {', '.join(FFN_KINDS)}")
        if isinstance(self.ffn_mult, bool) or not isinstance(self.ffn_mult, int) or not 1 <= self.ffn_mult <= 64:
            raise OptionError(f"{{ffn_mult}} must be an integer from 1 to 64, got {self.ffn_mult!r}")


@dataclass(frozen=True)
class MambaOptions:
    """Nested Mamba.

    Args:
        d_state: state size per channel.
        expand: channel expansion factor.
    """

    d_state: int = 16
    expand: int = 2

    def __post_init__(self) -> None:
        for name in ("d_state", "expand"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{{{name}}} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class SASRecOptions:
    """SASRec (full width only).

    Args:
        n_heads: attention heads; must divide the width (the largest size).
    """

    n_heads: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.n_heads, bool) or not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise OptionError(f"{{n_heads}} must be a positive integer, got {self.n_heads!r}")

    def check_width(self, width: int) -> None:
        if width % self.n_heads:
            raise OptionError(f"{{n_heads}} {self.n_heads} must divide the width {width} (the largest size)")


ENCODER_OPTIONS: dict[str, type] = {"lru": LRUOptions, "mamba": MambaOptions, "sasrec": SASRecOptions}
def options_of(name: str, value: Any) -> Any:
    """``value`` (an options object, a mapping of its fields, or None for the defaults) as the typed
    options of encoder ``name``; an invalid value raises :class:`OptionError` naming ``name.field``."""
    cls = ENCODER_OPTIONS[name]
    if isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        value = vars(value)  # a parsed namespace
    unknown = sorted(set(value) - {f.name for f in fields(cls)})
    if unknown:
        raise OptionError(f"{{{unknown[0]}}}: unknown option of the {name} encoder").within(name)
    try:
        return cls(**value)
    except OptionError as exc:
        raise exc.within(name) from None


def build_encoder(name: str, sizes: Sequence[int], **options: Any) -> nn.Module:
    """The encoder called ``name``; ``options`` are its constructor's keyword arguments."""
    if name == "lru":
        from recsys.nn.lru import NestedLRUEncoder as cls
    elif name == "mamba":
        from recsys.nn.mamba import NestedMambaEncoder as cls
    elif name == "sasrec":
        from recsys.nn.sasrec import SASRecEncoder as cls
    else:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return cls(sizes, **options)
