"""Delivery: the outbox handed to a mail transport, each message exactly once.

``outbox`` claims due deliveries, has them rendered, sends and records each answer
(safe in several processes at once); ``transports`` are Maildir and SMTP and what
their answers mean; ``pacing`` is the delay before a retry, when to give up, and the
sending rate; ``dkim`` signs what goes out.
"""
