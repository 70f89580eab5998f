"""
SingingHead-layout data for UniSinger: the reader of the public release's folders (and the writer of its
take pickles), with the rules that keep a bad file from going unnoticed.

Layout (the SingingHead release's)
    root/train.txt val.txt test.txt    one sequence id a line, e.g. id0_2_1_0; the first field is the person
    root/flame_seqs/<id>.pkl           dict pickle: expcodes (T, 50+), posecodes (T, 9), shapecode, cam (T, 3)
    root/audio_seqs/<id>.wav           dry singing voice, any sample rate, mono or stereo
    root/bgm_seqs/<id>_bgm.wav         background music, same length
    root/video_seqs/<id>.mp4           portrait video, 30 fps (read only by the render stage)
The 59-d motion vector is [expression 50 | global 3 | neck 3 | jaw 3]: the pickle's expression columns
followed by its 9 pose columns, row t = video frame t at 30 fps.

Rules (bad input gets a one-line ValueError naming the file)
    - Pickle keys: expression from `expcodes` or `expression` (first 50 columns), pose from `posecodes` or
      `pose` (first 9 columns; 15-column full poses work too), shape from `shapecode` or `shape` (the first
      row, first 100 values), camera from `cam` or `camcodes` ((T, 3) or one row; DEFAULT_CAM when absent).
      A missing key, too few columns, rows that disagree, or NaN / inf is refused. Read as data only.
    - Length rule: T motion frames need round(T * 16000 / 30) audio samples; voice and music may differ from
      that by one frame's worth at most, and are then zero-padded or cut; a larger mismatch is refused.
    - Clips: a sequence is cut into consecutive clips of clip_frames frames; shorter remainders are dropped
      and counted. A split file that is missing or lists no id is refused.

Depends on torch, numpy, soundfile, imageio (+ imageio-ffmpeg) and our audio.py, flame.py and render.py.

Use alone:
    clips = SingingHead(root, "train")   # torch Dataset; clips[0]["motion"] is float32 (240, 59)
    frames = read_video(video_path(root, clips[0]["id"]), size=256)   # uint8 (T, 256, 256, 3)
"""
import pickle
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import render
from audio import FPS, SAMPLE_RATE, AudioFile, load_audio
from flame import N_EXPR, N_SHAPE, load_data_pickle

CLIP_SECONDS = 8                      # the release's sequence length
CLIP_FRAMES = CLIP_SECONDS * FPS      # 240 frames a clip
SPLITS = ("train", "val", "test")

EXPRESSION_KEYS = ("expcodes", "expression")
POSE_KEYS = ("posecodes", "pose")
SHAPE_KEYS = ("shapecode", "shape")
CAM_KEYS = ("cam", "camcodes")
N_POSE = 9                            # global 3 | neck 3 | jaw 3


# ----------------------------------------------------------------------------- reading

def _pick(d, keys, path):
    for key in keys:
        if key in d:
            return key, d[key]
    raise ValueError(f"{path}: missing key '{keys[0]}' (accepted spellings: {', '.join(keys)})")


def _finite_array(value, key, path):
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: '{key}' is not a numeric array ({e})") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: '{key}' holds NaN or inf")
    return array


def _columns(array, key, path, n):
    """(T, >= n) array -> (T, n) float32; anything else is refused."""
    if array.ndim != 2 or array.shape[1] < n:
        raise ValueError(f"{path}: '{key}' must be (frames, {n}+), got shape {array.shape}")
    return array[:, :n].astype(np.float32)


