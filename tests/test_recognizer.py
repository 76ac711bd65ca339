"""The streaming recognizer against the real converted whisper.cpp model and real (generated) speech."""

from __future__ import annotations


import numpy as np
import pytest

from bench import corpus
from bench.calls import speech_bounds, to_mulaw_roundtrip
from bench.drive import new_leg, play, wait_for
from bench.monologue import monologue_audio
from bridge.events.types import Final, Partial
from bridge.recognizer.agreement import norm, norm_text
from bridge.recognizer.engines import DecodeOptions
from bridge.recognizer.streamer import StreamerConfig

SR = 16000

CLEAN = [  # no digits or spelled letters: a fair WER for a tiny model on espeak speech
    "I would like to check the status of my order, please.",
    "My card was charged twice for the same purchase last week.",
    "Please hold while I look up your account information.",
]
# Band-limited espeak is hard for tiny.en: over all 36 corpus sentences at 8 kHz mu-law its WER
# is ~25 % offline as well as streaming (docs/benchmarks.md). These are sentences it can hear
# at 8 kHz, so the test checks our telephone path, not the model's limits.
# (Chosen when decodes still depended on the context's history, which flash attention caused:
# they held after five different preceding decodes. See docs/recognizer.md.)
PHONE = [
    "Let me transfer you to the billing department, one moment please.",
    "I need to cancel my subscription before the next billing cycle.",
    "The technician will arrive between nine and eleven tomorrow morning.",
]


def sil(s: float) -> np.ndarray:
    return np.zeros(int(s * SR), np.int16)


def speech(text: str, rate: int = 160, voice: str = "en-us") -> np.ndarray:
    """The sentence without espeak's own leading and trailing silence, so pauses are exact."""
    s = corpus.synthesize(text, voice=voice, rate=rate)
    a, b = speech_bounds(s)
    return s[a:b]


def assert_no_partial_after_final(events) -> None:
    """A partial of an utterance must never arrive after that utterance's final."""
    last_final_end = -1.0
    for s in events:
        ev = s.event
        if isinstance(ev, Final):
            last_final_end = max(last_final_end, ev.end)
        elif isinstance(ev, Partial):
            assert ev.end > last_final_end, f"partial {ev.text!r} after the final ending {last_final_end}"


async def test_mulaw_8k_sentences_transcribe(pool):
    """G.711 mu-law at 8 kHz, as a SIP trunk sends it, through the front-end into the leg."""
    pcm = np.concatenate([sil(0.5)] + [np.concatenate([speech(t, rate=140), sil(1.2)]) for t in PHONE])
    pcm16 = to_mulaw_roundtrip(pcm)  # 20 ms mu-law frames through AudioFrontEnd
    run = new_leg(pool)
    await play(run, pcm16, pace=4.0)
    ref = " ".join(PHONE)
    w = corpus.wer(ref, run.text)
    assert w < 0.15, (w, run.text)
    assert len(run.finals) == len(PHONE), [f.text for f in run.finals]
    assert all(f.speech_final for f in run.finals)
    assert run.partials, "interim results are on by default"
    assert_no_partial_after_final(run.events)
    # timestamps: ordered, inside the stream, words inside their segment
    t_prev = 0.0
    for f in run.finals:
        assert t_prev <= f.start < f.end <= len(pcm16) / SR + 0.01
        assert f.words and all(f.start <= x.start <= x.end <= f.end for x in f.words)
        assert all(0.0 < x.confidence <= 1.0 for x in f.words)
        t_prev = f.start


@pytest.mark.parametrize("kind", ["silence", "white", "pink", "hum", "tone", "dtmf", "music"])
async def test_non_speech_gives_no_final(pool, kind):
    audio = sil(8.0) if kind == "silence" else corpus.noise(kind, 8.0, level_dbfs=-25, seed=3)
    run = new_leg(pool)
    await play(run, audio, pace=None)
    assert run.finals == [], [f.text for f in run.finals]
    assert run.partials == []


async def test_endpointing_change_takes_effect_live(pool):
    """The same 0.5 s pause joins two sentences at 700 ms and splits them after configure(300)."""
    a, b = speech(CLEAN[0]), speech(CLEAN[1])
    pair = np.concatenate([a, sil(0.5), b, sil(1.5)])
    audio = np.concatenate([sil(0.3), pair, pair])
    switch = int(0.3 * SR) + len(pair)
    run = new_leg(pool, StreamerConfig(endpointing_ms=700, interim_results=False))
    await play(run, audio, pace=None, actions={switch: lambda r: r.configure(endpointing_ms=300)})
    finals = run.finals
    assert len(finals) == 3, [f.text for f in finals]
    assert corpus.wer(CLEAN[0] + " " + CLEAN[1], finals[0].text) < 0.2
    assert corpus.wer(CLEAN[0], finals[1].text) < 0.2
    assert corpus.wer(CLEAN[1], finals[2].text) < 0.2
    with pytest.raises(ValueError):
        run.recognizer.configure(endpointing_ms=20001)


