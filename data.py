"""
SingingHead-layout data for UniSinger: the reader of the public release's folders (and the writer of its take
pickles), with the rules that keep a bad file from going unnoticed; below the banner, what every command shares.

Layout (the SingingHead release's)
    root/train.txt val.txt test.txt    one sequence id a line, e.g. id0_2_1_0; the first field is the person
    root/flame_seqs/<id>.pkl           dict pickle: expcodes (T, 50+), posecodes (T, 9), shapecode, cam (T, 3)
    root/audio_seqs/<id>.wav           dry singing voice, any sample rate, mono or stereo
    root/bgm_seqs/<id>_bgm.wav         background music, same length
    root/video_seqs/<id>.mp4           portrait video, 30 fps (read only by the render stage)
The 59-d motion vector is [expression 50 | global 3 | neck 3 | jaw 3], row t = video frame t at 30 fps.

Rules (bad input gets a one-line ValueError naming the file)
    - Pickle keys: expression `expcodes` / `expression` (first 50 columns), pose `posecodes` / `pose` (first 9
      of 9 or 15), shape `shapecode` / `shape` (first row, first 100), camera `cam` / `camcodes` ((T, 3) or one
      row; DEFAULT_CAM when absent). Missing keys, too few columns, unequal rows, NaN / inf: refused. Read as data.
    - Length rule: T motion frames need round(T * 16000 / 30) audio samples; voice and music one frame's worth
      off at most are zero-padded or cut, others refused. Clips: consecutive runs of clip_frames frames, shorter
      remainders dropped and counted. A split file that is missing or lists no id is refused.
    - Index (SplitIndex, a file per split in index_dir): each sequence's frame count, motion sums and shape, with
      its files' size and mtime_ns; an entry is made again when a file changes or is too new to tell (RACY_NS).
      Items are read from the files per item (memory does not grow with the data set), and a file changed since
      it was indexed is refused or re-read, never served stale.

Depends on torch, numpy, soundfile, imageio (+ imageio-ffmpeg) and our audio.py and flame.py.

Use alone:
    clips = SingingHead(root, "train")   # torch Dataset; clips[0]["motion"] is float32 (240, 59)
    frames = read_video(video_path(root, clips[0]["id"]), size=256)   # uint8 (T, 256, 256, 3)
"""
import argparse
import contextlib
import errno
import fcntl
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from fractions import Fraction
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from audio import FPS, SAMPLE_RATE, AudioFile, load_audio
from flame import MOTION_DIM, N_EXPR, N_SHAPE, load_data_pickle, read_torch_data

CLIP_SECONDS = 8                      # the release's sequence length
CLIP_FRAMES = CLIP_SECONDS * FPS      # 240 frames a clip
SPLITS = ("train", "val", "test")

EXPRESSION_KEYS, POSE_KEYS = ("expcodes", "expression"), ("posecodes", "pose")     # the accepted spellings of each
SHAPE_KEYS, CAM_KEYS = ("shapecode", "shape"), ("cam", "camcodes")
DEFAULT_CAM = (6.5, 0.0, 0.035)       # DECA's [scale, tx, ty (m)] for a pickle without one: crown to neck in view
N_POSE = 9                            # global 3 | neck 3 | jaw 3
CACHE_DIR = ".unisinger"              # in a writable data folder: the index and the render stage's frames
INDEX_VERSION = 1                     # of the index files' layout; another version's file is made again
RACY_NS = 2_000_000_000               # ns: a change this close before an entry was made may hide in a timestamp tick
INDEX_PROGRESS_LINES = 10             # progress lines while indexing, at most
INDEX_PROGRESS_MIN = 200              # sequences to index before progress lines are worth printing
INDEX_PARALLEL_MIN = 500              # sequences to index before a process per core pays for its start-up
INDEX_CHUNK = 64                      # sequences a pool process indexes per task


def _pick(d, keys, path, columns=None):
    """(key, float64 array) of the first of keys in d, or with columns=n (key, its first n columns as float32 (T, n));
    a missing key, a non-numeric or non-finite array, or one not (frames, n+) is refused."""
    key = next((k for k in keys if k in d), None)
    if key is None:
        raise ValueError(f"{path}: missing key '{keys[0]}' (accepted spellings: {', '.join(keys)})")
    try:
        array = np.asarray(d[key], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: '{key}' is not a numeric array ({e})") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: '{key}' holds NaN or inf")
    if columns is None:
        return key, array
    if array.ndim != 2 or array.shape[1] < columns:
        raise ValueError(f"{path}: '{key}' must be (frames, {columns}+), got shape {array.shape}")
    return key, array[:, :columns].astype(np.float32)


