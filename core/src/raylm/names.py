"""The names plugins give their engines, backends and options."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"{kind} name {name!r} is invalid: use 1-40 lowercase letters, digits, '-' or '_', starting with a letter"
        )
