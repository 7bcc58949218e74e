"""Web: the published files served to feed readers and browsers, and the forms.

``server`` is the ASGI app (files, health, metrics, sign-up routes), ``webguard`` the
rules for what a request may ask, ``proxies`` which client a request came from behind
a reverse proxy.
"""
