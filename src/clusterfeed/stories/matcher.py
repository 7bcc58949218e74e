"""What the live pipeline brings to story matching besides the items.

The config's ``together``/``apart`` corrections (compared by page, the way the store
keys entries), the sentence encoder and the pair model, both loaded once and only when
a cycle has items to match, and the processes that compute many items' features at
once. ``clusterfeed.stories.cluster`` makes the decisions; the store loads and keeps
the features.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from clusterfeed.stories.features import ItemFeatures, StoryItem

K = TypeVar("K")
log = logging.getLogger(__name__)

# Items whose features are missing from which they are computed in worker processes:
# each worker loads the encoder once (1.2 CPU-seconds, 150 MB), and an item costs about
# 6 ms (embedding and evidence), so below this the processes cost more than they save.
PARALLEL_FROM = 1000


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
        processes: int | None = None,
        parallel_from: int = PARALLEL_FROM,
    ) -> None:
        from clusterfeed.ingest.normalize import link_key, normalize_url

        self._encoder_spec = encoder
        self._model = model
        # None: one per CPU core; 0 or 1: features are computed in this process.
        self._processes = (os.cpu_count() or 1) if processes is None else processes
        self._parallel_from = parallel_from

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

    def features(
        self, batches: Iterable[tuple[K, Sequence[StoryItem]]], total: int
    ) -> Iterator[tuple[K, list[ItemFeatures]]]:
        """Each batch's features, in the order of ``batches`` (``total``: how many items
        they hold). A backlog is spread over worker processes, a batch to a worker, each
        batch computed exactly as this process would compute it (so the stored vectors
        are the same bits); a few batches are ahead at a time, so the texts of 100,000
        items are never all in memory. A cycle's few items are computed here."""
        from clusterfeed.stories.features import item_features

        workers = self._processes
        if workers <= 1 or total < self._parallel_from:
            for key, items in batches:
                yield key, item_features(items, self.encoder)
            return
        from clusterfeed.app.lifeline import lifeline, start_worker

        spec = self._encoder_spec

        # forkserver: a clean process forks the workers, never this threaded one.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=start_worker,
            initargs=(lifeline(), _load_encoder, spec),
        ) as pool:
            pending: deque[tuple[K, Sequence[StoryItem], Future[list[ItemFeatures]] | None]]
            pending = deque()
            broken = False

            def finished(items: Sequence[StoryItem], future: Future[Any] | None) -> Any:
                nonlocal broken
                if future is not None and not broken:
                    try:
                        return future.result()
                    except BrokenProcessPool as exc:
                        # A worker died (out of memory, killed): the rest is computed
                        # here, nothing is lost.
                        log.warning("story features process failed (%s); computing here", exc)
                        broken = True
                return item_features(items, self.encoder)

            for key, items in batches:
                future = None if broken else pool.submit(_features_in_worker, items, spec)
                pending.append((key, items, future))
                if len(pending) >= 2 * workers:
                    done, done_items, done_future = pending.popleft()
                    yield done, finished(done_items, done_future)
            while pending:
                done, done_items, done_future = pending.popleft()
                yield done, finished(done_items, done_future)


def _load_encoder(spec: str | None) -> None:
    """In a worker: load the encoder's weights before the first batch arrives."""
    from clusterfeed.stories.encoder import load_encoder

    load_encoder(spec).encode(["-"])


def _features_in_worker(items: Sequence[StoryItem], spec: str | None) -> list[ItemFeatures]:
    from clusterfeed.stories.encoder import load_encoder
    from clusterfeed.stories.features import item_features

    return item_features(items, load_encoder(spec))
