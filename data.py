"""
SingingHead-format data for UniSinger: a reader for the public release's layout and a generator that writes a
data set of its own in that layout (the built-in data everything uses by default).

Depends on torch, numpy, scipy, soundfile, imageio (+ imageio-ffmpeg) and our audio.py (load_audio, FPS, SAMPLE_RATE),
flame.py (the procedural head, for the portrait videos) and render.py (projection, shading, mp4 output).
Holds too the progress lines every long job of the project prints (Progress: steps done, the recent rate and
the ETA from it).

Use alone:
    python data.py                       # build (first use) and summarise the built-in data set
    root = builtin_data()                # Path of data/builtin, generated on first use (~1-2 min on 2 cores)
    clips = SingingHead(root, "train")   # torch Dataset; clips[0]["motion"] is float32 (240, 59)
    frames = read_video(video_path(root, clips[0]["id"]), size=256)   # uint8 (T, 256, 256, 3)

Layout (the SingingHead release's)
    root/train.txt val.txt test.txt    one sequence id a line, e.g. id0_2_1_0; the first field is the person
    root/flame_seqs/<id>.pkl           dict pickle: expcodes (T, 50+), posecodes (T, 9), shapecode, cam (T, 3)
    root/audio_seqs/<id>.wav           dry singing voice, any sample rate, mono or stereo
    root/bgm_seqs/<id>_bgm.wav         background music, same length
    root/video_seqs/<id>.mp4           portrait video, 30 fps (read only by the render stage)
The 59-d motion vector is [expression 50 | global 3 | neck 3 | jaw 3]: the pickle's expression columns
followed by its 9 pose columns (global | neck | jaw axis-angle), row t = video frame t at 30 fps.

Reading rules (bad input gets a one-line ValueError naming the file)
    - Pickle keys: expression from `expcodes` or `expression` (first 50 columns), pose from `posecodes` or
      `pose` (first 9 columns: global | neck | jaw; 15-column full poses with eyes work too), shape from
      `shapecode` or `shape` ((N,), (1, N) or (T, N): the first row, first 100 values), camera from `cam` or
      `camcodes` ((T, 3) or one row for all frames; optional, DEFAULT_CAM of render.py when absent).
      A missing key, too few columns, rows that disagree, or NaN / inf is refused.
    - Audio is read with audio.load_audio (any sample rate resampled to 16 kHz, stereo mixed to mono); it
      refuses a wav whose header promises more samples than the file holds (truncated) when the clip is first
      read; a wav cut by more than a frame is already refused by the length rule when the data set is made.
    - Length rule: a sequence of T motion frames needs round(T * 16000 / 30) audio samples. Voice and music
      may differ from that by at most one frame's worth (533 samples); they are then zero-padded or cut to
      the exact length. A larger mismatch is refused with an error naming the wav.
    - Clips: a sequence is cut into consecutive clips of clip_frames frames (the release's sequences are
      exactly one 240-frame clip each). A remainder shorter than a clip, or a whole sequence shorter than a
      clip, is dropped and the dropped frames are counted and printed.
    - A split file that is missing, or lists no id, is refused naming that file.

The generated data set (generate_dataset, builtin_data)
    People: id0 .. id<n-1>, each a procedural FLAME shape (beta ~ N(0, 1) on the first 10 coefficients, 0
    after), a fixed camera (DEFAULT_CAM's scale times 1 +- 6 %, a small shift, a little smooth jitter per
    frame), a voice register, a skin tint and background colour, and a motion style (the gains below), and the
    looks of a filmed person (lip, hair, iris, clothing and backdrop colours, pattern seeds: make_looks).
    Songs: each song is composed once and cut into clips_per_song consecutive sequences of clip_seconds,
    ids id<person>_<song>_<segment>_0. A song has a tempo (90-130 bpm), a key, a chord progression
    (I-V-vi-IV, one chord a bar of 4 beats) and a melody: phrases of 3-8 syllables, each syllable one note of
    the major scale lasting 1/2-2 beats and one of the vowels a e i o u, rests of 1-2 beats between phrases.
    Voice (source-filter): a band-limited sawtooth pulse train at the melody's pitch (25 ms portamento
    between notes, ~5.5 Hz vibrato of 0.3 semitone fading in on each note, a little breath noise) through
    the vowel's three formant resonators, vowels cross-faded over ~15 ms, times the syllable envelope
    (40 ms attack, slow decay, 60 ms release; the voice dips between syllables), with a short noise burst
    (a consonant) at each syllable onset. Music: kick on beats 1 and 3, snare on 2 and 4, hi-hat on every
    half beat, a plucked bass on the chord's root each beat, a sustained chord pad.
    Motion, a known function of the audio at frame t (frame t covers audio [t/30, (t+1)/30) s):
        env_t    mean of the syllable envelope over the frame (0..1; the voice's RMS is proportional to it)
        w_t[v]   mean vowel weights over the frame (sum to 1)
        jaw x-rotation       = jaw_gain * 0.3 rad * env_t * sum_v w_t[v] * OPENNESS[v]
        expression (mouth)   = mouth_gain * env_t * sum_v w_t[v] * VOWEL_MOUTH[v] on MOUTH_DIMS, the procedural
                               head's open / smile / pucker / stretch / funnel expressions (/a/ wide open,
                               /e/ and /i/ spread, /o/ and /u/ rounded)
        expression (brows)   = brow_gain * (pitch_t - 60) / 12 * voiced_t on BROW_DIM (brows raise), pitch_t
                               the mean note contour over the frame in MIDI numbers (vibrato left out),
                               voiced_t = (env_t > 0.1) Gaussian-smoothed over 2 frames
        global x-rotation    = nod_gain * sum_beats a_b * exp(-(t_centre - t_b)^2 / (2 * 0.07^2)),
                               a_b = 1 on kick beats, 0.6 on snare beats (a nod at every beat of the music)
        neck x-rotation      = half of that
    plus the person's constant expression and head-pose offsets and a little smooth noise (Gaussian-filtered,
    sigma 4 frames; std 0.03 on the first 10 expression dims, 0.005 rad on head pose, 0.003 rad on the jaw).
    Files: flame_seqs pickles with the release's keys (expcodes (T, 50), posecodes (T, 9), shapecode (1, 100),
    cam (T, 3), float32, pickle protocol 2); 16-bit PCM mono wavs at 16 kHz; video_seqs mp4s (libx264,
    video_size square, 30 fps, no sound track: the voice is in audio_seqs) for the people id0 ..
    id<video_people-1> only, and of theirs for every val and test sequence and the first train sequences by id,
    video_clips sequences in all (built-in set: id0 only, 8 of its 20 sequences: 3 test, 1 val, 4 train).
    The videos film the person as a portrait recording would (filmed_body, film; see "the filmed person" below):
    textured skin, lips, eyes, brows and hair, teeth, tongue and a dark mouth seen through the parted lips, neck,
    shoulders in clothing, a backdrop, key and fill light. Rendering is the generator's main cost and the render
    stage trains one person; check video_path(root, id).exists().
    Splits: per person, 15 % of the sequences to test and 5 % to val (at least one each), the rest to train,
    so every person appears in every split. generator.json records the parameters and BUILTIN_VERSION, and
    marks the set as generated (is_generated): its heads are procedural. Any other set holds real FLAME
    parameters, and require_head refuses it without a FLAME file (the stand-in head would be silently wrong).
"""
import json
import math
import os
import pickle
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d, uniform_filter1d
from scipy.signal import lfilter
from torch.utils.data import Dataset