async def test_force_endpoint_finalizes_at_once(pool):
    """force_endpoint mid-stream: the final comes without waiting for silence."""
    run = new_leg(pool, StreamerConfig(endpointing_ms=5000))
    await play(run, np.concatenate([sil(0.3), speech(CLEAN[0])]), pace=None, finish=False)
    # feed() runs every frame through the VAD and the endpointer before play returns, so there is
    # nothing to wait for: the utterance is open and no final is queued (no silence, 5 s endpointing)
    rec = run.recognizer
    assert rec._utt is not None and not rec._finals and run.finals == []
    run.recognizer.force_endpoint()
    assert await wait_for(lambda: len(run.finals) == 1, timeout=10)
    assert corpus.wer(CLEAN[0], run.finals[0].text) < 0.2
    assert run.finals[0].speech_final
    await play(run, np.concatenate([speech(CLEAN[1]), sil(1.0)]), pace=None)
    assert len(run.finals) == 2 and corpus.wer(CLEAN[1], run.finals[1].text) < 0.2
    assert_no_partial_after_final(run.events)


@pytest.mark.slow
async def test_long_monologue_is_committed_in_pieces_without_duplicates(pool, model_path):
    """45 s without an endpoint-long pause: pieces with speech_final false, clean seams."""
    audio, ref = monologue_audio(seed=1)  # the audio bench.monologue measures
    run = new_leg(pool)
    await play(run, audio, pace=2.0)
    assert [f.speech_final for f in run.finals[:-1]] == [False] * (len(run.finals) - 1)
    assert run.finals[-1].speech_final  # possibly an empty end-of-speech marker after the last piece
    finals = [f for f in run.finals if f.text]
    assert len(finals) >= 3, [f.text for f in finals]
    for f in finals:  # every piece stays inside whisper's 30 s window
        assert f.end - f.start < 28
    # seams: no word repeated across a cut (the script has no immediate repetitions)
    for f1, f2 in zip(finals, finals[1:]):
        tail = [norm(w.word) for w in f1.words[-3:]]
        head = [norm(w.word) for w in f2.words[:3]]
        for k in range(1, 4):
            assert tail[-k:] != head[:k], (f1.text, f2.text)
        assert f1.end <= f2.start + 0.05
    # nothing lost: streaming is about as accurate as one offline pass over the same audio.
    # docs/benchmarks.md's target, streaming <= offline + 1 point, is pooled over bench.accuracy's
    # call sets; one 139-word call cannot resolve it (a word is 0.7 points), and where the pieces
    # are cut varies with when partials agree. `python -m bench.monologue --seeds 1 --runs 9`
    # on this audio measured -1.4 to +4.3 points (0 in 6 of 9 runs, +2.2 and +4.3 when it was
    # cut into 4 pieces instead of 2-3). The bound is the claim plus that spread, rounded up to
    # whole words: +5 points (7 words); the test allowed +8 before.
    from bridge.recognizer.engines.whisper_cpp import WhisperEngine

    offline = WhisperEngine(model_path, n_threads=2).decode(audio, DecodeOptions(offline=True)).text
    w_stream, w_off = corpus.wer(ref, run.text), corpus.wer(ref, offline)
    n_ref, n_hyp = len(corpus.normalize_text(ref).split()), len(corpus.normalize_text(run.text).split())
    assert abs(n_hyp - n_ref) <= 0.1 * n_ref, (n_ref, n_hyp, run.text)
    assert w_stream <= w_off + 0.05, (w_stream, w_off, run.text, offline)


def test_decode_does_not_depend_on_the_previous_decode(model_path):
    """The same audio gives the same text and scores whatever the context decoded before. With
    whisper.cpp's flash attention it did not (stale encoder positions past a reduced audio_ctx:
    bench/attention.py); a streamer's finals then varied with which partials ran before them."""
    from bridge.recognizer.engines.whisper_cpp import WhisperDecodeOptions, WhisperEngine

    eng = WhisperEngine(model_path)
    clip = to_mulaw_roundtrip(speech(CLEAN[2]))
    final = WhisperDecodeOptions(ctx_margin=256)

    def decode() -> tuple[str, float, list[tuple[str, float, float]]]:
        h = eng.decode(clip, final)
        return h.text, h.avg_logprob, [(w.word, w.start, w.end) for w in h.words]

    first = decode()
    assert corpus.wer(CLEAN[2], first[0]) <= 0.5, first[0]
    histories = [(corpus.monologue(12.0, seed=7)[0], DecodeOptions(offline=True)),
                 (speech("Yes."), WhisperDecodeOptions(ctx_margin=16)),
                 (speech(PHONE[0]), WhisperDecodeOptions(ctx_margin=64, partial=True))]
    for audio, opts in histories:
        eng.decode(audio, opts)
        assert decode() == first


