// callbridge live captions: microphone -> WebRTC -> service; events back on the "events" data channel.
// Plain script, no build step, no external resources (it must work in a closed network).
"use strict";

(() => {
  const OFFER_PATH = "/v1/webrtc/offer";
  const KEY_STORAGE = "callbridge.apiKey";
  const LANG_STORAGE = "callbridge.language";
  const ICE_GATHER_TIMEOUT_MS = 3000;   // host candidates only (no STUN): gathering is quick
  const CONNECT_TIMEOUT_MS = 15000;     // answer received but no `ready`: no network path
  const COMPLETED_TIMEOUT_MS = 30000;   // after bye the server flushes the last utterance
  const DISCONNECT_GRACE_MS = 4000;     // "disconnected" often recovers by itself
  const KEEP_ALIVE_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const els = {
    app: $("app"), form: $("controls"), key: $("api-key"), lang: $("language"), toggle: $("toggle"),
    status: $("status"), error: $("error"), captions: $("captions"), finals: $("finals"),
    partials: $("partials"), placeholder: $("placeholder"), usage: $("usage"),
    job: $("job"), jobLink: $("job-link"),
  };

  let session = null;   // the live attempt; null when idle
  let lastJob = null;   // {id, jobPath, transcriptPath, key} of the last session, for the exports
  const partialEls = new Map();  // speaker -> its grey line
  let partialCount = 0;

  // ---------------------------------------------------------------- UI helpers
  function setState(state) {
    els.app.dataset.state = state;
    const busy = state === "connecting" || state === "live" || state === "stopping";
    els.key.disabled = busy;
    els.lang.disabled = busy;
    els.toggle.disabled = state === "stopping";
    els.toggle.textContent = state === "stopping" ? "Stopping…" : busy ? "Stop" : "Start";
    els.toggle.classList.toggle("stop", busy);
    els.status.classList.toggle("live", state === "live");
  }

  function setStatus(text) { els.status.textContent = text; }

  function showError(kind, text) {
    els.error.dataset.error = kind;
    els.error.textContent = text;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.hidden = true;
    els.error.textContent = "";
    delete els.error.dataset.error;
  }

  function clock(seconds) {
    const t = Math.max(0, Math.floor(Number(seconds) || 0));
    const h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), s = t % 60;
    const mm = String(m).padStart(2, "0"), ss = String(s).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  function speakerOf(ev) {
    return ev.speaker || (Number.isInteger(ev.channel) ? `ch${ev.channel}` : "speaker");
  }

  function line(cls, testid, speaker, text, start) {
    const p = document.createElement("p");
    p.className = cls;
    p.dataset.testid = testid;
    p.dataset.speaker = speaker;
    if (start !== undefined) {
      const time = document.createElement("span");
      time.className = "time";
      time.textContent = `[${clock(start)}]`;
      p.append(time, " ");
    }
    const who = document.createElement("span");
    who.className = "speaker";
    who.textContent = `${speaker}:`;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    p.append(who, " ", body);
    return p;
  }

  // Keep following the newest text unless the reader scrolled up to read back.
  function withAutoScroll(update) {
    const c = els.captions;
    const atBottom = c.scrollHeight - c.scrollTop - c.clientHeight < 40;
    update();
    els.placeholder.hidden = els.finals.childElementCount + els.partials.childElementCount > 0;
    if (atBottom) c.scrollTop = c.scrollHeight;
  }

  function resetCaptions() {
    els.finals.replaceChildren();
    els.partials.replaceChildren();
    partialEls.clear();
    partialCount = 0;
    delete els.captions.dataset.partials;
    els.placeholder.hidden = false;
    els.usage.textContent = "";
    els.job.hidden = true;
    lastJob = null;
  }

  // ---------------------------------------------------------------- captions
  function renderPartial(ev) {
    const speaker = speakerOf(ev);
    const text = String(ev.text || "").trim();
    partialCount += 1;
    els.captions.dataset.partials = String(partialCount);
    withAutoScroll(() => {
      let el = partialEls.get(speaker);
      if (!text) {
        if (el) { el.remove(); partialEls.delete(speaker); }
        return;
      }
      if (!el) {
        el = line("partial", "partial", speaker, "");
        partialEls.set(speaker, el);
        els.partials.append(el);
      }
      el.querySelector(".text").textContent = text;  // rewritten in place
    });
  }

  function renderFinal(ev) {
    const speaker = speakerOf(ev);
    const text = String(ev.text || "").trim();
    withAutoScroll(() => {
      const el = partialEls.get(speaker);
      if (el) { el.remove(); partialEls.delete(speaker); }
      if (text) els.finals.append(line("final", "final", speaker, text, ev.start));
    });
  }

  function renderUsage(ev) {
    const secs = Number(ev.streamed_seconds || 0).toFixed(1);
    const credits = Number(ev.credits_used || 0).toFixed(2);
    els.usage.textContent = `${secs} s streamed · ${credits} credits used`;
  }

  function clearPartials() {
    els.partials.replaceChildren();
    partialEls.clear();
  }

  // ---------------------------------------------------------------- messages
  function micProblem(err) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
      return ["mic-denied", "Microphone access was denied. Allow the microphone for this site " +
        "(the icon in the address bar) and press Start again."];
    }
    if (name === "NotFoundError" || name === "DevicesNotFoundError" || name === "OverconstrainedError") {
      return ["no-mic", "No microphone was found. Connect one and press Start again."];
    }
    if (name === "NotReadableError" || name === "TrackStartError" || name === "AbortError") {
      return ["mic-busy", "The microphone could not be started; another application may be using it."];
    }
    return ["mic-error", `The microphone could not be opened: ${(err && err.message) || err}`];
  }

  async function readError(resp) {
    try {
      const data = await resp.json();
      if (data && data.error) return data.error;
    } catch (_) { /* not JSON: a proxy's error page */ }
    return { code: `HTTP_${resp.status}`, message: resp.statusText || `HTTP ${resp.status}` };
  }

  function offerProblem(status, err) {
    const detail = err.message ? ` (${err.message})` : "";
    switch (status) {
      case 401:
      case 403:
        return ["bad-key", `The API key was refused. Check the key and press Start again.${detail}`];
      case 400: return ["server", `The server rejected the settings: ${err.message || err.code}`];
      case 402: return ["server", `Not enough credits to start a session.${detail}`];
      case 429: return ["server", `Too many sessions right now; wait a moment and try again.${detail}`];
      case 503: return ["server", `The server is not accepting new sessions right now (restarting?). Try again shortly.${detail}`];
      case 404: return ["server", "This server does not accept browser (WebRTC) sessions."];
      default: return ["server", `The server answered ${status} ${err.code || ""}: ${err.message || "no details"}`];
    }
  }

  const SESSION_ERRORS = {
    INSUFFICIENT_CREDITS: "The session stopped: the account ran out of credits.",
    MAX_DURATION_REACHED: "The session reached its maximum length and was stopped.",
    IDLE_TIMEOUT: "The session ended because the server received no audio for too long.",
    RATE_LIMITED: "The session was refused: too many sessions at once.",
    INVALID_CONFIG: "The server rejected the settings.",
    INVALID_AUDIO: "The server could not decode the microphone audio.",
  };

  // ---------------------------------------------------------------- the session
  function teardown(s) {
    for (const t of s.timers) { clearTimeout(t); clearInterval(t); }
    s.timers = [];
    if (s.dc) { s.dc.onclose = null; s.dc.onmessage = null; try { s.dc.close(); } catch (_) { /* closed */ } }
    if (s.pc) { s.pc.onconnectionstatechange = null; try { s.pc.close(); } catch (_) { /* closed */ } }
    if (s.stream) s.stream.getTracks().forEach((t) => t.stop());
    if (session === s) session = null;
  }

  function rememberJob(s, completed) {
    if (!s.jobId) return;
    const id = s.jobId;
    lastJob = {
      id,
      key: s.key,
      jobPath: (completed && completed.job_path) || `/v1/jobs/${encodeURIComponent(id)}`,
      transcriptPath: (completed && completed.transcript_path) || `/v1/jobs/${encodeURIComponent(id)}/transcript`,
    };
    els.jobLink.textContent = id;
    els.jobLink.href = lastJob.jobPath;
    els.job.hidden = false;
  }

  // An attempt that ends before or without `completed`: say why, keep what was shown.
  function fail(s, kind, message) {
    if (s.ended) return;
    s.ended = true;
    teardown(s);
    clearPartials();
    rememberJob(s, null);  // finals are saved as they arrive: the job may still be useful
    setState("error");
    showError(kind, message);
    setStatus(kind === "mic-denied" || kind === "no-mic" || kind === "mic-busy" || kind === "mic-error"
      ? "Microphone unavailable." : "Stopped.");
  }

  function lost(s, why) {
    fail(s, "connection-lost", `Connection to the server lost${why ? ` (${why})` : ""}. ` +
      "Captions so far are kept above; press Start to begin a new session.");
  }

  function onEvent(s, raw) {
    if (s.ended) return;
    let ev;
    try { ev = JSON.parse(raw); } catch (_) { return; }
    if (!ev || typeof ev.type !== "string") return;
    switch (ev.type) {
      case "ready":
        s.jobId = ev.job_id || s.jobId;
        s.ready = true;
        setState(s.stopping ? "stopping" : "live");
        if (!s.stopping) setStatus("Listening — speak now. Press Stop when you are done.");
        break;
      case "partial": renderPartial(ev); break;
      case "final": renderFinal(ev); break;
      case "usage": renderUsage(ev); break;
      case "completed": {
        s.ended = true;
        s.jobId = ev.job_id || s.jobId;
        teardown(s);
        clearPartials();
        if (ev.streamed_seconds !== undefined) renderUsage(ev);
        rememberJob(s, ev);
        setState("completed");
        setStatus("Done. The transcript is saved; download it below.");
        break;
      }
      case "error": {
        const friendly = SESSION_ERRORS[ev.code] || "The server ended the session with an error.";
        fail(s, "session", `${friendly} ${ev.message ? `(${ev.code}: ${ev.message})` : `(${ev.code})`}`);
        break;
      }
      default: break;  // newer event types: ignore
    }
  }

  function waitIceGathering(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { pc.removeEventListener("icegatheringstatechange", check); clearTimeout(t); resolve(); };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const t = setTimeout(done, ICE_GATHER_TIMEOUT_MS);  // then send the candidates found so far
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function sessionConfig() {
    const config = { interim_results: true };
    const lang = els.lang.value.trim();
    if (lang) config.language = lang;
    return config;
  }

  async function start() {
    clearError();
    const key = els.key.value.trim();
    if (!key) {
      showError("no-key", "Enter your API key first.");
      els.key.focus();
      return;
    }
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("insecure", "This browser only allows the microphone on secure pages: open this page over " +
        "HTTPS (or on localhost).");
      return;
    }
    if (typeof RTCPeerConnection === "undefined") {
      showError("unsupported", "This browser does not support WebRTC.");
      return;
    }
    try {
      localStorage.setItem(KEY_STORAGE, key);
      localStorage.setItem(LANG_STORAGE, els.lang.value.trim());
    } catch (_) { /* private mode: nothing remembered */ }

    resetCaptions();
    const s = { key, pc: null, dc: null, stream: null, jobId: null, timers: [], ready: false,
      stopping: false, ended: false };
    session = s;
    setState("connecting");
    setStatus("Asking for the microphone…");

    try {
      // Raw audio: the browser's voice processing would alter what the recognizer hears.
      s.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false }, video: false,
      });
    } catch (err) {
      const [kind, message] = micProblem(err);
      return fail(s, kind, message);
    }
    if (s.ended) { s.stream.getTracks().forEach((t) => t.stop()); return; }  // cancelled meanwhile

    setStatus("Connecting to the server…");
    const pc = s.pc = new RTCPeerConnection({ iceServers: [] });
    // Created before the offer so the offer carries the SCTP section for it.
    const dc = s.dc = pc.createDataChannel("events", { ordered: true });
    s.stream.getAudioTracks().forEach((t) => pc.addTrack(t, s.stream));
    dc.onmessage = (e) => onEvent(s, e.data);
    dc.onopen = () => {
      if (!s.ready && !s.ended) setStatus("Connected; waiting for the server…");
      s.timers.push(setInterval(() => {
        if (dc.readyState === "open") dc.send(JSON.stringify({ type: "keep_alive" }));
      }, KEEP_ALIVE_MS));
    };
    dc.onclose = () => lost(s, "the event channel closed");
    pc.onconnectionstatechange = () => {
      if (s.ended) return;
      const state = pc.connectionState;
      if (state === "failed" || state === "closed") {
        lost(s, `network ${state}`);
      } else if (state === "disconnected") {
        setStatus("Connection interrupted; trying to recover…");
        s.timers.push(setTimeout(() => {
          if (!s.ended && pc.connectionState !== "connected") lost(s, "network disconnected");
        }, DISCONNECT_GRACE_MS));
      } else if (state === "connected" && s.ready && !s.stopping) {
        setStatus("Listening — speak now. Press Stop when you are done.");
      }
    };

    let answer;
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await waitIceGathering(pc);
      if (s.ended) return;
      let resp;
      try {
        resp = await fetch(OFFER_PATH, {
          method: "POST",
          cache: "no-store",
          headers: { "Authorization": `Bearer ${key}`, "Content-Type": "application/json" },
          body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, config: sessionConfig() }),
        });
      } catch (_) {
        return fail(s, "network", "Cannot reach the server. Check the network connection and try again.");
      }
      if (s.ended) return;
      if (!resp.ok) {
        const [kind, message] = offerProblem(resp.status, await readError(resp));
        return fail(s, kind, message);
      }
      answer = await resp.json();
      if (!answer || typeof answer.sdp !== "string") throw new Error("the server sent no SDP answer");
      s.jobId = answer.job_id || null;
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    } catch (err) {
      return fail(s, "server", `Could not set up the audio connection: ${(err && err.message) || err}`);
    }
    if (s.ended) return;
    setStatus(`Connecting audio… (job ${s.jobId || "?"})`);
    s.timers.push(setTimeout(() => {
      if (!s.ready && !s.ended) {
        lost(s, "no audio path to the server; a firewall may block UDP between this browser and the server");
      }
    }, CONNECT_TIMEOUT_MS));
  }

  function stop() {
    const s = session;
    if (!s || s.ended) return;
    if (!s.dc || s.dc.readyState !== "open") {
      // Not connected yet: nothing to save, just cancel.
      s.ended = true;
      teardown(s);
      setState("idle");
      setStatus("Cancelled.");
      return;
    }
    s.stopping = true;
    setState("stopping");
    setStatus("Finishing: the server is saving the transcript…");
    try {
      s.dc.send(JSON.stringify({ type: "bye" }));
    } catch (_) {
      return lost(s, "could not send stop");
    }
    s.timers.push(setTimeout(() => lost(s, "the server did not confirm the end of the session"), COMPLETED_TIMEOUT_MS));
  }

  // ---------------------------------------------------------------- exports (auth header, never a key in a URL)
  async function fetchBlob(path, params) {
    const url = new URL(path, location.origin);
    for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
    const resp = await fetch(url, { headers: { "Authorization": `Bearer ${lastJob.key}` }, cache: "no-store" });
    if (!resp.ok) {
      const err = await readError(resp);
      throw new Error(`${resp.status} ${err.code}: ${err.message}`);
    }
    return resp.blob();
  }

  function saveBlob(blob, filename) {
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = filename;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  async function exportAs(button) {
    if (!lastJob) return;
    const fmt = button.dataset.format;
    const job = lastJob;
    button.disabled = true;
    try {
      const blob = await fetchBlob(job.transcriptPath, { format: fmt });
      saveBlob(blob, `${job.id}.${fmt}`);
      setStatus(`Downloaded ${job.id}.${fmt}.`);
    } catch (err) {
      showError("export", `The ${fmt.toUpperCase()} download failed: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  async function openJob(ev) {
    ev.preventDefault();
    if (!lastJob) return;
    const job = lastJob;
    // Opened inside the click so popup blockers allow it; filled once the authorized fetch is done.
    const win = window.open("", "_blank");
    try {
      const blob = await fetchBlob(job.jobPath);
      const json = new Blob([blob], { type: "application/json" });
      if (win) {
        win.opener = null;
        win.location.href = URL.createObjectURL(json);
      } else {
        saveBlob(json, `${job.id}.job.json`);
      }
    } catch (err) {
      if (win) win.close();
      showError("export", `Could not load the job: ${err.message}`);
    }
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    const params = new URLSearchParams(location.search);
    let stored = {};
    try {
      stored = { key: localStorage.getItem(KEY_STORAGE), lang: localStorage.getItem(LANG_STORAGE) };
    } catch (_) { /* storage disabled */ }
    els.key.value = params.get("api_key") || stored.key || "";
    els.lang.value = params.get("language") || stored.lang || "";
    if (params.has("api_key")) {
      // Keep the key out of the address bar, history and screenshots once it is in the field.
      params.delete("api_key");
      const q = params.toString();
      history.replaceState(null, "", location.pathname + (q ? `?${q}` : "") + location.hash);
    }

    els.form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (session) stop(); else start();
    });
    els.job.querySelectorAll("button[data-format]").forEach((b) => b.addEventListener("click", () => exportAs(b)));
    els.jobLink.addEventListener("click", openJob);
    // Leaving the page mid-session: ask the server to save what it has.
    window.addEventListener("pagehide", () => {
      const s = session;
      if (s && s.dc && s.dc.readyState === "open") {
        try { s.dc.send(JSON.stringify({ type: "bye" })); } catch (_) { /* closing anyway */ }
      }
    });
    setState("idle");
  }

  init();
})();
