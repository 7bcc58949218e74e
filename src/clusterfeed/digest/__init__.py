"""Digest: which stories each subscriber gets, planned once per slot, rendered as mail.

``digest`` selects and renders, ``sections`` groups a digest by the subscriber's
topics, ``planning`` decides the outbox of a new digest from what the outbox already
holds, and ``templatecheck`` renders every template once with sample data so a typo is
found by ``clusterfeed check``, not halfway through a run.
"""
