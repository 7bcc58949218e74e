"""Composing a whole digest's messages: each story list rendered once, checked once.

``DigestComposer`` is what the service sends with. It joins the three ways of making a
message (``render`` in full, ``shared`` renderings filled in, the ``wire`` writer) and
falls back to full rendering wherever sharing would not give the same bytes.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2

from clusterfeed.config import Config
from clusterfeed.digest.message import address, build_message, message_bytes, recipient
from clusterfeed.digest.render import DigestLinks, render_digest, section_key, template_dir
from clusterfeed.digest.shared import (
    SharedDigest,
    can_share_renderings,
    fill,
    fill_part,
    fits_a_blank,
    personal_values,
    render_shared,
)
from clusterfeed.digest.wire import MessageWriter, quoted_printable
from clusterfeed.model import Story, Subscriber

# Story lists kept rendered. The outbox is written grouped by story list, so a run
# needs one or two at a time; the rest serve retries and several digests at once.
SHARED_CACHE_SIZE = 64

log = logging.getLogger(__name__)


class DigestComposer:
    """Composes many subscribers' digests, rendering each distinct story list once.

    The first subscriber of each story list is also rendered in full and compared with
    the filled-in rendering; if they differ (a template does something this module did
    not foresee), that story list is rendered in full for everyone, and a warning says
    so. Memory holds at most ``SHARED_CACHE_SIZE`` story lists, however many
    subscribers there are.
    """

    def __init__(self, env: jinja2.Environment, config: Config) -> None:
        self.env = env
        self.config = config
        self.writer = MessageWriter(config)
        self.sender = address(config.digest.from_address).addr_spec
        self.sharing = can_share_renderings(env, config)
        self._marker = "cf" + secrets.token_hex(8)
        self._shared: OrderedDict[tuple[Any, ...], SharedDigest | None] = OrderedDict()
        self.shared_hits = 0
        self._lock = threading.Lock()  # compose may run in several threads

    def compose(
        self,
        subscriber: Subscriber,
        stories: Sequence[Story],
        *,
        slot: datetime,
        links: DigestLinks,
        message_id: str,
        more: int = 0,
    ) -> tuple[str, str, bytes]:
        """(sender, recipient, message bytes) for one subscriber; ``more`` stories of
        theirs were left out by the cap (see ``render_digest``)."""
        to = recipient(subscriber)
        if not to.username.isascii():
            # An internationalized mailbox: its headers are UTF-8 (see needs_utf8).
            # Rare enough to compose the long way.
            full = render_digest(
                self.env, self.config, subscriber, stories, slot=slot, links=links, more=more
            )
            message = build_message(
                self.config, full, to=subscriber, message_id=message_id, slot=slot, links=links
            )
            return self.sender, to.addr_spec, message_bytes(message)
        values = personal_values(self.config, subscriber, links)
        shared = None
        if self.sharing and all(
            fits_a_blank(v) for f, v in values.items() if f != "name" or subscriber.name
        ):
            with self._lock:
                shared = self._shared_for(subscriber, stories, slot, links, values, more)
        if shared is None:
            full = render_digest(
                self.env, self.config, subscriber, stories, slot=slot, links=links, more=more
            )
            subject = full.subject
            text_qp, html_qp = quoted_printable(full.text), quoted_printable(full.html)
        else:
            self.shared_hits += 1
            subject = shared.subject
            text_qp = fill_part(shared.text, shared.text_encoded, values)
            html_qp = fill_part(shared.html, shared.html_encoded, values)
        data = self.writer.write(
            subject,
            text_qp,
            html_qp,
            to=to,
            message_id=message_id,
            slot=slot,
            links=links,
        )
        return self.sender, to.addr_spec, data

    def _shared_for(
        self,
        subscriber: Subscriber,
        stories: Sequence[Story],
        slot: datetime,
        links: DigestLinks,
        values: dict[str, str],
        more: int,
    ) -> SharedDigest | None:
        # Everything the rendering depends on besides the personal values: the stories,
        # how they fall into the subscriber's sections, how many the cap left out.
        key = (
            slot,
            links.web_url,
            tuple(s.id for s in stories),
            section_key(self.config, subscriber, stories),
            more,
            (True, None) if subscriber.name else (False, subscriber.name),
        )
        if key in self._shared:
            self._shared.move_to_end(key)
            return self._shared[key]
        shared = render_shared(
            self.env,
            self.config,
            stories,
            slot=slot,
            links=links,
            named=bool(subscriber.name),
            empty_name=None if subscriber.name else subscriber.name,
            marker=self._marker,
            topics=subscriber.topics,
            more=more,
        )
        if shared is not None:
            full = render_digest(
                self.env, self.config, subscriber, stories, slot=slot, links=links, more=more
            )
            filled = (shared.subject, fill(shared.text, values), fill(shared.html, values))
            if filled != (full.subject, full.text, full.html):
                log.warning(
                    "the digest templates in %s print a subscriber's values in a way that "
                    "cannot be rendered once for many subscribers; rendering each message "
                    "in full (slower, same result)",
                    template_dir(self.config),
                )
                shared = None
        self._shared[key] = shared
        if len(self._shared) > SHARED_CACHE_SIZE:
            self._shared.popitem(last=False)
        return shared
