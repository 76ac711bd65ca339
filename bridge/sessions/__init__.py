"""The session layer below the ingresses: what a session is, whichever way its audio comes in.

- `start`: the start configuration and its validation (StartConfig).
- `gate`: admission (session limit, capacity, credits), the job and its Call, the end and
  the settlement (SessionGate, Ticket).
- `frames`: the wire frames (`ready`, events, `completed`) and the client's controls.
- `errors`: why a session was refused or ended (SessionError, ErrorCode) and the job status it leaves.

An ingress (bridge/ingress/) only speaks its transport: it turns its client's start into a
StartConfig (or its own job config), asks the gate for a Ticket, feeds the Call, and renders
SessionErrors its own way (error frame and close code, HTTP status, SIP final response).
"""

from bridge.sessions.errors import (CLOSE_CODES, CLOSE_GOING_AWAY, CLOSE_NORMAL, HTTP_STATUS, ErrorCode, SessionError,
                                    failure_error, job_ending, shown)
from bridge.sessions.frames import STREAM_CONTROLS, ControlChannel, completed_frame, ready_frame, wire_frame
from bridge.sessions.gate import SessionGate, Ticket
from bridge.sessions.start import StartConfig, streamer_config

__all__ = ["CLOSE_CODES", "CLOSE_GOING_AWAY", "CLOSE_NORMAL", "HTTP_STATUS", "STREAM_CONTROLS", "ControlChannel",
           "ErrorCode", "SessionError", "SessionGate", "StartConfig", "Ticket", "completed_frame", "failure_error",
           "job_ending", "ready_frame", "shown", "streamer_config", "wire_frame"]
