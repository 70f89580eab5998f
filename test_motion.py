"""Tests of the motion stage: the CVAE's structure, whole-song generation, training, resume and learning."""
import pickle
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile
import torch

import data
import train
import unisinger
from unisinger import CLIP_FRAMES, FPS, MotionConfig, MotionCVAE, alignment_mask, generate, load_checkpoint

LEARN_EPOCHS = 30            # ~240 steps of batch 4: enough for the tiny model on the small set below


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MotionCVAE(MotionConfig.preset("tiny")).eval()


def test_alignment_mask_lets_motion_frame_t_see_only_audio_frame_t():
    mask = alignment_mask(2, 5, "cpu")                       # True = blocked
    assert mask.shape == (7, 5)
    assert not mask[:2].any()                                # [mu] [sigma] see every audio token
    assert torch.equal(~mask[2:], torch.eye(5, dtype=torch.bool))


def test_decoder_frame_depends_on_its_own_audio_frame_only_through_cross_attention():
    """With the decoder's self-attention cut to the diagonal too, frame t's output may only move when audio
    token t moves: this checks that the mask really reaches the cross-attention."""
    model = tiny_model()
    T, d = 12, model.cfg.d_model
    audio = torch.randn(1, T, d)
    shape, z = torch.zeros(1, 100), torch.randn(1, d)
    for layer in model.decoder.layers:                        # self-attention off: no mixing between frames
        layer.self_attn.out_proj.weight.data.zero_()
        layer.self_attn.out_proj.bias.data.zero_()
    with torch.no_grad():
        before = model.decode(z, shape, audio)
        moved = audio.clone()
        moved[0, 7] += 1.0
        after = model.decode(z, shape, moved)
    changed = (after - before).abs().amax(-1)[0] > 1e-6       # (T,)
    assert changed.tolist() == [t == 7 for t in range(T)]


@pytest.mark.parametrize("seconds", [3.0, 8.0, 20.3])
def test_generate_gives_one_frame_per_thirtieth_of_a_second_for_any_length(seconds):
    voice = np.random.default_rng(0).standard_normal(int(seconds * data.SAMPLE_RATE)).astype(np.float32) * 0.1
    motion = generate(tiny_model(), voice, None, None, n_samples=2)
    assert motion.shape == (2, int(seconds * FPS), 59)
    assert np.isfinite(motion).all()


