"""The ingresses the service runs, one per job source (`JobSource`, the one list of sources).

A new ingress is its module (implementing bridge/ingress/base.py's `Ingress`), its source in
`JobSource`, and one line here. The service builds, starts, drains and stops those the config
enables, in this order, and serves every one's routes.
"""

from __future__ import annotations

from bridge.ingress.base import Ingress
from bridge.ingress.sip import SipIngress
from bridge.ingress.stream import StreamIngress
from bridge.ingress.webrtc import WebRtcIngress

__all__ = ["INGRESSES"]

INGRESSES: tuple[type[Ingress], ...] = (StreamIngress, WebRtcIngress, SipIngress)
