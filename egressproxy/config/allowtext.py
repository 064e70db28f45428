"""How allowlint's findings are worded: quoting, joining, and the ``accept_risk`` hint.

Every message ``check-config`` prints about an allowlist ends by saying how to
mark the entry intended; the modules that judge entries (``allownets.py``,
``allownames.py``, ``ownsocket.py``, ``allowwidth.py``) share these few
phrasings so the messages read alike.
"""

from __future__ import annotations

from collections.abc import Sequence


def mark(texts: Sequence[str]) -> str:
    """The ``accept_risk`` line that marks ``texts`` intended."""
    quoted = ", ".join(f'"{text}"' for text in texts)
    return f"accept_risk: [{quoted}]"


def or_mark(text: str) -> str:
    """The end of a message about one entry: how to mark it intended."""
    return f"or mark it intended with {mark([text])}"


def join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