def read_flame_pickle(path):
    """A flame_seqs pickle -> dict(expression (T, 50), pose (T, 9), motion (T, 59) (the two joined), shape (100,),
    cam (T, 3) or None), float32; rules in the module docstring. Read as data only (flame.DataUnpickler): a pickle
    naming anything but arrays, numbers, strings and containers is refused before it is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    d = load_data_pickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict of FLAME parameters, got {type(d).__name__}")
    _, expression = _pick(d, EXPRESSION_KEYS, path, N_EXPR)                           # (T, 50)
    key, pose = _pick(d, POSE_KEYS, path, N_POSE)                                       # (T, 9)
    if len(pose) != len(expression):
        raise ValueError(f"{path}: '{key}' has {len(pose)} rows but the expression has {len(expression)}")
    key, shape = _pick(d, SHAPE_KEYS, path)
    shape = shape.reshape(1, -1) if shape.ndim == 1 else shape
    if shape.ndim != 2 or shape.shape[1] < N_SHAPE:
        raise ValueError(f"{path}: '{key}' must hold {N_SHAPE}+ values a row, got shape {shape.shape}")
    shape = shape[0, :N_SHAPE].astype(np.float32)                                       # (100,)
    cam = None
    if any(k in d for k in CAM_KEYS):
        key, cam = _pick(d, CAM_KEYS, path)
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


def clip_samples(n_frames):
    """Audio samples that belong to n_frames motion frames: also the first sample of frame n_frames."""
    return round(n_frames * SAMPLE_RATE / FPS)


def song_frames(n_samples):
    """Whole motion frames in n_samples of audio."""
    return int(n_samples * FPS // SAMPLE_RATE)


def cache_folder(root, fallback):
    """Where caches of the data set at root go: root/.unisinger when the data folder is writable (every run and
    every torchrun process then shares them), else `fallback` (e.g. beside the run)."""
    root = Path(root)
    return root / CACHE_DIR if os.access(root, os.W_OK) else Path(fallback)


def file_stamps(paths):
    """(size, mtime_ns) of each file, flattened to int64 (2 * len(paths),): a rewrite or a cut changes them."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            raise ValueError(f"{path}: no such file") from None
        stamps += [stat.st_size, stat.st_mtime_ns]
    return np.array(stamps, dtype=np.int64)


def sequence_files(root, seq):
    """The files a sequence's motion-stage item is read from: its pickle, voice and music, as the strings
    flame_path, audio_path and bgm_path make (without pathlib, which is slow enough to matter at 10^4 ids)."""
    return f"{root}/flame_seqs/{seq}.pkl", f"{root}/audio_seqs/{seq}.wav", f"{root}/bgm_seqs/{seq}_bgm.wav"


def index_entry(root, seq, clip_frames):
    """One sequence checked and summarised: (frames, frames in clips, their motion's float64 mean (59,) and sum of
    squared deviations (59,), shape (100,)). Refusals as reading an item would refuse (ValueError naming the file)."""
    flame = read_flame_pickle(flame_path(root, seq))
    n_frames = len(flame["expression"])
    n = clip_samples(n_frames)
    for path in (audio_path(root, seq), bgm_path(root, seq)):
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:                            # the length at SAMPLE_RATE from the header where libsndfile reads it
            info = soundfile.info(str(path))
            n_audio = round(info.frames * SAMPLE_RATE / info.samplerate)
        except (RuntimeError, OSError):     # soundfile's errors: a container it cannot read, decoded as load_audio does
            n_audio = len(AudioFile(path, SAMPLE_RATE))
        _check_length(n_audio, n, path)
    used = n_frames // clip_frames * clip_frames
    motion = flame["motion"][:used].astype(np.float64)                                   # (used, 59)
    mean = motion.mean(0) if used else np.zeros(MOTION_DIM)
    return n_frames, used, mean, ((motion - mean) ** 2).sum(0), flame["shape"]


def _stamped_entry(job):
    """index_entry of (root, seq, clip_frames) as an index row, with its files' stamps taken before reading."""
    root, seq, clip_frames = job
    checked = time.time_ns()                          # before the files are read: a write during it is too new
    stamps = file_stamps(sequence_files(root, seq))
    n_frames, used, mean, m2, shape = index_entry(root, seq, clip_frames)
    return dict(stamps=stamps, checked=checked, frames=n_frames, used=used, mean=mean, m2=m2, shape=shape)


