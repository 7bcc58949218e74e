"""What the live pipeline brings to story matching besides the items.

The config's ``together``/``apart`` corrections (compared by page, the way the store
keys entries), the sentence encoder and the pair model, both loaded once and only when
a cycle has items to match. ``clusterfeed.stories.cluster`` makes the decisions; the
store loads and keeps the features.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class StoryMatcher:
    """The live pipeline's side of matching: the config's corrections, the encoder and
    the pair model (loaded once; ``clusterfeed.stories.cluster`` decides, the store
    keeps the features)."""

    def __init__(
        self,
        *,
        together: Iterable[tuple[str, str]] = (),
        apart: Iterable[tuple[str, str]] = (),
        encoder: str | None = None,
        model: Any = None,
    ) -> None:
        from clusterfeed.ingest.normalize import link_key, normalize_url

        self._encoder_spec = encoder
        self._model = model

        def key(url: str) -> str:
            return link_key(normalize_url(url) or url) or url

        self._together = {frozenset((key(a), key(b))) for a, b in together}
        self._apart = {frozenset((key(a), key(b))) for a, b in apart}
        self._key = key

    @property
    def model(self) -> Any:
        """The pair model (``clusterfeed.stories.score.PairModel``), loaded once."""
        if self._model is None:
            from clusterfeed.stories.score import default_model

            self._model = default_model()
        return self._model

    @property
    def encoder(self) -> Any:
        """The sentence encoder (``clusterfeed.stories.encoder.Encoder``), shared by the process."""
        from clusterfeed.stories.encoder import load_encoder

        return load_encoder(self._encoder_spec)

    def forced_links(self, a: str | None, b: str | None) -> str | None:
        """ "together", "apart" or None for the items at two links (the config's pairs)."""
        if not a or not b:
            return None
        pair = frozenset((self._key(a), self._key(b)))
        if pair in self._apart:
            return "apart"
        if pair in self._together:
            return "together"
        return None

    @property
    def forces_pairs(self) -> bool:
        """Whether the config forces any pair together or apart."""
        return bool(self._together or self._apart)
