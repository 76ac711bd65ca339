"""`serve` where pjsua2 cannot be imported (Python 3.12+: its wheel is cp311 only): the service
starts with SIP off and one warning line, and /healthz does not wait for SIP."""

from __future__ import annotations

import json
import os

import aiohttp

from tests.test_service_process import ROOT, Serve


async def test_serve_starts_without_sip_when_pjsua2_cannot_be_imported(tmp_path):
    # The interpreter of a 3.12 venv, as far as pjsua2 goes: the module cannot be imported.
    blocker = tmp_path / "no_pjsua2"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text('import sys\nsys.modules["pjsua2"] = None  # import fails\n')
    path = os.pathsep.join([str(blocker), str(ROOT), os.environ.get("PYTHONPATH", "")])
    async with Serve(tmp_path / "data", env={"CALLBRIDGE_SIP_ENABLED": "true", "PYTHONPATH": path}) as srv:
        async with aiohttp.ClientSession() as http:
            async with http.get(srv.url + "/healthz") as r:
                health = await r.json()
        assert r.status == 200 and health["status"] == "ok"
        assert health["sip"] == {"enabled": False,
                                 "unavailable": "pjsua2 is not installed (its wheel is built for Python 3.11 only)"}
        assert "SIP on" not in srv.stdout()
        lines = [json.loads(x) for x in srv.log.read_text().splitlines() if x.startswith("{")]
        warned = [x for x in lines if x["event"] == "sip_disabled"]
        assert len(warned) == 1 and warned[0]["level"] == "warning"
        assert "CALLBRIDGE_SIP_ENABLED=false" in warned[0]["hint"] and "python3.11" in warned[0]["hint"]
        assert not any(x["event"] == "sip_listening" for x in lines)
