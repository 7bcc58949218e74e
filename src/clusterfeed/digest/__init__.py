"""Digest: which stories each subscriber gets, planned once per slot, rendered as mail.

In the order a digest is made: ``select`` holds the rules for one subscriber (topics,
languages, frequency), ``planning`` applies them to everyone from what the outbox
already holds, ``sections`` groups a digest by the subscriber's topics, ``render``
fills the operator's templates, ``message`` makes the e-mail and its bytes, ``wire``
writes the same bytes faster, ``shared`` renders a story list once for everyone who
shares it, and ``compose`` joins those three for the service. ``templatecheck``
renders every template once with sample data, so a typo is found by
``clusterfeed check``, not halfway through a run.
"""
