"""Several callbridge nodes on one database (docs/cluster.md): who each node is (identity.py),
its heartbeat and the take-over of dead nodes (heartbeat.py), and what becomes of the live jobs a
restart or a death cut off (recovery.py).

Below the service, which wires it, and beside the session admission: it reaches the webhook
dispatcher only through the `Recoverer` shape, not by import.
"""

from bridge.cluster.heartbeat import Heartbeat
from bridge.cluster.identity import advertise_url, load_node_id
from bridge.cluster.recovery import Recoverer, Recovery, recover_recordings

__all__ = ["Heartbeat", "Recoverer", "Recovery", "advertise_url", "load_node_id", "recover_recordings"]
