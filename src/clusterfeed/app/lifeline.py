"""Worker processes that end when the process that started them dies.

``concurrent.futures`` workers wait on a pipe whose other end every worker holds too,
so after a ``kill -9`` of ``clusterfeed fetch`` they waited forever; and as each worker
also holds the forkserver's and the resource tracker's pipes, those stayed as well
(12-25 MB each, until the next reboot). Each worker now watches a *lifeline*: the read
end of a pipe whose write end only the main process holds. When the main process dies,
however it dies, the kernel closes that end, the pipe reads as ended, and the worker
exits. The forkserver and the resource tracker then see their own pipes end and leave
by themselves.

The worker also notices its parent changing (``os.getppid``), which covers the start
method ``fork``, where a child inherits the write end too. No signals and no
Linux-only calls: this works on any POSIX system.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

POLL_SECONDS = 1.0

_ends: tuple[int, Connection, Connection] | None = None  # (pid, reader, writer)


def lifeline() -> Connection:
    """The read end to hand to workers (through ``initargs``, so it is passed on to
    them whatever the start method); this process keeps the write end until it exits."""
    global _ends
    if _ends is None or _ends[0] != os.getpid():
        reader, writer = multiprocessing.Pipe(duplex=False)
        _ends = (os.getpid(), reader, writer)
    return _ends[1]


def watch_parent(reader: Connection) -> None:
    """In a worker: exit at once when the main process is gone (see the module text).

    A daemon thread, so a worker that is shut down normally is not held up by it.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            try:
                if reader.poll(POLL_SECONDS):
                    break  # nothing is ever written: readable means the writer is gone
            except (EOFError, OSError):
                break
            if os.getppid() != parent:
                break
        os._exit(1)

    threading.Thread(target=watch, name="clusterfeed-lifeline", daemon=True).start()


def start_worker(reader: Connection, then: Callable[..., None] | None = None, *args: Any) -> None:
    """A pool ``initializer``: watch the lifeline, then run the pool's own initializer."""
    watch_parent(reader)
    if then is not None:
        then(*args)
