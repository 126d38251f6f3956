"""Typed backend options: every backend declares one frozen dataclass of its tuning knobs with
``option(...)`` fields, and ``resolve`` is the one place they are validated.

A field carries its default per device type (``cuda=``, ``cpu=``), the ops it applies to (``"logprobs"``:
``sequence_logprobs``; ``"sdpo_loss"``: ``fused_sdpo_loss``) and one check. ``None`` given for a field
means "the default".
"""

from __future__ import annotations

import dataclasses
from typing import Any

OPS = ("logprobs", "sdpo_loss")


class OptionError(ValueError, TypeError):
    """A bad backend option: an unknown name (historically a TypeError for some backends) or a bad
    value (a ValueError)."""


def option(default: Any = None, *, cpu: Any = dataclasses.MISSING, check: str | None = None, ops=OPS,
           doc: str = ""):
    """A backend option field. ``default`` is the CUDA (or only) default, ``cpu`` the CPU one when it
    differs; ``check``: ``"int>=0"``, ``"int>=1"``, ``"int>=1|None"``, ``"pow2"``, ``"pow2>=16"``,
    ``"bool"``, ``"choice:a,b,..."`` or None; ``ops``: the ops that take it."""
    meta = dict(cpu=default if cpu is dataclasses.MISSING else cpu, check=check, ops=tuple(ops), doc=doc)
    return dataclasses.field(default=default, metadata=meta)


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        what = "a positive int (an integer >= 1)" if minimum == 1 else f"an integer >= {minimum}"
        raise OptionError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _checked(name: str, value, check: str | None):
    if check is None:
        return value
    if check == "bool":
        return bool(value)
    if check == "int>=1|None":
        return None if value is None else _integer(name, value, 1)
    if check in ("int>=0", "int>=1"):
        return _integer(name, value, int(check[-1]))
    if check.startswith("choice:"):
        choices = check[len("choice:"):].split(",")
        if value not in choices:
            raise OptionError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if check in ("pow2", "pow2>=16"):
        low = 16 if check == "pow2>=16" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
            tail = " >= 16 (tl.dot tile)" if low == 16 else ""
            raise OptionError(f"{name} must be a power of two{tail}, got {value!r}")
        return value
    raise AssertionError(f"unknown option check {check!r}")


def fields_for(cls, op: str) -> tuple[str, ...]:
    """Names of ``cls``'s options that ``op`` takes."""
    return tuple(f.name for f in dataclasses.fields(cls) if op in f.metadata["ops"])


def resolve(cls, backend: str, op: str, device_type: str, given: dict | None):
    """``cls`` filled from ``given`` (names -> values; None means the default) over its defaults for
    ``device_type``; raises ``OptionError`` naming the option on an unknown name or a bad value."""
    given = dict(given or {})
    known = fields_for(cls, op)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise OptionError(f"unknown {backend} option(s) {unknown} for {op}; known: {sorted(known)}")
    values = {}
    for f in dataclasses.fields(cls):
        default = f.metadata["cpu"] if device_type != "cuda" else f.default
        value = given.get(f.name)
        values[f.name] = _checked(f.name, default if value is None else value, f.metadata["check"])
    opts = cls(**values)
    check = getattr(opts, "check", None)
    if check is not None:
        check(op, {k for k, v in given.items() if v is not None})
    return opts


def defaults(cls, device_type: str = "cuda") -> dict:
    """``{name: default}`` of ``cls`` for ``device_type``."""
    return {f.name: (f.default if device_type == "cuda" else f.metadata["cpu"]) for f in dataclasses.fields(cls)}
