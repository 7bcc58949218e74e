"""DKIM signatures, so that receiving servers can check a digest came from the cluster.

The key is read once, when the transport starts (``config.read_dkim_key`` names the
file or variable in its errors); each message's bytes are then signed as they are
handed over, with the headers a later relay must not add or change.
"""

from __future__ import annotations

from pathlib import Path

from clusterfeed.config import MailConfig, read_dkim_key

# Signed even when absent, so nobody can add them later (RFC 6376 5.4); RFC 8058 wants
# List-Unsubscribe and List-Unsubscribe-Post covered by the signature.
DKIM_HEADERS = (
    "From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "MIME-Version",
    "Content-Type", "Content-Transfer-Encoding", "List-Id", "List-Unsubscribe",
    "List-Unsubscribe-Post", "Precedence", "Auto-Submitted",
)  # fmt: skip


class DkimSigner:
    """Signs the bytes of a message with dkimpy; the signature goes on top."""

    def __init__(self, selector: str, domain: str, private_key: bytes) -> None:
        self.selector = selector.encode()
        self.domain = domain.encode()
        self._key = private_key
        self._headers = [h.lower().encode() for h in DKIM_HEADERS]

    def sign(self, data: bytes) -> bytes:
        import dkim

        signature: bytes = dkim.sign(
            data,
            self.selector,
            self.domain,
            self._key,
            include_headers=self._headers,
            # relaxed/relaxed survives the re-wrapping of headers and trailing blanks
            # that relays are known to do; simple body canonicalization does not.
            canonicalize=(b"relaxed", b"relaxed"),
        )
        return signature + data


def make_signer(cfg: MailConfig, config_file: Path) -> DkimSigner | None:
    """The configured signer, or None; a missing or broken key is a ConfigError."""
    if cfg.dkim is None:
        return None
    key = read_dkim_key(config_file, cfg.dkim.private_key_file, cfg.dkim.private_key_env)
    return DkimSigner(cfg.dkim.selector, cfg.dkim.domain, key)
