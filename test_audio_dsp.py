"""Tests of audio.py (MFCC, HPSS, onset strength, beat tracking) against librosa and scipy.

librosa and scipy.ndimage are references only and are imported inside the tests.
Run alone: pytest -q test_audio.py
"""
import numpy as np
import pytest
import torch

from audio import (SAMPLE_RATE, beat_track, beats, hpss, mel_filterbank, median_filter, mfcc, mfcc_at_fps,
                       onset_strength)

SR = SAMPLE_RATE


def _test_signals(seconds=8.0):
    """Noise, two pure tones, a chirp, silence and near-silence, float32 (N,) each."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(1)
    signals = {
        "noise": 0.1 * rng.standard_normal(len(t)),
        "tone_440": 0.5 * np.sin(2 * np.pi * 440 * t),
        "tone_3000": 0.9 * np.sin(2 * np.pi * 3000 * t),
        "chirp": 0.5 * np.sin(2 * np.pi * (50 * t + (7000 - 50) / (2 * seconds) * t ** 2)),
        "silence": np.zeros(len(t)),
        "near_silence": 1e-4 * rng.standard_normal(len(t)),
    }
    return {name: y.astype(np.float32) for name, y in signals.items()}


def _click_track(bpm=120.0, seconds=8.0):
    """Short decaying 2.3 kHz clicks every beat from 0.25 s."""
    y = np.zeros(int(seconds * SR), dtype=np.float32)
    click = (np.hanning(400)[200:] * np.sin(np.arange(200) * 0.9)).astype(np.float32)
    for at in np.arange(0.25, seconds, 60.0 / bpm):
        i = int(at * SR)
        y[i:i + len(click)] += click[:len(y) - i]
    return y


def _drum_song(bpm=100.0, seconds=8.0, seed=0):
    """Kick on beats 1 and 3, snare on 2 and 4, hi-hat on every half beat, and a sine melody of random
    semitones changing every beat."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    y = np.zeros_like(t)
    beat = 60.0 / bpm
    for k, start in enumerate(np.arange(0.0, seconds, beat / 2)):
        i = int(start * SR)
        n = min(len(t) - i, 4000)
        tt = np.arange(n) / SR
        if k % 4 == 0:
            y[i:i + n] += np.sin(2 * np.pi * (60 + 80 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 12)
        if k % 4 == 2:
            y[i:i + n] += 0.5 * rng.standard_normal(n) * np.exp(-tt * 25)
        m = min(n, 800)
        y[i:i + m] += 0.15 * rng.standard_normal(m) * np.exp(-tt[:m] * 80)
    notes = 220.0 * 2 ** (rng.integers(0, 12, int(seconds / beat) + 1) / 12)
    y += 0.2 * np.sin(2 * np.pi * np.cumsum(notes[(t / beat).astype(int)]) / SR)
    return (0.3 * y).astype(np.float32)


def _librosa_beats(y):
    import librosa
    _, percussive = librosa.effects.hpss(y)
    envelope = librosa.onset.onset_strength(y=percussive, sr=SR, aggregate=np.median)
    return librosa.beat.beat_track(onset_envelope=envelope, sr=SR)[1]


def test_mfcc_matches_librosa_within_1e3_db_on_noise_tones_chirp_and_silence():
    import librosa
    for hop in (512, 533, 160):
        for name, y in _test_signals(2.0).items():
            ref = librosa.feature.mfcc(y=y, sr=SR, n_mfcc=64, n_fft=2048, hop_length=hop, n_mels=128)
            ours = mfcc(y, sr=SR, n_mfcc=64, hop_length=hop, n_fft=2048, n_mels=128)
            assert ours.shape == ref.shape, (hop, name)
            assert np.abs(ours.numpy() - ref).max() <= 1e-3, (hop, name)


@pytest.mark.filterwarnings("ignore:n_fft=2048 is too large")
def test_mfcc_matches_librosa_on_short_and_float64_input():
    import librosa
    y = _test_signals(0.3)["noise"]
    for wave in (y, y[:700], y.astype(np.float64)):
        ref = librosa.feature.mfcc(y=wave, sr=SR, n_mfcc=64, n_fft=2048, hop_length=512, n_mels=128)
        ours = mfcc(torch.from_numpy(wave))
        assert ours.dtype == (torch.float64 if wave.dtype == np.float64 else torch.float32)
        assert np.abs(ours.numpy() - ref).max() <= 1e-3


def test_mfcc_batched_equals_per_signal_with_its_own_db_floor():
    signals = _test_signals(2.0)
    batch = np.stack([signals["tone_440"], signals["near_silence"], signals["chirp"]]).reshape(3, 1, -1)
    together = mfcc(batch)                                                           # (3, 1, 64, T)
    assert together.shape[:3] == (3, 1, 64)
    for i in range(3):
        alone = mfcc(batch[i, 0])
        assert torch.allclose(together[i, 0], alone, atol=1e-4, rtol=0)


def test_mel_filterbank_equals_librosa_slaney_bitwise():
    import librosa
    for sr, n_fft, n_mels in ((16000, 2048, 128), (22050, 1024, 80), (16000, 400, 40)):
        assert np.array_equal(mel_filterbank(sr, n_fft, n_mels), librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels))


