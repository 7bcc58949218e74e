"""Web: the published files served to feed readers and browsers, and the forms.

``server`` is the ASGI app (published files, health, metrics), ``signup`` its
sign-up, confirm, preferences and unsubscribe pages, ``webguard`` the rules for what
a request may ask, ``proxies`` which client a request came from behind a reverse
proxy.
"""
