"""BioC documents checked against the shapes BioC gives its fields, before anything reads them:
a malformed one (a passage that is a string, infons that are a list, a `"type": null`, a text that
is a number, an offset that is not a whole number, an id that is null) is one line,
`FILE: document ID: what is wrong`, never a Python error. JSON's documents and XML's (whose
numbers come as text) pass through the same checks, and come out with whole-number offsets.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import InputError


def checked(d: Any, name: str, where: str) -> dict[str, Any]:
    """`d` (the `where`th document of `name`) as BioC says it is, offsets as ints; InputError else."""
    if not isinstance(d, dict):
        raise InputError(f"{name}: {where}: expected a BioC document (an object), got {_kind(d)}")
    ident = d.get("id")
    if isinstance(ident, bool) or not isinstance(ident, str | int) or not str(ident).strip():
        raise InputError(f'{name}: {where}: "id" must be a non-empty string or a number, got {_kind(ident)}')
    at = f"{name}: document {ident}"
    passages = [_passage(p, f"{at}: passage {k + 1}") for k, p in enumerate(_list(d.get("passages"), at, "passages"))]
    return {**d, "id": str(ident).strip(), "infons": _infons(d.get("infons"), at), "passages": passages,
            "relations": [_relation(r, f"{at}: relation {k + 1}")
                          for k, r in enumerate(_list(d.get("relations"), at, "relations"))]}


def _passage(p: Any, at: str) -> dict[str, Any]:
    _object(p, at)
    return {**p, "infons": _infons(p.get("infons"), at), "offset": _whole(p.get("offset", 0), at, "offset"),
            "text": _text(p.get("text"), at),
            "annotations": [_annotation(a, f"{at}: annotation {k + 1}")
                            for k, a in enumerate(_list(p.get("annotations"), at, "annotations"))],
            "relations": [_relation(r, f"{at}: relation {k + 1}")
                          for k, r in enumerate(_list(p.get("relations"), at, "relations"))]}


def _annotation(a: Any, at: str) -> dict[str, Any]:
    _object(a, at)
    locations = []
    for k, loc in enumerate(_list(a.get("locations"), at, "locations")):
        _object(loc, f"{at}: location {k + 1}")
        locations.append({"offset": _whole(loc.get("offset"), at, "a location's offset"),
                          "length": _whole(loc.get("length"), at, "a location's length")})
    return {**a, "infons": _infons(a.get("infons"), at), "text": _text(a.get("text"), at), "locations": locations}


def _relation(r: Any, at: str) -> dict[str, Any]:
    _object(r, at)
    nodes = _list(r.get("nodes"), at, "nodes")
    for k, n in enumerate(nodes):
        _object(n, f"{at}: node {k + 1}")
        if not isinstance(n.get("refid"), str):
            raise InputError(f'{at}: node {k + 1}: "refid" must be a string, got {_kind(n.get("refid"))}')
    return {**r, "infons": _infons(r.get("infons"), at), "nodes": nodes}


def _object(value: Any, at: str) -> None:
    if not isinstance(value, dict):
        raise InputError(f"{at}: expected an object, got {_kind(value)}")


def _list(value: Any, at: str, field: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f'{at}: "{field}" must be a list, got {_kind(value)}')
    return value


def _infons(value: Any, at: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f'{at}: "infons" must be an object of strings, got {_kind(value)}')
    for key, v in value.items():
        if not isinstance(v, str):
            raise InputError(f'{at}: the infon "{key}" must be a string, got {_kind(v)}')
    return value


def _text(value: Any, at: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f'{at}: "text" must be a string, got {_kind(value)}')
    return value


def _whole(value: Any, at: str, field: str) -> int:
    """A count of characters: an int (JSON) or the digits of one (XML)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        return int(value)
    raise InputError(f"{at}: {field} must be a whole number of characters, got {_kind(value)}")


def _kind(value: Any) -> str:
    """How a wrong value is named in a message: JSON's words, and the value when it is short."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return shown if len(shown) <= 40 else f"{type(value).__name__} {shown[:37]}..."
