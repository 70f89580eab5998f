"""Tests of data.py: the SingingHead reader's rules and the generated data set's structure. Run: pytest test_data.py"""
import functools
import pickle
import re
import shutil

import numpy as np
import pytest

import data

CLIP = 60          # frames: 2 s clips keep the generated sets tiny


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Two people, three 2-s sequences each (one song), no video."""
    root = tmp_path_factory.mktemp("small") / "set"
    return data.generate_dataset(root, n_people=2, clips_per_person=3, clip_seconds=2, clips_per_song=3,
                                 with_video=False, verbose=False)


@pytest.fixture(scope="module")
def song_set(tmp_path_factory):
    """One person, one 12-s song in three sequences of 4 s, for checking motion against the audio."""
    root = tmp_path_factory.mktemp("song") / "set"
    return data.generate_dataset(root, n_people=1, clips_per_person=3, clip_seconds=4, clips_per_song=3,
                                 with_video=False, seed=3, verbose=False)


def _copy(root, tmp_path):
    return shutil.copytree(root, tmp_path / "set")


def _song(root):
    """The first song of id0, sequences joined: motion (T, 59), voice (N,), music (N,) at 16 kHz."""
    import soundfile
    ids = sorted(p.stem for p in (root / "flame_seqs").glob("id0_0_*.pkl"))
    motion = np.concatenate([np.concatenate([d["expression"], d["pose"]], 1) for d in
                             (data.read_flame_pickle(root / "flame_seqs" / f"{i}.pkl") for i in ids)])
    voice = np.concatenate([soundfile.read(root / "audio_seqs" / f"{i}.wav", dtype="float32")[0] for i in ids])
    music = np.concatenate([soundfile.read(root / "bgm_seqs" / f"{i}_bgm.wav", dtype="float32")[0] for i in ids])
    return motion, voice, music


def test_generated_set_reads_back_with_shapes_dtypes_and_disjoint_splits(small_set):
    splits = {split: data.SingingHead(small_set, split, clip_frames=CLIP) for split in data.SPLITS}
    ids = {split: set(ds.sequences) for split, ds in splits.items()}
    every = {p.stem for p in (small_set / "flame_seqs").glob("*.pkl")}
    assert ids["train"] | ids["val"] | ids["test"] == every and len(every) == 6
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    for ds in splits.values():
        assert ds.people == ["id0", "id1"]
        for item in ds:
            assert re.fullmatch(r"id[01]_0_[0-2]_0", item["id"]) and item["person"] == item["id"].split("_")[0]
            assert item["audio"].shape == item["bgm"].shape == (2 * data.SAMPLE_RATE,)
            assert item["motion"].shape == (CLIP, data.MOTION_DIM) and item["cam"].shape == (CLIP, 3)
            assert item["shape"].shape == (100,)
            for key in ("audio", "bgm", "motion", "shape", "cam"):
                assert item[key].dtype == np.float32 and np.isfinite(item[key]).all()
            assert np.abs(item["audio"]).max() > 0.05 and np.abs(item["bgm"]).max() > 0.05
    people = {item["person"]: item["shape"] for item in splits["train"]}
    assert np.abs(people["id0"] - people["id1"]).max() > 0.1          # different procedural shapes
    assert np.abs(people["id0"][10:]).max() == 0


def test_generated_set_matches_release_pickle_keys(small_set):
    path = next((small_set / "flame_seqs").glob("*.pkl"))
    with open(path, "rb") as f:
        d = pickle.load(f)
    assert d["expcodes"].shape == (CLIP, 50) and d["posecodes"].shape == (CLIP, 9)
    assert d["shapecode"].shape == (1, 100) and d["cam"].shape == (CLIP, 3)
    assert path.read_bytes()[:2] == b"\x80\x02"                            # protocol 2


def test_generation_is_deterministic_per_seed(small_set, tmp_path):
    again = data.generate_dataset(tmp_path / "again", n_people=2, clips_per_person=3, clip_seconds=2,
                                  clips_per_song=3, with_video=False, verbose=False)
    other = data.generate_dataset(tmp_path / "other", n_people=2, clips_per_person=3, clip_seconds=2,
                                  clips_per_song=3, with_video=False, verbose=False, seed=1)
    files = sorted(p.relative_to(small_set) for p in small_set.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (small_set / name).read_bytes() == (again / name).read_bytes(), name
    wav = files[[str(f).startswith("audio_seqs") for f in files].index(True)]
    assert (small_set / wav).read_bytes() != (other / wav).read_bytes()


def test_jaw_opening_follows_the_voice_rms_envelope(song_set):
    motion, voice, _ = _song(song_set)
    edges = np.round(np.arange(len(motion) + 1) * data.SAMPLE_RATE / data.FPS).astype(int)
    rms = np.array([np.sqrt(np.mean(voice[a:b] ** 2)) for a, b in zip(edges[:-1], edges[1:])])
    assert np.corrcoef(motion[:, 56], rms)[0, 1] > 0.8
    assert motion[:, 56].max() - motion[:, 56].min() > 0.15              # rad: the mouth really opens


def test_head_nods_peak_at_the_music_beats(song_set):
    import librosa
    motion, _, music = _song(song_set)
    _, beats = librosa.beat.beat_track(y=music, sr=data.SAMPLE_RATE, units="time")
    nod = motion[:, 50]                                                    # global x-rotation
    peaks = np.flatnonzero((nod[1:-1] > nod[:-2]) & (nod[1:-1] >= nod[2:]) & (nod[1:-1] > np.median(nod))) + 1
    peak_times = (peaks + 0.5) / data.FPS
    assert len(beats) >= 10
    near = [np.abs(peak_times - b).min() < 2.5 / data.FPS for b in beats]
    assert np.mean(near) >= 0.9


def test_brows_follow_the_sung_pitch(song_set):
    import librosa
    motion, voice, _ = _song(song_set)
    f0 = librosa.yin(voice.astype(np.float64), fmin=70, fmax=900, sr=data.SAMPLE_RATE, frame_length=1024,
                     hop_length=data.SAMPLE_RATE // 50)
    frame_f0 = np.interp((np.arange(len(motion)) + 0.5) / data.FPS, np.arange(len(f0)) / 50, f0)
    loud = motion[:, 56] > 0.5 * motion[:, 56].max()                       # well inside sung vowels
    assert loud.sum() > 50
    assert np.corrcoef(motion[loud, data.BROW_DIM], np.log2(frame_f0[loud]))[0, 1] > 0.9


def _write(path, **arrays):
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=2)


def test_read_flame_pickle_accepts_both_key_spellings_and_camera_keys(tmp_path):
    rng = np.random.default_rng(0)
    exp, pose, cam = rng.normal(size=(7, 100)), rng.normal(size=(7, 15)), rng.normal(size=(7, 3))
    shape = rng.normal(size=300)
    _write(tmp_path / "a.pkl", expcodes=exp[:, :50], posecodes=pose[:, :9], shapecode=shape[None, :100], cam=cam)
    _write(tmp_path / "b.pkl", expression=exp, pose=pose, shape=np.tile(shape, (7, 1)), camcodes=cam)
    _write(tmp_path / "c.pkl", expcodes=exp[:, :50], posecodes=pose[:, :9], shapecode=shape[:100],
           camcodes=cam[0])
    _write(tmp_path / "d.pkl", expcodes=exp[:, :50], posecodes=pose[:, :9], shapecode=shape[:100])
    a, b, c, d = (data.read_flame_pickle(tmp_path / f"{n}.pkl") for n in "abcd")
    for read in (a, b, c, d):
        np.testing.assert_allclose(read["expression"], exp[:, :50], rtol=1e-6)
        np.testing.assert_allclose(read["pose"], pose[:, :9], rtol=1e-6)
        np.testing.assert_allclose(read["shape"], shape[:100], rtol=1e-6)
        assert read["expression"].dtype == read["pose"].dtype == read["shape"].dtype == np.float32
    np.testing.assert_allclose(a["cam"], cam, rtol=1e-6)
    np.testing.assert_allclose(b["cam"], cam, rtol=1e-6)
    np.testing.assert_allclose(c["cam"], np.tile(cam[:1], (7, 1)), rtol=1e-6)     # one row for all frames
    assert d["cam"] is None


def test_read_flame_pickle_refuses_nan_and_missing_keys_naming_the_file(tmp_path):
    good = dict(expcodes=np.zeros((5, 50)), posecodes=np.zeros((5, 9)), shapecode=np.zeros(100))
    bad = dict(nan=dict(good, posecodes=np.full((5, 9), np.nan)),
               inf=dict(good, expcodes=np.full((5, 50), np.inf)),
               nokey={k: v for k, v in good.items() if k != "expcodes"},
               rows=dict(good, posecodes=np.zeros((4, 9))),
               narrow=dict(good, posecodes=np.zeros((5, 6))))
    expected = dict(nan="'posecodes' holds NaN or inf", inf="'expcodes' holds NaN or inf",
                    nokey="missing key 'expcodes' (accepted spellings: expcodes, expression)",
                    rows="'posecodes' has 4 rows but the expression has 5",
                    narrow="'posecodes' must be (frames, 9+)")
    for name, arrays in bad.items():
        _write(tmp_path / f"{name}.pkl", **arrays)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}.pkl: {expected[name]}")):
            data.read_flame_pickle(tmp_path / f"{name}.pkl")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'absent.pkl'}: no such file")):
        data.read_flame_pickle(tmp_path / "absent.pkl")


def test_wav_at_44k_stereo_is_read_resampled_to_16k_mono(small_set, tmp_path):
    import librosa
    import soundfile
    root = _copy(small_set, tmp_path)
    ds = data.SingingHead(root, "train", clip_frames=CLIP)
    item = ds[0]
    path = ds.audio_path(item["id"])
    wave = soundfile.read(path, dtype="float32")[0]
    up = librosa.resample(wave, orig_sr=16_000, target_sr=44_100)
    soundfile.write(path, np.stack([up, up], 1), 44_100, subtype="FLOAT")
    again = data.SingingHead(root, "train", clip_frames=CLIP)[0]
    assert again["audio"].shape == item["audio"].shape
    inner = slice(200, -200)                                                   # away from the filters' edges
    error = again["audio"][inner] - item["audio"][inner]
    assert np.sqrt(np.mean(error ** 2)) < 0.01 * np.sqrt(np.mean(item["audio"] ** 2))


def test_truncated_wav_is_refused_naming_the_file(small_set, tmp_path):
    root = _copy(small_set, tmp_path)
    seq = data.read_split(root, "train")[0]
    path = root / "audio_seqs" / f"{seq}.wav"
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])                                      # cut by a second
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data.SingingHead(root, "train", clip_frames=CLIP)
    path.write_bytes(raw[:-100])                                               # cut by 50 samples: within a frame
    ds = data.SingingHead(root, "train", clip_frames=CLIP)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": truncated"):
        ds[ds.clips.index((seq, 0))]


def test_length_mismatch_within_a_frame_is_fitted_beyond_is_refused(small_set, tmp_path):
    import soundfile
    root = _copy(small_set, tmp_path)
    seq = data.read_split(root, "train")[0]
    path = root / "bgm_seqs" / f"{seq}_bgm.wav"
    music = soundfile.read(path, dtype="float32")[0]
    soundfile.write(path, music[:-300], data.SAMPLE_RATE, subtype="FLOAT")    # 300 samples short: padded
    ds = data.SingingHead(root, "train", clip_frames=CLIP)
    bgm = ds[ds.clips.index((seq, 0))]["bgm"]
    assert len(bgm) == len(music) and np.all(bgm[-300:] == 0)
    np.testing.assert_array_equal(bgm[:-300], music[:-300])
    soundfile.write(path, np.concatenate([music, music[:400]]), data.SAMPLE_RATE, subtype="FLOAT")   # long: cut
    ds = data.SingingHead(root, "train", clip_frames=CLIP)
    np.testing.assert_array_equal(ds[ds.clips.index((seq, 0))]["bgm"], music)
    soundfile.write(path, music[:-600], data.SAMPLE_RATE, subtype="FLOAT")    # more than a frame short
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": .* they may differ by one frame"):
        data.SingingHead(root, "train", clip_frames=CLIP)


def test_long_sequences_are_cut_into_clips_and_the_remainder_counted(small_set, tmp_path, capsys):
    root = _copy(small_set, tmp_path)
    seq = data.read_split(root, "train")[0]
    ds = data.SingingHead(root, "train", clip_frames=25)                      # 60 frames -> 2 clips + 10 left
    out = capsys.readouterr().out
    n_seq = len(ds.sequences)
    assert len(ds) == 2 * n_seq and f"dropped {10 * n_seq} frames" in out
    whole = ds.sequence(seq)
    second = ds[ds.clips.index((seq, 25))]
    np.testing.assert_array_equal(second["motion"], whole["motion"][25:50])
    a = round(25 * data.SAMPLE_RATE / data.FPS)
    np.testing.assert_array_equal(second["audio"], whole["audio"][a:a + len(second["audio"])])
    assert len(second["audio"]) == round(25 * data.SAMPLE_RATE / data.FPS)
    with pytest.raises(ValueError, match=r"train\.txt: no sequence holds a clip of 61 frames"):
        data.SingingHead(root, "train", clip_frames=61)


def test_empty_or_missing_split_is_refused_naming_the_split_file(small_set, tmp_path):
    root = _copy(small_set, tmp_path)
    (root / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match=re.escape(str(root / "val.txt")) + ": the split lists no sequence id"):
        data.SingingHead(root, "val", clip_frames=CLIP)
    (root / "test.txt").unlink()
    with pytest.raises(ValueError, match=re.escape(str(root / "test.txt")) + ": no such split file"):
        data.SingingHead(root, "test", clip_frames=CLIP)


def test_read_video_round_trip_frame_count_and_size(tmp_path):
    root = data.generate_dataset(tmp_path / "video", n_people=1, clips_per_person=3, clip_seconds=1,
                                 clips_per_song=3, video_size=64, video_clips=2, verbose=False)
    held_out = data.read_split(root, "val") + data.read_split(root, "test")
    assert sorted(p.stem for p in (root / "video_seqs").glob("*.mp4")) == sorted(held_out)
    path = root / "video_seqs" / f"{held_out[0]}.mp4"
    frames = data.read_video(path, size=64)
    assert frames.shape == (data.FPS, 64, 64, 3) and frames.dtype == np.uint8
    small = data.read_video(path, size=32)
    assert small.shape == (data.FPS, 32, 32, 3)
    reference = frames.reshape(data.FPS, 32, 2, 32, 2, 3).astype(np.float64).mean((2, 4))   # 2x2 area average
    assert np.abs(small - reference).mean() < 1.0
    # the head covers a good part of the picture and moves over time
    assert (frames[0].astype(int) - frames[0, 0, 0].astype(int)).any(-1).mean() > 0.2
    assert np.abs(frames.astype(int) - frames[:1]).max() > 10


def test_builtin_data_is_built_once_and_rebuilt_when_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "generate_dataset", functools.partial(
        data.generate_dataset, n_people=1, clips_per_person=3, clip_seconds=1, clips_per_song=3, with_video=False,
        verbose=False))
    root = data.builtin_data(tmp_path / "builtin")
    marker = root / "generator.json"
    stamp = marker.stat().st_mtime_ns
    assert data.builtin_data(tmp_path / "builtin") == root and marker.stat().st_mtime_ns == stamp
    monkeypatch.setattr(data, "BUILTIN_VERSION", data.BUILTIN_VERSION + 1)
    data.builtin_data(tmp_path / "builtin")
    assert marker.stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builtin"]          # no temporary folder left
