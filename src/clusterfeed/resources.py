"""Files that ship inside the package: the standard templates.

Config checks, ``clusterfeed init``, the digest and the sign-up pages all need the
templates folder, and config.py needs it before there is a ``Config``; so the lookup
lives here, below all of them, and imports nothing of clusterfeed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def default_template_dir() -> Path:
    """The templates that ship with clusterfeed (config checks need it before a Config)."""
    packaged = resources.files("clusterfeed").joinpath("default_templates")
    if packaged.is_dir():
        return Path(str(packaged))
    # Running from a source checkout (editable install): the repository's templates/.
    return Path(__file__).resolve().parents[2] / "templates"
