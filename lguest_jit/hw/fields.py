"""Named, validated fields: how saved state (a snapshot) is described and read.

Every part of the machine that saves state declares its layout as a
schema built from these few types, and ``check(schema, value, where)``
is the one reader every field goes through: a wrong type, a value out of
bounds, a missing or an unknown key is one :class:`FieldError` naming the
field.  ``describe(schema)`` is the layout as text (field names and types,
bounds left out): the snapshot format's fingerprint is taken from it, so a
changed layout cannot keep an old format version unnoticed.

Standard library only.  JSON gives ints, strings, lists and dicts; a bool
is not accepted as an int, nor a float as either.
"""
from __future__ import annotations

import base64
import binascii


class FieldError(ValueError):
    """A saved field that does not fit its declaration: one line."""


class Int:
    def __init__(self, lo: int, hi: int, *, pow2: bool = False):
        self.lo, self.hi, self.pow2 = lo, hi, pow2

    def check(self, v, where):
        if type(v) is not int:
            raise FieldError(f"{where}: expected a whole number, got {_kind(v)}")
        if not self.lo <= v <= self.hi or (self.pow2 and v & (v - 1)):
            raise FieldError(f"{where}: {v} is outside {self.lo}..{self.hi}"
                             + (" or not a power of two" if self.pow2 else ""))
        return v

    def describe(self):
        return "int"


def U(bits: int) -> Int:
    """An unsigned field of ``bits`` bits."""
    return Int(0, (1 << bits) - 1)


class Float:
    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def check(self, v, where):
        if type(v) not in (int, float) or not self.lo <= v <= self.hi:      # also refuses nan
            raise FieldError(f"{where}: expected a number from {self.lo:g} to {self.hi:g}, got {_short(v)}")
        return float(v)

    def describe(self):
        return "float"


class Bool:
    def check(self, v, where):
        if type(v) is not bool:
            raise FieldError(f"{where}: expected true or false, got {_kind(v)}")
        return v

    def describe(self):
        return "bool"


class Str:
    def __init__(self, max_len: int = 4096, *, choices=None):
        self.max_len, self.choices = max_len, choices

    def check(self, v, where):
        if type(v) is not str or len(v) > self.max_len or "\0" in v:
            raise FieldError(f"{where}: expected a string of at most {self.max_len} characters, got {_kind(v)}")
        if self.choices is not None and v not in self.choices:
            raise FieldError(f"{where}: {v[:40]!r} is not one of {', '.join(self.choices)}")
        return v

    def describe(self):
        return "str"


class Blob:
    """Bytes of an exact length (or at most ``max_len``), saved as base64."""

    def __init__(self, size: int | None = None, *, max_len: int | None = None):
        self.size, self.max_len = size, max_len

    def check(self, v, where):
        limit = self.size if self.size is not None else self.max_len
        if type(v) is not str or len(v) > 4 * (limit // 3 + 1):
            raise FieldError(f"{where}: expected base64 of {limit} bytes, got {_kind(v)}")
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise FieldError(f"{where}: not base64") from None
        if (self.size is not None and len(raw) != self.size) or len(raw) > limit:
            raise FieldError(f"{where}: {len(raw)} bytes, expected {limit}")
        return raw

    def describe(self):
        return f"bytes[{self.size}]" if self.size is not None else "bytes"


def blob(data: bytes) -> str:
    """How a :class:`Blob` is written."""
    return base64.b64encode(bytes(data)).decode()


class List:
    def __init__(self, item, max_len: int, *, min_len: int = 0):
        self.item, self.max_len, self.min_len = item, max_len, min_len

    def check(self, v, where):
        if type(v) is not list or not self.min_len <= len(v) <= self.max_len:
            n = f"{self.min_len}..{self.max_len}" if self.min_len != self.max_len else str(self.max_len)
            raise FieldError(f"{where}: expected a list of {n} items, got {_kind(v)}")
        return [self.item.check(x, f"{where}[{i}]") for i, x in enumerate(v)]

    def describe(self):
        return f"list[{self.item.describe()}]"


class Map:
    """A dict whose keys are not fixed names (e.g. MSR numbers): keys are
    strings checked by ``key`` (an Int parses them as decimal)."""

    def __init__(self, key, value, max_len: int):
        self.key, self.value, self.max_len = key, value, max_len

    def check(self, v, where):
        if type(v) is not dict or len(v) > self.max_len:
            raise FieldError(f"{where}: expected a mapping of at most {self.max_len} entries, got {_kind(v)}")
        out = {}
        for k, x in v.items():
            if isinstance(self.key, Int):
                if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 24):
                    raise FieldError(f"{where}: key {k[:40]!r} is not a number")
                key = self.key.check(int(k), f"{where} key")
            else:
                key = self.key.check(k, f"{where} key")
            out[key] = self.value.check(x, f"{where}[{k}]")
        return out

    def describe(self):
        return f"map[{self.key.describe()},{self.value.describe()}]"


class Record:
    """A dict of named fields, each declared; ``optional`` names may be
    absent (None then).  Unknown keys are refused: a layout this reader
    does not know is not half-read."""

    def __init__(self, fields: dict, optional=()):
        self.fields, self.optional = fields, frozenset(optional)

    def check(self, v, where):
        if type(v) is not dict:
            raise FieldError(f"{where}: expected an object, got {_kind(v)}")
        extra = set(v) - set(self.fields)
        if extra:
            raise FieldError(f"{where}: unknown field {sorted(map(str, extra))[0]!r}")
        out = {}
        for name, t in self.fields.items():
            at = f"{where}.{name}" if where else name
            if name not in v:
                if name in self.optional:
                    out[name] = None
                    continue
                raise FieldError(f"{at}: missing")
            out[name] = None if (v[name] is None and name in self.optional) else t.check(v[name], at)
        return out

    def describe(self):
        return "{" + ",".join(f"{k}{'?' if k in self.optional else ''}:{t.describe()}"
                              for k, t in sorted(self.fields.items())) + "}"


class OneOf:
    """A record chosen by its ``kind`` field (e.g. one per device type)."""

    def __init__(self, tag: str, records: dict):
        self.tag, self.records = tag, records

    def check(self, v, where):
        if type(v) is not dict or type(v.get(self.tag)) is not str or v[self.tag] not in self.records:
            raise FieldError(f"{where}: {self.tag} must be one of {', '.join(self.records)}")
        return self.records[v[self.tag]].check(v, where)

    def describe(self):
        return "oneof[" + ",".join(f"{k}={r.describe()}" for k, r in sorted(self.records.items())) + "]"


def check(schema, value, where: str = "state"):
    """``value`` read through ``schema``: the checked (and decoded) value,
    or FieldError naming the first field that does not fit."""
    return schema.check(value, where)


def describe(schema) -> str:
    return schema.describe()


def _kind(v) -> str:
    if isinstance(v, bool):
        return "a bool"
    if isinstance(v, (list, dict)):
        return f"a {type(v).__name__} of {len(v)}"
    return f"{type(v).__name__} {_short(v)}"


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


__all__ = ["FieldError", "Int", "U", "Float", "Bool", "Str", "Blob", "blob", "List", "Map", "Record", "OneOf",
           "check", "describe"]
