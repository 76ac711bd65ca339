"""The captions page at `/`: its files over HTTP, then a real headless Chromium with a fake microphone.

The browser tests drive the page exactly as a user would: the fake microphone plays an espeak
WAV (Chromium's `--use-file-for-fake-audio-capture`), the page makes a WebRTC offer to the real
service (real model, real SQLite), and the test reads the captions off the page. Selenium is
blocking, so it runs in a worker thread while the server keeps the event loop.
"""

from __future__ import annotations

import asyncio
import os
import json
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from yarl import URL

from bench import corpus
from tests.serving import API_KEY

ROOT = Path(__file__).resolve().parents[1]
# docs/ keeps the published screenshot; a run rewrites it only when asked, so tests leave the tree clean
SCREENSHOT = ROOT / "docs" / "webrtc-page.png"
UPDATE_SCREENSHOT = os.environ.get("CALLBRIDGE_UPDATE_SCREENSHOT") == "1"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Two sentences, a pause between them so each is a final. Chosen because tiny.en hears them after
# an Opus round trip at any 5 ms offset of the audio (0-35 ms tried); "check the status of my order"
# is misheard at some offsets, and the offset varies with when the connection comes up.
SENTENCES = [
    "The technician will arrive between nine and eleven tomorrow morning.",
    "Let me transfer you to the billing department, one moment please.",
]
TEXT = " ".join(SENTENCES)
WINDOW = (480, 1000)  # a phone-sized window (headless Chromium makes it at least 500 wide)
RATE = 48000  # the fake microphone takes 16-bit mono WAV at 22050 or 48000 Hz

PAGE_IDS = ["app", "api-key", "language", "start-stop", "status", "error", "captions", "finals", "partials",
            "usage", "job", "job-link", "export-srt", "export-vtt", "export-txt", "export-json"]

needs_browser = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"browser tests need Debian chromium ({CHROMIUM}) and chromium-driver ({CHROMEDRIVER})",
)


# --------------------------------------------------------------------------- plain HTTP


async def _get(url: str | URL) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, dict(r.headers), await r.text()


async def test_index_is_the_captions_page(server):
    status, headers, body = await _get(server.url + "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html") and headers["Cache-Control"] == "no-cache"
    assert "no-referrer" in headers["Referrer-Policy"]  # the page URL may carry ?api_key=
    for testid in PAGE_IDS:
        assert f'data-testid="{testid}"' in body, testid
    assert 'name="viewport"' in body and 'src="/static/app.js"' in body and 'href="/static/style.css"' in body
    # every input has a label (accessible names on a phone's screen reader)
    for field in ("api-key", "language"):
        assert f'<label for="{field}"' in body


async def test_static_files_and_content_types(server):
    assets = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
    for name, ctype in assets.items():
        status, headers, body = await _get(f"{server.url}/static/{name}")
        assert status == 200, name
        assert headers["Content-Type"].split(";")[0] == ctype, name
        assert headers["X-Content-Type-Options"] == "nosniff"
        # closed networks: nothing may come from a CDN
        assert "https://" not in body and "http://" not in body, name
    _, _, js = await _get(f"{server.url}/static/app.js")
    assert "/v1/webrtc/offer" in js and '"events"' in js and "echoCancellation: false" in js


async def test_static_refuses_anything_but_the_page_files(server):
    base = server.url
    # encoded=True: send the path as written, so the server (not the client) sees the dots and slashes
    attempts = ["/static/../service.py", "/static/..%2Fservice.py", "/static/%2e%2e%2fservice.py",
                "/static/..%2F..%2Fbridge%2Fservice.py", "/static/web.py", "/static/", "/static/app.js/",
                "/static/%2Fetc%2Fpasswd", "/static/..\\service.py", "/static/.app.js", "/web/app.js"]
    for path in attempts:
        status, _, body = await _get(URL(base + path, encoded=True))
        assert status == 404, (path, status)
        assert "import" not in body and "root:" not in body, path


