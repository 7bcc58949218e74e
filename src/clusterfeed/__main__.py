"""``python -m clusterfeed``: the same as the ``clusterfeed`` command."""

from clusterfeed.cli import main

if __name__ == "__main__":
    main()
