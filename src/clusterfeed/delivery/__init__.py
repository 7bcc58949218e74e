"""Delivery: the outbox handed to a mail transport, each message exactly once.

The transports (SMTP, Maildir), retries and bounces, the sending rate, DKIM
signatures. ``mail`` holds them all for now; ``claims`` says who holds an outbox row
and when that holder counts as gone.
"""