import render
from audio import FPS, SAMPLE_RATE, load_audio
from flame import (BROW_A, EYE_A, EYE_PHI, FLAME_SOURCE, MOTION_DIM, MOUTH_A, MOUTH_HALF_WIDTH, N_EXPR, N_JOINTS,
                   N_SHAPE, Flame, load_data_pickle, procedural_head, smoothstep, vertex_normals)

CLIP_SECONDS = 8                      # the release's sequence length
CLIP_FRAMES = CLIP_SECONDS * FPS      # 240 frames a clip
SPLITS = ("train", "val", "test")
TEST_SHARE, VAL_SHARE = 0.15, 0.05    # the release's 80 / 5 / 15 % split by sequence

EXPRESSION_KEYS = ("expcodes", "expression")
POSE_KEYS = ("posecodes", "pose")
SHAPE_KEYS = ("shapecode", "shape")
CAM_KEYS = ("cam", "camcodes")
N_POSE = 9                            # global 3 | neck 3 | jaw 3

BUILTIN_ROOT = Path(__file__).parent / "data" / "builtin"
BUILTIN_VERSION = 2                   # bump when the generator changes: an older built-in set is rebuilt
                                      # (the built-in set is generate_dataset's defaults)


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
    """Length at SAMPLE_RATE of the audio file at path, from its header (no decoding)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError) as e:      # soundfile's errors derive from RuntimeError
        raise ValueError(f"{path}: unreadable audio ({e})") from None
    return round(info.frames * SAMPLE_RATE / info.samplerate)


def flame_path(root, seq):
    return Path(root) / "flame_seqs" / f"{seq}.pkl"


def audio_path(root, seq):
    return Path(root) / "audio_seqs" / f"{seq}.wav"


def bgm_path(root, seq):
    return Path(root) / "bgm_seqs" / f"{seq}_bgm.wav"


def video_path(root, seq):
    return Path(root) / "video_seqs" / f"{seq}.mp4"


def generator_path(root):
    """The marker generate_dataset writes: its parameters and BUILTIN_VERSION."""
    return Path(root) / "generator.json"


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


# ----------------------------------------------------------------------------- progress lines of long jobs
# Progress counts the steps of a long job (building this data set, training, an evaluation, a long song) and says
# how far, how fast lately and when it will end:
#     progress = Progress(480, "step")
#     for batch in batches:
#         train_step(batch)
#         if progress.advance():                # True when a line is due (MAX_PROGRESS_LINES lines a run, and the last step)
#             print(progress.line("train"))
# The rate is measured over the last `window` steps and never counts the first one: the first step carries the
# start-up (first calls, caches filling, memory being allocated), and an average since the start lets it dominate
# the early estimates (an ETA six times too long on the first line of a 9-minute training run). Whatever happens
# between two steps (a validation pass between epochs) is part of the step after it, so a window longer than an
# epoch spreads that cost over the remaining steps as it will really fall.

MAX_PROGRESS_LINES = 50     # progress lines a whole job prints, at most
RATE_WINDOW = 20            # steps whose timing gives the rate: recent enough to forget start-up, enough to smooth


def format_duration(seconds):
    """Seconds -> '42s', '8m30s' or '1h05m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts steps of a job of `total` steps (`done` already done, e.g. after a resume) and times them."""

    def __init__(self, total, unit="step", done=0, lines=MAX_PROGRESS_LINES, window=RATE_WINDOW, clock=time.perf_counter):
        self.total, self.unit, self.done = total, unit, done
        self.every = max(1, -(-(total - done) // lines))    # ceil: at most `lines` lines
        self.clock = clock
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

    def elapsed(self):
        return self.clock() - self.start

    def status(self):
        """'0.85 step/s | ETA 8m30s'; the time so far while the rate is unknown; the whole time at the end."""
        rate, eta = self.rate(), self.eta()
        if rate is None:
            return f"first {self.unit} took {format_duration(self.elapsed())}, ETA from the next"
        speed = f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}"
        if self.done >= self.total:
            return f"{speed} | done in {format_duration(self.elapsed())}"
        return f"{speed} | ETA {format_duration(eta)}"

    def line(self, label):
        """'label 12/480 steps | 0.85 step/s | ETA 8m30s'."""
        return f"{label} {self.done}/{self.total} {self.unit}s | {self.status()}"


# ----------------------------------------------------------------------------- the generated data set

VOWELS = ("a", "e", "i", "o", "u")
FORMANTS = np.array([[800, 1200, 2600],           # a   (F1, F2, F3 in Hz)
                     [450, 2000, 2700],           # e
                     [300, 2300, 3000],           # i
                     [500, 850, 2500],            # o
                     [320, 750, 2400]])           # u
BANDWIDTHS = np.array([80, 100, 150])             # Hz, per formant
OPENNESS = np.array([1.0, 0.75, 0.55, 0.8, 0.6])  # jaw opening per vowel, times 0.3 rad at full voice
JAW_OPEN = 0.3                                    # rad
MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])          # semitones of the scale degrees
PROGRESSION = ((0, 4, 7), (7, 11, 14), (9, 12, 16), (5, 9, 12))   # I V vi IV, semitones above the key
VIBRATO_DEPTH = 0.3                               # semitones
NOD_SIGMA = 0.07                                  # s, width of the nod at each beat
BREATH = 0.03                                     # noise share of the glottal source
VOICE_GAIN = 0.25                                 # voice RMS at full envelope
CONTROL_RATE = 1000                               # Hz, rate of the envelope / note / vowel controls
ATTACK, RELEASE = 0.04, 0.06                      # s, syllable envelope ramps
LEVEL_WINDOW = 0.025                              # s, window of the voice's level normalisation
HISS = 0.15                                       # consonant noise burst at each syllable onset
MOUTH_DIMS = [0, 1, 3, 9, 15]                     # procedural head's expressions: open, smile, pucker, stretch, funnel
VOWEL_MOUTH = np.array([[1.2, 0.0, 0.0, 0.3, 0.0],   # a: wide open
                        [0.5, 0.3, 0.0, 1.0, 0.0],   # e: spread
                        [0.2, 0.6, 0.0, 1.5, 0.0],   # i: spread wide, a little smile
                        [0.6, 0.0, 1.0, 0.0, 0.8],   # o: rounded
                        [0.2, 0.0, 1.6, 0.0, 1.2]])  # u: rounded, pursed
BROW_DIM = 6                                      # procedural head's expression that raises the brows
VOICED = 0.1                                      # envelope above which a frame counts as sung
NOISE_EXPRESSION, NOISE_HEAD, NOISE_JAW = 0.03, 0.005, 0.003   # std of the smooth motion noise (-, rad, rad)


def _vowel_expression():
    """(5, 50) mouth expression per vowel at full voice, on the procedural head's mouth dimensions."""
    table = np.zeros((len(VOWELS), N_EXPR))
    table[:, MOUTH_DIMS] = VOWEL_MOUTH
    return table


