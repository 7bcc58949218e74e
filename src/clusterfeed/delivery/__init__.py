"""Delivery: the outbox handed to a mail transport, each message exactly once.

The transports (SMTP, Maildir), retries and bounces, the sending rate, DKIM
signatures. ``mail`` holds them all for now.
"""
