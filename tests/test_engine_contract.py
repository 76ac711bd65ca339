"""The contract of the recognizer seams (docs/recognizer.md, "Engines"), run against what is registered.

Every engine in `bridge.recognizer.engines.ENGINES` is loaded with the real models listed for it
in CONTRACT_MODELS and must decode real (synthesized) speech into a well-formed Hypothesis;
every leg recognizer in `bridge.recognizer.leg.LEG_RECOGNIZERS` must turn a fed leg into
partials and finals the way bridge/calls.py relies on. No stand-in replaces a model here.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench import corpus
from bench.drive import wait_for
from bridge import config as bridge_config
from bridge.events.types import Final, Partial
from bridge.models.registry import ModelError
from bridge.models.store import resolve
from bridge.recognizer.agreement import norm_text
from bridge.recognizer.engines import (
    ENGINES, SAMPLE_RATE, DecodeOptions, Engine, Hypothesis, HypothesisFilter, UnknownEngine, load_engine,
)
from bridge.recognizer.leg import LEG_RECOGNIZERS, LegRecognizer, new_leg_recognizer
from bridge.recognizer.pool import RecognizerPool
from bridge.recognizer.streamer import StreamerConfig

# The real models each registered engine is checked with, and whether each is multilingual.
# A new engine adds its line here (test_every_engine_is_checked fails until it does).
CONTRACT_MODELS: dict[str, tuple[tuple[str, bool], ...]] = {
    "whisper.cpp": (("tiny.en", False), ("base", True)),
}
CASES = [(engine, model, multi) for engine in ENGINES for model, multi in CONTRACT_MODELS.get(engine, ())]

PHRASE = "Please hold while I look up your account information."
SPANISH = "Buenos días, quisiera cambiar la dirección de envío de mi pedido."


def _padded(pcm: np.ndarray, before_s: float = 1.0, after_s: float = 0.5) -> np.ndarray:
    return np.concatenate([np.zeros(int(before_s * SAMPLE_RATE), np.int16), pcm,
                           np.zeros(int(after_s * SAMPLE_RATE), np.int16)])


@pytest.fixture(scope="module", params=CASES, ids=[f"{e}-{m}" for e, m, _ in CASES])
def case(request) -> tuple[Engine, bool]:
    name, model, multilingual = request.param
    try:
        path = resolve(model)
    except ModelError as e:  # an optional model's package is not installed (./run test installs it)
        pytest.skip(str(e))
    return load_engine(name, str(path), threads=2), multilingual


def test_every_engine_is_checked_and_configurable():
    assert set(CONTRACT_MODELS) == set(ENGINES), "each registered engine needs contract models here"
    assert set(bridge_config.ENGINES) == set(ENGINES), "config's model.engine choices are the registry's names"
    assert bridge_config.Config().model.engine in ENGINES
    with pytest.raises(UnknownEngine, match="registered: whisper.cpp"):
        load_engine("no-such-engine", "model.bin")


def test_engine_describes_itself(case):
    eng, multilingual = case
    assert isinstance(eng, Engine)
    assert ENGINES[eng.name] is not None
    assert eng.sample_rate == SAMPLE_RATE
    assert eng.multilingual is multilingual
    assert isinstance(eng.languages, frozenset) and "en" in eng.languages and "auto" not in eng.languages
    assert all(isinstance(code, str) and code == code.strip().lower() and code for code in eng.languages)
    assert isinstance(eng.hypothesis_filter, HypothesisFilter)


def test_speech_decodes_to_a_well_formed_hypothesis(case):
    eng, _ = case
    audio = _padded(corpus.synthesize(PHRASE))
    audio_s = len(audio) / SAMPLE_RATE
    hyp = eng.decode(audio, DecodeOptions())
    assert isinstance(hyp, Hypothesis)
    assert corpus.wer(PHRASE, hyp.text) <= 0.25, hyp.text
    assert hyp.language == "en"
    assert hyp.audio_s == pytest.approx(audio_s, abs=1e-3) and hyp.decode_s > 0
    assert hyp.words and norm_text(hyp.text) == norm_text(" ".join(w.word for w in hyp.words)), (hyp.text, hyp.words)
    for w in hyp.words:
        assert w.word.strip() == w.word and w.word, w
        assert 0.0 <= w.start <= w.end <= audio_s, w
        assert 0.0 <= w.confidence <= 1.0, w
    starts = [w.start for w in hyp.words]
    assert starts == sorted(starts), hyp.words
    assert not eng.hypothesis_filter.rejects(hyp, speech_s=audio_s - 1.5), "real speech judged invented"
    # int16 and float32 of the same samples are the same input; and a decode depends on its input alone
    again = eng.decode(audio.astype(np.float32) / 32768.0, DecodeOptions())
    assert (again.text, again.words) == (hyp.text, hyp.words)


def test_partial_and_final_decodes_both_transcribe(case):
    eng, _ = case
    audio = _padded(corpus.synthesize(PHRASE), before_s=0.3)
    for opts in (DecodeOptions(partial=True), DecodeOptions(partial=False), DecodeOptions(offline=True)):
        hyp = eng.decode(audio, opts)
        assert corpus.wer(PHRASE, hyp.text) <= 0.34, (opts, hyp.text)


def test_offline_covers_audio_longer_than_one_window(case):
    """Only coverage is checked: over 40 s whisper base looped ("M. M. M. ...") in the middle,
    at temperature 0 without fallback, so the offline baseline's accuracy is the benches' business."""
    eng, _ = case
    audio = corpus.monologue(33.0, seed=3)[0]
    audio_s = len(audio) / SAMPLE_RATE
    hyp = eng.decode(audio, DecodeOptions(offline=True))
    assert hyp.audio_s == pytest.approx(audio_s, abs=1e-3)
    assert hyp.words[-1].end > 30.5 and all(w.end <= audio_s for w in hyp.words), hyp.words[-3:]


def test_prompt_steers_the_spelling_of_boosted_terms(case):
    """word_boost reaches the engine as the prompt (tiny.en says "cube-a-neats" without it)."""
    eng, _ = case
    hyp = eng.decode(corpus.synthesize("We use Kubernetes and Postgres at work."),
                     DecodeOptions(prompt="Kubernetes, Postgres."))
    assert "kubernetes" in corpus.normalize_text(hyp.text), hyp.text


def test_language_handling(case):
    eng, multilingual = case
    english = _padded(corpus.synthesize(PHRASE), before_s=0.3)
    if not multilingual:  # an English-only model decodes English whatever it is asked for
        for lang in ("de", "auto"):
            hyp = eng.decode(english, DecodeOptions(language=lang))
            assert hyp.language == "en" and corpus.wer(PHRASE, hyp.text) <= 0.34, (lang, hyp.text)
        return
    spanish = _padded(corpus.synthesize(SPANISH, voice="es", rate=150), before_s=0.3)
    detected = eng.decode(spanish, DecodeOptions(language="auto"))
    assert detected.language == "es" and "quisiera" in corpus.normalize_text(detected.text), detected.text
    told = eng.decode(spanish, DecodeOptions(language="es"))
    assert told.language == "es" and "quisiera" in corpus.normalize_text(told.text), told.text
    assert eng.decode(english, DecodeOptions(language="auto")).language == "en"


def test_empty_and_silent_audio_give_no_words(case):
    eng, _ = case
    eng.decode(_padded(corpus.synthesize(PHRASE)), DecodeOptions())  # something for a stale result to leak from
    empty = eng.decode(np.zeros(0, np.int16), DecodeOptions())
    assert (empty.text, empty.words, empty.audio_s) == ("", [], 0.0), empty.text
    for audio in (corpus.silence(2.0), corpus.noise("pink", 2.0)):
        hyp = eng.decode(audio, DecodeOptions())
        # no words, or words the engine's own filter rejects (whisper says "you" on silence)
        assert not norm_text(hyp.text) or eng.hypothesis_filter.rejects(hyp, speech_s=0.0), hyp.text


def test_bad_audio_is_refused_with_a_clear_error(case):
    eng, _ = case
    with pytest.raises(ValueError, match="mono"):
        eng.decode(np.zeros((2, 1600), np.float32), DecodeOptions())


# ------------------------------------------------------------------ leg recognizers

@pytest.fixture(params=sorted(LEG_RECOGNIZERS))
def leg_kind(request) -> str:
    return request.param


def _new_leg(pool: RecognizerPool, kind: str, **config) -> tuple[LegRecognizer, list]:
    events: list = []
    leg = new_leg_recognizer(pool, events.append, channel=1, speaker="agent", config=StreamerConfig(**config),
                             kind=kind)
    assert isinstance(leg, LegRecognizer)
    return leg, events


async def _feed(leg: LegRecognizer, pcm: np.ndarray, pace: float | None = 1.0) -> None:
    """20 ms frames as a live call sends them (`pace` 1.0: real time; None: as fast as the loop allows)."""
    step = SAMPLE_RATE // 50
    t0 = asyncio.get_running_loop().time()
    for i in range(0, len(pcm), step):
        leg.feed(pcm[i : i + step])
        due = t0 + (i + step) / SAMPLE_RATE / pace if pace else 0.0
        await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))


async def test_leg_gives_partials_then_one_final(pool, leg_kind):
    leg, events = _new_leg(pool, leg_kind)
    task = leg.start()
    speech = corpus.synthesize("I would like to check the status of my order, please.")
    await _feed(leg, np.concatenate([np.zeros(4800, np.int16), speech, corpus.silence(1.5)]))
    assert await wait_for(lambda: any(isinstance(e, Final) for e in events), timeout=30), events
    await leg.finish()
    assert task.done() and task.exception() is None
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 1 and finals[0].speech_final, finals
    assert corpus.wer("I would like to check the status of my order, please.", finals[0].text) <= 0.25, finals[0].text
    assert isinstance(events[0], Partial) and events[-1] is finals[0], "partials first, nothing after the final"
    fed_s = (4800 + len(speech)) / SAMPLE_RATE + 1.5
    for e in events:
        assert (e.channel, e.speaker) == (1, "agent")
    assert all(0.0 <= w.start <= w.end <= fed_s for w in finals[0].words), finals[0].words
    with pytest.raises(RuntimeError):
        leg.feed(np.zeros(320, np.int16))  # a finished leg takes no more audio


async def test_force_endpoint_ends_the_utterance_without_silence(pool, leg_kind):
    leg, events = _new_leg(pool, leg_kind, endpointing_ms=20000, interim_results=False)
    leg.start()
    await _feed(leg, np.concatenate([np.zeros(4800, np.int16), corpus.synthesize(PHRASE)]), pace=None)
    leg.force_endpoint()
    assert await wait_for(lambda: any(isinstance(e, Final) for e in events), timeout=30), events
    await leg.finish()
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 1 and finals[0].speech_final and corpus.wer(PHRASE, finals[0].text) <= 0.25, finals
    assert not any(isinstance(e, Partial) for e in events), "interim_results false: no partials"


async def test_configure_applies_to_the_open_utterance(pool, leg_kind):
    leg, events = _new_leg(pool, leg_kind, endpointing_ms=5000, interim_results=False)
    leg.start()
    with pytest.raises(ValueError):
        leg.configure(endpointing_ms=20001)
    # 1 s of silence after the speech: no endpoint at 5000 ms, and no more audio comes
    await _feed(leg, np.concatenate([np.zeros(4800, np.int16), corpus.synthesize(PHRASE), corpus.silence(1.0)]),
                pace=None)
    leg.configure(endpointing_ms=500)
    assert await wait_for(lambda: any(isinstance(e, Final) for e in events), timeout=30), events
    await leg.finish()
    assert len([e for e in events if isinstance(e, Final)]) == 1, events


async def test_finish_flushes_and_close_stops(pool, leg_kind):
    leg, events = _new_leg(pool, leg_kind, interim_results=False)
    leg.start()
    await _feed(leg, np.concatenate([np.zeros(4800, np.int16), corpus.synthesize(PHRASE)]), pace=None)
    await leg.finish()  # no trailing silence: finish ends the utterance and waits for its final
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 1 and corpus.wer(PHRASE, finals[0].text) <= 0.25, finals

    other, other_events = _new_leg(pool, leg_kind)
    task = other.start()
    await _feed(other, np.concatenate([np.zeros(4800, np.int16), corpus.synthesize(PHRASE)]), pace=None)
    await other.aclose()  # shutdown past the drain deadline: stop, no flush
    assert task.done()
    # a decode already running for it still completes in the shared pool: let it, before this
    # test's event loop closes (a worker resolving onto a closed loop dies with RuntimeError)
    assert await wait_for(lambda: pool.busy == 0 and not sum(pool.queue_depth().values()), timeout=60)
    assert not any(isinstance(e, Final) for e in other_events), other_events
    with pytest.raises(ValueError):
        other.feed(np.zeros(320, np.float32))  # the leg takes 16-bit samples only
