"""The fast way of composing digests gives the same bytes as the EmailMessage way.

``Service.compose_prepared`` (used for sending) renders each story list once and fills in
every subscriber's name, address and links afterwards, and writes the wire form without
EmailMessage objects. ``Service.compose`` renders every message in full with the email
package. Both run here on the bundled example feeds, for subscribers with ordinary and
hostile names and addresses, and with operator templates that use those values in ways
the shortcut has to notice.
"""

from __future__ import annotations

import asyncio
import shutil
from email import message_from_bytes, policy
from email.headerregistry import Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.delivery.mail import prepare
from clusterfeed.digest.digest import (
    boundary_for,
    fold,
    fold_message_id,
    fold_to,
    fold_unsubscribe,
    message_bytes,
    message_id,
    section_key,
)
from clusterfeed.store import Store
from tests.conftest import TEMPLATES, Clock, FeedServer, served_example_feeds, write_config
from tests.helpers import NOW

TOPICS = ["cluster", "gene-therapy", "financing", "drug-discovery", "research", "medtech"]
HOSTILE_NAMES = [
    'Anke "the boss" Petersen',
    "O'Brien & Söhne <GmbH>",
    "<script>alert(1)</script>",
    "Jürgen Müller-Lüdenscheidt",
    "田中 健二",
    "Ines\u00a0Vogt",  # a no-break space: rendered in full
    "=?utf-8?q?Injected?= Name",
    "Tab\there",  # not printable: rendered in full
    "  spaced  ",  # would lose its blanks in the text part: rendered in full
    "Ole, Hansen; Brandt",
    "a" * 150,
    "&amp; already escaped &lt;",
    "emoji 🧬 lab",
]
HOSTILE_ADDRESSES = [
    "jürgen@bücher.example",
    "kenji@例え.jp",
    "o'brien+digest@example.org",
    "first.last@sub.example.co.uk",
]


def _subscribers() -> list[dict[str, object]]:
    subs: list[dict[str, object]] = []
    for i in range(40):
        sub: dict[str, object] = {"email": f"reader{i:02d}@example.org"}
        if i % 3:
            sub["name"] = f"Reader Nummer {i}"
        if i % 4:
            sub["topics"] = TOPICS[i % 5 : i % 5 + 1 + i % 3]
        if i % 5 == 1:
            sub["languages"] = ["de"]
        subs.append(sub)
    for i, name in enumerate(HOSTILE_NAMES):
        subs.append({"email": f"hostile{i:02d}@example.org", "name": name})
    for i, addr in enumerate(HOSTILE_ADDRESSES):
        subs.append({"email": addr, "name": HOSTILE_NAMES[i]})
    return subs


def _service(
    tmp_path: Path, feed_server: FeedServer, database_url: str, templates: Path
) -> Service:
    path = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        subscribers=_subscribers(),
    )
    text = path.read_text(encoding="utf-8").replace(str(TEMPLATES), str(templates))
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    clock = Clock()
    service = Service(config, Store(config.database_url), clock=clock)
    service.prepare()
    asyncio.run(service.fetch())
    service.create_digest("test:compose", clock())
    return service


def _compare_all(service: Service) -> int:
    deliveries = service.store.pending_deliveries()
    assert len(deliveries) == len(_subscribers())
    for delivery in deliveries:
        fast = service.compose_prepared(delivery)
        slow = prepare(service.compose(delivery))
        assert fast.data == slow.data, delivery.subscriber
        # Every line ends in CRLF: the SMTP transport declares the length as the SIZE.
        assert fast.data.count(b"\n") == fast.data.count(b"\r\n") == fast.data.count(b"\r")
        assert (fast.sender, fast.recipients) == (slow.sender, slow.recipients)
    assert service._composer is not None
    return service._composer.shared_hits


def test_every_subscriber_gets_the_same_bytes_both_ways(
    tmp_path: Path, feed_server: FeedServer, database_url: str
) -> None:
    service = _service(tmp_path, feed_server, database_url, TEMPLATES)
    shared = _compare_all(service)
    # The shortcut did the work for all but the names that cannot be filled in.
    # (the tab, the no-break space and the blanks around a name are not printable or
    # would be trimmed, so those three are rendered in full) and the mailbox with
    # non-ASCII characters, whose message has UTF-8 headers.
    assert shared == len(_subscribers()) - 4
    service.close()
    service.store.close()