def read_flame_pickle(path):
    """
    A flame_seqs pickle -> dict(expression (T, 50), pose (T, 9), motion (T, 59) (the two joined), shape (100,),
    cam (T, 3) or None), float32.
    Key spellings and rules: see the module docstring. Read as data only: a pickle naming anything but arrays,
    numbers, strings and containers is refused before it is loaded (flame.DataUnpickler).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    d = load_data_pickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict of FLAME parameters, got {type(d).__name__}")
    key, value = _pick(d, EXPRESSION_KEYS, path)
    expression = _columns(_finite_array(value, key, path), key, path, N_EXPR)          # (T, 50)
    key, value = _pick(d, POSE_KEYS, path)
    pose = _columns(_finite_array(value, key, path), key, path, N_POSE)                # (T, 9)
    if len(pose) != len(expression):
        raise ValueError(f"{path}: '{key}' has {len(pose)} rows but the expression has {len(expression)}")
    key, value = _pick(d, SHAPE_KEYS, path)
    shape = _finite_array(value, key, path)
    shape = shape.reshape(1, -1) if shape.ndim == 1 else shape
    if shape.ndim != 2 or shape.shape[1] < N_SHAPE:
        raise ValueError(f"{path}: '{key}' must hold {N_SHAPE}+ values a row, got shape {shape.shape}")
    shape = shape[0, :N_SHAPE].astype(np.float32)                                       # (100,)
    cam = None
    if any(k in d for k in CAM_KEYS):
        key, value = _pick(d, CAM_KEYS, path)
        cam = _finite_array(value, key, path)
        cam = cam.reshape(1, 3) if cam.shape == (3,) else cam
        if cam.ndim != 2 or cam.shape[1] != 3 or len(cam) not in (1, len(expression)):
            raise ValueError(f"{path}: '{key}' must be ({len(expression)}, 3) or (3,), got shape {cam.shape}")
        cam = np.broadcast_to(cam, (len(expression), 3)).astype(np.float32)            # (T, 3)
    return dict(expression=expression, pose=pose, motion=np.concatenate([expression, pose], axis=1), shape=shape,
                cam=cam)


def write_flame_pickle(path, motion, shape, cam=None):
    """motion (T, 59), shape (100,), cam (T, 3) or None -> a pickle with the release's keys (protocol 2)."""
    motion = np.asarray(motion, dtype=np.float32)
    d = dict(expcodes=motion[:, :N_EXPR], posecodes=motion[:, N_EXPR:],
             shapecode=np.asarray(shape, dtype=np.float32).reshape(1, -1))
    if cam is not None:
        d["cam"] = np.asarray(cam, dtype=np.float32)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def audio_samples(path):
    """Length at SAMPLE_RATE of the audio file at path: from its header where libsndfile reads it (no decoding),
    else decoded as load_audio decodes it (a song in a container libsndfile does not know)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError):           # soundfile's errors derive from RuntimeError
        return len(AudioFile(path, SAMPLE_RATE))
    return round(info.frames * SAMPLE_RATE / info.samplerate)


def flame_path(root, seq):
    return Path(root) / "flame_seqs" / f"{seq}.pkl"


def audio_path(root, seq):
    return Path(root) / "audio_seqs" / f"{seq}.wav"


def bgm_path(root, seq):
    return Path(root) / "bgm_seqs" / f"{seq}_bgm.wav"


def video_path(root, seq):
    return Path(root) / "video_seqs" / f"{seq}.mp4"


def split_path(root, split):
    return Path(root) / f"{split}.txt"


def read_split(root, split):
    """Sequence ids listed in root/<split>.txt (blank lines ignored)."""
    path = split_path(root, split)
    if not path.is_file():
        raise ValueError(f"{path}: no such split file")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: the split lists no sequence id")
    return ids


def _check_length(n_audio, n, path):
    """The length rule: audio of n_audio samples for motion needing n samples, at most one frame off."""
    if abs(n_audio - n) > SAMPLE_RATE / FPS:
        raise ValueError(f"{path}: {n_audio / SAMPLE_RATE:.3f} s of audio for {n / SAMPLE_RATE:.3f} s of "
                         f"motion; they may differ by one frame ({1 / FPS:.3f} s) at most")


def fit_length(x, n):
    """A 1-D signal cut or zero-padded to n samples."""
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


def _fit(audio, n, path):
    """audio (N,) zero-padded or cut to exactly n samples, after the length rule."""
    _check_length(len(audio), n, path)
    return fit_length(audio, n)


def clip_samples(n_frames):
    """Audio samples that belong to n_frames motion frames: also the first sample of frame n_frames."""
    return round(n_frames * SAMPLE_RATE / FPS)


def song_frames(n_samples):
    """Whole motion frames in n_samples of audio."""
    return int(n_samples * FPS // SAMPLE_RATE)


class SingingHead(Dataset):
    """
    Clips of a SingingHead-layout folder (see the module docstring for the rules). Item:
        id str (sequence id), person str (its first field), start int (first frame of the clip in the sequence),
        audio float32 (clip_frames / 30 * 16000,), bgm float32 (same), motion float32 (clip_frames, 59),
        shape float32 (100,), cam float32 (clip_frames, 3)
    Pickles and wav headers are checked when the data set is made; audio is decoded on first use and, with
    cache=True, kept in memory (about 1 MB a sequence of 8 s).
    """

    def __init__(self, root, split="train", clip_frames=CLIP_FRAMES, cache=True):
        self.root, self.split, self.clip_frames, self.cache = Path(root), split, clip_frames, cache
        self.sequences = read_split(self.root, split)
        self.clips = []            # (sequence id, first frame)
        dropped_frames, dropped_sequences = 0, 0
        for seq in self.sequences:
            flame = read_flame_pickle(flame_path(self.root, seq))
            n_frames = len(flame["expression"])
            n = clip_samples(n_frames)
            for path in (audio_path(self.root, seq), bgm_path(self.root, seq)):
                _check_length(audio_samples(path), n, path)
            n_clips = n_frames // clip_frames
            self.clips += [(seq, k * clip_frames) for k in range(n_clips)]
            dropped_frames += n_frames - n_clips * clip_frames
            dropped_sequences += n_clips == 0
        if dropped_frames:
            print(f"SingingHead {self.root / f'{split}.txt'}: dropped {dropped_frames} frames "
                  f"({dropped_frames / FPS:.1f} s) shorter than a {clip_frames}-frame clip, "
                  f"{dropped_sequences} of {len(self.sequences)} sequences entirely")
        if not self.clips:
            raise ValueError(f"{self.root / f'{split}.txt'}: no sequence holds a clip of {clip_frames} frames")
        self.people = sorted({seq.split("_")[0] for seq in self.sequences})
        self._loaded = {}

    def sequence(self, seq):
        """Whole sequence: dict(motion (T, 59), shape (100,), cam (T, 3), audio (N,), bgm (N,)), N exact."""
        if seq in self._loaded:
            return self._loaded[seq]
        flame = read_flame_pickle(flame_path(self.root, seq))
        n_frames = len(flame["expression"])
        n = clip_samples(n_frames)
        cam = flame["cam"]
        if cam is None:
            cam = np.broadcast_to(np.asarray(render.DEFAULT_CAM, dtype=np.float32), (n_frames, 3))
        loaded = dict(motion=flame["motion"],                                                 # (T, 59)
                      shape=flame["shape"], cam=np.ascontiguousarray(cam),
                      audio=_fit(load_audio(audio_path(self.root, seq), SAMPLE_RATE), n, audio_path(self.root, seq)),
                      bgm=_fit(load_audio(bgm_path(self.root, seq), SAMPLE_RATE), n, bgm_path(self.root, seq)))
        if self.cache:
            self._loaded[seq] = loaded
        return loaded

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        seq, start = self.clips[i]
        s = self.sequence(seq)
        stop = start + self.clip_frames
        a, b = clip_samples(start), clip_samples(start) + clip_samples(self.clip_frames)
        return dict(id=seq, person=seq.split("_")[0], start=start,
                    audio=s["audio"][a:b].astype(np.float32), bgm=s["bgm"][a:b].astype(np.float32),
                    motion=s["motion"][start:stop].copy(), shape=s["shape"].copy(), cam=s["cam"][start:stop].copy())


def _resize_square(frames, size):
    """uint8 (n, H, W, 3) tensor -> centre square crop resized to size (area when shrinking) -> uint8."""
    h, w = frames.shape[1:3]
    side = min(h, w)
    frames = frames[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    if side == size:
        return frames
    x = frames.permute(0, 3, 1, 2).float()                                             # (n, 3, side, side)
    mode = dict(mode="area") if size < side else dict(mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=(size, size), **mode)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def read_video(path, size=256, batch=32):
    """mp4 -> uint8 (T, size, size, 3) (centre-cropped to a square if needed; size=None keeps the original)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        reader = imageio.get_reader(str(path), "ffmpeg")
    except Exception as e:
        raise ValueError(f"{path}: unreadable video ({e})") from None
    out, pending = [], []
    try:
        with reader:
            for frame in reader:
                pending.append(torch.from_numpy(np.asarray(frame)[..., :3]))
                if len(pending) == batch:
                    out.append(_resize_square(torch.stack(pending), size or min(pending[0].shape[:2])))
                    pending = []
    except Exception as e:                      # ffmpeg stops on damaged data in many ways; imageio raises them all
        raise ValueError(f"{path}: unreadable video ({' '.join(str(e).split())[:300]})") from None
    if pending:
        out.append(_resize_square(torch.stack(pending), size or min(pending[0].shape[:2])))
    if not out:
        raise ValueError(f"{path}: the video holds no frame")
    return torch.cat(out).numpy()
