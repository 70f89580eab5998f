"""Tests of the render stage: training runs, checkpoints, exact resume, learning, and the portrait video.

Everything runs on a one-person data set of 1 s sequences made in a temporary folder, with a 'micro' renderer
(the same 8 levels at 128² and a few channels) so the whole file takes well under a minute on 2 cores.
"""
import subprocess
from dataclasses import asdict

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

import data
import render
import train
import unisinger
from flame import Flame

MICRO = render.RendererConfig(channels=(4, 8, 16, 16, 16, 16, 16, 16),
                                    discriminator_channels=(8, 16, 16, 16), image_size=128)
SIZE = MICRO.image_size


@pytest.fixture(scope="module")
def person(tmp_path_factory):
    """id0 with one 1 s sequence in each split, all filmed at 128²."""
    root = tmp_path_factory.mktemp("render_data") / "set"
    return data.generate_dataset(root, n_people=1, clips_per_person=3, clip_seconds=1, clips_per_song=3,
                                 video_size=SIZE, video_clips=3, verbose=False)


@pytest.fixture(autouse=True, scope="module")
def micro_preset():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(render.RENDERER_PRESETS, "micro", MICRO)
        yield


def render_args(root, out, *extra):
    args = train.parse_args(["--stage", "render", "--data", str(root), "--out", str(out), "--device", "cpu",
                             "--batch-size", "2", "--seed", "3", *extra])
    args.preset = "micro"
    return args


def train_render(args):
    run = train.Run(args)
    try:
        return train.train_render(args, run)
    finally:
        run.close()


@pytest.fixture(scope="module")
def trained(person, tmp_path_factory):
    """One epoch on the tiny person; returns (out folder, result, printed text)."""
    out = tmp_path_factory.mktemp("render_run")
    with pytest.MonkeyPatch.context() as patch:
        lines = []
        patch.setattr(train.Run, "log", lambda self, *msg: lines.append(" ".join(map(str, msg))))
        result = train_render(render_args(person, out, "--epochs", "1"))
    return out, result, "\n".join(lines)


def test_render_run_writes_checkpoints_grid_and_reference(person, trained):
    out, result, _ = trained
    for name in ("best.pt", "last.pt", "reference.png"):
        assert (out / name).is_file(), name
    grid = imageio.imread(out / "samples_000.png")
    assert grid.shape == (4 * SIZE, 3 * SIZE, 3) and grid.dtype == np.uint8    # 4 rows of depth | generated | truth
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["renderer_config"] == asdict(MICRO)
    assert ckpt["person"] == "id0" and len(ckpt["cam"]) == 3
    seq = train.person_sequences(person, "train", "id0")[0]
    true_cam = data.read_flame_pickle(person / "flame_seqs" / f"{seq}.pkl")["cam"]                # (T, 3)
    assert np.allclose(ckpt["cam"], true_cam[::train.RENDER_FRAME_STRIDE].mean(0), atol=1e-5)
    assert set(result["summary"]) >= {"renderer", "copy_reference"}


def test_render_run_without_vgg_says_once_the_perceptual_term_is_off(trained):
    _, result, text = trained
    assert text.count("perceptual (VGG-19) loss term is off") == 1
    assert "vgg19-dcbfe0e4.pth" in text
    assert all("perceptual" not in epoch["train"] for epoch in result["history"])


def test_missing_vgg_file_is_refused_naming_it(person, tmp_path):
    with pytest.raises(ValueError, match="nowhere.pth"):
        train_render(render_args(person, tmp_path, "--epochs", "1", "--vgg", str(tmp_path / "nowhere.pth")))


def test_person_without_videos_is_refused_naming_the_split_file(person):
    with pytest.raises(ValueError, match=r"train\.txt: person 'id7' has no sequence with a video"):
        train.person_sequences(person, "train", "id7")


def test_render_resume_gives_the_same_losses_as_an_uninterrupted_run(person, tmp_path, monkeypatch):
    whole = train_render(render_args(person, tmp_path / "whole", "--epochs", "2"))

    class Interrupted(Exception):
        pass

    save = train.Run.save

    def save_then_stop(self, state, name):
        save(self, state, name)
        if name == "last.pt":
            raise Interrupted

    monkeypatch.setattr(train.Run, "save", save_then_stop)
    with pytest.raises(Interrupted):
        train_render(render_args(person, tmp_path / "cut", "--epochs", "2"))
    monkeypatch.setattr(train.Run, "save", save)
    resumed = train_render(render_args(person, tmp_path / "cut", "--epochs", "2", "--resume"))

    assert len(resumed["history"]) == 1
    assert resumed["history"][0] == whole["history"][1]
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["generator"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["generator"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_render_training_beats_copying_the_reference(person, tmp_path, monkeypatch):
    monkeypatch.setattr(train_render_wip, "RENDER_FRAME_STRIDE", 1)              # all 30 frames of each split
    result = train_render(render_args(person, tmp_path, "--epochs", "10", "--lr", "1e-2"))
    s = result["summary"]
    assert s["frames"] == 30
    assert s["renderer"]["ssim"] > s["copy_reference"]["ssim"]


def video_streams(path):
    """ffmpeg's stream lines for a media file."""
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                           capture_output=True, text=True)
    return [line for line in probe.stderr.splitlines() if "Stream #" in line]


def test_portrait_video_writes_frames_sound_and_the_depth_video(person, trained, tmp_path):
    out, _, _ = trained
    seq = train.person_sequences(person, "test", "id0")[0]
    params = data.read_flame_pickle(person / "flame_seqs" / f"{seq}.pkl")
    motion = np.concatenate([params["expression"], params["pose"]], 1)[:21]          # (21, 59): 2 batches + 5
    voice = (0.1 * np.sin(np.arange(round(21 / 30 * 16000)) * 0.05)).astype(np.float32)
    flame = Flame.procedural()
    video = unisinger.portrait_video(out / "best.pt", out / "reference.png", flame, params["shape"], motion,
                                        tmp_path / "song" / "portrait.mp4", audio=voice, batch=8)
    depth_video = tmp_path / "song" / "depth.mp4"
    assert video == tmp_path / "song" / "portrait.mp4"
    for path in (video, depth_video):
        assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 21
        streams = video_streams(path)
        assert any("Video:" in s for s in streams) and any("Audio:" in s for s in streams), streams

    cam = torch.load(out / "best.pt", weights_only=False)["cam"]
    with torch.no_grad():
        verts = flame.from_motion(torch.as_tensor(params["shape"]), torch.as_tensor(motion))
        expected = render.render_depth(verts, flame.faces, torch.tensor(cam), SIZE)[:, 0].numpy() * 255
    decoded = data.read_video(depth_video, SIZE)[..., 0].astype(np.float64)
    assert np.abs(decoded - expected).mean() < 3.0
