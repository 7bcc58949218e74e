"""Settings (key and value, such as the signing secret) and the alerts the operator was sent."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from clusterfeed.store.base import StoreBase
from clusterfeed.store.schema import alerts, feeds, settings


class SettingsMixin(StoreBase):
    """Settings and operator alerts."""

    def get_setting(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(settings.c.value).where(settings.c.key == key)).scalar()
            return None if value is None else str(value)

    def setting_or_create(self, key: str, make: Callable[[], str]) -> str:
        """Read a setting, creating it once; two processes racing agree on one value."""
        existing = self.get_setting(key)
        if existing is not None:
            return existing
        made = make()  # before the transaction: making it may read or write settings
        try:
            with self._tx() as conn:
                conn.execute(insert(settings).values(key=key, value=made))
        except IntegrityError:
            pass
        value = self.get_setting(key)
        assert value is not None
        return value

    def put_setting(self, key: str, value: str) -> None:
        """Set a setting, replacing what it held."""
        with self._tx() as conn:
            changed = conn.execute(
                update(settings).where(settings.c.key == key).values(value=value)
            )
            if not changed.rowcount:
                conn.execute(insert(settings).values(key=key, value=value))

    def secret(self) -> str:
        """A signing secret that survives restarts when none is configured."""
        return self.setting_or_create("signing_secret", lambda: secrets.token_urlsafe(32))

    def alert_recorded(self, feed_name: str, incident: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(alerts.c.id)
                    .join(feeds, feeds.c.id == alerts.c.feed_id)
                    .where(feeds.c.name == feed_name, alerts.c.incident == incident)
                ).first()
                is not None
            )

    def record_alert(self, feed_name: str, incident: str, message: str, now: datetime) -> bool:
        """Remember that the operator was told; False if this incident was already recorded."""
        try:
            with self._tx() as conn:
                feed_id = conn.execute(
                    select(feeds.c.id).where(feeds.c.name == feed_name)
                ).scalar_one()
                conn.execute(
                    insert(alerts).values(
                        feed_id=feed_id, incident=incident, message=message, created_at=now
                    )
                )
        except IntegrityError:
            return False
        return True
