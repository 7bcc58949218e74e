"""One file per schema version; Alembic reads them by path (see ``migrations/__init__``)."""
