"""Ctrl-C during a conversion: honoured at the next step even when a library swallowed it.

TensorFlow's converter and other native code call back into Python, and some of those
callbacks catch every exception: a KeyboardInterrupt raised inside one is lost, and the
conversion used to finish and exit 0 after Ctrl-C. Inside `honoured` a SIGINT still raises
KeyboardInterrupt at once, and is also remembered, so `check` raises it again at the next
step boundary: before a file is verified, before it takes its final name.

Example:
    >>> with honoured():
    ...     export(model, staging)
    ...     check()          # KeyboardInterrupt here if Ctrl-C came during the export
    ...     validate(model, staging)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["honoured", "check"]

_pending = threading.Event()


def _handler(signum, frame) -> None:
    _pending.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def honoured() -> Iterator[None]:
    """While the block runs, SIGINT raises KeyboardInterrupt and is remembered for `check`.

    Signal handlers can only be set from the main thread; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _pending.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending.clear()


def check() -> None:
    """Raises KeyboardInterrupt if a SIGINT came inside `honoured` (whether or not it was caught since).

    The SIGINT stays remembered until the block ends, so every later check raises again.
    """
    if _pending.is_set():
        raise KeyboardInterrupt
