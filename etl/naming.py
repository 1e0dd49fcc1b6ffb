"""Column names in the target: as in the source, snake_case, lower case, or an explicit map.

``--rename-columns snake_case`` turns ``InvoiceLineId`` into ``invoice_line_id`` and
``HTTPStatus`` into ``http_status``; ``lower`` lower-cases; ``Old=new,Other=other``
renames the columns named (the rest keep their names). Two source columns that
would get one name are refused.
"""

from __future__ import annotations

import re

from .errors import UsageError

_WORD_BREAK = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NOT_WORD = re.compile(r"[^0-9a-zA-Z_]+")


def snake_case(name: str) -> str:
    """``InvoiceLineId`` → ``invoice_line_id``; ``HTTPStatus`` → ``http_status``."""
    return _NOT_WORD.sub("_", _WORD_BREAK.sub("_", name)).strip("_").lower() or name


def rename_map(rule: str | dict[str, str] | None, names: list[str]) -> dict[str, str]:
    """Source column name → target column name, for every name in ``names``."""
    if not rule:
        return {n: n for n in names}
    if isinstance(rule, dict):
        explicit = dict(rule)
    elif rule == "snake_case":
        return _unique({n: snake_case(n) for n in names})
    elif rule == "lower":
        return _unique({n: n.lower() for n in names})
    else:
        explicit = {}
        for part in rule.split(","):
            old, sep, new = part.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise UsageError(f"--rename-columns {rule!r}: expected snake_case, lower, or "
                                 "OLD=new[,OLD2=new2…]")
            explicit[old.strip()] = new.strip()
    unknown = sorted(set(explicit) - set(names))
    if unknown:
        raise UsageError(f"--rename-columns names column(s) {', '.join(unknown)} that the copy "
                         f"does not have; its columns are: {', '.join(names)}")
    return _unique({n: explicit.get(n, n) for n in names})


def _unique(mapping: dict[str, str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for old, new in mapping.items():
        if new in seen:
            raise UsageError(f"--rename-columns gives {seen[new]!r} and {old!r} the same name "
                             f"{new!r}; map one of them explicitly (OLD=new)")
        seen[new] = old
    return mapping
