"""clusterfeed: one news stream from a life-science cluster's partner feeds.

The public face is the ``clusterfeed`` command (``clusterfeed.cli``) and the plain
data types in ``clusterfeed.model``; everything else is machinery that may change.
"""

__version__ = "0.1.0"