async def test_auto_language_on_an_english_only_model_is_english(pool):
    """tiny.en cannot detect a language: the server accepts "auto" on any model, and the engine
    decodes it as English, so even a German caller's finals say "en". Left to itself whisper.cpp
    "detects" a language on tiny.en anyway, and this clip's final then says otherwise. Detection proper is tested
    on the multilingual base model in tests/test_multilingual.py."""
    assert not pool.multilingual
    german = speech("Guten Tag, ich möchte bitte den Status meiner Bestellung prüfen.", voice="de", rate=150)
    run = new_leg(pool, StreamerConfig(language="auto", interim_results=False))
    await play(run, np.concatenate([sil(0.3), german, sil(1.0)]), pace=None)
    assert run.finals, "no final"
    assert {f.language for f in run.finals} == {"en"}, [(f.language, f.text) for f in run.finals]
    assert run.recognizer.detected_language == "en"


async def test_utterance_never_outgrows_the_window(pool):
    """If pieces cannot be committed (here: disabled), the utterance is ended at the window limit."""
    pcm, ref = corpus.monologue(24, pause_s=0.25, seed=2)
    cfg = StreamerConfig(interim_results=False, max_utterance_s=100, hard_max_utterance_s=100, window_limit_s=10)
    run = new_leg(pool, cfg)
    await play(run, np.concatenate([sil(0.3), pcm, sil(1.0)]), pace=None)
    finals = run.finals
    assert run.recognizer.stats["window_endpoints"] >= 2
    assert len(finals) >= 3 and not finals[0].speech_final and finals[-1].speech_final
    assert all(f.end - f.start <= 10.5 for f in finals)
    n_ref, n_hyp = len(corpus.normalize_text(ref).split()), len(corpus.normalize_text(run.text).split())
    assert abs(n_hyp - n_ref) <= 0.15 * n_ref, (ref, run.text)


async def test_word_boost_terms_reach_the_decoder(pool):
    """Terms in word_boost are spelled as given; without them tiny.en hears other words."""
    lines = ["I am calling about my Callbridge subscription.", "The error came from the Kubernetes cluster.",
             "We use Twilio for our phone numbers."]
    terms = ["Callbridge", "Kubernetes", "Twilio"]
    audio = np.concatenate([sil(0.3)] + [np.concatenate([speech(t, rate=150), sil(1.2)]) for t in lines])

    async def transcribe(boost):
        run = new_leg(pool, StreamerConfig(word_boost=tuple(boost), interim_results=False))
        await play(run, audio, pace=None)
        return run.text

    plain, boosted = await transcribe([]), await transcribe(terms)
    hits = lambda text: sum(t.lower() in text.lower() for t in terms)  # noqa: E731
    assert hits(boosted) >= 2, boosted  # measured: 3/3 spelled as given, or "Kubernete"
    assert hits(plain) == 0, plain  # the boost, not luck, put them there


@pytest.mark.parametrize("reply", ["Bye.", "Okay."])
async def test_short_replies_from_a_caller_are_kept(pool, reply):
    """"Bye." and "Okay." are on the list of phrases whisper invents on noise, and real ones are
    short (0.3-0.6 s here) and decoded unsure by tiny.en (mean token probability 0.4-0.6). The
    filter used to drop a stock phrase when either held, so every one of these was lost; now it
    keeps them, at 16 kHz and through the 8 kHz mu-law phone path. (espeak's en-us+f3 "Okay." at
    16 kHz is still dropped, by the general log-probability floor: -1.08 < -1.0.)"""
    lost = []
    for voice, rate in (("en-us", 160), ("en-us", 140), ("en", 170)):
        clip = np.concatenate([sil(0.3), speech(reply, rate=rate, voice=voice), sil(1.0)])
        for path, audio in (("16k", clip), ("mulaw", to_mulaw_roundtrip(clip))):
            run = new_leg(pool)
            await play(run, audio, pace=None)
            if [norm_text(f.text) for f in run.finals] != [norm_text(reply)]:
                lost.append((voice, rate, path, [f.text for f in run.finals], run.recognizer.stats))
    assert not lost, lost