class SplitIndex:
    """A split's index, made or brought up to date by `load_or_build` (kept in index_dir, or in memory if None): per
    sequence of the split file, in its order, arrays of
        stamps (S, 6) int64   size and mtime_ns of the pickle, voice and music (file_stamps)
        checked (S,) int64    time.time_ns() just before the entry's files were read
        frames, used (S,)     frames of the sequence, and those in whole clips
        mean, m2 (S, 59)      float64 mean and sum of squared deviations of the frames in clips
        shape (S, 100)        float32 FLAME shape"""
    FIELDS = ("stamps", "checked", "frames", "used", "mean", "m2", "shape")

    def __init__(self, arrays):
        for key in self.FIELDS:
            setattr(self, key, arrays[key])

    @classmethod
    def load_or_build(cls, root, split, sequences, clip_frames, index_dir=None):
        """The split's index: entries of the stored file whose files are unchanged (and old enough to tell) are
        kept, the others are made again (with progress when there are many), and the file is rewritten when any
        was. One process at a time per folder (an flock): torchrun's ranks wait for the first, then reuse its work."""
        if index_dir is None:
            return cls._update(root, split, sequences, clip_frames, {})[0]
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        path = index_dir / f"index_{split}_{clip_frames}.npz"
        with open(index_dir / "index.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes, or its process dies
            started = time.perf_counter()
            index, made = cls._update(root, split, sequences, clip_frames, cls._read(path, clip_frames))
            if made:
                with atomic_output(path) as tmp:
                    np.savez(tmp, version=INDEX_VERSION, clip_frames=clip_frames, ids=np.array(sequences),
                             **{key: getattr(index, key) for key in cls.FIELDS})
                print(f"indexed {made} of the {len(sequences)} sequences of {Path(root) / f'{split}.txt'} in "
                      f"{time.perf_counter() - started:.1f} s: {path}", flush=True)
        return index

    @staticmethod
    def _read(path, clip_frames):
        """The stored entries as id -> row of each array, or {} when there is no usable file (said when one is
        damaged: it is then made again, never trusted)."""
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {key: z[key] for key in ("version", "clip_frames", "ids") + SplitIndex.FIELDS}
        except Exception as e:                          # a cut or foreign file fails in numpy's many ways
            print(f"{path}: unreadable index ({' '.join(str(e).split())[:200]}); making it again", flush=True)
            return {}
        ids = arrays.pop("ids")
        if arrays.pop("version") != INDEX_VERSION or arrays.pop("clip_frames") != clip_frames or \
                any(len(a) != len(ids) for a in arrays.values()):
            return {}
        return {seq: {key: a[i] for key, a in arrays.items()} for i, seq in enumerate(ids.tolist())}

    @classmethod
    def _update(cls, root, split, sequences, clip_frames, stored):
        """(index, entries made) from `stored` (id -> row): a row is kept while its files' stamps are the same
        and every file was older than RACY_NS when the row was made; the others are made again."""
        rows, todo = [], []
        for i, seq in enumerate(sequences):
            stamps = file_stamps(sequence_files(root, seq))
            row = stored.get(seq)
            fresh = row is not None and np.array_equal(row["stamps"], stamps) and \
                stamps[1::2].max() < row["checked"] - RACY_NS
            rows.append(row if fresh else None)
            if not fresh:
                todo.append(i)
        # the rate over every entry so far: the pool hands entries back a chunk at a time, in bursts
        progress = Progress(len(todo), "sequence", lines=INDEX_PROGRESS_LINES, window=len(todo))
        cores, pool = cpu_cores(), None
        if len(todo) >= INDEX_PARALLEL_MIN and cores >= 2:   # a process per core: reading a pickle is pure Python
            from concurrent.futures import ProcessPoolExecutor
            pool = ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork"))
        with pool or contextlib.nullcontext():
            jobs = [(root, sequences[i], clip_frames) for i in todo]
            made = pool.map(_stamped_entry, jobs, chunksize=INDEX_CHUNK) if pool else map(_stamped_entry, jobs)
            for i, row in zip(todo, made):
                rows[i] = row
                if len(todo) >= INDEX_PROGRESS_MIN and progress.advance():
                    print(progress.line(f"indexing {Path(root) / f'{split}.txt'}:"), flush=True)
        return cls({key: np.stack([np.asarray(row[key]) for row in rows]) for key in cls.FIELDS}), len(todo)

    def motion_stats(self):
        """Mean and (unbiased) std of every motion frame in the split's clips, (59,) float32 tensors each: the
        sequences' float64 sums merged pairwise-exactly (Chan et al.), so no pass over the motion is needed."""
        keep = self.used > 0
        used, mean, m2 = self.used[keep].astype(np.float64), self.mean[keep], self.m2[keep]
        total = used.sum()
        grand = (used[:, None] * mean).sum(0) / total
        spread = m2.sum(0) + (used[:, None] * (mean - grand) ** 2).sum(0)
        return (torch.from_numpy(grand.astype(np.float32)),
                torch.from_numpy(np.sqrt(spread / (total - 1)).astype(np.float32)))


class SingingHead(Dataset):
    """Clips of a SingingHead-layout folder (rules: the module docstring). Item: id str (sequence id), person str
    (its first field), start int (the clip's first frame), audio float32 (clip_frames / 30 * 16000,), bgm float32
    (same), motion float32 (clip_frames, 59), shape float32 (100,), cam float32 (clip_frames, 3).
    Every sequence is checked when the data set is made, through its SplitIndex (in index_dir when given: later
    runs check only the files that changed); items are read from the files, so memory holds the index alone."""

    def __init__(self, root, split="train", clip_frames=CLIP_FRAMES, index_dir=None):
        self.root, self.split, self.clip_frames = Path(root), split, clip_frames
        self.sequences = read_split(self.root, split)
        self.index = SplitIndex.load_or_build(self.root, split, self.sequences, clip_frames, index_dir)
        self.clips = [(seq, k * clip_frames) for seq, n_frames in zip(self.sequences, self.index.frames.tolist())
                      for k in range(n_frames // clip_frames)]                  # (sequence id, first frame)
        dropped_frames = int((self.index.frames - self.index.used).sum())
        if dropped_frames:
            print(f"SingingHead {self.root / f'{split}.txt'}: dropped {dropped_frames} frames "
                  f"({dropped_frames / FPS:.1f} s) shorter than a {clip_frames}-frame clip, "
                  f"{int((self.index.used == 0).sum())} of {len(self.sequences)} sequences entirely")
        if not self.clips:
            raise ValueError(f"{self.root / f'{split}.txt'}: no sequence holds a clip of {clip_frames} frames")
        self.people = sorted({seq.split("_")[0] for seq in self.sequences})
        self._frames = dict(zip(self.sequences, self.index.frames.tolist()))

    def first_shapes(self):
        """person -> FLAME shape (100,) float32 of their first sequence holding a clip, in order of appearance."""
        shapes = {}
        for seq, used, shape in zip(self.sequences, self.index.used.tolist(), self.index.shape):
            if used:
                shapes.setdefault(seq.split("_")[0], shape.copy())
        return shapes

    def _read_flame(self, seq):
        """The sequence's pickle: motion (T, 59), shape (100,), cam (T, 3). It must still hold the frames it was
        indexed with: a file changed since is refused, never half-read."""
        path = flame_path(self.root, seq)
        flame = read_flame_pickle(path)
        n_frames = len(flame["expression"])
        if n_frames != self._frames[seq]:
            raise ValueError(f"{path}: {n_frames} frames, {self._frames[seq]} when the data set was indexed; the "
                             f"file changed while in use")
        cam = flame["cam"]
        if cam is None:
            cam = np.broadcast_to(np.asarray(DEFAULT_CAM, dtype=np.float32), (n_frames, 3))
        return flame["motion"], flame["shape"], np.ascontiguousarray(cam)

    def sequence(self, seq):
        """Whole sequence: dict(motion (T, 59), shape (100,), cam (T, 3), audio (N,), bgm (N,)), N exact."""
        motion, shape, cam = self._read_flame(seq)
        n, sounds = clip_samples(len(motion)), {}
        for name, path in (("audio", audio_path(self.root, seq)), ("bgm", bgm_path(self.root, seq))):
            sound = load_audio(path, SAMPLE_RATE)
            _check_length(len(sound), n, path)                      # then zero-padded or cut to exactly n samples
            sounds[name] = fit_length(sound, n)
        return dict(motion=motion, shape=shape, cam=cam, **sounds)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        seq, start = self.clips[i]
        motion, shape, cam = self._read_flame(seq)
        stop, n = start + self.clip_frames, clip_samples(len(motion))
        a, b = clip_samples(start), clip_samples(start) + clip_samples(self.clip_frames)
        audio, bgm = (clip_audio(path(self.root, seq), n, a, b) for path in (audio_path, bgm_path))
        return dict(id=seq, person=seq.split("_")[0], start=start, audio=audio, bgm=bgm,
                    motion=motion[start:stop].copy(), shape=shape.copy(), cam=cam[start:stop].copy())


def clip_audio(path, n, a, b):
    """Samples a..b-1 of the sound at path fitted to n samples by the length rule, float32 (SingingHead.sequence's
    [a:b]), reading only that stretch (and the scan for damage that opening does)."""
    song = AudioFile(path, SAMPLE_RATE)
    _check_length(len(song), n, path)
    stop = min(b, n)                                  # the fitted sequence ends at n
    present = min(stop, len(song))                    # samples past the file's end are the fit's zeros
    wave = song[a:present] if a < present else np.zeros(0, np.float32)
    return np.pad(wave, (0, max(0, stop - a) - len(wave)))


class VideoFrames:
    """Frames t = 0, stride, 2 stride, ... below `stop` (all when None) of an mp4, iterated as uint8 (b, size, size,
    3) batches of at most `batch` frames, centre-cropped to a square if needed (size=None: as decoded, no crop),
    each resized as it is decoded: memory holds one batch of resized frames and one decoded frame's float copy
    whatever the video's length or picture size. decoded() yields every frame as decoded instead. After either,
    `count` holds the frames the video has (all are decoded, kept or not)."""

    def __init__(self, path, size=256, stride=1, stop=None, batch=32):
        self.path, self.size, self.stride, self.stop, self.batch = Path(path), size, stride, stop, batch
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such file")
        self.count = 0

    def decoded(self):
        """Every frame of the video in order, uint8 (H, W, 3) as decoded; damage is refused naming the file."""
        try:
            with imageio.get_reader(str(self.path), "ffmpeg") as reader:
                self.count = 0
                for frame in reader:
                    self.count += 1
                    yield np.asarray(frame)[..., :3]
        except Exception as e:                  # ffmpeg stops on damaged data in many ways; imageio raises them all
            raise ValueError(f"{self.path}: unreadable video ({ffmpeg_said(e, self.path)})") from None
        if not self.count:
            raise ValueError(f"{self.path}: the video holds no frame")

    def __iter__(self):
        pending = []
        for t, frame in enumerate(self.decoded()):
            if t % self.stride == 0 and (self.stop is None or t < self.stop):
                pending.append(self._resized(torch.from_numpy(frame)[None]))
            if len(pending) == self.batch:
                yield np.concatenate(pending)
                pending = []
        if pending:
            yield np.concatenate(pending)

    def _resized(self, frames):
        """uint8 (n, H, W, 3) tensor -> numpy, its centre square crop resized to size (area when shrinking)."""
        size = self.size
        if size is None:
            return frames.numpy()
        h, w = frames.shape[1:3]
        side = min(h, w)
        frames = frames[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        if side == size:
            return frames.numpy()
        x = frames.permute(0, 3, 1, 2).float()                                             # (n, 3, side, side)
        mode = dict(mode="area") if size < side else dict(mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(size, size), **mode)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_video(path, size=256, batch=32):
    """mp4 -> uint8 (T, size, size, 3), centre-cropped to a square if needed (size=None: (T, H, W, 3) as decoded)."""
    return np.concatenate(list(VideoFrames(path, size, batch=batch)))

# ---------------------------------------------------------------------------------------------- support
# What every command shares: files that appear whole, checkpoints, videos and sounds written, progress lines,
# core counting and the one-line error exit.

VIDEO_CRF = 10                   # libx264 quality (0 lossless .. 51 worst): near transparent
VIDEO_PRESET = "medium"          # libx264 speed preset of videos (its default)
AUDIO_BLOCK = 1 << 20            # samples of a long sound copied into a file at a time
MAX_PROGRESS_LINES = 50          # progress lines a whole job prints, at most
RATE_WINDOW = 20                 # steps whose timing gives the rate: recent enough to forget start-up, enough to smooth


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block: a matrix product's rounding may depend on how many threads share
    it (items must not depend on where they are made), and a process whose cores others use must not spin a
    second thread waiting for one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_cores():
    """The cores this process may run on (its affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_checkpoint(path, device="cpu"):
    """A checkpoint file written by train.py -> its dict, read as data only (flame.read_torch_data: a file
    that names anything but tensors and plain containers is refused before any of it runs)."""
    if not zipfile.is_zipfile(path):                        # torch.save writes a zip archive
        raise ValueError(f"{path}: not a checkpoint torch.save wrote (not a zip archive, or one cut short)")
    try:
        ckpt = read_torch_data(path, device)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: {error}" if str(error).startswith("refused") else
                         f"{path}: not a readable checkpoint ({error})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt


@contextlib.contextmanager
def atomic_output(path):
    """A temporary path beside `path` (same suffix, for writers that go by it) to write to, renamed onto `path` when
    the block ends without error, else removed: readers never see a half-written file, a crash or a full disk
    leaves the previous one intact, and a failed write raises OSError naming `path` (np.savez's would not)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:        # the user's file named, never our temporary (a writer may quote its name)
        raise OSError(error.errno, unnamed(error.strerror or str(error), tmp, path), str(path)) from None
    except ValueError as error:
        if tmp.name not in str(error):
            raise
        raise ValueError(unnamed(str(error), tmp, path)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def unnamed(text, tmp, path):
    """text with the temporary file tmp called by the name of the file it becomes, path."""
    return str(text).replace(str(tmp), str(path)).replace(Path(tmp).name, Path(path).name)


def write_wav(path, audio, sample_rate=SAMPLE_RATE):
    """Mono audio in [-1, 1] as a 16-bit PCM wav that appears whole at path (a failed write: OSError naming it): an
    array (N,), or a sound with len() and slices [a:b] (e.g. audio.AudioFile) copied AUDIO_BLOCK samples at a time."""
    if isinstance(audio, (np.ndarray, list, tuple)) or torch.is_tensor(audio):
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise ValueError(f"{path}: audio must be mono (N,), got shape {audio.shape}")
    with wav_writer(path, sample_rate) as write:
        for start in range(0, len(audio), AUDIO_BLOCK):
            write(np.asarray(audio[start:start + AUDIO_BLOCK]))


@contextlib.contextmanager
def wav_writer(path, sample_rate=SAMPLE_RATE):
    """A mono 16-bit PCM wav written a piece at a time: the block gets write(samples (n,)), samples clipped to
    [-1, 1]; the file appears at path whole when the block ends, and a failed write raises OSError naming it."""
    def sound_error(error):                                     # soundfile's errors are RuntimeErrors
        return OSError(errno.EIO, " ".join(str(error).split()))

    def write(samples):
        try:
            sink.write(np.clip(np.asarray(samples, dtype=np.float32), -1, 1))
        except soundfile.LibsndfileError as error:
            raise sound_error(error) from None

    with atomic_output(path) as tmp:
        try:
            sink = soundfile.SoundFile(tmp, "w", int(sample_rate), 1, "PCM_16", format="WAV")
        except soundfile.LibsndfileError as error:
            raise sound_error(error) from None
        with sink:
            yield write


class VideoWriter:
    """Streams uint8 frames into an mp4 (libx264, yuv420p), muxing optional mono audio as AAC on close: float32 (N,)
    at sample_rate, or a sound with len() and float32 slices [a:b] (e.g. audio.AudioFile) read a block at a time. The
    file appears at `path` only when complete; a failed write (ffmpeg's exit status, a full disk) raises OSError naming
    `path`. Our own ffmpeg process: imageio_ffmpeg.write_frames ignores its exit status, lets its complaints through."""

    def __init__(self, path, size, fps=FPS, audio=None, sample_rate=SAMPLE_RATE, preset=VIDEO_PRESET):
        self.path, self.frames = Path(path), 0
        self.height, self.width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.mp4")
        self.wav = None if audio is None else self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.wav")
        self.log = self.encoder = None
        try:
            if audio is not None:
                try:
                    write_wav(self.wav, audio, sample_rate)
                except OSError as error:
                    raise OSError(error.errno, f"soundtrack not written ({error.strerror})", str(path)) from None
            cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-vcodec", "rawvideo",
                   "-s", f"{self.width}x{self.height}", "-pix_fmt", "rgb24",
                   "-r", str(Fraction(fps).limit_denominator()), "-i", "-"]
            cmd += ["-an"] if self.wav is None else ["-i", str(self.wav)]
            cmd += ["-vcodec", "libx264", "-preset", preset, "-pix_fmt", "yuv420p", "-crf", str(VIDEO_CRF)]
            if self.wav is not None:
                cmd += ["-acodec", "aac", "-map", "0:v:0", "-map", "1:a:0", "-shortest"]
            self.log = tempfile.TemporaryFile()                  # ffmpeg's complaints, for the error message
            self.encoder = subprocess.Popen(cmd + [str(self.tmp)], stdin=subprocess.PIPE,
                                            stdout=subprocess.DEVNULL, stderr=self.log)
        except BaseException as error:
            self._clean()
            if isinstance(error, OSError):
                raise OSError(error.errno, error.strerror, str(self.path)) from None
            raise

    def _failed(self):
        """OSError naming the video, with ffmpeg's last complaint (or the signal that ended it)."""
        self.log.seek(0)
        said = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        status = self.encoder.returncode
        why = said[-1] if said else f"killed by {signal.Signals(-status).name}" if status < 0 else f"status {status}"
        why = unnamed(why, self.tmp, self.path)
        if self.wav is not None:                                 # our temporary: the user knows it as the sound
            why = why.replace(str(self.wav), "the soundtrack").replace(self.wav.name, "the soundtrack")
        return OSError(errno.EIO, f"ffmpeg could not write the video ({why})", str(self.path))

    def write(self, frames):
        """frames uint8 (T, H, W, 3) numpy or tensor."""
        frames = frames.cpu().numpy() if torch.is_tensor(frames) else np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"{self.path}: frames must be uint8 (T, {self.height}, {self.width}, 3), "
                             f"got {frames.dtype} {frames.shape}")
        try:
            self.encoder.stdin.write(np.ascontiguousarray(frames).tobytes())
        except OSError:                                          # ffmpeg stopped reading: it failed
            self.encoder.wait()
            raise self._failed() from None
        self.frames += len(frames)

    def close(self, keep=True):
        """Finish the file and move it into place; keep=False discards it (used after an error)."""
        try:
            if not keep:
                self.encoder.kill()
            with contextlib.suppress(OSError):                   # it failed already: its exit status says so
                self.encoder.stdin.close()
            if self.encoder.wait() != 0 and keep:
                raise self._failed()
            if keep and self.frames == 0:
                raise ValueError(f"{self.path}: no frames written")
            if keep:
                try:
                    os.replace(self.tmp, self.path)
                except OSError as error:
                    raise OSError(error.errno, error.strerror, str(self.path)) from None
        finally:
            self._clean()

    def _clean(self):
        for tmp in (self.tmp, self.wav):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if self.log is not None:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(keep=exc_type is None)


def write_video(path, frames, fps=FPS, audio=None, sample_rate=SAMPLE_RATE):
    """frames uint8 (T, H, W, 3) -> mp4 at path, with audio float32 (N,) at sample_rate muxed in if given."""
    if frames.ndim != 4:
        raise ValueError(f"{path}: frames must be (T, H, W, 3), got shape {tuple(frames.shape)}")
    with VideoWriter(path, frames.shape[1:3], fps, audio, sample_rate) as video:
        video.write(frames)


def format_duration(seconds):
    """Seconds -> '42s', '8m30s' or '1h05m'."""
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts the steps of a long job of `total` steps (`done` already done, e.g. after a resume) and says how far,
    how fast lately and when it will end (building the built-in data, training, an evaluation, a long song):
        progress = Progress(480, "step")
        for batch in batches:
            train_step(batch)
            if progress.advance():        # True when a line is due (`lines` a job at most, and the last step)
                print(progress.line("train"))
    The rate is measured over the last `window` steps, never the first one: its start-up (first calls, caches
    filling) would dominate the early estimates. What happens between two steps (validation between epochs) is
    part of the step after it, so a window longer than an epoch spreads that cost as it will really fall."""

    def __init__(self, total, unit="step", done=0, lines=MAX_PROGRESS_LINES, window=RATE_WINDOW,
                 clock=time.perf_counter):
        self.total, self.unit, self.done, self.clock = total, unit, done, clock
        self.every = max(1, -(-(total - done) // lines))    # ceil: at most `lines` lines
        self.times = deque(maxlen=max(2, window + 1))       # (steps done, clock) after each step, from the first
        self.start = clock()

    def advance(self, n=1):
        """Record n more steps done; True when a progress line is due."""
        self.done += n
        self.times.append((self.done, self.clock()))
        return self.done >= self.total or self.done % self.every < n

    def rate(self):
        """Steps a second over the recent window (the first step excluded), or None before two steps are timed."""
        if len(self.times) < 2:
            return None
        (d0, t0), (d1, t1) = self.times[0], self.times[-1]
        return (d1 - d0) / max(t1 - t0, 1e-9)

    def eta(self):
        """Seconds left at the recent rate, or None while unknown."""
        rate = self.rate()
        return None if rate is None else (self.total - self.done) / rate

    def status(self):
        """'0.85 step/s | ETA 8m30s'; the time so far while the rate is unknown; the whole time at the end."""
        rate, eta = self.rate(), self.eta()
        if rate is None:
            return f"first {self.unit} took {format_duration(self.clock() - self.start)}, ETA from the next"
        speed = f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}"
        if self.done >= self.total:
            return f"{speed} | done in {format_duration(self.clock() - self.start)}"
        return f"{speed} | ETA {format_duration(eta)}"

    def line(self, label):
        """'label 12/480 steps | 0.85 step/s | ETA 8m30s'."""
        return f"{label} {self.done}/{self.total} {self.unit}s | {self.status()}"


class Parser(argparse.ArgumentParser):
    """argparse whose refusals end in one line with exit status 1, like the commands' own errors."""

    def error(self, message):
        sys.exit(f"error: {message}")


class InRange:
    """An argparse type: a finite number (kind float or int) in [lo, hi], else the one-line refusal `argument
    --flag: must be a number from lo to hi, not <text>`. str() gives the range, for the flag's --help."""

    def __init__(self, kind, lo, hi):
        self.kind, self.lo, self.hi = kind, lo, hi

    def __str__(self):
        return f"{self.lo:g} to {self.hi:g}" if self.kind is float else f"{self.lo} to {self.hi}"

    def __call__(self, text):
        try:
            value = self.kind(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not (self.lo <= value <= self.hi and np.isfinite(float(value))):   # NaN fails all
            raise argparse.ArgumentTypeError(f"must be {'a number' if self.kind is float else 'an integer'} from "
                                             f"{self}, not {text}")
        return value


def float_in(lo, hi):
    """argparse type of a flag taking a finite float in [lo, hi]: add_argument("--lr", type=float_in(0, 1))."""
    return InRange(float, lo, hi)


def int_in(lo, hi):
    """argparse type of a flag taking an integer in [lo, hi] (Python's ints are unbounded; torch's are not)."""
    return InRange(int, lo, hi)


def check_device(name, flag="--device"):
    """Refuse a device torch cannot run on here, naming the flag: cpu, cuda, cuda:N (N below the GPUs present)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {name}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: no CUDA device here; use {flag} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ..)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {name}: not a device this program runs on (cpu, cuda or cuda:N)")
    return device


def check_output_folder(folder, first, flag="--out"):
    """Refuse, before any work, an output folder that cannot be made or written (under a file, or whose nearest existing
    folder is read-only); first: the first file written there, named as the write would when the folder is read-only."""
    if not str(folder):
        raise ValueError(f"{flag} '': names no folder (give one, e.g. {flag} .)")
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"{folder}: exists and is not a folder")
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if not existing.is_dir():
        raise ValueError(f"{folder}: cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{folder / first}: Permission denied (cannot write in {existing})" if existing == folder
                         else f"{folder}: cannot be made: Permission denied (cannot write in {existing})")


@contextlib.contextmanager
def output_folder(folder):
    """The folder made (with its parents) for the block (None: nothing to make); when the block fails, those this
    call made are removed again if still empty: a refused or stopped command leaves no output folder it created."""
    if folder is None:
        yield None
        return
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not os.path.exists(p)]              # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()                                      # only an empty folder goes
        raise


def check_finite(values, path, what):
    """Refuse an array or tensor holding NaN or inf: `path: <what> holds NaN or inf`, path the file read or written."""
    finite = torch.isfinite(values).all() if torch.is_tensor(values) else np.isfinite(np.asarray(values)).all()
    if not finite:
        raise ValueError(f"{path}: {what} holds NaN or inf")


def ffmpeg_said(error, path):
    """ffmpeg's complaint in an imageio error: its last line that says something, without the version banner,
    the file's name or the `[in#0 @ 0x..]` tags."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and str(path) not in line]
    said = lines[-1] if lines else type(error).__name__
    return " ".join(said.split("] ", 1)[-1].split())[:200]


class Stopped(BaseException):
    """SIGTERM, raised where the program is so that every `with` unwinds (atomic_output and VideoWriter remove
    their temporaries). A BaseException, as KeyboardInterrupt is: a reader's `except Exception` lets it through."""


def _stop(signum, frame):
    if os.getpid() != _stop.owner:                   # a forked child (a pool, a loader worker): as by default
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for sig in (signal.SIGINT, signal.SIGTERM):    # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


def run_command(command, argv=None):
    """command(argv), where bad input or a failed write (a full disk, a read-only folder) ends in one line,
    `error: <file>: <problem>`, and exit status 1, not a traceback. Ctrl-C and SIGTERM unwind it (temporaries
    removed) and end it in one line with the status a shell gives a command the signal ended, 130 or 143: a
    script tells a stopped run from a refused one."""
    _stop.owner, previous = os.getpid(), {}
    with contextlib.suppress(ValueError):            # signal handlers are the main thread's to set
        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        command(argv)
    except (ValueError, OSError) as err:
        named = isinstance(err, OSError) and err.filename
        sys.exit("error: " + " ".join((f"{err.filename}: {err.strerror}" if named else str(err)).split()))
    except (KeyboardInterrupt, Stopped) as stop:
        sig = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM
        print(f"error: stopped by {sig.name}; the files said written are whole, none other was kept",
              file=sys.stderr, flush=True)
        sys.exit(128 + sig)
    finally:
        for sig, handler in previous.items():
            if handler is not None:                  # None: set outside Python, cannot be put back
                signal.signal(sig, handler)