def test_the_outbox_is_written_grouped_by_story_list(
    tmp_path: Path, feed_server: FeedServer, database_url: str
) -> None:
    """So a sending run renders each story list once and keeps only a few rendered."""
    service = _service(tmp_path, feed_server, database_url, TEMPLATES)
    deliveries = service.store.pending_deliveries()
    stories = {s.id: s for s in service.store.recent_stories()}
    # What a rendering depends on: the stories, their sections (the subscriber's
    # topics decide them), how many the cap left out, and whether there is a name.
    order = [
        (
            tuple(d.story_ids),
            section_key(service.config, d.subscriber, [stories[i] for i in d.story_ids]),
            len(d.left_out),
            bool(d.subscriber.name),
        )
        for d in deliveries
    ]
    groups = [key for i, key in enumerate(order) if i == 0 or order[i - 1] != key]
    assert len(set(order)) > 3  # the subscribers' choices give several story lists

    assert len(groups) == len(set(order))  # each one comes in one run of rows
    service.close()
    service.store.close()


def test_hostile_names_stay_escaped_in_the_html_and_headers(
    tmp_path: Path, feed_server: FeedServer, database_url: str
) -> None:
    service = _service(tmp_path, feed_server, database_url, TEMPLATES)
    by_email = {d.subscriber.email: d for d in service.store.pending_deliveries()}
    data = service.compose_prepared(by_email["hostile02@example.org"]).data
    message = message_from_bytes(data, policy=policy.default)
    html = message.get_body(("html",)).get_content()
    assert "<script>alert(1)</script>" not in html
    assert "Hello &lt;script&gt;alert(1)&lt;/script&gt;," in html
    headers = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    assert headers.count("\r\nTo: ") == 1 and "\r\nBcc" not in headers
    idn = service.compose_prepared(by_email["kenji@例え.jp"])
    assert idn.recipients == ("kenji@xn--r8jz45g.jp",)
    service.close()
    service.store.close()


# Operator templates that print the personal values in other places (an attribute, a
# title, an autoescape-off block, a CSS-inlined style attribute) keep the shortcut; ones
# that filter or test them must not use it.
PRINTING = {
    "digest.html": (
        '<p title="{{ subscriber.name }}">{{ subscriber.email }}</p>\n'
        "<title>{{ subscriber.name }}</title>\n"
        "{% autoescape false %}<i>{{ subscriber.name }}</i>{% endautoescape %}\n"
        '<span style="color: red">{{ reason }}</span>\n'
    ),
}
FILTERING = {
    "digest.html": "<p>{{ subscriber.name | upper }}</p>{{ links.unsubscribe_url }}\n",
    "digest.txt": (
        "{% if subscriber.email.endswith('.org') %}org{% endif %} {{ subscriber.topics }}\n"
    ),
}