# --------------------------------------------------------------------------- the browser


def _speech_wav(path: Path) -> float:
    """The test sentences as 48 kHz 16-bit mono WAV; returns its length in seconds.

    1 s of leading silence: the first few hundred ms are lost while the connection comes up.
    Trailing silence lets the endpointer close the last utterance before Stop is pressed.
    """
    def sil(s: float) -> np.ndarray:
        return np.zeros(int(s * 16000), np.int16)

    parts = [sil(1.0), corpus.synthesize(SENTENCES[0]), sil(1.0), corpus.synthesize(SENTENCES[1]), sil(2.0)]
    pcm = corpus._resample(np.concatenate(parts), 16000, RATE)
    corpus.write_wav(path, pcm, RATE)
    return len(pcm) / RATE


def _chrome(tmp: Path, wav: Path | None = None, *, deny_mic: bool = False, size=WINDOW):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--use-fake-device-for-media-stream",
            # answers the permission prompt: allow, or deny for the denied-microphone test
            "--use-fake-ui-for-media-stream=deny" if deny_mic else "--use-fake-ui-for-media-stream",
            # without it Chromium offers no 127.0.0.1 candidates; the service is on loopback
            "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
            f"--user-data-dir={tmp / 'profile'}", f"--window-size={size[0]},{size[1]}"]
    if wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={wav}%noloop")  # %noloop: play once, then silence
    for a in args:
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(tmp / "downloads"),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    return driver


def _by(testid: str) -> tuple[str, str]:
    return ("css selector", f'[data-testid="{testid}"]')


def _state(driver) -> str:
    return driver.find_element(*_by("app")).get_attribute("data-state")


def _error(driver) -> tuple[str | None, str]:
    el = driver.find_element(*_by("error"))
    return el.get_attribute("data-error"), el.text


def _final_text(driver) -> str:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=final] .text'))"
        ".map(e => e.textContent).join(' ')")


