"""``python -m clusterfeed`` and the ``clusterfeed`` command.

The command's entry point is here rather than in ``clusterfeed.cli`` and imports the
CLI only when it is called. Worker processes (parsing feeds, rendering digests) begin
by importing the script that started their parent, and the generated ``clusterfeed``
script imports its entry point's module: pointed at ``clusterfeed.cli``, every worker
loaded the whole service for nothing.
"""

from __future__ import annotations


def main() -> None:
    from clusterfeed.cli import main as command

    command()


if __name__ == "__main__":
    main()