@dataclass
class Person:
    name: str
    shape: np.ndarray          # (100,)
    cam: np.ndarray            # (3,) scale, tx, ty
    register: int              # MIDI number of the lowest note of the person's songs' keys
    vibrato_rate: float        # Hz
    jaw_gain: float
    mouth_gain: float
    brow_gain: float
    nod_gain: float            # rad
    expression_offset: np.ndarray   # (50,)
    pose_offset: np.ndarray         # (9,)
    skin: np.ndarray           # (3,) RGB of a fully lit surface
    background: np.ndarray     # (3,) RGB
    looks: dict                # the filmed appearance: colours (3,) RGB of lips, hair, iris, clothing, backdrop
                               # accent, and backdrop / cloth pattern seeds (make_looks)


def make_person(index, seed):
    """Person id<index>: shape, camera, voice and motion style, colours; depends only on (seed, index)."""
    rng = np.random.default_rng([seed, index, 0])
    shape = np.zeros(N_SHAPE)
    shape[:10] = rng.normal(0, 1, 10)
    cam = np.array(render.DEFAULT_CAM, dtype=np.float64)
    cam[0] *= 1 + rng.uniform(-0.06, 0.06)
    cam[1:] += rng.uniform(-0.01, 0.01, 2)                     # metres, before scaling
    expression_offset = np.zeros(N_EXPR)
    expression_offset[:10] = rng.normal(0, 0.1, 10)
    pose_offset = np.zeros(N_POSE)
    pose_offset[:6] = rng.normal(0, 0.03, 6)
    return Person(name=f"id{index}", shape=shape, cam=cam, register=int(rng.integers(50, 62)),
                  vibrato_rate=rng.uniform(5.0, 6.0), jaw_gain=rng.uniform(0.8, 1.2),
                  mouth_gain=rng.uniform(0.8, 1.2), brow_gain=rng.uniform(0.6, 1.0),
                  nod_gain=rng.uniform(0.05, 0.09), expression_offset=expression_offset, pose_offset=pose_offset,
                  skin=rng.uniform([170, 120, 100], [240, 190, 170]), background=rng.uniform(20, 90, 3),
                  looks=make_looks(np.random.default_rng([seed, index, 0, 1])))


def make_looks(rng):
    """The filmed person's colours beyond skin and background (their own stream: the voice and motion stay)."""
    hair = rng.choice([(40, 28, 22), (70, 45, 30), (20, 18, 18), (120, 85, 50)]) * rng.uniform(0.85, 1.15)
    iris = rng.choice([(85, 55, 35), (60, 90, 120), (80, 100, 60), (50, 35, 25)]) * rng.uniform(0.9, 1.1)
    return dict(lips=rng.uniform([150, 60, 70], [200, 95, 100]), hair=hair, iris=iris,
                clothing=rng.uniform(30, 200, 3), accent=rng.uniform(60, 200, 3), pattern=int(rng.integers(1 << 30)))


@dataclass
class Song:
    duration: float            # s
    key: int                   # MIDI number of the tonic
    beats: np.ndarray          # (K,) beat times, s
    kick: np.ndarray           # (K,) bool: kick (beats 1, 3) or snare (beats 2, 4)
    onsets: np.ndarray         # (S,) syllable starts, s
    offsets: np.ndarray        # (S,) syllable ends (release starts), s
    notes: np.ndarray          # (S,) MIDI numbers
    vowels: np.ndarray         # (S,) indices into VOWELS
    accents: np.ndarray        # (S,) loudness 0.7-1


def compose_song(rng, duration, register):
    """A tempo, a key, a beat grid and a melody of sung syllables grouped in phrases."""
    beat = 60 / rng.uniform(90, 130)
    first = rng.uniform(0, beat)
    beats = np.arange(first, duration, beat)
    key = register + int(rng.integers(0, 5))
    onsets, offsets, notes, vowels = [], [], [], []
    t, degree = first + beat * int(rng.integers(0, 2)), int(rng.integers(0, 5))
    while t < duration - 0.2:
        for _ in range(int(rng.integers(3, 9))):
            length = beat * rng.choice([0.5, 1, 1.5, 2], p=[0.3, 0.4, 0.15, 0.15])
            degree = int(np.clip(degree + rng.integers(-2, 3), -3, 9))
            onsets.append(t)
            offsets.append(t + length - 0.06)                   # the release ends as the next syllable starts
            notes.append(key + 12 * (degree // 7) + MAJOR[degree % 7])
            vowels.append(int(rng.integers(len(VOWELS))))
            t += length
        t += beat * rng.choice([1, 2])
    keep = np.array(onsets) < duration - 0.1
    return Song(duration=duration, key=key, beats=beats, kick=np.arange(len(beats)) % 2 == 0,
                onsets=np.array(onsets)[keep], offsets=np.array(offsets)[keep], notes=np.array(notes)[keep],
                vowels=np.array(vowels)[keep], accents=rng.uniform(0.7, 1.0, int(keep.sum())))


def _sawtooth(phase, step):
    """Band-limited (PolyBLEP) sawtooth in [-1, 1] for a running phase in cycles and its per-sample step."""
    t = phase % 1.0
    saw = 2 * t - 1
    x = t / step
    saw -= np.where(t < step, 2 * x - x * x - 1, 0)
    x = (t - 1) / step
    saw -= np.where(t > 1 - step, x * x + 2 * x + 1, 0)
    return saw


def _resonate(x, freq, bandwidth):
    """Two-pole resonator (one formant) at freq Hz with the given bandwidth."""
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * freq / SAMPLE_RATE
    return lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], x)


