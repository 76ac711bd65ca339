"""The shape of credentials: what an operator-given API key may look like, and what marks a token.

Why a module of its own: `bridge.config` checks keys when it reads them (a short key is a config
error naming its source, not a traceback), and `bridge.auth` needs the same rules; keeping them
here, with nothing but the standard library, lets the config layer check keys without importing
auth (and with it jwt, cryptography and the database).
"""

from __future__ import annotations

import re

__all__ = ["JWT_SHAPE", "MIN_CONFIG_KEY_CHARS", "TEMP_PREFIX", "config_key_problem"]

TEMP_PREFIX = "cbt_"  # temporary tokens: distinct, so a token is never mistaken for a key
MIN_CONFIG_KEY_CHARS = 16
JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")  # empty 3rd part: alg "none"


def config_key_problem(secret: str) -> str | None:
    """Why `secret` cannot be an operator-given API key, or None."""
    if len(secret) < MIN_CONFIG_KEY_CHARS:
        return (f"every key must be at least {MIN_CONFIG_KEY_CHARS} characters (one has {len(secret)}); "
                "`callbridge keys create` makes strong ones")
    if secret.startswith(TEMP_PREFIX) or JWT_SHAPE.match(secret):
        return (f"a key must not start with {TEMP_PREFIX!r} or look like a JWT (three dot-separated parts): "
                "it would be read as a token")
    return None
