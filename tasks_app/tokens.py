"""Secrets we hand out once and keep only as a hash.

The secrets are 256-bit random strings, so a plain SHA-256 is enough: there is
nothing to brute-force that a slow password hash would protect.
"""

import hashlib
import secrets


def digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def mint(prefix: str) -> tuple[str, str]:
    """A fresh secret and its digest; the prefix tells an operator what it is."""
    raw = f"{prefix}_{secrets.token_urlsafe(32)}"
    return raw, digest(raw)