def test_generate_on_one_window_equals_the_decoder_on_that_window():
    model = tiny_model()
    voice = np.random.default_rng(1).standard_normal(8 * data.SAMPLE_RATE).astype(np.float32) * 0.1
    got = generate(model, voice, None, None, n_samples=1, seed=3)
    z = torch.randn(1, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    feats = model.voice_features(torch.from_numpy(voice)[None], CLIP_FRAMES)
    music = unisinger.mfcc_at_fps(torch.zeros(1, len(voice)), data.SAMPLE_RATE, CLIP_FRAMES)
    want = model.sample(torch.zeros(1, 100), feats, music, z=z).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_window_blend_weights_cover_every_frame_and_fade_linearly():
    starts = unisinger.window_starts(600, CLIP_FRAMES, 60)
    assert starts[0] == 0 and starts[-1] == 600 - CLIP_FRAMES
    assert all(b - a <= CLIP_FRAMES - 60 for a, b in zip(starts, starts[1:]))
    ramp = unisinger.blend_weights(CLIP_FRAMES, 60)[:, 0]
    assert torch.allclose(ramp[:60] + ramp[-60:], torch.ones(60))     # fade-out of one + fade-in of the next
    assert (ramp[60:-60] == 1).all()


def test_missing_checkpoint_says_what_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.py --stage motion"):
        load_checkpoint(tmp_path / "none.pt")


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion_data")
    return data.generate_dataset(root, n_people=4, clips_per_person=10, with_video=False, verbose=False)


@pytest.fixture(scope="module")
def trained(small_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("motion_run")
    train.main(["--stage", "motion", "--data", str(small_set), "--out", str(out), "--epochs", str(LEARN_EPOCHS),
                "--batch-size", "4", "--lr", "3e-3", "--no-summary"])
    return out


def test_training_writes_best_and_last_checkpoints_that_load(trained):
    for name in ("best.pt", "last.pt"):
        model = load_checkpoint(trained / name)
        assert isinstance(model, MotionCVAE) and not model.training
        assert set(model.people) == {"id0", "id1", "id2", "id3"}


def test_tiny_model_learns_singing_motion_and_uses_the_audio(trained, small_set):
    """Issue 4's bar on the test split: LVE <= half the mean-motion baseline's, much worse when deaf, and
    diverse samples that stay close to the truth."""
    args = train.parse_args(["--stage", "motion"])
    rows = train.motion_summary(load_checkpoint(trained / "best.pt"), small_set, args)
    ours, base, deaf = rows["UniSinger"], rows["mean motion"], rows["UniSinger, silence"]
    assert ours["LVE-mean"] <= 0.5 * base["LVE-mean"]
    assert deaf["LVE-mean"] >= 1.5 * ours["LVE-mean"]
    assert ours["Diversity"] > 0
    assert ours["LVE-min"] < ours["LVE-mean"]


def test_long_song_windows_join_without_a_seam(trained):
    """A 20 s song is made of several overlapping windows: the frame-to-frame change at every join stays within
    the range of changes seen inside the windows."""
    model = load_checkpoint(trained / "best.pt")
    rng = np.random.default_rng(5)
    song = data.compose_song(rng, 20.0, 60)
    person = data.make_person(0, 0)
    voice = data.sing(song, person, rng)[0]
    music = data.play_music(song, rng)
    motion = generate(model, voice, music, person.shape, n_samples=2)
    speed = np.abs(np.diff(motion, axis=1)).max(-1)                       # (S, T-1)
    starts = unisinger.window_starts(motion.shape[1], CLIP_FRAMES, 60)[1:]
    joins = np.unique(np.concatenate([np.arange(s - 2, s + 62) for s in starts]))
    inside = np.setdiff1d(np.arange(speed.shape[1]), joins)
    assert speed[:, joins].max() <= speed[:, inside].max()


def test_cli_writes_motion_pickle_landmarks_and_a_preview_with_sound(trained, small_set, tmp_path):
    item = data.SingingHead(small_set, "test")[0]
    soundfile.write(tmp_path / "voice.wav", np.stack([item["audio"], item["audio"]], 1), data.SAMPLE_RATE)
    soundfile.write(tmp_path / "bgm.wav", item["bgm"], data.SAMPLE_RATE)
    out = tmp_path / "song"
    unisinger.main(["--audio", str(tmp_path / "voice.wav"), "--bgm", str(tmp_path / "bgm.wav"), "--checkpoint",
                    str(trained / "best.pt"), "--person", "id1", "--samples", "2", "--out", str(out)])
    n_frames = len(item["audio"]) * FPS // data.SAMPLE_RATE
    for k in range(2):
        with np.load(out / f"sample_{k}.npz") as z:
            assert z["motion"].shape[1:] == (59,) and z["landmarks"].shape[1:] == (68, 3)
            assert len(z["landmarks"]) == len(z["motion"]) == n_frames
        again = data.read_flame_pickle(out / f"sample_{k}.pkl")
        np.testing.assert_allclose(np.concatenate([again["expression"], again["pose"]], 1),
                                   np.load(out / f"sample_{k}.npz")["motion"], atol=1e-6)
        probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out / f"sample_{k}.mp4")],
                               capture_output=True, text=True).stderr
        assert "Video:" in probe and "Audio:" in probe


def test_resumed_run_continues_exactly(small_set, tmp_path, monkeypatch):
    args = ["--stage", "motion", "--data", str(small_set), "--epochs", "2", "--batch-size", "8", "--no-summary"]
    train.main(args + ["--out", str(tmp_path / "straight")])

    real_save = train.Run.save

    def save_then_stop(run, state, name):              # the process dies right after its first checkpoint
        real_save(run, state, name)
        if name == "last.pt":
            raise KeyboardInterrupt
    monkeypatch.setattr(train.Run, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(train.Run, "save", real_save)
    train.main(args + ["--out", str(tmp_path / "resumed"), "--resume"])

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] and a["val"] == b["val"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