def _raised_cosine(x):
    """0 for x <= 0, 1 for x >= 1, a half cosine between."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(x, 0, 1))


def sing(song, person, rng):
    """
    Source-filter singing. Returns the voice (N,) float32 and its controls at CONTROL_RATE: envelope (M,) in
    [0, 1], vowel weights (5, M) summing to 1, note contour (M,) in MIDI numbers (without vibrato).
    """
    n, m = round(song.duration * SAMPLE_RATE), round(song.duration * CONTROL_RATE)
    tc = np.arange(m) / CONTROL_RATE
    envelope, vibrato = np.zeros(m), np.zeros(m)
    note_step, vowel_step = np.full(m, float(song.notes[0])), np.zeros(m, dtype=int)
    for i, (on, off) in enumerate(zip(song.onsets, song.offsets)):
        start, stop = np.searchsorted(tc, [on, off + RELEASE])
        local = tc[start:stop] - on
        shape = _raised_cosine(local / ATTACK) * _raised_cosine((off + RELEASE - tc[start:stop]) / RELEASE)
        envelope[start:stop] = np.maximum(envelope[start:stop], song.accents[i] * shape * np.exp(-0.25 * local))
        held = slice(start, np.searchsorted(tc, song.onsets[i + 1]) if i + 1 < len(song.onsets) else m)
        note_step[held], vowel_step[held] = song.notes[i], song.vowels[i]
        vibrato[start:stop] = np.clip((local - 0.15) / 0.3, 0, 1)        # fades in after 150 ms of a note
    contour = gaussian_filter1d(note_step, 0.025 * CONTROL_RATE)           # portamento between notes
    weights = gaussian_filter1d(np.eye(len(VOWELS))[vowel_step].T, 0.015 * CONTROL_RATE, axis=1)  # (5, M)

    t = np.arange(n) / SAMPLE_RATE
    midi = np.interp(t, tc, contour) + VIBRATO_DEPTH * np.interp(t, tc, vibrato) * np.sin(
        2 * np.pi * person.vibrato_rate * t + rng.uniform(0, 2 * np.pi))
    step = 440.0 * 2 ** ((midi - 69) / 12) / SAMPLE_RATE                    # cycles per sample
    source = _sawtooth(np.cumsum(step), step) + BREATH * rng.standard_normal(n)
    voice = np.zeros(n)
    for v in range(len(VOWELS)):
        y = source
        for freq, bandwidth in zip(FORMANTS[v], BANDWIDTHS):
            y = _resonate(y, freq, bandwidth)
        voice += np.interp(t, tc, weights[v]) * y
    # a harmonic crossing a formant changes the loudness a lot: level-normalise so the RMS follows the envelope
    level = np.sqrt(uniform_filter1d(voice * voice, round(LEVEL_WINDOW * SAMPLE_RATE)))
    voice *= np.interp(t, tc, envelope) / np.maximum(level, 1e-9)
    burst = round(0.03 * SAMPLE_RATE)
    for on, accent in zip(np.round(song.onsets * SAMPLE_RATE).astype(int), song.accents):   # consonant hiss
        hiss = np.diff(rng.standard_normal(burst + 1)) * np.exp(-np.arange(burst) / (0.008 * SAMPLE_RATE))
        _place(voice, HISS * accent * hiss, on)
    return (VOICE_GAIN * voice).clip(-1, 1).astype(np.float32), envelope, weights, contour


def _place(track, sound, at):
    """Add sound (M,) into track (N,) starting at sample `at`, cut at the end of the track."""
    stop = min(len(track), at + len(sound))
    if at < stop:
        track[at:stop] += sound[:stop - at]


def play_music(song, rng):
    """Background music: drums on the beat grid, a plucked bass and a chord pad. Returns (N,) float32."""
    n = round(song.duration * SAMPLE_RATE)
    beat = float(np.median(np.diff(song.beats))) if len(song.beats) > 1 else 0.5
    t = np.arange(round(0.3 * SAMPLE_RATE)) / SAMPLE_RATE
    kick = np.sin(2 * np.pi * np.cumsum(50 + 90 * np.exp(-t / 0.04)) / SAMPLE_RATE) * np.exp(-t / 0.12)
    noise = np.diff(rng.standard_normal(len(t) + 1))
    snare = 0.35 * noise * np.exp(-t / 0.08) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.05)
    hihat = 0.12 * noise * np.exp(-t / 0.015)
    drums, bass, pad = np.zeros(n), np.zeros(n), np.zeros(n)
    for k, (time_k, is_kick) in enumerate(zip(song.beats, song.kick)):
        at = round(time_k * SAMPLE_RATE)
        _place(drums, kick if is_kick else snare, at)
        _place(drums, hihat, at)
        _place(drums, hihat * 0.6, at + round(beat / 2 * SAMPLE_RATE))
        root = 440.0 * 2 ** ((song.key - 24 + PROGRESSION[k // 4 % 4][0] - 69) / 12)
        tb = np.arange(round(beat * SAMPLE_RATE)) / SAMPLE_RATE
        _place(bass, (np.sin(2 * np.pi * root * tb) + 0.3 * np.sin(4 * np.pi * root * tb)) * np.exp(-tb / 0.25), at)
    bar = 4 * beat
    starts = np.concatenate([[0.0], song.beats[::4]]) if len(song.beats) else np.array([0.0])
    for b, start in enumerate(starts):
        chord = PROGRESSION[(b - 1) % 4]
        tb = np.arange(round(bar * SAMPLE_RATE)) / SAMPLE_RATE
        shape = np.minimum(1, tb / 0.1) * np.minimum(1, (bar - tb) / 0.1)
        tone = sum(np.sin(2 * np.pi * 440.0 * 2 ** ((song.key - 12 + s - 69) / 12) * tb * h) / h
                   for s in chord for h in (1, 2, 3))
        _place(pad, tone * shape, round(start * SAMPLE_RATE))
    music = 0.55 * drums + 0.25 * bass + 0.05 * pad
    return (0.9 * music / max(1e-9, np.abs(music).max())).astype(np.float32)


def _frame_means(x, n_frames, rate=CONTROL_RATE):
    """(..., N) at rate Hz -> (..., n_frames): mean over each 30 fps frame's span."""
    edges = [round(f * rate / FPS) for f in range(n_frames + 1)]
    return np.stack([x[..., a:b].mean(-1) for a, b in zip(edges[:-1], edges[1:])], axis=-1)


def _smooth_noise(rng, n_frames, n_dims, sigma=4.0):
    """(n_frames, n_dims) Gaussian-filtered noise with unit standard deviation per dimension."""
    x = gaussian_filter1d(rng.standard_normal((n_frames + 8 * int(sigma), n_dims)), sigma, axis=0)
    x = x[4 * int(sigma):4 * int(sigma) + n_frames]
    return x / x.std(0, keepdims=True)


def song_motion(song, person, envelope, weights, contour, rng):
    """The known motion function of the module docstring: (T, 59) float32, T = duration * 30."""
    n_frames = round(song.duration * FPS)
    env = _frame_means(envelope, n_frames)                                  # (T,)
    w = _frame_means(weights, n_frames)                                     # (5, T)
    pitch = _frame_means(contour, n_frames)                                 # (T,)
    voiced = gaussian_filter1d((env > VOICED).astype(float), 2.0)
    t = (np.arange(n_frames) + 0.5) / FPS
    accents = np.where(song.kick, 1.0, 0.6)
    nod = (accents[None] * np.exp(-(t[:, None] - song.beats[None]) ** 2 / (2 * NOD_SIGMA ** 2))).sum(1)
    motion = np.zeros((n_frames, MOTION_DIM))
    motion[:, :N_EXPR] = person.mouth_gain * env[:, None] * (w.T @ _vowel_expression())
    motion[:, BROW_DIM] += person.brow_gain * (pitch - 60) / 12 * voiced
    motion[:, N_EXPR] = person.nod_gain * nod                               # global x: nod down
    motion[:, N_EXPR + 3] = 0.5 * person.nod_gain * nod                     # neck x
    motion[:, N_EXPR + 6] = person.jaw_gain * JAW_OPEN * env * (OPENNESS @ w)   # jaw x: open
    motion[:, :N_EXPR] += person.expression_offset
    motion[:, N_EXPR:] += person.pose_offset
    motion[:, :10] += NOISE_EXPRESSION * _smooth_noise(rng, n_frames, 10)
    motion[:, N_EXPR:N_EXPR + 6] += NOISE_HEAD * _smooth_noise(rng, n_frames, 6)
    motion[:, N_EXPR + 6] += NOISE_JAW * _smooth_noise(rng, n_frames, 1)[:, 0]
    return motion.astype(np.float32)


