"""Ingest: partner feeds and news pages in, clean ``Entry`` values out.

The first stage of the pipeline. ``fetch`` gets the bytes (politely, within limits,
guarded by ``netguard``), ``parse`` and ``scrape`` turn them into raw entries,
``normalize`` (with ``dates`` and ``teaser``) makes them clean and comparable, and
``filters`` drops what the operator does not want. ``polling`` and ``cadence`` decide
when each feed is asked again. ``reading`` is the unit a parsing process runs.

Nothing is imported here on purpose: a parsing worker that loads ``ingest.reading``
must not pay for the fetcher or the store.
"""