def _wait(driver, what: str, cond, timeout: float, poll: float = 0.2) -> Any:
    """Poll `cond(driver)` until truthy; fail fast with the page's error if it shows one."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond(driver)
        if got:
            return got
        kind, msg = _error(driver)
        if kind and _state(driver) == "error":
            got = cond(driver)  # the page may have reached the awaited state since the check above
            if got:
                return got
            raise AssertionError(f"waiting for {what}: the page shows an error ({kind}): {msg}")
        if time.monotonic() > deadline:
            status = driver.find_element(*_by("status")).text
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; state={_state(driver)!r}, "
                                 f"status={status!r}, captions={_final_text(driver)!r}")
        time.sleep(poll)


def _drive_captions(url: str, tmp: Path, wav: Path) -> dict[str, Any]:
    driver = _chrome(tmp, wav)
    try:
        driver.get(url)
        # the page moves the key from the address bar into the (password) field
        _wait(driver, "the key moved out of the URL", lambda d: "api_key" not in d.current_url, 5)
        assert driver.find_element(*_by("api-key")).get_attribute("value") == API_KEY
        driver.find_element(*_by("start-stop")).click()
        _wait(driver, "the session to go live", lambda d: _state(d) == "live", 15)

        # captions: the whole text, spoken and finalized (bounded by the audio length plus margin)
        _wait(driver, "the spoken words in the captions",
              lambda d: corpus.wer(TEXT, _final_text(d)) <= 0.15, 40, poll=0.25)
        page_text = _final_text(driver)
        finals = driver.find_elements(*_by("final"))
        lines = [f.text for f in finals]
        final_color = finals[0].value_of_css_property("color")
        partials_seen = int(driver.find_element(*_by("captions")).get_attribute("data-partials") or 0)

        driver.find_element(*_by("start-stop")).click()
        _wait(driver, "the completed state", lambda d: _state(d) == "completed", 30)
        _wait(driver, "the export buttons", lambda d: d.find_element(*_by("export-srt")).is_displayed(), 5)
        job_id = driver.find_element(*_by("job-link")).text
        job_href = driver.find_element(*_by("job-link")).get_attribute("href")

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOT if UPDATE_SCREENSHOT else tmp / "webrtc-page.png"
        assert driver.save_screenshot(str(shot)), "the screenshot was not written"
        png = shot.read_bytes()
        viewport = driver.execute_script(
            "return [window.innerWidth * devicePixelRatio, window.innerHeight * devicePixelRatio]")

        # one export end to end: fetch with the Authorization header, saved from a Blob
        driver.find_element(*_by("export-txt")).click()
        txt = tmp / "downloads" / f"{job_id}.txt"
        _wait(driver, "the TXT download", lambda d: txt.exists() and txt.stat().st_size > 0, 10)

        # the job link opens the job's JSON, fetched with the header (a plain link would get 401)
        page = driver.current_window_handle
        driver.find_element(*_by("job-link")).click()
        _wait(driver, "the job window", lambda d: len(d.window_handles) == 2, 5)
        driver.switch_to.window(next(h for h in driver.window_handles if h != page))
        job_json = _wait(driver, "the job JSON", lambda d: d.find_element("tag name", "body").text
                         if job_id in d.find_element("tag name", "body").text else None, 10)
        driver.close()
        driver.switch_to.window(page)
        return {"page_text": page_text, "lines": lines, "final_color": final_color, "partials": partials_seen,
                "job_id": job_id, "job_href": job_href, "txt": txt.read_text(), "job": json.loads(job_json),
                "screenshot": png, "viewport": tuple(round(v) for v in viewport)}
    finally:
        driver.quit()


@needs_browser
async def test_browser_captions_from_fake_microphone(server, tmp_path):
    wav = tmp_path / "speech.wav"
    _speech_wav(wav)
    got = await asyncio.to_thread(_drive_captions, f"{server.url}/?api_key={API_KEY}", tmp_path, wav)

    assert corpus.wer(TEXT, got["page_text"]) <= 0.15, got["page_text"]
    assert len(got["lines"]) >= 2, got["lines"]  # one final per sentence, at least
    for line in got["lines"]:  # "[mm:ss] caller: text"
        assert line[0] == "[" and line[3] == ":" and line[6] == "]" and " caller: " in line, line
    assert got["final_color"] in ("rgba(0, 0, 0, 1)", "rgb(0, 0, 0)")
    assert got["partials"] > 0, "no partial was shown"
    assert got["job_href"].endswith(f"/v1/jobs/{got['job_id']}")
    assert got["job"]["id"] == got["job_id"] and got["job"]["source"] == "webrtc", got["job"]
    # the downloaded TXT export: "[HH:MM:SS.cc] caller: text" per segment
    exported = " ".join(re.sub(r"^\[[^\]]*\] caller: ", "", ln) for ln in got["txt"].splitlines())
    assert corpus.wer(TEXT, exported) <= 0.15, got["txt"]
    # the screenshot this run took (not the committed docs/webrtc-page.png): a PNG of the window
    # with the captions drawn, not a blank or truncated image
    width, height, rows = _png_summary(got["screenshot"])
    assert (width, height) == got["viewport"], ((width, height), got["viewport"])
    assert rows >= 100, f"{rows} distinct pixel rows: a blank page?"  # 318 in docs/webrtc-page.png

    job = await server.service.store.get_job(got["job_id"])
    assert job is not None
    assert job.source.value == "webrtc" and job.status.value == "completed", (job.source, job.status)
    assert job.speakers == ["caller"]
    saved = " ".join(s.text for s in await server.service.store.segments(job.id))
    assert corpus.wer(TEXT, saved) <= 0.15, saved


def _png_summary(png: bytes) -> tuple[int, int, int]:
    """(width, height, distinct rows) of a PNG Chromium wrote (8-bit RGB(A), not interlaced).
    Rows are compared as stored, filter byte included: a blank page gives a handful of distinct
    rows, a page with text on it hundreds."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", png[16:29])
    assert png[12:16] == b"IHDR" and depth == 8 and ctype in (2, 6) and interlace == 0, png[12:29]
    data, pos = b"", 8
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            data += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(data)
    stride = 1 + width * (3 if ctype == 2 else 4)
    assert len(raw) == stride * height, "truncated image data"
    return width, height, len({raw[i:i + stride] for i in range(0, len(raw), stride)})


