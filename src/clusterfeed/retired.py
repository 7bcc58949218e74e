"""Config keys that are still accepted but no longer change anything.

Story matching moved from hand-set weights to a trained pair model. An operator's
config that sets the old weights still loads (refusing it would stop a working
service on upgrade), but silently ignoring a setting someone tuned would mislead:
``clusterfeed check`` names each such key, says it has no effect, and what to use.
"""

from __future__ import annotations

from clusterfeed.config import StoriesConfig

# The version whose story matching stopped reading the hand-set weights.
STORY_WEIGHTS_RETIRED_IN = "0.1.0"

_CORRECT = (
    "to fix single decisions use [stories] together/apart or `clusterfeed stories split "
    "URL`; to turn matching off, match = false"
)

# Key -> what to do instead.
RETIRED_STORY_KEYS: dict[str, str] = {
    "window_days": "the time window now comes with the pair model (14 days); remove the key",
    "threshold": f"the join thresholds now come with the pair model; {_CORRECT}",
    "rare_name_idf": f"the pair model weighs names itself; {_CORRECT}",
    **{
        key: f"the pair model learned its own weights; {_CORRECT}"
        for key in (
            "name_weight", "name_saturation", "text_weight", "min_text_similarity",
            "link_weight", "amount_weight", "code_weight", "date_weight", "percent_weight",
        )
    },
}  # fmt: skip


def retired_story_settings(stories: StoriesConfig) -> list[str]:
    """A warning for each retired ``[stories]`` key the config sets, in the table's order."""
    return [
        f"stories.{key} has no effect since clusterfeed {STORY_WEIGHTS_RETIRED_IN} "
        f"(story matching uses a trained pair model): {instead}"
        for key, instead in RETIRED_STORY_KEYS.items()
        if key in stories.model_fields_set
    ]
