"""``python -m clusterfeed`` and the ``clusterfeed`` command.

The command's entry point is here rather than in ``clusterfeed.cli`` and imports the
CLI only when it is called. Worker processes (parsing feeds, rendering digests) begin
by importing the script that started their parent, and the generated ``clusterfeed``
script imports its entry point's module: pointed at ``clusterfeed.cli``, every worker
loaded the whole service for nothing.
"""

from __future__ import annotations

import gc


def main() -> None:
    from clusterfeed.cli import main as command

    # What the imports made (about 80,000 objects: modules, classes, SQLAlchemy's and
    # pydantic's structures) lives as long as the process. Frozen, the garbage collector
    # no longer walks it at every full collection: one of those stopped the event loop
    # of a 304-only fetch cycle for 0.1-0.5 s, and the interpreter's collections at
    # exit took as long again (issue 16, point 15; bench/RESULTS.md). Objects the
    # command makes afterwards are collected as before.
    gc.freeze()
    command()


if __name__ == "__main__":
    main()