# ----------------------------------------------------------------------------- the filmed person
# The video of a person with video is the procedural head made up, dressed and lit like a portrait recording.
# Its surface is painted from a texture on its (polar angle, azimuth) chart: skin with tone variation and blush,
# lips of their own colour, eyes (sclera, iris, pupil, lash line), brows and hair. Extra geometry joins the head as
# extra vertices of the same FLAME-format model, skinned to its joints, so it moves exactly with it: a hair shell
# over the scalp (the vertices it covers, pushed out), upper teeth (head), lower teeth and tongue (jaw), a dark
# mouth cavity behind them (its lower half on the jaw) and shoulders in clothing (root). The lips' seam opens
# when the jaw drops, and through it the camera sees the teeth, the tongue and the cavity. A key and a fill
# light with a soft highlight, a backdrop with texture, a slight optical blur. The renderer's depth input stays
# the bare head's: what it must learn is how this person looks for each depth image.

PARTS = ("background", "skin", "lips", "eye", "brow", "hair", "teeth", "tongue", "mouth", "clothing")
PART = {name: code for code, name in enumerate(PARTS)}
CHART_ROWS, CHART_COLS = 384, 768     # texels of the head's texture over polar angle [0, pi] x azimuth [-pi, pi]
HAIR_THICKNESS = 0.012                # m, the hair shell's height over the scalp
KEY_LIGHT, FILL_LIGHT = (-0.55, 0.45, 0.70), (0.80, -0.10, 0.60)   # directions toward the lights, camera on +Z
KEY, FILL, AMBIENT = 0.72, 0.30, 0.26                               # their shares of a fully lit surface
SHININESS, GLOSS = 24.0, 0.10         # Blinn-Phong highlight of skin, lips, eyes and teeth (share of white)
OCCLUSION = {"tongue": 0.60, "mouth": 0.45}                         # light reaching into the mouth
FILM_BATCH = 16                       # frames filmed at once


def _noise(points, rng, wavelength, n=12):
    """Smooth random field of unit-ish amplitude on points (..., 3) metres: n plane waves of about the given
    wavelength (spread in length and direction, so they make no lattice)."""
    k = rng.normal(size=(n, 3))
    k *= 2 * np.pi / (wavelength * rng.uniform(0.6, 1.5, (n, 1))) / np.linalg.norm(k, axis=1, keepdims=True)
    phase = (points.astype(np.float32) @ k.T.astype(np.float32) + rng.uniform(0, 2 * np.pi, n).astype(np.float32))
    return np.cos(phase).sum(-1) * np.sqrt(2 / n)


def _chart_texture(person):
    """The head's texture: colour (CHART_ROWS, CHART_COLS, 3) float RGB and part codes (same, int)."""
    rng = np.random.default_rng(person.looks["pattern"])
    looks = person.looks
    a, phi = np.meshgrid((np.arange(CHART_ROWS) + 0.5) / CHART_ROWS * np.pi,
                         (np.arange(CHART_COLS) + 0.5) / CHART_COLS * 2 * np.pi - np.pi, indexing="ij")
    point = 0.1 * np.stack([np.sin(a) * np.sin(phi), np.cos(a), np.sin(a) * np.cos(phi)], -1)   # ~ on the head, m
    bump = lambda a0, p0, sa, sp: np.exp(-0.5 * ((a - a0) / sa) ** 2 - 0.5 * ((abs(phi) - p0) / sp) ** 2)
    tone = 1 + 0.05 * _noise(point, rng, 0.05) + 0.025 * _noise(point, rng, 0.008)
    colour = person.skin * tone[..., None]
    flush = bump(0.53 * np.pi, 0.55, 0.06, 0.2) + 0.6 * bump(0.53 * np.pi, 0.0, 0.03, 0.06) \
        + 0.8 * bump(0.45 * np.pi, np.pi / 2, 0.08, 0.15)                                # cheeks, nose tip, ears
    colour += np.array([22.0, -6, -6]) * flush[..., None]
    colour *= 1 - 0.10 * bump(EYE_A + 0.09, EYE_PHI, 0.04, 0.12)[..., None]              # under the eyes
    part = np.full(a.shape, PART["skin"])

    def paint(weight, rgb, name):
        nonlocal colour
        colour = colour * (1 - weight[..., None]) + weight[..., None] * rgb
        part[weight > 0.5] = PART[name]

    # lips: the upper one with a bow, the lower one fuller, both tapering to the corners of the mouth
    across = np.clip(phi / (MOUTH_HALF_WIDTH + 0.01), -1, 1)
    height = np.where(a < MOUTH_A, 0.068 - 0.012 * np.exp(-0.5 * (phi / 0.04) ** 2), 0.085) * (1 - across ** 2) ** 0.6
    lips = smoothstep((height - abs(a - MOUTH_A)) / 0.012) * (abs(phi) < MOUTH_HALF_WIDTH + 0.01)
    paint(lips, looks["lips"] * (1 + 0.04 * _noise(point, rng, 0.003))[..., None], "lips")
    # nostrils
    nostril = np.exp(-0.5 * ((a - 0.548 * np.pi) / 0.012) ** 2 - 0.5 * ((abs(phi) - 0.055) / 0.028) ** 2)
    colour *= 1 - 0.55 * nostril[..., None]
    # brows: arcs above the eyes, thinning outward
    t = (abs(phi) - 0.10) / 0.56
    centre = BROW_A + 0.012 - 0.025 * np.pi * np.sin(np.pi * np.clip(t, 0, 1) * 0.9)
    brow = smoothstep((0.022 * (1 - 0.6 * np.clip(t, 0, 1)) - abs(a - centre)) / 0.006) * (t > 0) * (t < 1)
    strands = 0.85 + 0.3 * np.cos(260 * phi + 40 * a + 2 * _noise(point, rng, 0.01))
    paint(brow, looks["hair"] * strands[..., None], "brow")
    # eyes: an almond of sclera, an iris with streaks, the pupil, a catch light; a dark lash line above
    for side in (-1, 1):
        dphi = phi - side * EYE_PHI
        almond = (dphi / 0.13) ** 2 + ((a - EYE_A) / (0.021 * np.pi)) ** 2
        r = np.hypot(dphi * np.sin(a), a - EYE_A)
        eye = np.clip(1.0 - almond, 0, None) * 8
        iris = looks["iris"] * (1 + 0.18 * np.cos(np.arctan2(a - EYE_A, dphi) * 23))[..., None] \
            * (1 - 0.5 * smoothstep((r - 0.036) / 0.01))[..., None]
        sclera = np.array([232.0, 226, 220]) * (1 - 0.15 * almond)[..., None]
        look = np.where((r < 0.045)[..., None], iris, sclera)
        look = np.where((r < 0.017)[..., None], np.array([14.0, 12, 12]), look)
        look = np.where((np.hypot(dphi * np.sin(a) + 0.012, a - EYE_A + 0.012) < 0.007)[..., None],
                        np.array([245.0, 245, 245]), look)
        paint(np.clip(eye, 0, 1), look, "eye")
        lash = smoothstep((1.6 - almond) / 0.3) * (almond >= 1) * (a < EYE_A)
        colour *= 1 - 0.75 * lash[..., None]
    # hair: above a hairline that runs from the forehead over the ears to the nape, with strands and a sheen
    hair = smoothstep((_hairline(a, phi) - a) / 0.03)
    strands = 0.7 + 0.3 * np.cos(180 * phi + 6 * np.sin(9 * a) + 3 * _noise(point, rng, 0.02)) \
        + 0.35 * np.exp(-0.5 * ((a - 0.17 * np.pi) / 0.12) ** 2)
    paint(hair, looks["hair"] * strands[..., None], "hair")
    return colour.astype(np.float32), part


