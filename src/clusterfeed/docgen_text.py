"""The words around the generated tables of docs/configuration.md (see docgen.py).

The tables themselves come from the config model: a key's meaning is the docstring
under its field in config.py. Here: the page's introduction, each section's heading
and the prose before and after its table, and the defaults the model cannot state
(a default computed at run time is ``None`` in the model).
"""

from typing import NamedTuple


class Section(NamedTuple):
    """One section of the page: a config table by its TOML path ("" is the top level)."""

    path: str
    heading: str
    before: str = ""
    after: str = ""


INTRO = """\
# Configuration reference

One TOML file. Relative paths in it are relative to the file's own folder, so a copied
config folder works anywhere. Unknown keys are errors (a typo must not silently fall
back to a default); `clusterfeed check` names the file, the key path, the value found
and what is expected, for every problem at once. `config/example.toml` is a complete,
commented example.
"""

SECTIONS: tuple[Section, ...] = (
    Section("", "Top level"),
    Section("cluster", "`[cluster]`"),
    Section("schedule", "`[schedule]`"),
    Section("fetch", "`[fetch]`"),
    Section("feeds", "`[[feeds]]` (one block per partner feed)"),
    Section(
        "feeds.selectors",
        "`[feeds.selectors]`",
        before="""\
For `kind = "html"`, a `[feeds.selectors]` table right after the feed's block names CSS
selectors: `item` (one news item on the page; required), `title` (within the item;
required), `link` (default `"a"`), and optionally `date`, `summary` and `image`.
`date_format` is a strftime pattern such as `"%d.%m.%Y"` or `"%d. %B %Y"` (German and
English month names both work); without it, ISO dates, "23. November 2026",
"Nov 23, 2026" and "2026年11月23日" are recognised. When the item selector stops
matching (the partner redesigned the site), the feed is reported as failing with that
reason and the items already stored are kept.

```toml
[[feeds]]
name = "Kieler Biotech-Netzwerk"
url = "https://www.kieler-biotech.example/aktuelles/"
kind = "html"
language = "de"
topics = ["cluster"]

[feeds.selectors]
item = "article.news-teaser"
title = "h3"
link = "h3 a"
date = "time"
date_format = "%d. %B %Y"
summary = "p.lead"
image = "img"
```
""",
    ),
    Section("publish", "`[publish]`"),
    Section("digest", "`[digest]`"),
    Section("mail", "`[mail]`"),
    Section(
        "mail.dkim",
        "`[mail.dkim]`",
        before="""\
`[mail.dkim]` (optional) signs every message the transport sends (digests, alerts) with
DKIM:
""",
        after="""\
A missing, unreadable or malformed key is reported by `clusterfeed check` and stops any
command before a message goes out unsigned. To make a key pair:
`openssl genrsa -out dkim.pem 2048`, then publish
`openssl rsa -in dkim.pem -pubout -outform der | base64 -w0` as the TXT record
`v=DKIM1; k=rsa; p=<that text>` at `<selector>._domainkey.<domain>`.
""",
    ),
    Section("store", "`[store]`"),
    Section("web", "`[web]`"),
    Section("signup", "`[signup]`"),
    Section(
        "stories",
        "`[stories]`",
        before="""\
`window_days`, `threshold`, the weights below and `rare_name_idf` are settings of the
hand-weighted evidence scorer that story matching used before the trained pair model
(see [One story, many sources](stories.md)); the live matcher no longer reads them (its 14-day
window and thresholds come with the model), and `clusterfeed check` warns about each one
a config sets.
""",
    ),
    Section(
        "filters",
        "`[filters]`",
        after="""\
The same keys in a feed's `[feeds.filters]` table apply to that feed only; an item must
pass both. Exclusion wins over inclusion. Filtered items are not stored.
""",
    ),
    Section(
        "alerts",
        "`[alerts]`",
        after="""\
Each incident (a feed failing since a given time, gone, moved to a given address, silent
since a given item) is mailed once, through the same transport as the digest, however
many cycles it lasts; a new outage after a recovery is a new incident.
""",
    ),
    Section(
        "workers",
        "`[workers]`",
        after="""\
Read by `clusterfeed worker` and `clusterfeed scheduler` only (PostgreSQL stores; see
[operations](operations.md#workers-on-postgresql)).
""",
    ),
    Section(
        "subscribers",
        "`[[subscribers]]` (one block per subscriber)",
        after="""\
The subscriber list in the config and the CSV is mirrored into the store on every
start. The operator holds the consent of these subscribers, so a new address is
confirmed at once (the consent record says "config"). Preferences the config changes
are updated; preferences a subscriber changed on their preferences page stay until the
config changes that subscriber's entry. Someone who unsubscribed stays unsubscribed
whatever the config says, and an erased address is skipped with a warning. Addresses
removed from both are marked removed (their history is kept, so re-adding them never
resends old stories). An address in both uses the config's entry.
""",
    ),
)

# Defaults the model leaves as None (or computes) and the page states in words.
DEFAULT_WORDS: dict[str, str] = {
    "fetch.parse_processes": "automatic",
    "fetch.user_agent": "`clusterfeed/VERSION (+CLUSTER-URL; news aggregator of CLUSTER-NAME)`",
    "feeds.filters": "none",
    "publish.feed_url": "`web.base_url` + `/` + `filename`",
    "publish.title": '`"<cluster name> – news from our partners"`',
    "digest.templates_dir": "the templates shipped with clusterfeed",
    "mail.port": '465 for `"tls"`, 587 for `"starttls"`, else 25',
    "mail.rate_per_minute": "`0` (no limit)",
    "mail.dkim.private_key_file": "–",
    "mail.dkim.private_key_env": "–",
    "store.url": "`sqlite:///clusterfeed.sqlite3` next to the config",
    "subscribers.topics": "`[]` (all)",
    "subscribers.languages": "`[]` (all)",
}
