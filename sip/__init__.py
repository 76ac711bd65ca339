"""SIP gateway: pjsua2 worker processes (at most 4 calls each), the dispatcher that spreads
INVITEs over them, and the control channel that carries their calls' audio to the service."""
