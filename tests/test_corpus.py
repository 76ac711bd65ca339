"""bench.corpus must be trustworthy: every WER and VAD number is measured on it."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a repo tool, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import corpus  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # noqa: E402


def test_sentences_and_voices_are_usable():
    assert len(SENTENCES := corpus.SENTENCES) >= 30
    assert len(set(SENTENCES)) == len(SENTENCES)
    for s in SENTENCES:
        assert 6 <= len(s.split()) <= 20, s
        assert not any(ch.isdigit() for ch in s), s  # numbers as words keep WER fair
    assert len(corpus.VOICES) >= 4


@pytest.mark.parametrize("voice", corpus.VOICES)
def test_every_voice_synthesizes(voice):
    pcm = corpus.synthesize("Hello, thank you for calling.", voice, 160)
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert corpus.rms_dbfs(pcm) > -40


def test_synthesize_format_and_length():
    text = corpus.SENTENCES[1]
    words = len(text.split())
    for rate in (140, 180):
        pcm = corpus.synthesize(text, "en-us", rate)
        assert pcm.dtype == np.int16 and pcm.ndim == 1
        expected = words / rate * 60
        assert 0.5 * expected < len(pcm) / 16000 < 2.0 * expected
    # faster speech is shorter
    assert len(corpus.synthesize(text, "en-us", 180)) < len(corpus.synthesize(text, "en-us", 140))


def test_synthesize_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CACHE_DIR", tmp_path)
    a = corpus.synthesize("Please hold the line.", "en-us+f3", 150)
    files = list((tmp_path / "tts").glob("*.wav"))
    assert len(files) == 1
    b = corpus.synthesize("Please hold the line.", "en-us+f3", 150)
    assert np.array_equal(a, b)
    files[0].unlink()  # a cache miss re-synthesizes the very same samples
    assert np.array_equal(a, corpus.synthesize("Please hold the line.", "en-us+f3", 150))
    corpus.synthesize("Please hold the line.", "en-us+f3", 151)
    assert len(list((tmp_path / "tts").glob("*.wav"))) == 2


def test_cache_dir_env_override(tmp_path):
    env = dict(os.environ, CALLBRIDGE_CORPUS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "from bench import corpus; print(corpus.CACHE_DIR)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path)


def test_utterances_round_robin():
    us = corpus.utterances(6)
    assert [u.text for u in us] == corpus.SENTENCES[:6]
    assert len({u.voice for u in us}) == 6
    assert {u.rate for u in us} == {140, 160, 180}
    assert all(u.sample_rate == 16000 and u.pcm.dtype == np.int16 for u in us)
    again = corpus.utterances(6)
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(us, again))


def test_monologue():
    pcm, text = corpus.monologue(12.0, seed=3)
    assert len(pcm) >= 12 * 16000
    assert pcm.dtype == np.int16
    sentences = [s for s in corpus.SENTENCES if s in text]
    assert len(sentences) >= 2
    pcm2, text2 = corpus.monologue(12.0, seed=3)
    assert text == text2 and np.array_equal(pcm, pcm2)
    assert corpus.monologue(12.0, seed=4)[1] != text


def test_g711_halves_the_sample_count():
    pcm = corpus.synthesize(corpus.SENTENCES[0])
    pcm = pcm[: len(pcm) // 2 * 2]
    for encode, decode in ((corpus.to_mulaw_8k, audioop.ulaw2lin), (corpus.to_alaw_8k, audioop.alaw2lin)):
        data = encode(pcm)
        assert isinstance(data, bytes)
        assert len(data) == len(pcm) // 2
        # and it decodes back to the same speech: G.711 is ~38 dB SNR on speech
        back = np.frombuffer(decode(data, 2), dtype=np.int16).astype(np.float64)
        ref = corpus._resample(pcm, 16000, 8000).astype(np.float64)
        snr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - back) ** 2))
        assert snr > 25


def test_wav_roundtrip(tmp_path):
    mono = corpus.noise("white", 0.1, level_dbfs=-20)
    corpus.write_wav(tmp_path / "m.wav", mono)
    got, rate = corpus.read_wav(tmp_path / "m.wav")
    assert rate == 16000 and np.array_equal(got, mono)
    stereo = np.stack([mono, mono // 2], axis=1)
    corpus.write_wav(tmp_path / "s.wav", stereo, rate=8000)
    got, rate = corpus.read_wav(tmp_path / "s.wav")
    assert rate == 8000 and np.array_equal(got, stereo.reshape(-1))


@pytest.mark.parametrize("ref,hyp,expected", [
    ("the cat sat", "the cat sat", 0.0),
    ("the cat sat", "the cat", 1 / 3),                 # deletion
    ("the cat sat", "the dog sat", 1 / 3),             # substitution
    ("the cat sat", "the cat sat down", 1 / 3),        # insertion
    ("Hello, World!", "hello world", 0.0),             # case and punctuation
    ("I don't know.", "i don't know", 0.0),            # in-word apostrophe kept
    ("a b c d", "d c b a", 1.0),
    ("one two", "", 1.0),
    ("", "", 0.0),
    ("", "thank you", 2.0),                            # hallucination on silence counts
])
def test_wer(ref, hyp, expected):
    assert corpus.wer(ref, hyp) == pytest.approx(expected)


def test_normalize_text():
    assert corpus.normalize_text("  Order #A-12,  please!  ") == "order a 1 2 please"
    # whisper writes digits where the script spells numbers: both reduce to single digits
    assert corpus.normalize_text("seven four two, forty two") == corpus.normalize_text("742, 42") == "7 4 2 4 2"
    assert corpus.normalize_text("one hundred and five") == "1 0 0 and 5"
    assert corpus.normalize_text("It\u2019s 'quoted'") == "it's quoted"


@pytest.mark.parametrize("kind", corpus.NOISE_KINDS)
def test_noise_level_and_determinism(kind):
    for level in (-30.0, -20.0):
        x = corpus.noise(kind, 2.0, level_dbfs=level, seed=1)
        assert x.dtype == np.int16 and len(x) == 32000
        assert corpus.rms_dbfs(x) == pytest.approx(level, abs=0.1)
    assert np.array_equal(corpus.noise(kind, 1.0, seed=2), corpus.noise(kind, 1.0, seed=2))
    if kind != "tone":
        assert not np.array_equal(corpus.noise(kind, 1.0, seed=2), corpus.noise(kind, 1.0, seed=5))


def test_noise_spectra_are_what_they_claim():
    def share_below(x, hz):
        p = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
        f = np.fft.rfftfreq(len(x), 1 / 16000)
        return p[f < hz].sum() / p.sum()

    assert share_below(corpus.noise("hum", 1.0), 400) > 0.9
    assert share_below(corpus.noise("pink", 1.0), 1000) > share_below(corpus.noise("white", 1.0), 1000) + 0.3
    tone = corpus.noise("tone", 1.0)
    peak = np.fft.rfftfreq(16000, 1 / 16000)[np.argmax(np.abs(np.fft.rfft(tone)))]
    assert peak == pytest.approx(1000, abs=2)
    with pytest.raises(ValueError):
        corpus.noise("thunder", 1.0)


@pytest.mark.parametrize("kind", ["white", "pink", "music", "babble", "hum"])
@pytest.mark.parametrize("snr", [0, 10, 20])
def test_mix_hits_snr(kind, snr):
    speech = np.concatenate([corpus.silence(0.5), corpus.synthesize(corpus.SENTENCES[2]), corpus.silence(0.5)])
    bg = corpus.noise(kind, 1.7, seed=snr)  # shorter than speech: must be looped
    mixed = corpus.mix(speech, bg, snr)
    assert mixed.dtype == np.int16 and len(mixed) == len(speech)
    active = np.repeat(corpus.active_frames(speech), 160)
    s = speech[: len(active)][active].astype(np.float64)
    n = (mixed.astype(np.float64) - speech)
    measured = 10 * np.log10(np.mean(s**2) / np.mean(n**2))
    assert measured == pytest.approx(snr, abs=1.0)


def test_silence():
    assert np.array_equal(corpus.silence(0.25), np.zeros(4000, dtype=np.int16))
    assert len(corpus.silence(1, rate=8000)) == 8000


def test_true_word_ends_fit_the_audio():
    """bench.latency scores partial lag against these: espeak-ng's own word starts (checked to be
    the cached audio, sample for sample), each word ending at its last audible sample."""
    from bench.calls import make_call, speech_bounds, word_ends

    text = "Thank you for calling customer support, my name is Sarah, how can I help you today?"
    pcm = corpus.synthesize(text, "en-us", 160)
    ends = word_ends(text, "en-us", 160)
    assert [w for w, _ in ends] == [w.strip(",?") for w in text.split()]
    times = [t for _, t in ends]
    assert times == sorted(times) and len(set(times)) == len(times)
    a, b = speech_bounds(pcm)
    assert times[0] > a / 16000 + 0.1  # "Thank" takes time to say
    assert times[-1] == pytest.approx(b / 16000, abs=1e-3)  # the last word ends where speech ends
    # the comma pause after "support" is not part of the word
    support, my = times[5], next(t for w, t in ends[6:] if w == "my")
    assert my - support > 0.15
    call = make_call(12, "en-us", 160, seed=1)
    assert len(call.word_ends) == sum(len(s.split()) for s in call.sentences)
    last_words = [sum(len(s.split()) for s in call.sentences[:i + 1]) - 1 for i in range(len(call.sentences))]
    for (s0, s1), k in zip(call.spans, last_words):
        assert call.word_ends[k][1] == pytest.approx(s1, abs=1e-3)  # a sentence ends with its last word
