"""All state, in SQLite or PostgreSQL, behind one facade: ``Store``.

Every unit of work has a key here: a feed by its name, an entry by (feed, identity), a
story by its key, a digest by its slot, a delivery by (digest, subscriber). The store
stores; what to store is decided by plain functions outside it and passed in or applied
to the facts it reads (a digest's plan, ``representative``, ``claims``, ``configsync``).

One module per aggregate under ``aggregates/``, each a part of ``Store``, beside what
they share:

========================  ===============================================================
``base``                  the engine, the writers' lock, the schema's version
``schema``                the tables; ``migrations/`` their history (Alembic), applied
                          by ``versioning`` at every start
``settings``              settings and the operator's alerts
``feeds``                 feeds and their conversation with the partner's server
``items``                 one fetch's entries and the stories they start or join by page
``stories``               joining new items to stories, splitting, reading stories back
``subscribers``           subscribers, consent, erasure, sign-up rate limits
``digests``               planning a digest from the outbox's facts, and what it held
``outbox``, ``sent``      deliveries: claims, answers, bounces, recovery
``taskqueue``             the workers' queue (procrastinate's tables), read for metrics
``records``               the plain records handed out, and rows mapped to them
========================  ===============================================================
"""

from __future__ import annotations

from clusterfeed.delivery.claims import worker_id as worker_id
from clusterfeed.store.aggregates.digests import DigestsMixin
from clusterfeed.store.aggregates.feeds import FeedsMixin
from clusterfeed.store.aggregates.items import ItemsMixin
from clusterfeed.store.aggregates.outbox import OutboxMixin
from clusterfeed.store.aggregates.sent import SentRecorder as SentRecorder
from clusterfeed.store.aggregates.settings import SettingsMixin
from clusterfeed.store.aggregates.stories import StoriesMixin
from clusterfeed.store.aggregates.subscribers import SubscribersMixin
from clusterfeed.store.aggregates.taskqueue import TaskQueueCounts as TaskQueueCounts
from clusterfeed.store.aggregates.taskqueue import TaskQueueMixin
from clusterfeed.store.base import _LOCK_KEY as _LOCK_KEY
from clusterfeed.store.base import StoreError as StoreError
from clusterfeed.store.base import _short_hash as _short_hash
from clusterfeed.store.base import _utc as _utc
from clusterfeed.store.records import Bouncing as Bouncing
from clusterfeed.store.records import Delivery as Delivery
from clusterfeed.store.records import DigestRecord as DigestRecord
from clusterfeed.store.records import FeedUpdateSummary as FeedUpdateSummary
from clusterfeed.store.records import PlannedDelivery as PlannedDelivery
from clusterfeed.store.schema import SCHEMA_VERSION as SCHEMA_VERSION
from clusterfeed.store.schema import alerts as alerts
from clusterfeed.store.schema import consents as consents
from clusterfeed.store.schema import deliveries as deliveries
from clusterfeed.store.schema import digests as digests
from clusterfeed.store.schema import entries as entries
from clusterfeed.store.schema import feeds as feeds
from clusterfeed.store.schema import metadata as metadata
from clusterfeed.store.schema import rate_events as rate_events
from clusterfeed.store.schema import schema_info as schema_info
from clusterfeed.store.schema import sent_stories as sent_stories
from clusterfeed.store.schema import settings as settings
from clusterfeed.store.schema import stories as stories
from clusterfeed.store.schema import story_corrections as story_corrections
from clusterfeed.store.schema import story_features as story_features
from clusterfeed.store.schema import subscribers as subscribers
from clusterfeed.store.schema import suppressions as suppressions
from clusterfeed.store.versioning import SchemaChange as SchemaChange


class Store(
    SettingsMixin,
    FeedsMixin,
    ItemsMixin,
    StoriesMixin,
    SubscribersMixin,
    DigestsMixin,
    OutboxMixin,
    TaskQueueMixin,
):
    """The one gateway to the database: ``Store(url)``, then ``migrate()`` at start-up.

    The methods live in one module per aggregate (listed above); this class only puts
    them together, so callers keep one object and one import.
    """
