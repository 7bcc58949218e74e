"""Publish: stories out as files, the combined feeds, the news pages and the OPML.

``feedset`` decides which files exist and what each holds, ``formats`` writes the Atom,
RSS and JSON Feed documents (and writes files atomically), ``site`` renders the pages
for people, ``opml`` reads and writes the partner list as OPML. All of it is pure
except the atomic write; the service passes in the stories and the config.
"""
