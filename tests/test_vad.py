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

from bench import corpus, vad_eval  # noqa: E402
from bridge.recognizer.vad import DEFAULT_VAD, VAD_KINDS, Vad, make_vad  # noqa: E402

KINDS = ["default", *VAD_KINDS]
FAR_FRAMES = vad_eval.FAR_MS // 10  # 10 ms label frames


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
    # Measured on this clip (670 speech frames, deterministic): silero 98.4 %, webrtc 98.7 %,
    # energy 99.0 %; the misses are onsets and quiet word tails. 97.5 % allows 6 more missed
    # frames (60 ms) than the worst, for another build's numerics, and nothing like a lost word.
    assert recall >= 0.975, f"{kind}: recall {recall:.4f}"
    # Non-speech frames called speech: next to speech that is onset/offset smearing and word
    # gaps, which endpointing absorbs (measured 6-25 % of the 310 non-speech frames: energy,
    # silero, webrtc); more than 200 ms from speech it could open a phantom segment (measured
    # 0 of 156 for every kind, and 0.3 % for silero on bench.vad_eval's 96 s track).
    assert np.mean(hyp[~ref]) <= 0.30, f"{kind}: false alarm {np.mean(hyp[~ref]):.3f}"
    far = np.convolve(ref.astype(float), np.ones(2 * FAR_FRAMES + 1), "same") < 0.5
    assert np.sum(hyp & far) <= 0.01 * np.sum(far), f"{kind}: {np.sum(hyp & far)} far false alarms"


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


def test_default_recall_as_documented():
    """docs/vad.md and docs/benchmarks.md: the default detects 98.9 % of speech frames clean and
    98.5 % pooled over the five backgrounds at 5 dB SNR (the hardest level), with 0.3 % far false
    alarms. This measures exactly that, with bench.vad_eval's own track, mixing and scoring.

    Bounds from measured spread: the figures are deterministic for a track, and over three
    track seeds (python -m bench.vad_eval's speech_track(24, seed) for 1, 2, 3) they were clean
    98.9 / 99.4 / 98.9 %, 5 dB pooled 98.5 / 98.7 / 98.7 %, far FA 0.29 / 0.37 / 0.36 %. So
    clean >= 98.5 % (the documented floor), 5 dB >= 98.0 % (the documented 98.5 less twice the
    seed-to-seed spread of 0.25 points) and far FA <= 1 % (here over clean and the four non-babble
    5 dB mixes, measured 0.48 %; the documented 0.3 % pools all SNRs). Measured here: clean
    98.87 %, 5 dB 98.48 %. About 9 s of CPU, mostly generating the noise."""
    track, labels = vad_eval.speech_track(24)
    runner = vad_eval.Runner(make_vad)
    clean, noisy, far = vad_eval.Score(), vad_eval.Score(), vad_eval.Score()
    conditions = [("clean", track)] + [
        (kind, corpus.mix(track, corpus.noise(kind, len(track) / 16000, seed=100 + 10 * i + 2), 5))
        for i, kind in enumerate(vad_eval.BACKGROUNDS)]  # seed as speech_conditions gives 5 dB
    for kind, pcm in conditions:
        probs, n = runner.probs(pcm)
        hyp = vad_eval.to_label_frames(probs >= 0.5, n, len(labels))
        (clean if kind == "clean" else noisy).add(hyp, labels)
        if kind != "babble":  # babble is speech, just not the caller's
            far.add(hyp, labels)
    assert clean.recall >= 0.985, f"clean recall {clean.recall:.4f}"
    assert noisy.recall >= 0.980, f"5 dB recall {noisy.recall:.4f}"
    assert far.fa_far <= 0.01, f"far false alarms {far.fa_far:.4f}"


def test_webrtc_aggressiveness():
    assert make_vad("webrtc", aggressiveness=1).aggressiveness == 1
    with pytest.raises(ValueError):
        make_vad("webrtc", aggressiveness=7)


def test_unknown_kind():
    with pytest.raises(ValueError):
        make_vad("psychic")
