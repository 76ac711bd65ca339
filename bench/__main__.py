"""Run every benchmark in one go: python -m bench [names...]; tables land in bench/out/."""

from __future__ import annotations

import importlib
import sys
import time

ALL = ["audio_frontend", "vad_eval", "quantization", "attention", "accuracy", "monologue", "latency", "capacity",
       "sip_capacity", "sip_tcp", "webrtc_capacity", "webhooks", "bus", "stores", "auth_guessing", "memory"]


def main() -> None:
    names = sys.argv[1:] or ALL
    for name in names:
        if name not in ALL:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}")
    for name in names:
        t0 = time.monotonic()
        print(f"== bench.{name}", flush=True)
        mod = importlib.import_module(f"bench.{name}")
        mod.main([])
        print(f"== bench.{name} took {time.monotonic() - t0:.0f} s\n", flush=True)


if __name__ == "__main__":
    main()
