"""``clusterfeed check`` tells an operator which ``[stories]`` keys no longer do anything.

The hand-set weights of the old story matcher are still accepted (an upgrade must not
stop a working service) but not read by the trained pair model; a silent no-op would
let an operator believe a tuned setting still holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clusterfeed.config import load_config
from clusterfeed.retired import RETIRED_STORY_KEYS, retired_story_settings
from tests.conftest import write_config

FEED = {"name": "Helix Vektor", "url": "https://www.helixvektor.example/feed", "language": "en"}


def test_check_names_each_retired_story_key_and_what_to_use(tmp_path: Path, run_cli: Any) -> None:
    path = write_config(
        tmp_path,
        [FEED],
        extra="[stories]\nwindow_days = 3\nname_weight = 2.0\nrare_name_idf = 0.5\n",
    )
    result = run_cli("check", "--config", path)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("warning: stories.")]
    assert [line.split()[1] for line in lines] == [
        "stories.window_days",
        "stories.rare_name_idf",
        "stories.name_weight",
    ]
    for line in lines:
        assert "has no effect since clusterfeed" in line
        assert str(path) in line
    assert "14 days" in lines[0]
    assert "clusterfeed stories split" in lines[2] and "apart" in lines[2]


def test_check_is_quiet_when_no_retired_key_is_set(tmp_path: Path, run_cli: Any) -> None:
    path = write_config(tmp_path, [FEED], extra="[stories]\nrepresentative = 'earliest'\n")
    result = run_cli("check", "--config", path)
    assert result.exit_code == 0, result.output
    assert "stories." not in result.stdout


def test_every_retired_key_is_a_stories_key_and_is_warned_about(tmp_path: Path) -> None:
    body = "".join(f"{key} = {0.5 if key != 'window_days' else 3}\n" for key in RETIRED_STORY_KEYS)
    config = load_config(write_config(tmp_path, [FEED], extra=f"[stories]\n{body}"))
    warned = retired_story_settings(config.stories)
    assert len(warned) == len(RETIRED_STORY_KEYS)