def _hairline(a, phi):
    """Polar angle of the hairline at azimuth phi: high on the forehead, over the ears, low at the nape."""
    return 0.2 * np.pi + 0.42 * np.pi * smoothstep((abs(phi) - 0.45) / 2.3) + 0.02 * np.sin(7 * phi)


def _grid_faces(rows, cols, first):
    """Triangles of a rows x cols vertex grid numbered row-major from `first`, all wound the same way."""
    i, j = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    a = first + i * cols + j
    quads = np.stack([np.stack([a, a + cols, a + 1], -1), np.stack([a + 1, a + cols, a + cols + 1], -1)], 2)
    return quads.reshape(-1, 3)


def _teeth(upper):
    """One row of teeth on an arch behind the lips (rest pose, m): verts (n, 3), colours (n, 3), faces."""
    t = np.linspace(-1.2, 1.2, 49)
    height = np.linspace(0, 1, 3)
    shrink = 1.0 if upper else 0.93                                     # the lower arch sits inside the upper
    x = 0.0245 * shrink * np.sin(t)
    z = 0.0625 + 0.0265 * shrink * np.cos(t) - (0 if upper else 0.0015)
    arc = 0.0255 * t                                                    # ~ m along the arch from the middle
    gap = np.cos(np.pi * arc / 0.0075) ** 16                            # 7.5 mm teeth, dark where they meet
    edge = -0.049 + 0.0008 * gap if upper else -0.0495 - 0.0008 * gap   # the biting edge, scalloped
    root = -0.035 if upper else -0.057
    y = edge[None] + (root - edge)[None] * height[:, None]
    verts = np.stack([np.broadcast_to(x, y.shape), y, np.broadcast_to(z, y.shape)], -1).reshape(-1, 3)
    shade = (1 - 0.45 * gap) * (1 - 0.35 * abs(t) / 1.2)                # gaps and the back teeth darker
    colours = np.broadcast_to((np.array([236.0, 230, 212]) * shade[:, None])[None], (3, len(t), 3)).reshape(-1, 3)
    return verts, colours, _grid_faces(3, len(t), 0)


def _tongue():
    """The tongue, a dome on the floor of the mouth behind the lower teeth (rest pose, m)."""
    u, v = np.meshgrid(np.linspace(-1, 1, 15), np.linspace(0, 1, 12), indexing="ij")
    x, z = 0.019 * u, 0.082 - 0.045 * v
    y = -0.0535 + 0.010 * np.sin(np.pi * np.clip(v * 1.3, 0, 1)) ** 0.7 * np.sqrt(1 - u ** 2 + 1e-9)
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    colours = (np.array([180.0, 82, 88]) * (1 - 0.25 * np.exp(-0.5 * (u / 0.15) ** 2))[..., None]).reshape(-1, 3)
    return verts, colours, _grid_faces(*u.shape, 0)


def _mouth_cavity():
    """The dark back of the mouth, a curved wall behind teeth and tongue (rest pose, m); its jaw share (n,)."""
    u, v = np.meshgrid(np.linspace(-1, 1, 11), np.linspace(0, 1, 13), indexing="ij")
    x, y = 0.036 * u, -0.028 - 0.052 * v
    z = 0.045 - 0.02 * u ** 2 - 0.015 * (2 * v - 1) ** 2
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    colours = (np.array([48.0, 16, 18]) * (0.6 + 0.4 * np.abs(u))[..., None]).reshape(-1, 3)
    return verts, colours, _grid_faces(*u.shape, 0), smoothstep(0.5 + (-0.046 - y) / 0.016).reshape(-1)


def _torso(person):
    """Shoulders and chest in clothing, below and behind the neck (rest pose, m): a sheet facing the camera."""
    rng = np.random.default_rng(person.looks["pattern"] + 1)
    u, v = np.meshgrid(np.linspace(-1, 1, 33), np.linspace(0, 1, 13), indexing="ij")
    x = 0.24 * u
    top = -0.115 - 0.3 * np.maximum(abs(x) - 0.04, 0)
    y = top - (0.35 + top) * v ** 1.5
    z = -0.03 + 0.07 * smoothstep((top - y) / 0.08) - 0.05 * u ** 2
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    weave = 1 + 0.07 * np.sign(np.sin(2 * np.pi * x / 0.03)) + 0.06 * _noise(verts.reshape(u.shape + (3,)), rng, 0.08)
    colours = (person.looks["clothing"] * weave[..., None]).reshape(-1, 3)
    return verts, colours, _grid_faces(*u.shape, 0)


@dataclass
class FilmedBody:
    """The filmed person's geometry: a FLAME-format model (head first, then the extras) and what paints it."""
    model: Flame               # from_motion gives (..., V_all, 3); its first V_head vertices are the head's
    faces: torch.Tensor        # (F_all, 3) long: the faces filmed (the head's that can face the camera, the rest)
    paint: torch.Tensor        # (V_all, 3): rest position (m) for chart-textured vertices, RGB for the others
    material: torch.Tensor     # (F_all,) long: -1 chart-textured, else a PART code, per filmed face
    chart: torch.Tensor        # (1, 3, CHART_ROWS, CHART_COLS) colour of the head's texture
    chart_part: torch.Tensor   # (1, 1, CHART_ROWS, CHART_COLS) its part codes (float, for sampling)
    backdrop: torch.Tensor     # (size, size, 3) RGB
    occlusion: torch.Tensor    # (len(PARTS),) light reaching each part
    glossy: torch.Tensor       # (len(PARTS),) 1 where a part has a highlight