def test_mfcc_at_fps_samples_the_533_hop_track_at_motion_frame_times():
    import librosa
    y = _drum_song(seconds=8.0)
    ours = mfcc_at_fps(y, sr=SR, n_frames=240)
    assert ours.shape == (240, 64) and ours.dtype == torch.float32
    track = librosa.feature.mfcc(y=y, sr=SR, n_mfcc=64, n_fft=2048, hop_length=533, n_mels=128)   # (64, 241)
    frame_of_time = np.arange(240) / 30 * SR / 533
    expected = np.stack([np.interp(frame_of_time, np.arange(track.shape[1]), row) for row in track], axis=1)
    assert np.abs(ours.numpy() - expected).max() <= 1e-3
    assert mfcc_at_fps(y).shape == (240, 64)
    assert mfcc_at_fps(y[:SR], n_frames=40)[-1].equal(mfcc_at_fps(y[:SR], n_frames=40)[-5])   # held past the end


def test_median_filter_equals_scipy_reflect_mode():
    from scipy import ndimage
    rng = np.random.default_rng(0)
    for shape in ((1025, 251), (3, 16), (5, 40), (3, 1), (3, 4, 37)):
        x = np.abs(rng.standard_normal(shape)).astype(np.float32)
        for size in (31, 1, 3, 7):
            for axis in range(-1, -x.ndim - 1, -1):
                kernel = [1] * x.ndim
                kernel[axis] = size
                ref = ndimage.median_filter(x, size=kernel, mode="reflect")
                assert np.array_equal(median_filter(x, size, axis), ref)


def test_hpss_matches_librosa():
    import librosa
    for y in (_drum_song(seconds=4.0), _test_signals(0.3)["noise"], _click_track(seconds=3.0).astype(np.float64)):
        for ours, ref in zip(hpss(y), librosa.effects.hpss(y)):
            assert ours.shape == ref.shape and ours.dtype == ref.dtype
            assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onset_strength_matches_librosa_within_1e4_relative():
    import librosa
    for y in (_drum_song(), _click_track(), _test_signals(2.0)["chirp"]):
        ref = librosa.onset.onset_strength(y=y, sr=SR, aggregate=np.median)
        ours = onset_strength(y, sr=SR, aggregate=np.median)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_beat_track_matches_librosa_on_varied_onset_envelopes():
    import librosa
    rng = np.random.default_rng(5)
    for i in range(40):
        n = int(rng.integers(20, 2000))
        period = rng.uniform(8, 40)
        envelope = [np.abs(rng.standard_normal(n)),
                    (rng.random(n) < 0.1) * rng.random(n) * 5,
                    np.maximum(0, np.cos(2 * np.pi * np.arange(n) / period)) ** 8 + 0.1 * rng.random(n)][i % 3]
        envelope = envelope.astype(np.float32 if i % 2 else np.float64)
        trim, start_bpm = bool(i % 4), float(rng.choice([60.0, 120.0, 150.0]))
        ref_bpm, ref = librosa.beat.beat_track(onset_envelope=envelope, sr=SR, trim=trim, start_bpm=start_bpm)
        bpm, ours = beat_track(envelope, sr=SR, trim=trim, start_bpm=start_bpm)
        assert np.array_equal(ours, ref), i
        assert bpm == float(np.atleast_1d(ref_bpm)[0])
    assert len(beat_track(np.zeros(100, dtype=np.float32))[1]) == 0


def test_beats_match_librosa_on_a_click_track():
    y = _click_track(bpm=120.0, seconds=8.0)
    frames, times = beats(y)
    assert frames.dtype == np.int64 and times.dtype == np.float64
    assert np.array_equal(frames, _librosa_beats(y))
    assert np.allclose(times, frames * 512 / SR, rtol=0, atol=1e-12)
    assert len(frames) >= 14 and np.allclose(np.diff(times), 0.5, atol=0.04)


def test_beats_match_librosa_on_synthetic_drums_and_melody():
    for bpm, seed in ((100.0, 0), (87.0, 1), (132.0, 2)):
        y = _drum_song(bpm=bpm, seed=seed)
        assert np.array_equal(beats(y)[0], _librosa_beats(y)), bpm


def test_beats_match_librosa_on_builtin_data_music():
    import data
    for seed in range(4):
        rng = np.random.default_rng(seed)
        song = data.compose_song(rng, 8.0, 55)
        music = data.play_music(song, rng)
        assert np.array_equal(beats(music)[0], _librosa_beats(music)), seed


def test_beats_accept_a_tensor_and_refuse_bad_input():
    y = _click_track(seconds=4.0)
    assert np.array_equal(beats(torch.from_numpy(y))[0], beats(y)[0])
    with pytest.raises(ValueError, match="beats"):
        beats(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="mfcc"):
        mfcc(np.zeros(0, dtype=np.float32))
