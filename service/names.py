"""Names people give things (datasets, keys, jobs and so models, tenants): no control characters.

A name is shown back in listings, the web page, logs and terminals. A newline or carriage
return in one forges a line in a log or a terminal listing, a NUL is refused by PostgreSQL
(a 500 there), and a bidi control (U+202E RIGHT-TO-LEFT OVERRIDE) makes a name read as another
("gpj.exe" shown as "exe.jpg"). So names refuse the Unicode categories Cc (controls, NUL
included), Cf (format characters: bidi controls, zero-width joiners), Zl and Zp (line and
paragraph separators), and, as unassigned or private code points cannot be shown reliably, Cn,
Co and Cs too. Tabs are controls as well: a name is one line of visible text.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import AfterValidator

from service.domain_errors import InvalidRequest

REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"})


def first_refused(value: str) -> str | None:
    """The first character a name may not hold, or None."""
    for char in value:
        if unicodedata.category(char) in REFUSED_CATEGORIES:
            return char
    return None


def describe(char: str) -> str:
    """U+000A (LINE FEED): how a refused character is named in an error, never the character."""
    return f"U+{ord(char):04X} ({unicodedata.name(char, unicodedata.category(char))})"


def check_name(value: str, field: str) -> str:
    """`value` if it holds no control character; else InvalidRequest (422) naming `field`."""
    char = first_refused(value)
    if char is not None:
        raise InvalidRequest(
            "invalid_request",
            f"{field} may not contain control or format characters; found {describe(char)}",
            {"field": field, "character": f"U+{ord(char):04X}"},
        )
    return value


def _validate(value: str | None) -> str | None:
    # In a pydantic model: a ValueError becomes a 422 `invalid_request` whose `loc` names the
    # field (service.http_errors).
    if value is not None:
        char = first_refused(value)
        if char is not None:
            raise ValueError(
                f"may not contain control or format characters; found {describe(char)}"
            )
    return value


# A str field of a request body that is a name: `name: NameStr | None = Field(...)`.
NameStr = Annotated[str, AfterValidator(_validate)]