def _drive_refusal(url: str, tmp: Path, *, deny_mic: bool = False, key: str | None = None,
                   language: str | None = None) -> tuple[str, str | None, str]:
    driver = _chrome(tmp, deny_mic=deny_mic)
    try:
        driver.get(url)
        for testid, value in (("api-key", key), ("language", language)):
            if value is not None:
                field = driver.find_element(*_by(testid))
                field.clear()
                field.send_keys(value)
        driver.find_element(*_by("start-stop")).click()
        _wait(driver, "the error state", lambda d: _state(d) == "error" or _error(d)[0], 15)
        kind, msg = _error(driver)
        visible = driver.find_element(*_by("error")).is_displayed()
        return _state(driver), kind if visible else None, msg
    finally:
        driver.quit()


@needs_browser
async def test_browser_bad_key_message(server, tmp_path):
    state, kind, msg = await asyncio.to_thread(
        _drive_refusal, f"{server.url}/", tmp_path, deny_mic=False, key="cbk_wrong_key_000000000000000000")
    assert (state, kind) == ("error", "bad-key"), msg
    assert "API key was refused" in msg
    assert await _jobs(server) == []  # a refused key creates nothing


@needs_browser
async def test_browser_shows_the_servers_error_message(server, tmp_path):
    # an English-only model refuses "de": 400 INVALID_CONFIG, and the page shows the server's reason
    state, kind, msg = await asyncio.to_thread(
        _drive_refusal, f"{server.url}/?api_key={API_KEY}", tmp_path, language="de")
    assert (state, kind) == ("error", "server"), msg
    assert msg.startswith("The server rejected the settings:") and "needs a multilingual model" in msg
    assert await _jobs(server) == []


@needs_browser
async def test_browser_microphone_denied_message(server, tmp_path):
    state, kind, msg = await asyncio.to_thread(
        _drive_refusal, f"{server.url}/?api_key={API_KEY}", tmp_path, deny_mic=True)
    assert (state, kind) == ("error", "mic-denied"), msg
    assert "Microphone access was denied" in msg
    assert await _jobs(server) == []  # refused before any offer reached the server


@needs_browser
async def test_browser_lost_connection_message(server, tmp_path):
    wav = tmp_path / "speech.wav"
    _speech_wav(wav)

    def go_live():
        driver = _chrome(tmp_path, wav)
        try:
            driver.get(f"{server.url}/?api_key={API_KEY}")
            driver.find_element(*_by("start-stop")).click()
            _wait(driver, "the session to go live", lambda d: _state(d) == "live", 15)
            return driver
        except BaseException:
            driver.quit()
            raise

    def wait_lost(driver):
        _wait(driver, "the lost-connection state", lambda d: _state(d) == "error" or _error(d)[0], 15)
        return (_state(driver), *_error(driver), driver.find_element(*_by("job")).is_displayed(),
                driver.find_element(*_by("job-link")).text)

    driver = await asyncio.to_thread(go_live)
    try:
        # the server side goes away abruptly (a crash or a network cut looks the same to the page)
        (session,) = server.service.webrtc.sessions.values()
        job_id = session.call.id
        await session.pc.close()
        state, kind, msg, job_shown, link = await asyncio.to_thread(wait_lost, driver)
    finally:
        await asyncio.to_thread(driver.quit)
    assert (state, kind) == ("error", "connection-lost"), msg
    assert "Connection to the server lost" in msg
    assert job_shown and link == job_id  # what was said so far is saved: the page still links it


async def _jobs(server) -> list[Any]:
    return (await server.service.store.list_jobs())[0]
