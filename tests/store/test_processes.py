"""Several processes and store instances on one database see one state."""

from __future__ import annotations

import subprocess
import sys

from clusterfeed.store import SCHEMA_VERSION, Store
from tests.store.kit import apply, entry


def test_a_second_process_sees_the_same_data(store: Store, database_url: str) -> None:
    apply(
        store,
        "Kansai Bio Frontier",
        [
            entry(
                "Kansai Bio Frontier",
                "guid:k1",
                title="関西バイオ、新しい共同研究を開始",
                guid="k1",
            )
        ],
    )
    code = (
        "import sys\n"
        "from clusterfeed.store import Store\n"
        "s = Store(sys.argv[1]); s.migrate()\n"
        "sys.stdout.buffer.write(s.recent_stories()[0].entry.title.encode())\n"
        "print(); print(s.count_entries())\n"
    )

    other = subprocess.run(
        [sys.executable, "-c", code, database_url], capture_output=True, check=True, timeout=60
    )

    title, count = other.stdout.decode().split("\n")[:2]
    assert title == "関西バイオ、新しい共同研究を開始"
    assert count == "1"


def test_a_second_store_instance_sees_writes_at_once(store: Store, database_url: str) -> None:
    second = Store(database_url)
    assert second.migrate() == SCHEMA_VERSION
    assert second.count_entries() == 0

    apply(store, "Helix Vektor", [entry("Helix Vektor", "guid:a", title="A", guid="a")])

    assert second.count_entries() == 1
    assert second.secret() == store.secret()  # one signing secret for every process
    second.close()