@pytest.mark.parametrize(("changes", "sharing"), [(PRINTING, True), (FILTERING, False)])
def test_operator_templates_give_the_same_bytes_both_ways(
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    changes: dict[str, str],
    sharing: bool,
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    for name, addition in changes.items():
        path = templates / name
        text = path.read_text(encoding="utf-8")
        where = text.rfind("</body>") if name.endswith(".html") else len(text)
        path.write_text(text[:where] + addition + text[where:], encoding="utf-8")
    service = _service(tmp_path, feed_server, database_url, templates)
    shared = _compare_all(service)
    assert service._composer is not None and service._composer.sharing is sharing
    assert (shared > 0) is sharing
    service.close()
    service.store.close()


def test_the_boundary_is_fixed_by_the_message_id() -> None:
    first = boundary_for("<a.1@nordbio.example>")
    assert first == boundary_for("<a.1@nordbio.example>")
    assert first != boundary_for("<a.2@nordbio.example>")
    assert first.startswith("===============") and first.endswith("==")


def test_a_resent_message_is_the_same_bytes(
    tmp_path: Path, feed_server: FeedServer, database_url: str
) -> None:
    service = _service(tmp_path, feed_server, database_url, TEMPLATES)
    delivery = service.store.pending_deliveries(limit=1)[0]
    assert message_bytes(service.compose(delivery)) == message_bytes(service.compose(delivery))
    again = Service(service.config, service.store, clock=service.clock)
    assert again.compose_prepared(delivery).data == service.compose_prepared(delivery).data
    service.close()
    service.store.close()


# The headers that differ per subscriber are written without the email package's parser
# when their values are plain; the bytes must be what ``fold`` writes, whatever comes.
ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
NAME_CHARS = ATEXT + ' .,;:<>@()[]\\"äü田🧬\u00a0\t'
URL_CHARS = ATEXT + ":/.?&;=%[]@()' <>\"äé"
atoms = st.text(ATEXT, min_size=1, max_size=12)
domains = st.lists(st.text("abcz09-", min_size=1, max_size=10), min_size=1, max_size=4).map(
    ".".join
)


@given(
    name=st.one_of(
        st.just(""),
        st.lists(atoms, min_size=1, max_size=4).map(" ".join),
        st.text(NAME_CHARS, max_size=40),
        st.text(ATEXT + " ", min_size=300, max_size=1100),
    ),
    local=st.lists(atoms, min_size=1, max_size=3).map(".".join),
    domain=domains,
)
def test_the_to_header_is_what_the_email_package_writes(name: str, local: str, domain: str) -> None:
    to = Address(display_name=name, username=local, domain=domain)
    assert fold_to(to) == fold("To", to)


@given(
    value=st.one_of(
        st.builds(lambda a, n, d: f"<{a}.{n}@{d}>", atoms, st.integers(0, 10**9), domains),
        st.builds(
            lambda key, n, d: message_id(key, n, f"Nachrichten <news@{d}>"),
            st.text(max_size=20),
            st.integers(0, 10**9),
            st.text("abz09.-_äü田", min_size=1, max_size=20),
        ),
        st.text(ATEXT, min_size=990, max_size=1010).map(lambda v: f"<{v}@x.example>"),
    )
)
def test_the_message_id_header_is_what_the_email_package_writes(value: str) -> None:
    assert fold_message_id(value) == fold("Message-ID", value)


@given(
    url=st.one_of(
        st.builds(
            lambda d, t: f"https://{d}/unsubscribe/{t}",
            domains,
            st.text(ATEXT + "._~", min_size=1, max_size=200),
        ),
        st.text(URL_CHARS, min_size=1, max_size=100).map(lambda v: f"https://x.example/{v}"),
        st.text(ATEXT, min_size=960, max_size=1010).map(lambda v: f"https://x.example/{v}"),
    )
)
def test_the_unsubscribe_header_is_what_the_email_package_writes(url: str) -> None:
    assert fold_unsubscribe(url) == fold("List-Unsubscribe", f"<{url}>")


def test_an_internationalized_sender_domain_gives_an_ascii_message_id() -> None:
    made = message_id("scheduled:2026-11-26", 7, "Nachrichten <news@bücher.example>")
    assert made.endswith(".7@xn--bcher-kva.example>")
    assert fold_message_id(made) == f"Message-ID: {made}\r\n".encode("ascii")


def test_subscribers_sharing_stories_but_not_sections_or_a_cap_get_their_own(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    """The sections depend on the subscriber's topics, the closing line on how many
    stories the cap left out: the shortcut renders once per all of that, not once per
    story list, and still gives the very bytes of a full rendering."""
    from clusterfeed.digest.digest import (
        DigestComposer,
        DigestLinks,
        build_message,
        make_environment,
        render_digest,
        template_dir,
    )
    from clusterfeed.model import Subscriber
    from tests.helpers import story

    path = write_config(tmp_path, served_example_feeds(feed_server))
    config = load_config(path)
    env = make_environment(template_dir(config))
    stories = [story(1, ("medtech", "research")), story(2, ("events", "medtech", "research"))]
    links = DigestLinks(
        unsubscribe_url="https://news.nordbio.example/unsubscribe/t",
        preferences_url="https://news.nordbio.example/preferences/t",
        feed_url="https://news.nordbio.example/feed.atom",
        site_url="https://www.nordbio.example",
        web_url="https://news.nordbio.example/digests/2026-11-26.html",
    )
    composer = DigestComposer(env, config)
    readers = [
        (Subscriber("a@example.org", "Anke", id=1, topics=("research",)), 0, "== Research =="),
        (Subscriber("b@example.org", "Bodo", id=2, topics=("medtech",)), 0, "== Medtech =="),
        (Subscriber("c@example.org", "Carl", id=3, topics=("medtech",)), 5, "== Medtech =="),
        (Subscriber("d@example.org", "Dora", id=4, topics=("research",)), 0, "== Research =="),
    ]
    for subscriber, more, section in readers:
        mid = message_id("test:sections", subscriber.id or 0, config.digest.from_address)
        _sender, _to, fast = composer.compose(
            subscriber, stories, slot=NOW, links=links, message_id=mid, more=more
        )
        full = render_digest(env, config, subscriber, stories, slot=NOW, links=links, more=more)
        slow = build_message(config, full, to=subscriber, message_id=mid, slot=NOW, links=links)
        assert fast == message_bytes(slow), subscriber
        text = full.text
        assert section in text and text.count("==") == 2
        assert ("… and 5 more stories on the website" in text) == (more == 5)
    assert composer.shared_hits == 4