def filmed_body(person, size):
    """The filmed person's model, texture and backdrop (deterministic from the person)."""
    head = procedural_head()
    verts, faces = head["v_template"], head["f"]
    n_head = len(verts)
    normals = vertex_normals(verts, faces)
    a = np.arccos(np.clip(verts[:, 1] / np.linalg.norm(verts, axis=1), -1, 1))
    phi = np.arctan2(verts[:, 0], verts[:, 2])
    covered = a < _hairline(a, phi) + 0.02
    shell = np.nonzero(covered)[0]                                     # scalp vertices the hair shell copies
    lift = HAIR_THICKNESS * smoothstep((_hairline(a, phi) - a) / 0.12)[shell]
    shell_faces = faces[covered[faces].all(1)]
    remap = np.full(n_head, -1)
    remap[shell] = n_head + np.arange(len(shell))

    # extras: (verts, colours, faces, joint weights (n, 5), part)
    one = lambda n, joint: np.eye(N_JOINTS)[np.full(n, joint)]
    parts = []
    for upper in (True, False):
        v, c, f = _teeth(upper)
        parts.append((v, c, f, one(len(v), 1 if upper else 2), PART["teeth"]))
    v, c, f = _tongue()
    parts.append((v, c, f, one(len(v), 2), PART["tongue"]))
    v, c, f, jaw = _mouth_cavity()
    parts.append((v, c, f, (1 - jaw)[:, None] * one(len(v), 1) + jaw[:, None] * one(len(v), 2), PART["mouth"]))
    v, c, f = _torso(person)
    parts.append((v, c, f, one(len(v), 0), PART["clothing"]))

    all_verts = [verts, verts[shell] + lift[:, None] * normals[shell]]
    all_faces, material = [faces, remap[shell_faces]], [np.full(len(faces) + len(shell_faces), -1)]
    shapedirs = [head["shapedirs"], head["shapedirs"][shell]]
    posedirs = [head["posedirs"], head["posedirs"][shell]]
    weights = [head["weights"], head["weights"][shell]]
    paint = [verts, verts[shell]]                                     # the shell takes the scalp's texture
    first = n_head + len(shell)
    for v, c, f, w, code in parts:
        near = np.argmin(((v[:, None] - verts[None]) ** 2).sum(-1), axis=1)
        extra_dirs = np.zeros((len(v), 3, head["shapedirs"].shape[2]))
        extra_dirs[:, :, :N_SHAPE] = head["shapedirs"][near, :, :N_SHAPE]   # the head's shape, not its expressions
        all_verts.append(v), all_faces.append(f + first), material.append(np.full(len(f), code))
        shapedirs.append(extra_dirs), posedirs.append(np.zeros((len(v),) + head["posedirs"].shape[1:]))
        weights.append(w), paint.append(c)
        first += len(v)
    arrays = dict(head, v_template=np.concatenate(all_verts), f=np.concatenate(all_faces),
                  shapedirs=np.concatenate(shapedirs), posedirs=np.concatenate(posedirs),
                  weights=np.concatenate(weights),
                  J_regressor=np.pad(head["J_regressor"], ((0, 0), (0, first - n_head))))
    model = Flame(arrays, N_SHAPE, N_EXPR, N_SHAPE, (head["lmk_faces_idx"], head["lmk_bary_coords"]), head["masks"],
                  "the filmed procedural head")
    # the back of the head and of the hair never faces the camera (the head turns by a few degrees): not filmed
    all_faces, material = np.concatenate(all_faces), np.concatenate(material)
    rest = arrays["v_template"][all_faces]                                         # (F_all, 3 corners, 3)
    facing = np.cross(rest[:, 1] - rest[:, 0], rest[:, 2] - rest[:, 0])
    keep = (material >= 0) | (facing[:, 2] > -0.5 * np.linalg.norm(facing, axis=1))
    colour, part = _chart_texture(person)
    occlusion, glossy = np.ones(len(PARTS)), np.zeros(len(PARTS))
    for name, value in OCCLUSION.items():
        occlusion[PART[name]] = value
    glossy[[PART["skin"], PART["lips"], PART["eye"], PART["teeth"], PART["tongue"]]] = 1
    as_tensor = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return FilmedBody(model=model, faces=torch.as_tensor(all_faces[keep]), paint=as_tensor(np.concatenate(paint)),
                      material=torch.as_tensor(material[keep]),
                      chart=as_tensor(colour).permute(2, 0, 1)[None], chart_part=as_tensor(part)[None, None],
                      backdrop=as_tensor(_backdrop(person, size)), occlusion=as_tensor(occlusion),
                      glossy=as_tensor(glossy))


def _backdrop(person, size):
    """A room behind the person: a lit wall with a vertical gradient, soft out-of-focus shapes and panels."""
    rng = np.random.default_rng(person.looks["pattern"] + 2)
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    image = person.background * (1.25 - 0.3 * y)[..., None]
    for _ in range(7):
        cx, cy, r = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.1, 0.35)
        blob = np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / r ** 2) * rng.uniform(0.2, 0.5)
        image = image * (1 - blob[..., None]) + blob[..., None] * person.looks["accent"] * rng.uniform(0.6, 1.2)
    image *= (1 + 0.08 * smoothstep(np.sin(np.pi * 2.5 * x + rng.uniform(0, 6)) * 4 + 0.5))[..., None]   # panels
    image *= (1 - 0.25 * (x ** 2 + y ** 2) / 2)[..., None]                                            # vignette
    return image.clip(0, 255)


def _vertex_normals(verts, faces):
    """verts (B, V, 3) -> unit vertex normals (B, V, 3), the area-weighted mean of the faces' normals."""
    tri = verts[:, faces]                                                              # (B, F, 3, 3)
    face_normal = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
    normals = torch.zeros_like(verts)
    for k in range(3):
        normals.index_add_(1, faces[:, k], face_normal)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def film(body, shape, motion, cam, size):
    """
    Frames of the filmed person: shape (100,), motion (B, 59), cam (B, 3) -> uint8 (B, size, size, 3) and the
    part each pixel shows, uint8 (B, size, size) codes into PARTS (before the optical blur).
    """
    with torch.no_grad():
        verts = body.model.from_motion(torch.as_tensor(shape, dtype=torch.float32), torch.as_tensor(motion))
        faces = body.faces
        projected = render.project(verts, torch.as_tensor(cam, dtype=torch.float32))
        _, face_id = render.rasterize(projected, faces, size)                           # (B, H, W)
        normals = _vertex_normals(verts, body.model.faces)                              # (B, V, 3) metres, +Z to camera
        values = render.interpolate(projected, faces, face_id,
                                    torch.cat([body.paint.expand(len(verts), -1, -1), normals], -1))  # (B, H, W, 6)
        paint, normal = values[..., :3], values[..., 3:]
        material = torch.where(face_id >= 0, body.material[face_id.clamp_min(0)], PART["background"])
        charted = material < 0
        # the chart: polar angle from +y, azimuth from +z toward +x, as grid_sample's [-1, 1] coordinates
        radius = paint.norm(dim=-1).clamp_min(1e-9)
        grid = torch.stack([torch.atan2(paint[..., 0], paint[..., 2]) / math.pi,
                            torch.acos((paint[..., 1] / radius).clamp(-1, 1)) / math.pi * 2 - 1], -1)
        sample = lambda image, mode: F.grid_sample(image.expand(len(verts), -1, -1, -1), grid, mode=mode,
                                                   padding_mode="border", align_corners=False)
        albedo = torch.where(charted[..., None], sample(body.chart, "bilinear").permute(0, 2, 3, 1), paint)
        part = torch.where(charted, sample(body.chart_part, "nearest")[:, 0].long(), material)
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        normal = torch.where(normal[..., 2:] < 0, -normal, normal)                   # two-sided: face the camera
        key, fill = (torch.tensor(d) / torch.tensor(d).norm() for d in (KEY_LIGHT, FILL_LIGHT))
        halfway = (key + torch.tensor([0.0, 0, 1])) / (key + torch.tensor([0.0, 0, 1])).norm()
        light = AMBIENT + KEY * (normal @ key).clamp_min(0) + FILL * (normal @ fill).clamp_min(0)
        highlight = GLOSS * 255 * (normal @ halfway).clamp_min(0) ** SHININESS * body.glossy[part]
        colour = albedo * (light * body.occlusion[part])[..., None] + highlight[..., None]
        image = torch.where((face_id >= 0)[..., None], colour, body.backdrop)          # (B, H, W, 3)
        for axis in (1, 2):                                                             # a lens's slight softness:
            edge = image.narrow(axis, 0, 1), image.narrow(axis, size - 1, 1)           # [1, 2, 1] / 4 on each axis
            image = 0.5 * image + 0.25 * (torch.cat([edge[0], image.narrow(axis, 0, size - 1)], axis)
                                          + torch.cat([image.narrow(axis, 1, size - 1), edge[1]], axis))
        return image.round().clamp(0, 255).to(torch.uint8).numpy(), part.to(torch.uint8).numpy()


