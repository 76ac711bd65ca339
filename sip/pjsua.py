"""The pjsua2 helpers the worker (sip/worker.py) and the test/CLI peer (sip/peer.py) share: one
way to set up an endpoint, its SIP transports, its codecs and its media, and to take it down.

Both processes run pjsua2 the same way: no pjsua worker threads (threadCnt 0, mainThreadOnly),
the endpoint polled from the calling thread, a null sound device whose clock drives the
conference bridge at 16 kHz, no VAD (steady RTP) and no echo canceller. pjsua2 is imported on
first use (`load`): it loads the whole pjsip library, which only these two processes need, and
`sip.peer` is imported by the CLI for its WAV check alone.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["DTMF_IS_END", "DTMF_IS_UPDATE", "PJ_ETOOMANY", "add_transport", "create_endpoint",
           "destroy_endpoint", "load", "media_transport", "pcm16_format", "pjsua_call_counter",
           "set_codecs", "stop_media_clock", "stream_codec"]

PJ_ETOOMANY = 70010  # pj_status_t of "too many objects": no free call slot for a new call
DTMF_IS_UPDATE, DTMF_IS_END = 1 << 0, 1 << 1  # pjmedia_stream_dtmf_event_flags (not exported by the wheel)

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    try:
        print(f"sip.pjsua: {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def load() -> ModuleType:
    """The pjsua2 module (imported on first use: see the module doc)."""
    return importlib.import_module("pjsua2")


def _stderr_writer() -> Any:
    pj = load()

    class StderrLog(pj.LogWriter):
        """pjsua2 logs go to stderr (the service captures it); the default writer uses stdout."""

        def write(self, entry: Any) -> None:
            msg = entry.msg
            try:
                sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
            except (OSError, ValueError):
                pass  # the service (our stderr pipe) is gone: nothing to report to

    return StderrLog()


def create_endpoint(log_level: int = 1, max_calls: int = 4,
                    user_agent: str = "callbridge-worker") -> tuple[Any, list[Any]]:
    """A started-but-not-transported pjsua2 Endpoint: headless (null audio device), polled from the
    calling thread (no pjsua worker threads), no VAD (steady RTP), no echo canceller (no sound
    device to echo). Returns (endpoint, objects to keep alive until destroy_endpoint)."""
    pj = load()
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.maxCalls = max_calls
    cfg.uaConfig.userAgent = user_agent
    writer = _stderr_writer()
    cfg.logConfig.writer = writer
    cfg.logConfig.level = log_level
    cfg.logConfig.consoleLevel = log_level
    cfg.medConfig.noVad = True
    cfg.medConfig.ecTailLen = 0
    cfg.medConfig.clockRate = 16000
    cfg.medConfig.sndClockRate = 16000
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    return ep, [writer]


def add_transport(ep: Any, kind: str, host: str, port: int, public: str = "") -> str:
    """A SIP transport ("udp" or "tcp") bound to host:port (port 0: any free one), naming
    `public` in Via/Contact when set. Returns its local name "host:port" (the port bound)."""
    pj = load()
    kinds = {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP}
    t = pj.TransportConfig()
    t.port = port
    t.boundAddress = host
    if public:
        t.publicAddress = public
    tid = ep.transportCreate(kinds[kind], t)
    return str(ep.transportGetInfo(tid).localName)


def media_transport(account_config: Any, host: str, port_start: int = 0, port_range: int = 0,
                    public: str = "") -> None:
    """Bind an account's RTP to `host` (ports port_start.. +port_range when given; `public` in SDP)."""
    mt = account_config.mediaConfig.transportConfig
    mt.boundAddress = host
    if port_start:
        mt.port = port_start
        mt.portRange = port_range
    if public:
        mt.publicAddress = public


def set_codecs(ep: Any, wanted: list[str] | tuple[str, ...]) -> list[str]:
    """Give `wanted` codecs (e.g. "PCMU/8000") descending high priorities and every other codec 0,
    which disables it: never offered, never accepted. Returns the pjsua codec ids enabled."""
    ids = [c.codecId for c in ep.codecEnum2()]
    chosen: list[str] = []
    for w in wanted:
        key = w.strip().lower().rstrip("/")
        match = [cid for cid in ids if cid.lower() == key or cid.lower().startswith(key + "/")]
        if not match:
            raise ValueError(f"codec {w!r} is not in this pjsua2 build (have {', '.join(ids)})")
        chosen.extend(m for m in match[:1] if m not in chosen)
    if not chosen:
        raise ValueError("no codecs configured")
    for cid in ids:
        ep.codecSetPriority(cid, 0)
    for i, cid in enumerate(chosen):
        ep.codecSetPriority(cid, max(1, 255 - i))
    return chosen


def stream_codec(call: Any, media_idx: int) -> str | None:
    """The codec a call's audio stream negotiated ("PCMU/8000"), or None if it has no stream."""
    try:
        si = call.getStreamInfo(media_idx)
    except load().Error:
        return None
    return f"{si.codecName}/{si.codecClockRate}"


def pcm16_format(rate: int = 16000) -> Any:
    """The media format of a port that takes 20 ms frames of mono PCM16 at `rate`."""
    pj = load()
    fmt = pj.MediaFormatAudio()
    fmt.init(pj.PJMEDIA_FORMAT_PCM, rate, 1, 20000, 16)
    return fmt


def pjsua_call_counter(log: Log = _stderr) -> Any:
    """pjsua's own count of call slots in use (`pjsua_call_get_count`, called through ctypes: the
    wheel exports it but pjsua2 does not wrap it). It differs from the calls the application
    sees: hanging up a call whose 200 the caller never ACKed (a flood tool), pjsua reports it
    DISCONNECTED at once but keeps its slot until the ACK comes or Timer H (32 s) expires, and
    refuses new calls with 486 meanwhile. None where the symbol is missing."""
    try:
        lib = ctypes.CDLL(importlib.import_module("pjsua2._pjsua2").__file__)
        fn = lib.pjsua_call_get_count
    except (OSError, AttributeError, ImportError) as e:
        log(f"pjsua_call_get_count unavailable ({e}); reporting the calls we track")
        return None
    fn.restype, fn.argtypes = ctypes.c_uint, []
    return fn


def stop_media_clock(ep: Any, log: Log = _stderr) -> None:
    """Detach the conference bridge from the null sound device, which stops the clock thread that
    drives every AudioMediaPort callback. A Python port freed while that thread runs can be called
    in the middle of its deallocation (a worker segfaulted so at shutdown in CI); with the clock
    stopped, nothing calls into Python ports any more. Idempotent."""
    try:
        ep.audDevManager().setNoDev()
    except load().Error as e:
        log(f"stopping the media clock failed: {e.info()}")


def destroy_endpoint(ep: Any, keep: list[Any], log: Log = _stderr) -> None:
    """libDestroy after every Call/port reference is gone (else pjsua2 aborts the process).
    Calls were hung up (and waited for) before this, so nothing more goes out on the network:
    without NO_NETWORK pjsua sleeps a further second waiting for unregistrations."""
    stop_media_clock(ep, log)
    gc.collect()
    try:
        ep.libDestroy(load().PJSUA_DESTROY_NO_NETWORK)
    finally:
        keep.clear()
