"""Subscribers: sign-up with proven consent, preferences, leaving, and their lists.

``forms`` holds the pure decisions (what is offered, reading a form, what a sign-up
leads to), ``subscribe`` joins them to the store, the clock and the mail
(``Subscriptions``), ``tokens`` signs the links in mails, ``csvtext`` reads the
subscriber lists that spreadsheet programs write. The pages are in ``web.signup``.
"""
