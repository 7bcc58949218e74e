"""Subscribers: sign-up with proven consent, preferences, leaving, and their lists.

``subscribe`` holds the decisions, mails and pages of sign-up and preferences,
``tokens`` the signed links in mails, ``csvtext`` the subscriber lists that
spreadsheet programs write.
"""