def render_portrait(body, person, motion, cam, size, batch=FILM_BATCH):
    """The person's portrait video frames for motion (T, 59) and cam (T, 3): uint8 (T, size, size, 3)."""
    return np.concatenate([film(body, person.shape, motion[lo:lo + batch], cam[lo:lo + batch], size)[0]
                           for lo in range(0, len(motion), batch)])


def _split(ids, rng):
    """Per person: 15 % test, 5 % val (at least one each), the rest train."""
    ids = list(ids)
    rng.shuffle(ids)
    n_test = max(1, round(TEST_SHARE * len(ids)))
    n_val = max(1, round(VAL_SHARE * len(ids)))
    return dict(test=ids[:n_test], val=ids[n_test:n_test + n_val], train=ids[n_test + n_val:])


def _filmed(split, video_clips):
    """Sequences of one person that get a video: all of val and test, then train ones up to video_clips."""
    held_out = split["test"] + split["val"]
    return set(held_out + sorted(split["train"])[:max(0, video_clips - len(held_out))])


def generate_dataset(root, n_people=4, clips_per_person=20, seed=0, video_size=render.IMAGE_SIZE,
                     with_video=True, video_people=1, video_clips=8, clip_seconds=CLIP_SECONDS, clips_per_song=4,
                     verbose=True):
    """
    Write a SingingHead-layout data set of procedural singers into root (see the module docstring): n_people
    people, clips_per_person sequences of clip_seconds each, songs of clips_per_song sequences. When with_video,
    the first video_people people get video_size mp4s for their val and test sequences and for their first
    train sequences, video_clips sequences in all. Returns root as a Path.
    """
    if clips_per_person < 3:
        raise ValueError(f"{root}: clips_per_person must be at least 3 (one per split), got {clips_per_person}")
    root = Path(root)
    for path in (flame_path, audio_path, bgm_path, video_path):
        path(root, "-").parent.mkdir(parents=True, exist_ok=True)
    filming = with_video and video_people > 0
    seg_frames, seg_samples = clip_seconds * FPS, clip_seconds * SAMPLE_RATE
    splits = {split: [] for split in SPLITS}
    songs_per_person = -(-clips_per_person // clips_per_song)
    progress = Progress(n_people * songs_per_person, "song", lines=10)
    to_film = []          # (path, body, person, motion, cam): filmed after the songs, each a step of its own
    for p in range(n_people):
        person = make_person(p, seed)
        songs = [(s, min(clips_per_song, clips_per_person - first))
                 for s, first in enumerate(range(0, clips_per_person, clips_per_song))]
        ids = [f"{person.name}_{s}_{g}_0" for s, n_segments in songs for g in range(n_segments)]
        split = _split(ids, np.random.default_rng([seed, p, 0]))
        filmed = _filmed(split, video_clips) if filming and p < video_people else set()
        body = filmed_body(person, video_size) if filmed else None
        for s, n_segments in songs:
            rng = np.random.default_rng([seed, p, s + 1])
            song = compose_song(rng, n_segments * clip_seconds, person.register)
            voice, envelope, weights, contour = sing(song, person, rng)
            music = play_music(song, rng)
            motion = song_motion(song, person, envelope, weights, contour, rng)
            jitter = _smooth_noise(rng, len(motion), 3, sigma=8.0) * [0.005 * person.cam[0], 0.001, 0.001]
            cam = (person.cam + jitter).astype(np.float32)                               # (T, 3)
            for g in range(n_segments):
                seq = f"{person.name}_{s}_{g}_0"
                frames = slice(g * seg_frames, (g + 1) * seg_frames)
                samples = slice(g * seg_samples, (g + 1) * seg_samples)
                write_flame_pickle(flame_path(root, seq), motion[frames], person.shape, cam[frames])
                soundfile.write(audio_path(root, seq), voice[samples], SAMPLE_RATE, subtype="PCM_16")
                soundfile.write(bgm_path(root, seq), music[samples], SAMPLE_RATE, subtype="PCM_16")
                if seq in filmed:
                    to_film.append((video_path(root, seq), body, person, motion[frames], cam[frames]))
            if progress.advance() and verbose:
                print(f"  {progress.line('built')} (person {person.name})", flush=True)
        for name, chosen in split.items():
            splits[name] += chosen
    # filming a clip costs a hundred times a song's sound and motion: counted apart, so each ETA holds
    filming_progress = Progress(len(to_film), "video", lines=10)
    for path, body, person, motion, cam in to_film:
        render.write_video(path, render_portrait(body, person, motion, cam, video_size))
        if filming_progress.advance() and verbose:
            print(f"  {filming_progress.line('filmed')} ({path.name})", flush=True)
    for name in SPLITS:
        split_path(root, name).write_text("".join(f"{seq}\n" for seq in sorted(splits[name])))
    generator_path(root).write_text(json.dumps(dict(
        version=BUILTIN_VERSION, n_people=n_people, clips_per_person=clips_per_person, seed=seed,
        video_size=video_size, with_video=with_video, video_people=video_people, video_clips=video_clips,
        clip_seconds=clip_seconds, clips_per_song=clips_per_song), indent=1))
    return root


def _is_current(root):
    marker = generator_path(root)
    return marker.is_file() and json.loads(marker.read_text()).get("version") == BUILTIN_VERSION


def is_generated(root):
    """True for a data set written by generate_dataset (its generator.json marks it): its people are procedural
    heads, so the procedural head is the right FLAME for it."""
    return generator_path(root).is_file()


def require_head(root, flame, procedural_head=False):
    """Refuse a data set of real FLAME parameters (any set generate_dataset did not write) without a FLAME file:
    the stand-in head would turn its motion into meshes silently wrong. procedural_head asks for it anyway."""
    if flame is None and not procedural_head and not is_generated(root):
        raise ValueError(f"{root}: not a data set of data.py's generator, so its motion is real FLAME parameters "
                         f"and needs the real FLAME: get {FLAME_SOURCE} and pass --flame PATH/generic_model.pkl "
                         f"(or --procedural-head to use the stand-in head anyway)")


def builtin_data(root=None):
    """Path of the built-in data set (default data/builtin beside this file), generated on first use."""
    root = Path(root) if root is not None else BUILTIN_ROOT
    if _is_current(root):
        return root
    print(f"building the built-in SingingHead-format data set in {root} (once; about a minute)", flush=True)
    started = time.time()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate_dataset(tmp)
    if _is_current(root):                        # another process finished first
        shutil.rmtree(tmp)
        return root
    if root.exists():                            # an older generator's set: move it aside, then drop it
        old = root.parent / f".{root.name}.old{os.getpid()}"
        os.replace(root, old)
        shutil.rmtree(old)
    os.replace(tmp, root)
    print(f"built-in data set ready in {time.time() - started:.0f} s: {root}", flush=True)
    return root


if __name__ == "__main__":
    data_root = Path(sys.argv[1]) if len(sys.argv) > 1 else builtin_data()
    for name in SPLITS:
        clips = SingingHead(data_root, name)
        print(f"{name}: {len(clips)} clips of {CLIP_FRAMES} frames, people {', '.join(clips.people)}")
