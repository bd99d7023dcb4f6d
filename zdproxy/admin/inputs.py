"""What the admin API takes from a request besides its models' own rules: JSON nested at
most MAX_JSON_DEPTH levels, valid Unicode, and no control or bidirectional formatting
character in any string (labels and values end up in events and logs); and
`printable`, which escapes request text before zdproxy logs it.
"""

from __future__ import annotations

import re

from zdproxy.admin.models import FieldError

# No option nests more than a few levels; the JSON decoder, the checks and the models
# recurse once per level, so a deeper body is refused before any of them sees it.
MAX_JSON_DEPTH = 64

# C0 controls, DEL and C1 controls; the Unicode Bidi_Control characters (ALM, LRM, RLM,
# the embeddings and overrides U+202A-U+202E, the isolates U+2066-U+2069), which reorder
# how a line reads on screen; and surrogates, which a decoded JSON string holds only when
# it spelled a lone one ("\ud800"), and which no UTF-8 encoder takes.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def text_problem(text: str) -> str | None:
    """Why `text` cannot be a label or value, or None."""
    found = _UNSAFE.search(text)
    if found is None:
        return None
    char = found.group()
    if "\ud800" <= char <= "\udfff":
        return "not valid Unicode (a lone surrogate)"
    kind = "a control character" if char <= "\x9f" else "a bidirectional formatting character"
    return f"contains {kind} (U+{ord(char):04X}); labels and values must be printable"


def printable(text: str) -> str:
    """`text` with every control, bidirectional formatting and surrogate character escaped
    as Python spells it (\\x1b, \\u202e, \\udcff): what a request sent, safe to log."""
    return _UNSAFE.sub(lambda found: ascii(found.group())[1:-1], text)


def too_deep() -> FieldError:
    return FieldError(field="body", reason=f"JSON nested deeper than {MAX_JSON_DEPTH} levels")


def json_problem(data: object) -> FieldError | None:
    """The first problem found in a decoded JSON value (keys included), or None.

    Iterative, so that the depth is checked before anything recurses into the value."""
    stack: list[tuple[object, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if (reason := text_problem(value)) is not None:
                return FieldError(field=path or "body", reason=reason)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth == MAX_JSON_DEPTH:
            return too_deep()
        children: list[tuple[object, str, int]] = []
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if (reason := text_problem(key)) is not None:
                    return FieldError(field=printable(where), reason=f"its name {reason}")
                children.append((item, where, depth + 1))
        else:
            children = [(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
        stack.extend(reversed(children))  # popped in document order
    return None
