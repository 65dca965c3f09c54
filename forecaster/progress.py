"""Progress bars for the offline commands (plot, evaluate, train, bench), shown only where a person
watches them.

tqdm redraws a bar by writing carriage returns; into a pipe or a log file every redraw becomes a
line (a 30 s ``forecaster plot`` wrote 300). So a bar is drawn when stderr is a terminal, or when
the user asks for it with ``--progress`` (:func:`force`), and is a silent counter otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

_forced = False


def force(on: bool = True) -> None:
    """Draw bars even when stderr is not a terminal (the commands' ``--progress`` flag)."""
    global _forced
    _forced = on


def enabled() -> bool:
    """True when bars are drawn: ``--progress`` was given, or stderr is a terminal.

    >>> force(True); enabled()
    True
    >>> force(False)
    """
    return _forced or sys.stderr.isatty()


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled unless :func:`enabled` (or ``disable=True`` given).

    A disabled bar is still an iterator with ``update``/``close``, so callers use it the same way
    either way:

    >>> list(progress_bar(range(3), disable=True))
    [0, 1, 2]
    """
    kwargs["disable"] = bool(kwargs.get("disable")) or not enabled()
    return tqdm(iterable, **kwargs)
