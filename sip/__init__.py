"""SIP gateway: pjsua2 worker processes (at most 4 calls each), the dispatcher that spreads
INVITEs over them, and the control channel that carries their calls' audio to the service.

The package stands alone (it imports nothing from `bridge`): the service drives it and passes
in what it needs (its logger, its admission check). docs/sip.md lists the modules."""

import importlib.util

PJSUA2_HINT = "for SIP use Python 3.11 (CALLBRIDGE_PYTHON=/path/to/python3.11 with a new .venv)"


def pjsua2_missing() -> str | None:
    """Why SIP cannot run in this interpreter (pjsua2 not importable), or None. Checked without
    importing pjsua2: that loads the whole pjsip library, which only the worker processes need."""
    if importlib.util.find_spec("pjsua2") is None:
        return "pjsua2 is not installed (its wheel is built for Python 3.11 only)"
    return None
