"""The VADs on real (synthesized) audio: speech found, non-speech left alone.

A VAD that misses speech drops words; one that fires on line noise, tones or
hold music makes whisper hallucinate. Both are checked without mocks.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a repo tool, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import corpus  # noqa: E402
from bridge.recognizer.vad import DEFAULT_VAD, VAD_KINDS, Vad, make_vad  # noqa: E402

KINDS = ["default", *VAD_KINDS]


def vad_for(kind: str) -> Vad:
    return make_vad() if kind == "default" else make_vad(kind)


def run(vad: Vad, pcm: np.ndarray) -> np.ndarray:
    """Per-frame speech probabilities over whole frames of ``pcm``."""
    n = vad.frame_samples
    return np.array([vad.speech_prob(pcm[i:i + n]) for i in range(0, len(pcm) - n + 1, n)])


def per_10ms(probs: np.ndarray, frame_samples: int, n_labels: int) -> np.ndarray:
    """VAD decisions mapped onto 10 ms label frames by frame centre."""
    idx = (np.arange(n_labels) * 160 + 80) // frame_samples
    return probs[idx[idx < len(probs)]] >= 0.5


@pytest.fixture(scope="module")
def speech():
    """Two sentences, two voices, with silence around and between them."""
    parts = [corpus.silence(0.5), corpus.synthesize(corpus.SENTENCES[0], "en-us", 160),
             corpus.silence(0.7), corpus.synthesize(corpus.SENTENCES[2], "en-us+f3", 180),
             corpus.silence(0.5)]
    pcm = np.concatenate(parts)
    return pcm, corpus.active_frames(pcm)


def test_default_is_a_known_kind():
    assert DEFAULT_VAD in VAD_KINDS
    assert type(make_vad()) is type(make_vad(DEFAULT_VAD))


@pytest.mark.parametrize("kind", KINDS)
def test_interface(kind):
    vad = vad_for(kind)
    assert isinstance(vad, Vad)
    assert vad.frame_samples in (320, 480, 512)
    p = vad.speech_prob(np.zeros(vad.frame_samples, dtype=np.int16))
    assert isinstance(p, float) and 0.0 <= p <= 1.0
    with pytest.raises(ValueError):
        vad.speech_prob(np.zeros(vad.frame_samples - 1, dtype=np.int16))


@pytest.mark.parametrize("kind", KINDS)
def test_detects_clean_speech(kind, speech):
    pcm, labels = speech
    vad = vad_for(kind)
    hyp = per_10ms(run(vad, pcm), vad.frame_samples, len(labels))
    ref = labels[: len(hyp)]
    recall = np.sum(hyp & ref) / np.sum(ref)
    assert recall > 0.8, f"{kind}: recall {recall:.2f}"
    # and it does not call the whole clip speech
    assert np.mean(hyp[~ref]) < 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_silence_is_not_speech(kind):
    vad = vad_for(kind)
    assert not np.any(run(vad, corpus.silence(3.0)) >= 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_makes_it_repeatable(kind, speech):
    pcm = speech[0][: 3 * 16000]
    vad = vad_for(kind)
    first = run(vad, pcm)
    vad.reset()
    assert np.allclose(run(vad, pcm), first)


@pytest.mark.parametrize("noise_kind", ["white", "tone", "music"])
def test_default_ignores_noise_tone_music(noise_kind):
    vad = make_vad()
    for seed in (0, 1):
        probs = run(vad, corpus.noise(noise_kind, 4.0, level_dbfs=-30, seed=seed))
        vad.reset()
        assert np.mean(probs >= 0.5) < 0.05, f"{noise_kind} seed {seed}"


def test_default_finds_speech_in_noise(speech):
    """The reason for the choice: recall holds up at 10 dB SNR (docs/vad.md)."""
    pcm, labels = speech
    noisy = corpus.mix(pcm, corpus.noise("pink", 2.0, seed=7), 10)
    vad = make_vad()
    hyp = per_10ms(run(vad, noisy), vad.frame_samples, len(labels))
    ref = labels[: len(hyp)]
    assert np.sum(hyp & ref) / np.sum(ref) > 0.8


def test_webrtc_aggressiveness():
    assert make_vad("webrtc", aggressiveness=1).aggressiveness == 1
    with pytest.raises(ValueError):
        make_vad("webrtc", aggressiveness=7)


def test_unknown_kind():
    with pytest.raises(ValueError):
        make_vad("psychic")
