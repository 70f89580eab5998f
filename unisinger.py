"""UniSinger: singing voice + background music + FLAME shape -> diverse 3D FLAME facial motion.

The method, in the order data flows: MotionConfig (the `paper` and CPU-sized `tiny` presets), MotionCVAE (the
paper's conditional VAE on transformer decoders, section IV-A), motion_losses, the user's Controls, generate (a
song of any length: overlapping windows of the training length, cross-faded) and portrait_video (motion ->
depth -> the trained face renderer). Below the support banner: live streaming (MotionStream, stream_song); the
checkpoint readers of both stages (read_model); the outputs (write_motion, the previews render_preview, side_by_side
and write_grid); a mixed song's voice and accompaniment separated (--song, separate_song); the command line.

The model in one paragraph. Every frame t gets one audio token: wav2vec 2.0 features of the singing voice
(interpolated to 30 fps before the transformer layers, as FaceFormer does) projected to d, concatenated with
the 64-d MFCC of the background music projected to d/2, then projected from 3d/2 to d (the "w/o BGM" ablation
has no music branch: the voice's d go through that last projection alone). The encoder reads the tokens
[mu] [sigma] (linear(m_t) + shape_emb)_t, the decoder [shape_emb] (z)_t with z repeated T times; both
cross-attend to the audio tokens, motion token t to audio token t only, the leading tokens to all. Periodic
positional encoding (period 30 frames) is added to all tokens. The networks work on motion standardised by the
training set's mean and std (buffers, so checkpoints carry them). Losses: KL + reconstruction + velocity +
face-mesh vertices, weighted in MotionConfig.

Depends on torch, numpy, Pillow and our audio.py, flame.py, render.py, data.py; the command line alone imports
builtin.py (the head a checkpoint names, or the stand-in head), so `import unisinger` loads no builtin or train.

Use alone (a checkpoint from `python train.py --stage motion`; the videos carry voice + music mixed):
    python unisinger.py --audio voice.wav --bgm music.wav --samples 3 --out out/song
    python unisinger.py --audio voice.wav --bgm music.wav --image out/render/reference.png \
        --renderer out/render/best.pt --out out/song
"""
import copy
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from audio import FPS, N_MFCC, SAMPLE_RATE, AudioFile, Wav2Vec2, Wav2Vec2Config, first_line, mfcc_at_fps, normalize_wave
from data import (AUDIO_BLOCK, CLIP_FRAMES, DEFAULT_CAM, Parser, Progress, VideoWriter, atomic_output, check_device,
                  check_finite, check_output_folder, clip_samples, fit_length, float_in, int_in, output_folder,
                  read_checkpoint, run_command, song_frames, wav_writer, write_flame_pickle, write_wav)
from flame import EXPRESSION, HEAD_POSE, JAW_POSE, MM_PER_M, MOTION_DIM, N_SHAPE, read_npy_header, save_glb
from render import (BACKGROUND_RGB, IMAGE_SIZE, PREVIEW_CAM, PREVIEW_SIZE, FaceRenderer, RendererConfig, image_tensor,
                    project, reference_flow, render_depth, shade, to_uint8)

RENDER_BATCH = 16                           # frames rasterized and rendered at once: memory flat for any song
PPE_PERIOD = 30                             # periodic positional encoding repeats every second
LOSS_SPACES = ("raw", "standardised")       # where the reconstruction and velocity losses compare motion
WAV2VEC2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                     feat_extract_norm="group", num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                     do_stable_layer_norm=False)
WAV2VEC2_TINY = dict(WAV2VEC2_BASE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=32,
                     num_conv_pos_embedding_groups=4)


@dataclass
class MotionConfig:
    """The motion model's hyper-parameters. The defaults are the `paper` preset: the paper's model and losses,
    with the paper's open choices filled in (README, "The method"); `tiny` is CPU-sized."""
    d_model: int = 256              # the paper does not give d; 256 is FaceFormer-sized for a 59-d output
    n_heads: int = 4
    n_layers: int = 4               # layers in each of the encoder and decoder stacks
    d_ff: int = 1024
    dropout: float = 0.1
    ppe_period: int = PPE_PERIOD    # frames after which the periodic positional encoding repeats
    wav2vec: dict = field(default_factory=lambda: dict(WAV2VEC2_BASE))
    freeze_feature_extractor: bool = True   # FaceFormer and the paper fine-tune wav2vec above its CNN
    use_music: bool = True          # False: the "w/o BGM" ablation, the music branch removed (no parameters)
    standardise_motion: bool = True  # networks see motion standardised by the training set's mean and std
    loss_space: str = "raw"         # rec / vel on raw FLAME parameters (the paper) or "standardised" (ours)
    mesh_head_pose: bool = True     # mesh loss with the head pose (the paper); False zeroes it, as LVE / FVE do
    # loss weights (the paper gives none): chosen so that each term is O(1) early in training; 0 = term off
    w_kl: float = 1e-3
    w_rec: float = 1.0
    w_vel: float = 10.0
    w_mesh: float = 0.05            # on squared millimetres of face-region vertices

    @classmethod
    def preset(cls, name):
        if name == "paper":
            return cls()
        if name == "tiny":
            return cls(d_model=64, n_heads=4, n_layers=2, d_ff=128, dropout=0.1, wav2vec=dict(WAV2VEC2_TINY),
                       freeze_feature_extractor=False, mesh_head_pose=False)
        raise ValueError(f"unknown preset {name!r}: choose 'paper' or 'tiny'")

    def __post_init__(self):
        if self.loss_space not in LOSS_SPACES:
            raise ValueError(f"loss_space must be one of {LOSS_SPACES}, not {self.loss_space!r}")


class PeriodicPositionalEncoding(nn.Module):
    """Sinusoidal encoding that repeats every `period` frames (FaceFormer's PPE)."""

    def __init__(self, d_model, period=PPE_PERIOD):
        super().__init__()
        position = torch.arange(period, dtype=torch.float32)[:, None]                       # (P, 1)
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(period, d_model)                                                   # (P, d)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x):                                                                   # x (B, L, d)
        index = torch.arange(x.shape[1], device=x.device) % self.pe.shape[0]
        return x + self.pe[index]


def alignment_mask(n_lead, n_frames, device):
    """Cross-attention mask (n_lead + T, T), True = blocked: motion token t sees audio token t only."""
    lead = torch.zeros(n_lead, n_frames, dtype=torch.bool, device=device)
    return torch.cat([lead, ~torch.eye(n_frames, dtype=torch.bool, device=device)], dim=0)


def transformer_decoder(cfg):
    layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, batch_first=True)
    return nn.TransformerDecoder(layer, cfg.n_layers)


class MotionCVAE(nn.Module):
    def __init__(self, cfg: MotionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.wav2vec = Wav2Vec2(Wav2Vec2Config.from_dict(cfg.wav2vec))
        # the paper's "entire audio feature": voice -> d, music MFCC -> d/2, concatenated (3d/2) -> d
        self.voice_proj = nn.Linear(self.wav2vec.cfg.hidden_size, d)
        self.music_proj = nn.Linear(N_MFCC, d // 2) if cfg.use_music else None
        self.audio_proj = nn.Linear(d + d // 2 if cfg.use_music else d, d)
        self.shape_emb = nn.Linear(N_SHAPE, d)
        self.motion_proj = nn.Linear(MOTION_DIM, d)
        self.mu_token = nn.Parameter(torch.randn(d) * 0.02)
        self.sigma_token = nn.Parameter(torch.randn(d) * 0.02)
        self.ppe = PeriodicPositionalEncoding(d, cfg.ppe_period)
        self.encoder = transformer_decoder(cfg)
        self.decoder = transformer_decoder(cfg)
        self.to_motion = nn.Linear(d, MOTION_DIM)
        self.register_buffer("motion_mean", torch.zeros(MOTION_DIM))
        self.register_buffer("motion_std", torch.ones(MOTION_DIM))
        if cfg.freeze_feature_extractor:
            self.wav2vec.features.requires_grad_(False)

    def set_motion_stats(self, mean, std):
        self.motion_mean.copy_(torch.as_tensor(mean))
        self.motion_std.copy_(torch.as_tensor(std).clamp_min(1e-4))

    def voice_features(self, voice, n_frames):
        """wav2vec 2.0 features at the motion frame rate: (B, N) samples, each normalised to zero mean and unit
        variance as wav2vec 2.0 base checkpoints expect -> (B, T, C)."""
        return self.wav2vec(normalize_wave(voice), n_frames=n_frames)

    def audio_tokens(self, voice_feats, music_mfcc=None):
        """voice (B, T, C) + music MFCC (B, T, 64) -> one audio token a frame (B, T, d). A model without the
        music branch (use_music False) takes no music: music_mfcc is ignored and may be None."""
        voice = self.voice_proj(voice_feats)                                                # (B, T, d)
        if self.music_proj is None:
            return self.audio_proj(voice)
        if music_mfcc is None:
            raise ValueError("this model has a music branch: pass the background music's MFCC (silence for none)")
        return self.audio_proj(torch.cat([voice, self.music_proj(music_mfcc)], dim=-1))   # (B, T, 3d/2) -> d

    def encode(self, motion, shape, audio):
        """motion (B, T, 59) normalised, shape (B, 100), audio tokens (B, T, d) -> mu, logvar (B, d)."""
        B, T, _ = motion.shape
        tokens = torch.cat([self.mu_token.expand(B, 1, -1), self.sigma_token.expand(B, 1, -1),
                            self.motion_proj(motion) + self.shape_emb(shape)[:, None]], dim=1)  # (B, T+2, d)
        out = self.encoder(self.ppe(tokens), audio, memory_mask=alignment_mask(2, T, motion.device))
        return out[:, 0], out[:, 1]

    def decode(self, z, shape, audio):
        """z (B, d), shape (B, 100), audio tokens (B, T, d) -> normalised motion (B, T, 59)."""
        T = audio.shape[1]
        tokens = torch.cat([self.shape_emb(shape)[:, None], z[:, None].expand(-1, T, -1)], dim=1)  # (B, T+1, d)
        out = self.decoder(self.ppe(tokens), audio, memory_mask=alignment_mask(1, T, z.device))
        return self.to_motion(out[:, 1:])

    def standardise(self, motion):
        return (motion - self.motion_mean) / self.motion_std

    def normalise(self, motion):
        """FLAME motion -> what the networks read."""
        return self.standardise(motion) if self.cfg.standardise_motion else motion

    def denormalise(self, motion):
        """What the networks write -> FLAME motion."""
        return motion * self.motion_std + self.motion_mean if self.cfg.standardise_motion else motion

    def forward(self, motion, shape, music_mfcc=None, voice=None, voice_feats=None):
        """Training pass on raw voice (B, N) or cached wav2vec features (B, T, C), exactly one of them ->
        predicted motion (B, T, 59) in FLAME units and the posterior (mu, logvar) (B, d) each."""
        if (voice is None) == (voice_feats is None):
            raise ValueError("pass exactly one of voice (raw samples) and voice_feats (cached features)")
        if voice_feats is None:
            voice_feats = self.voice_features(voice, motion.shape[1])
        audio = self.audio_tokens(voice_feats, music_mfcc)
        mu, logvar = self.encode(self.normalise(motion), shape, audio)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.denormalise(self.decode(z, shape, audio)), mu, logvar

    @torch.no_grad()
    def sample(self, shape, voice_feats, music_mfcc=None, z=None):
        """Inference: only the decoder; z ~ N(0, I) unless given. Returns motion (B, T, 59)."""
        audio = self.audio_tokens(voice_feats, music_mfcc)
        if z is None:
            z = torch.randn(audio.shape[0], self.cfg.d_model, device=audio.device)
        return self.denormalise(self.decode(z, shape, audio))


def motion_losses(model, face, pred, target, shape, mu, logvar):
    """The paper's loss w_kl * KL + w_rec * rec + w_vel * vel + w_mesh * mesh -> (total, {term: float}).

    pred, target: FLAME motion (B, T, 59). rec and vel: mean squared errors of the motion and of its frame-to-frame
    differences, in cfg.loss_space; mesh: mean squared distance in mm^2 of the face-region vertices (face: a
    Flame.region), with the head pose or not (cfg.mesh_head_pose). A term of weight 0 is not computed at all
    (face may then be None), so it cannot touch the other terms' gradients.
    """
    cfg = model.cfg
    space = model.standardise if cfg.loss_space == "standardised" else (lambda m: m)
    terms = {}
    if cfg.w_kl:
        terms["kl"] = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1))
    if cfg.w_rec or cfg.w_vel:
        pred_s, target_s = space(pred), space(target)
        if cfg.w_rec:
            terms["rec"] = F.mse_loss(pred_s, target_s)
        if cfg.w_vel:
            terms["vel"] = F.mse_loss(pred_s[:, 1:] - pred_s[:, :-1], target_s[:, 1:] - target_s[:, :-1])
    if cfg.w_mesh:
        pred_v = face.from_motion(shape, pred.float(), zero_head_pose=not cfg.mesh_head_pose)   # (B, T, F, 3)
        target_v = face.from_motion(shape, target.float(), zero_head_pose=not cfg.mesh_head_pose)
        terms["mesh"] = (pred_v - target_v).pow(2).sum(-1).mean() * MM_PER_M ** 2
    total = sum(getattr(cfg, f"w_{k}") * v for k, v in terms.items())
    return total, {k: v.item() for k, v in terms.items()}


@dataclass
class Controls:
    """What a user chooses of a generation: how many takes from which seed, how far z strays (temperature), and
    how much the head and the face move about the training mean motion (apply_controls)."""
    samples: int = 1
    seed: int = 0
    temperature: float = 1.0
    pose_scale: float = 1.0
    expression_scale: float = 1.0
    still: bool = False


def draw_z(d_model, n_samples, seed, temperature=1.0):
    """The takes' latent codes, z ~ N(0, temperature^2 I): (n_samples, d). Row k is the same for any n_samples,
    so a stream with the same seed plays offline sample 0; temperature 0 gives every take z = 0."""
    return torch.randn(n_samples, d_model, generator=torch.Generator().manual_seed(seed)) * temperature


def apply_controls(motion, mean, controls):
    """Scale a take's motion (..., 59) tensor about mean (59,), the model's training mean motion, frame by frame
    (so a stream can apply it too): m' = mean + scale * (m - mean), pose_scale for the head pose (global + neck),
    expression_scale for expression and jaw. Scale 0 holds that part at the mean, 1 leaves it untouched (bit for
    bit), above 1 exaggerates; still holds the head pose at the mean whatever pose_scale says."""
    out = motion.clone()
    pose_scale = 0.0 if controls.still else controls.pose_scale
    scales = ((HEAD_POSE, pose_scale), (EXPRESSION, controls.expression_scale), (JAW_POSE, controls.expression_scale))
    for part, scale in scales:
        if scale != 1.0:
            out[..., part] = mean[part] + scale * (motion[..., part] - mean[part])
    return out


def window_starts(n_frames, window, overlap):
    """Start frames of windows of `window` frames overlapping by `overlap`, the last one flush with the end."""
    if n_frames <= window:
        return [0]
    return list(range(0, n_frames - window, window - overlap)) + [n_frames - window]


@torch.no_grad()
def generate(model, voice, bgm=None, shape=None, controls=Controls(), overlap=60, batch_windows=8, progress=False):
    """Motion for a whole song: voice / bgm (N,) float32 at 16 kHz, or AudioFiles read a batch of windows at a
    time (memory then does not grow with the song beyond the motion), shape (100,) -> (n_samples, T, 59) numpy.

    Windows of the training length overlap by `overlap` frames; each sample keeps one z for the whole song (one
    consistent take), and overlapping frames are cross-faded linearly, so the joins have no seam. A song shorter
    than a window is padded with silence and cropped back; the music is cut or padded to the voice (a model
    without the music branch reads none). controls.samples takes from controls.seed, z scaled by temperature
    (draw_z), then apply_controls. progress=True prints progress lines when the song takes several batches.
    """
    model.eval()
    device = next(model.parameters()).device
    voice = voice if isinstance(voice, AudioFile) else np.asarray(voice, dtype=np.float32)
    n_frames = song_frames(len(voice))
    if n_frames < 1:
        raise ValueError(f"audio too short: {len(voice)} samples is less than one frame at {FPS} fps")
    if bgm is not None and not isinstance(bgm, AudioFile):
        bgm = np.asarray(bgm, dtype=np.float32)
    shape = torch.zeros(N_SHAPE) if shape is None else torch.as_tensor(shape, dtype=torch.float32)
    window = CLIP_FRAMES
    starts = window_starts(n_frames, window, overlap)
    total = max(n_frames, window)
    n_samples = controls.samples
    z = draw_z(model.cfg.d_model, n_samples, controls.seed, controls.temperature).to(device)     # (S, d)
    out = torch.zeros(n_samples, total, MOTION_DIM)                                       # (S, T, 59)
    weight = torch.zeros(total, 1)
    ramp = blend_weights(window, overlap)                                                 # (window, 1)
    windows = Progress(len(starts), "window", lines=PROGRESS_LINES)
    progress = progress and len(starts) > batch_windows
    for b in range(0, len(starts), batch_windows):
        chunk = starts[b:b + batch_windows]
        spans = [(clip_samples(s), clip_samples(s) + clip_samples(window)) for s in chunk]
        v = torch.from_numpy(np.stack([stretch(voice, a, b, len(voice)) for a, b in spans])).to(device)  # (W, N)
        m = None
        if model.cfg.use_music:
            m = torch.from_numpy(np.stack([stretch(bgm, a, b, len(voice)) for a, b in spans]))         # (W, N)
            m = mfcc_at_fps(m, SAMPLE_RATE, window).to(device).repeat_interleave(n_samples, 0)  # (W * S, window, 64)
        feats = model.voice_features(v, window)                                           # (W, window, C)
        W = len(chunk)
        motion = model.sample(shape.to(device).expand(W * n_samples, -1), feats.repeat_interleave(n_samples, 0), m,
                              z=z.repeat(W, 1)).float().cpu().view(W, n_samples, window, MOTION_DIM)
        for i, s in enumerate(chunk):
            w = ramp.clone()
            if s == 0:
                w[:overlap] = 1.0                      # nothing before the first window to blend with
            if s + window == total:
                w[-overlap:] = 1.0
            out[:, s:s + window] += motion[i] * w
            weight[s:s + window] += w
        if windows.advance(len(chunk)) and progress:
            print(windows.line("motion:"), flush=True)
    out /= weight                                    # in place: a long song holds as few copies of its motion
    return apply_controls(out[:, :n_frames], model.motion_mean.cpu(), controls).numpy()


def blend_weights(window, overlap):
    """Linear fade in over the first `overlap` frames and out over the last ones: (window, 1)."""
    w = torch.ones(window, 1)
    if overlap > 0:
        fade = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
        w[:overlap, 0] = fade
        w[-overlap:, 0] = fade.flip(0)
    return w


def stretch(x, start, stop, end):
    """Samples start..stop-1 of a signal (an array, an AudioFile, or None for silence), zero from `end` on:
    (stop - start,) float32."""
    out = np.zeros(stop - start, np.float32)
    stop_in = min(stop, end, 0 if x is None else len(x))
    if stop_in > start:
        out[:stop_in - start] = x[start:stop_in]
    return out


@torch.no_grad()
def portrait_video(trained, image_path, flame, shape, motion, out_path, audio=None, progress=False):
    """The singing portrait: motion (T, 59) with shape (100,) -> FLAME meshes -> depth with the renderer's camera
    (and a warping renderer's reference warp) -> FaceRenderer frames (trained: load_renderer's, on its device),
    RENDER_BATCH frames at a time (frame t has temporal index t), streamed into out_path (mp4, audio (N,) muxed in
    when given) and the depth video into depth.mp4 beside it. Returns out_path as a Path. To film a tracked clip
    with its own cameras, give a TrainedRenderer whose cam is them (dataclasses.replace)."""
    out_path = Path(out_path)
    if trained.flame_record["flame_sha256"] != flame.sha256:          # depth of another head than it learnt from
        raise ValueError(f"{trained.source}: trained on depth images of {trained.flame_record['flame']}, not of "
                         f"{flame.source}; use the FLAME it was trained with (--flame) or a renderer trained with it")
    renderer, size = trained.generator, trained.config.image_size
    device = next(renderer.parameters()).device
    reference = load_reference(image_path, size).to(device)                               # (3, H, W)
    motion = torch.as_tensor(np.asarray(motion), dtype=torch.float32)
    if motion.ndim != 2 or motion.shape[1] != MOTION_DIM:
        raise ValueError(f"{out_path}: motion must be (frames, {MOTION_DIM}), got {tuple(motion.shape)}")
    shape = torch.as_tensor(np.asarray(shape), dtype=torch.float32, device=device)
    flame = copy.deepcopy(flame).to(device)  # leave the caller's model where it was
    cam = torch.as_tensor(np.asarray(trained.cam), dtype=torch.float32, device=device)
    if cam.shape not in ((3,), (len(motion), 3)):
        raise ValueError(f"{trained.source}: its camera must be (3,) or ({len(motion)}, 3), got {tuple(cam.shape)}")
    reference_head = None                # a warping renderer's reference frame: its vertices and camera
    if trained.reference is not None:
        head = {k: v.to(device) for k, v in trained.reference.items()}
        reference_head = (flame.from_motion(head["shape"], head["motion"]), head["cam"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    frames_done = Progress(len(motion), "frame", lines=PROGRESS_LINES)
    with VideoWriter(out_path, size, FPS, audio) as video, VideoWriter(out_path.with_name("depth.mp4"), size, FPS,
                                                                        audio) as depth_video:
        for start in range(0, len(motion), RENDER_BATCH):
            chunk = motion[start:start + RENDER_BATCH].to(device)                          # (b, 59)
            chunk_cam = cam if cam.dim() == 1 else cam[start:start + RENDER_BATCH]
            verts = flame.from_motion(shape, chunk)
            depth = render_depth(verts, flame.faces, chunk_cam, size)                      # (b, 1, H, W)
            flow = None if reference_head is None else reference_flow(verts, flame.faces, chunk_cam,
                                                                      *reference_head, size)
            index = torch.arange(start, start + len(chunk), device=device)
            with autocast:
                frames = renderer(depth, reference.expand(len(chunk), -1, -1, -1), index, flow)  # (b, 3, H, W)
            video.write(to_uint8(frames))
            depth_video.write(to_uint8(depth))
            if frames_done.advance(len(chunk)) and progress:
                print(frames_done.line("portrait video:"), flush=True)
    return out_path


# ------------------------------------------------------------ support: streaming, checkpoints, outputs, command line

DEFAULT_CHECKPOINT = Path(__file__).parent / "out" / "motion" / "best.pt"
PROGRESS_LINES = 10                         # progress lines of each long step of the command line
MIN_PREVIEW_SIZE = 16                       # pixels, the smallest --size the previews are written at
STREAM_LOOKAHEAD = 4        # frames (133 ms) of audio past a frame before the stream makes it final
STREAM_CHUNK_MS = 100       # default size of the audio chunks the command line feeds a stream
GRID_COLUMNS = 4            # takes a row in the --grid preview
PREVIEW_BATCH = 64          # frames render_preview meshes and writes at once
PREVIEW_PRESET = "veryfast"  # libx264 speed preset of shaded previews: smooth synthetic frames compress easily
LABEL_HEIGHT = 1 / 16       # a label's height, a share of the panel's side (32 px at 512²)
LABEL_MARGIN = 0.03         # share of the panel between a label and the panel's top and left edges
LABEL_RGB = (235, 235, 235)  # label colour
GRID_BATCH_PIXELS = 1 << 26  # pixels of --grid frames made at once (64 frames of 1024²): memory flat in its size
MAX_SAMPLES = 32            # takes a run: each is three files and a --grid panel
GENERATE_BATCH = 32         # windows x takes the model runs at once, so memory does not grow with --samples
MAX_PREVIEW_SIZE = 1024     # pixels, the largest --size (the shading's work and memory grow with its square)
MAX_IMAGE_SIDE = 8192       # pixels, the longest --image side read (8192² is 200 MB of pixels; a renderer takes 256)
MAX_SEED = 2 ** 63 - 1      # the largest seed torch.Generator takes as a signed 64-bit integer
CONTROL = float_in(0, 3)    # temperature and scales: 0 holds still, 1 as trained; beyond 3 the model never was
STREAM_RANGES = dict(chunk_ms=float_in(1, 10_000), lookahead_ms=float_in(0, 10_000), window_s=float_in(1, 60))
SONG_MIN_S = 1.0            # seconds a --song must last at least: the separation needs some to tell the parts
SILENT_PEAK = 1e-3          # a --song whose loudest sample is below this (-60 dBFS) is silent
NO_VOICE_SHARE = 0.01       # a voice estimate with under 1 % of the song's energy (-20 dB) is no voice
STEMS = ("voice", "accompaniment")


def mirror_fill(x, n):
    """x (N,) continued by its mirror image, back and forth (x, reversed x, x, ...), to n >= N samples."""
    return np.concatenate([x if i % 2 == 0 else x[::-1] for i in range(-(-n // len(x)))])[:n]


class MotionStream:
    """Live inference: voice (and music) pushed in chunks of any size -> motion frames of one take as soon as they
    are final: push(voice, bgm=None) -> (k, 59) numpy (k may be 0), finish() -> the rest; together every frame of
    the song exactly once. The same model and controls as generate, its sample 0's z for the same seed.

    Why a lookahead: wav2vec 2.0 and the decoder's self-attention see their whole window, so a frame depends on
    the audio after it. Each push runs the model on the last `window` frames of audio, ending at the newest frame
    A, its start rounded down to a multiple of the PPE period (the positional phase of training clips). Until a
    whole window has arrived, the audio is continued by its mirror image to a window's length (the length the
    model was trained on; better than a short window or silence). Frame f is final once A > f + lookahead; the
    frames a push makes final are cross-faded linearly from the previous pass's prediction to this one's, so the
    joins carry no step. Latency by design: lookahead plus the chunk size.
    """

    def __init__(self, model, shape=None, controls=Controls(), lookahead=STREAM_LOOKAHEAD, window=CLIP_FRAMES):
        if not 0 <= lookahead < window:
            raise ValueError(f"stream: lookahead {lookahead} frames must be in [0, window = {window})")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        shape = torch.zeros(N_SHAPE) if shape is None else torch.as_tensor(shape, dtype=torch.float32)
        self.shape = shape.to(self.device)[None]                                           # (1, 100)
        self.z = draw_z(model.cfg.d_model, 1, controls.seed, controls.temperature).to(self.device)   # (1, d)
        self.lookahead, self.window, self.controls = lookahead, window, controls
        self.voice = self.bgm = np.zeros(0, np.float32)   # samples from frame self.first on (older ones dropped)
        self.first = 0                              # a multiple of PPE_PERIOD, so clip_samples(first) is exact
        self.received = 0                           # samples pushed so far
        self.seen = 0                               # audio frames the last pass read (its A)
        self.emitted = 0                            # frames handed out so far
        self.ahead = torch.zeros(0, MOTION_DIM)     # (seen - emitted, 59) the last pass's frames not yet final
        self.per_pass_s, self.per_pass_cpu_s = [], []   # wall and this process's CPU seconds of each pass

    @torch.no_grad()
    def push(self, voice, bgm=None):
        voice = np.asarray(voice, dtype=np.float32).reshape(-1)
        bgm = np.zeros_like(voice) if bgm is None else np.asarray(bgm, dtype=np.float32).reshape(-1)
        if len(bgm) != len(voice):
            raise ValueError(f"stream: a chunk of music ({len(bgm)} samples) must match its voice ({len(voice)})")
        self.voice = np.concatenate([self.voice, voice])
        self.bgm = np.concatenate([self.bgm, bgm])
        self.received += len(voice)
        out = []
        available = song_frames(self.received)
        while self.seen < available:
            # a pass may move on at most `window` frames past the first frame not yet emitted, else frames in
            # between would never be predicted (a chunk longer than a window is taken in several passes)
            out.append(self._pass(min(available, self.emitted + self.window)))
        return np.concatenate(out) if out else np.zeros((0, MOTION_DIM), np.float32)

    @torch.no_grad()
    def finish(self):
        """End of the song: no more audio will come, so the last pass's frames are final as they are."""
        motion, self.ahead = self.ahead, self.ahead[:0]
        self.emitted = self.seen
        return self._controlled(motion)

    def _pass(self, end):
        start = max(0, end - self.window)
        start -= start % PPE_PERIOD
        n = end - start
        lo = clip_samples(start) - clip_samples(self.first)
        m = max(n, self.window)                                    # frames the model reads: a whole window
        voice = mirror_fill(fit_length(self.voice[lo:], clip_samples(n)), clip_samples(m))    # (M,)
        bgm = mirror_fill(fit_length(self.bgm[lo:], clip_samples(n)), clip_samples(m))
        t0, cpu0 = time.perf_counter(), time.process_time()
        feats = self.model.voice_features(torch.from_numpy(voice)[None].to(self.device), m)   # (1, m, C)
        music = mfcc_at_fps(torch.from_numpy(bgm)[None], SAMPLE_RATE, m).to(self.device)      # (1, m, 64)
        motion = self.model.sample(self.shape, feats, music, z=self.z)[0, :n].float().cpu()   # (n, 59)
        self.per_pass_s.append(time.perf_counter() - t0)
        self.per_pass_cpu_s.append(time.process_time() - cpu0)
        fresh = motion[self.emitted - start:]                                              # (end - emitted, 59)
        k = max(0, end - self.lookahead - self.emitted)                                    # frames final now
        # cross-fade from the previous pass (less future audio) to this one: the first frame out continues the
        # previous push's last, the last is this pass alone, as the next push's first will continue it
        old = min(k, len(self.ahead))
        fade = (torch.arange(1, old + 1, dtype=torch.float32) / k)[:, None]               # (old, 1)
        out = fresh[:k].clone()
        out[:old] = (1 - fade) * self.ahead[:old] + fade * fresh[:old]
        self.ahead = fresh[k:]
        self.emitted += k
        self.seen = end
        keep = max(0, end - self.window)
        keep -= keep % PPE_PERIOD                                  # every later pass starts at or after this
        drop = clip_samples(keep) - clip_samples(self.first)
        self.voice, self.bgm, self.first = self.voice[drop:], self.bgm[drop:], keep
        return self._controlled(out)

    def _controlled(self, motion):
        return apply_controls(motion, self.model.motion_mean.cpu(), self.controls).numpy()


def stream_song(stream, voice, bgm=None, chunk_ms=STREAM_CHUNK_MS, realtime=True):
    """Feed a whole song (voice, bgm: arrays (N,) or AudioFiles, read a chunk at a time) through a MotionStream in
    chunks of chunk_ms, at real-time pace (each chunk pushed when its last sample would have arrived live) or as
    fast as possible -> the take (T, 59) and latency figures in seconds: a frame's latency runs from when its own
    audio had fully arrived to when the stream handed it out (in fast mode the pace is simulated)."""
    n = len(voice)
    chunk = max(1, round(chunk_ms * SAMPLE_RATE / 1000))
    pieces, latency = [], []
    t0 = time.perf_counter()
    for lo in list(range(0, n, chunk)) + [None]:                       # None: the song has ended
        hi = n if lo is None else min(n, lo + chunk)
        if realtime:
            time.sleep(max(0.0, t0 + hi / SAMPLE_RATE - time.perf_counter()))
        start = time.perf_counter()
        frames = stream.finish() if lo is None else stream.push(stretch(voice, lo, hi, n), stretch(bgm, lo, hi, n))
        done = time.perf_counter()
        clock = done - t0 if realtime else hi / SAMPLE_RATE + (done - start)            # seconds into the song
        first = sum(len(p) for p in pieces)
        latency += [clock - clip_samples(f + 1) / SAMPLE_RATE for f in range(first, first + len(frames))]
        pieces.append(frames)
    compute, cpu = np.asarray(stream.per_pass_s), np.asarray(stream.per_pass_cpu_s)
    seconds = n / SAMPLE_RATE
    stats = dict(algorithmic_s=stream.lookahead / FPS + chunk / SAMPLE_RATE, lookahead_s=stream.lookahead / FPS,
                 chunk_s=chunk / SAMPLE_RATE, pass_mean_s=float(compute.mean()), pass_max_s=float(compute.max()),
                 compute_per_audio_s=float(compute.sum() / seconds), pass_cpu_mean_s=float(cpu.mean()),
                 cpu_per_audio_s=float(cpu.sum() / seconds), latency_mean_s=float(np.mean(latency)),
                 latency_max_s=float(np.max(latency)))
    return np.concatenate(pieces), stats


def stream_summary(stats, realtime):
    """One line of stream_song's figures, in milliseconds."""
    ms = {k: v * 1000 for k, v in stats.items()}
    return (f"stream: latency by design {ms['algorithmic_s']:.0f} ms (lookahead {ms['lookahead_s']:.0f} + chunk "
            f"{ms['chunk_s']:.0f}); a pass {ms['pass_mean_s']:.1f} ms mean ({ms['pass_cpu_mean_s']:.1f} ms of CPU), "
            f"{ms['pass_max_s']:.1f} ms max; {stats['compute_per_audio_s']:.3f} s per second of audio "
            f"({stats['cpu_per_audio_s']:.3f} s of CPU); latency {'measured' if realtime else 'simulated'} "
            f"{ms['latency_mean_s']:.0f} ms mean, {ms['latency_max_s']:.0f} ms max")


@dataclass
class TrainedMotion:
    """A motion checkpoint read back: the model and what it was trained with."""
    model: MotionCVAE             # in eval mode
    people: dict                  # person name -> FLAME shape (100,) float32, from the training data
    flame_record: dict            # the head of training: flame.flame_record's {'flame', 'flame_sha256'}


def load_checkpoint(path, device="cpu"):
    """A motion checkpoint written by train.py -> TrainedMotion, the model on device."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no motion checkpoint here; train one with `python train.py --stage "
                                f"motion` (writes out/motion/best.pt) or pass --checkpoint PATH")
    ckpt, model = read_model(path, device, "motion", ("model", "config"),
                             lambda c: _loaded(MotionCVAE(MotionConfig(**c["config"])), c["model"]))
    people = {k: np.asarray(v.cpu(), dtype=np.float32) for k, v in ckpt.get("people", {}).items()}
    for person, shape in people.items():
        check_finite(shape, path, f"the shape of person {person!r}")
    return TrainedMotion(model, people, dict(flame=ckpt.get("flame"), flame_sha256=ckpt.get("flame_sha256")))


def read_model(path, device, kind, keys, build):
    """A checkpoint of either stage -> (its dict, build(dict) on device in eval mode): one of the other stage,
    damaged settings or weights that do not fit them are refused naming the file."""
    ckpt = read_checkpoint(path, device)
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a {kind} checkpoint (missing key {missing[0]!r})")
    try:
        model = build(ckpt).to(device)
    except (TypeError, ValueError, RuntimeError) as e:      # a damaged config or weights that do not fit it
        said = " ".join(str(e).split())                     # torch lists every key: the first few say enough
        raise ValueError(f"{path}: not a usable {kind} checkpoint ({type(e).__name__}: "
                         f"{said[:200] + ' ...' if len(said) > 200 else said})") from None
    for name, tensor in model.state_dict().items():         # weights and normalisation (the motion's mean, std)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: not a usable {kind} checkpoint (NaN or inf in {name})")
    return ckpt, model.eval()


def _loaded(model, state):
    model.load_state_dict(state)
    return model


@dataclass
class TrainedRenderer:
    """A face renderer checkpoint read back: the generator and what it was trained with."""
    generator: FaceRenderer       # in eval mode
    config: RendererConfig
    cam: tuple                    # the person's camera [scale, tx, ty] in training (or one per frame (T, 3))
    flame_record: dict            # the head its depth inputs came from: {'flame': file, 'flame_sha256'}
    source: str                   # the checkpoint file
    reference: dict = None        # a warping renderer's reference head: motion (59,), cam (3,), shape (100,) tensors


def load_renderer(path, device="cpu"):
    """Checkpoint from `train.py --stage render` -> TrainedRenderer, the generator on device."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no renderer checkpoint; train one with `python train.py --stage render`")

    def build(ckpt):
        config = RendererConfig(**ckpt["renderer_config"])
        return _loaded(FaceRenderer(config.channels, config.warp), ckpt["generator"])

    ckpt, generator = read_model(path, device, "face renderer", ("generator", "renderer_config"), build)
    config, reference = RendererConfig(**ckpt["renderer_config"]), None      # build checked it
    if config.warp:
        reference = dict(motion=ckpt.get("reference_motion"), cam=ckpt.get("reference_cam"), shape=ckpt.get("shape"))
        sizes = dict(motion=MOTION_DIM, cam=3, shape=N_SHAPE)
        bad = [k for k, v in reference.items() if not isinstance(v, torch.Tensor) or v.shape != (sizes[k],)]
        if bad:
            raise ValueError(f"{path}: a warping face renderer without its reference head ({', '.join(bad)} missing "
                             f"or of the wrong size)")
        reference = {k: v.float() for k, v in reference.items()}
    cam = tuple(float(c) for c in ckpt.get("cam", DEFAULT_CAM))
    for values in (np.asarray(cam), *(reference or {}).values()):
        check_finite(values, path, "the camera or reference head it was trained with")
    return TrainedRenderer(generator, config, cam,
                           dict(flame=ckpt.get("flame"), flame_sha256=ckpt.get("flame_sha256")), str(path), reference)


def load_reference(path, size=IMAGE_SIZE):
    """Reference portrait file (any format Pillow reads, size to MAX_IMAGE_SIDE a side) -> float (3, size, size)
    in [-1, 1]; one smaller than size a side is refused (the renderer would see it blurred)."""
    with open_reference(path) as image:
        if min(image.size) < size:
            raise ValueError(f"{path}: {image.size[0]}x{image.size[1]} pixels, smaller than the {size}x{size} the "
                             f"renderer takes; give a larger portrait")
        try:
            pixels = rgb_pixels(image)
        except (OSError, ValueError) as error:                  # damage Pillow meets while decoding
            raise ValueError(f"{path}: not a readable image ({first_line(error)})") from None
    return image_tensor(pixels, size)


def open_reference(path):
    """A reference portrait opened by Pillow, which reads the size from the header: a file that is not an image,
    or one over MAX_IMAGE_SIDE a side, is refused before any pixel is decoded."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such reference image")
    try:
        with warnings.catch_warnings():              # Pillow's warning of a huge picture: ours is the refusal
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:             # over 179 M pixels, so over MAX_IMAGE_SIDE a side
        raise ValueError(f"{path}: larger than {MAX_IMAGE_SIDE} pixels a side; give a smaller portrait") from None
    except (OSError, ValueError) as error:
        why = "not an image format Pillow reads" if isinstance(error, Image.UnidentifiedImageError) else error
        raise ValueError(f"{path}: not a readable image ({why})") from None
    if max(image.size) > MAX_IMAGE_SIDE:
        image.close()
        raise ValueError(f"{path}: {image.size[0]}x{image.size[1]} pixels, larger than {MAX_IMAGE_SIDE} a side; "
                         f"give a smaller portrait")
    return image


def rgb_pixels(image):
    """A Pillow image -> uint8 (H, W, 3), the RGB picture a viewer shows: turned upright by its EXIF orientation,
    grey, palette and CMYK converted, alpha dropped, 16-bit grey scaled to 8 bits (Pillow would clip it)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        grey = np.asarray(image, dtype=np.float64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"{image.mode} pixels outside 0..65535")
        return np.repeat(np.round(grey / 257).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ValueError("floating-point pixels, which have no agreed brightness range; save it as 8 or 16 bits")
    if image.mode in ("P", "PA"):                    # a palette's transparency, without Pillow's warning about it
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"))                  # a copy torch may write to


def write_motion(out_dir, motion, flame, shape, song, size=PREVIEW_SIZE):
    """Each take k: sample_k.npz (motion, shape, landmarks), sample_k.pkl (the SingingHead keys) and preview_k.mp4
    (the shaded head, size x size, with the song as sound: samples, or a SongMix read a block at a time); each file
    appears under its name only when complete and is announced then. Meshes and landmarks are made RENDER_BATCH
    frames at a time and never held whole, so memory does not grow with the song."""
    check_finite(motion, out_dir / "sample_0.npz", "the motion")         # before any take is written
    out_dir.mkdir(parents=True, exist_ok=True)
    shape_t = torch.as_tensor(shape, dtype=torch.float32)
    frames_done = Progress(motion.shape[0] * motion.shape[1], "frame", lines=PROGRESS_LINES)

    def on_frames(n):
        if frames_done.advance(n) and len(motion[0]) > CLIP_FRAMES:
            print(frames_done.line("previews:"), flush=True)

    for k, m in enumerate(motion):
        m_t = torch.from_numpy(m)

        def meshes():                                    # (b, V, 3) each; checked, as a huge motion overflows
            for lo in range(0, len(m_t), RENDER_BATCH):
                verts = flame.from_motion(shape_t, m_t[lo:lo + RENDER_BATCH])
                check_finite(verts, out_dir / f"sample_{k}.npz", f"the head of frames {lo}.. of take {k}")
                yield verts

        landmarks = (flame.landmarks(verts).numpy() for verts in meshes())                     # (b, 68, 3) each
        save_npz(out_dir / f"sample_{k}.npz", dict(motion=m, shape=shape, fps=np.asarray(FPS)),
                 "landmarks", (len(m), 68, 3), landmarks)
        announce(out_dir / f"sample_{k}.npz", f"take {k}: motion ({len(m)}, 59), shape (100,), "
                                              f"landmarks ({len(m)}, 68, 3) at {FPS} fps")
        with atomic_output(out_dir / f"sample_{k}.pkl") as tmp:
            write_flame_pickle(tmp, m, shape)
        announce(out_dir / f"sample_{k}.pkl", f"take {k} with the SingingHead keys (expcodes, posecodes, shapecode)")
        render_preview(flame, meshes(), out_dir / f"preview_{k}.mp4", audio=song, size=size, on_frames=on_frames)
        announce(out_dir / f"preview_{k}.mp4", f"take {k} as a shaded head, with sound")


def save_npz(path, arrays, name, shape, pieces):
    """An .npz as np.savez writes it: the arrays of the dict `arrays`, and one float32 array `name` of `shape`
    whose values come from the iterable `pieces`, written as they come so that it is never held whole. The file
    appears under its name only when complete."""
    expected = math.prod(shape)
    written = 0
    with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, dict(descr=np.lib.format.dtype_to_descr(
                np.dtype(np.float32)), fortran_order=False, shape=tuple(shape)))
            for piece in pieces:
                piece = np.ascontiguousarray(piece, dtype=np.float32)
                written += piece.size
                member.write(piece.tobytes())
        if written != expected:
            raise ValueError(f"{path}: {name} got {written} values, not the {expected} of {tuple(shape)}")


def announce(path, what):
    print(f"wrote {path}: {what}", flush=True)


class SongMix:
    """The song as heard, read a stretch at a time like an AudioFile: song[a:b] is voice + background music (cut
    or zero-padded to the voice's length), scaled down as a whole only if the sum would clip; len(song) is the
    voice's. voice and bgm: arrays (N,) or AudioFiles, their peak found AUDIO_BLOCK samples at a time."""

    def __init__(self, voice, bgm):
        self.voice, self.bgm, self.scale = voice, bgm, 1.0
        peak = max(float(np.abs(self[a:a + AUDIO_BLOCK]).max()) for a in range(0, len(voice), AUDIO_BLOCK))
        self.scale = max(1.0, peak)

    def __len__(self):
        return len(self.voice)

    def __getitem__(self, index):
        start, stop, _ = index.indices(len(self))
        return (stretch(self.voice, start, stop, len(self)) + stretch(self.bgm, start, stop, len(self))) / self.scale


def render_preview(flame, verts, path, audio=None, cam=PREVIEW_CAM, size=PREVIEW_SIZE, on_frames=None):
    """Shaded preview mp4 of a vertex sequence at FPS: verts (T, V, 3) metres, written PREVIEW_BATCH frames at a
    time, or an iterable of (t, V, 3) pieces in order (a long song's meshes are never held all at once); audio at
    SAMPLE_RATE; cam (3,) or one per frame (T, 3). on_frames(n), when given, hears of every n frames written."""
    pieces = (verts[lo:lo + PREVIEW_BATCH] for lo in range(0, len(verts), PREVIEW_BATCH)) \
        if torch.is_tensor(verts) else verts
    cam = torch.as_tensor(cam, dtype=torch.float32)
    start = 0
    with VideoWriter(path, size, FPS, audio, preset=PREVIEW_PRESET) as video:
        for piece in pieces:
            frame_cam = cam[start:start + len(piece)] if cam.dim() == 2 else cam
            with torch.no_grad():
                video.write(shade(project(piece, frame_cam.to(piece)), flame.faces, size))
            start += len(piece)
            if on_frames is not None:
                on_frames(len(piece))


def side_by_side(verts, faces, labels, cam=PREVIEW_CAM, size=PREVIEW_SIZE):
    """Heads side by side under one light and one camera: verts (K, T, V, 3) metres, one sequence a panel ->
    uint8 (T, size, K*size, 3), panel k the shaded preview of verts[k] with labels[k] written at its top left."""
    cam = torch.as_tensor(cam, dtype=torch.float32)
    frames = torch.cat([shade(project(panel, cam.to(panel)), faces, size) for panel in verts], 2)
    for k, label in enumerate(labels):
        draw_text(frames, label, LABEL_MARGIN * size, k * size + LABEL_MARGIN * size, round(size * LABEL_HEIGHT))
    return frames


def write_side_by_side(path, pieces, faces, labels, audio=None, cam=PREVIEW_CAM, size=PREVIEW_SIZE):
    """side_by_side as an mp4 at FPS with audio (as VideoWriter takes it): pieces an iterable of (K, t, V, 3)
    vertex sequences in order, so that a long take's meshes are never held all at once."""
    with VideoWriter(path, (size, len(labels) * size), FPS, audio, preset=PREVIEW_PRESET) as video:
        for piece in pieces:
            with torch.no_grad():
                video.write(side_by_side(piece, faces, labels, cam, size))
    return Path(path)


def draw_text(frames, text, top, left, height):
    """Write text into uint8 frames (T, H, W, 3) in place, LABEL_RGB in Pillow's default font `height` pixels
    tall, its top left corner at pixel (top, left); anti-aliased, cut at the frames' edges."""
    font = ImageFont.load_default(size=height)
    mask = Image.new("L", font.getbbox(text)[2:])
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
    alpha = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[..., None]            # (h, w, 1)
    region = frames[:, int(top):int(top) + alpha.shape[0], int(left):int(left) + alpha.shape[1]]
    alpha = alpha[:region.shape[1], :region.shape[2]]
    region[:] = (region * (1 - alpha) + torch.tensor(LABEL_RGB) * alpha).round().to(frames.dtype)
    return frames


@torch.no_grad()
def write_grid(path, motion, flame, shape, voice, size=PREVIEW_SIZE):
    """All takes (S, T, 59) in one preview mp4 with the song, playing in sync so one can be picked by eye: take k
    at row k // GRID_COLUMNS, column k % GRID_COLUMNS, each panel size x size pixels, empty panels background."""
    n_takes, n_frames = motion.shape[:2]
    cols = min(n_takes, GRID_COLUMNS)
    rows = -(-n_takes // cols)
    shape_t = torch.as_tensor(shape, dtype=torch.float32)
    background = torch.tensor(BACKGROUND_RGB, dtype=torch.uint8)
    step = max(1, min(PREVIEW_BATCH, GRID_BATCH_PIXELS // (rows * cols * size * size)))
    with VideoWriter(path, (rows * size, cols * size), FPS, voice, preset=PREVIEW_PRESET) as video:
        for start in range(0, n_frames, step):
            batch = torch.from_numpy(motion[:, start:start + step])                               # (S, b, 59)
            frames = background.expand(batch.shape[1], rows * size, cols * size, 3).clone()      # (b, H, W, 3)
            for k, m in enumerate(batch):
                r, c = divmod(k, cols)
                panel = shade(project(flame.from_motion(shape_t, m), PREVIEW_CAM), flame.faces, size)   # (b, s, s, 3)
                frames[:, r * size:(r + 1) * size, c * size:(c + 1) * size] = panel
            video.write(frames)
    return path


def read_shape(path):
    """A FLAME shape from a .npy file -> float32 (100,): trackers write 50 to 300 coefficients, so longer vectors
    are cut to 100 and shorter ones padded with zeros (the mean head); one row ((1, N), as DECA saves it) counts
    as a vector. A bad file is refused naming it, its header's claimed size checked before anything is read."""
    try:
        with open(path, "rb") as file:
            dims, dtype = read_npy_header(file, os.fstat(file.fileno()).st_size)
            if dtype.kind not in "fiu":
                raise ValueError(f"{dtype} values; a FLAME shape is real numbers")
            if sum(n > 1 for n in dims) > 1:
                raise ValueError(f"an array of shape {dims}; a FLAME shape is one row of coefficients")
        values = np.load(path, allow_pickle=False).reshape(-1)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a FLAME shape .npy ({getattr(err, 'strerror', None) or err})") from None
    if values.size == 0 or not np.isfinite(values).all() or np.abs(values).max() > np.finfo(np.float32).max:
        raise ValueError(f"{path}: a FLAME shape must be a non-empty array of finite float32 numbers")
    return np.pad(values[:N_SHAPE].astype(np.float32), (0, max(0, N_SHAPE - values.size)))


def check_file(path, what, hint=""):
    """Refuse a path that is not a readable file, naming it (hint: how to make one)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no {what} here{hint}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: {what} not readable (permission denied)")


def parse_args(argv=None):
    p = Parser(description="Singing audio -> FLAME motion (and portrait video).")
    p.add_argument("--audio", help="singing voice: wav, flac, mp3, ... (stereo is mixed down); required unless --song")
    p.add_argument("--bgm", help="background music (default: silence)")
    p.add_argument("--song", help="one mixed song, voice and band together (any format --audio takes): its voice "
                                  "and accompaniment are estimated and given to the model as --audio and --bgm")
    p.add_argument("--stems", metavar="DIR", help="with --song: also write the two estimates the model heard as "
                                                  "DIR/voice.wav and DIR/accompaniment.wav")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="motion checkpoint from train.py")
    p.add_argument("--person", help="use the shape of this person from the checkpoint's training data")
    p.add_argument("--shape", help=".npy file with a 100-d FLAME shape")
    p.add_argument("--flame", help="FLAME model file: the checkpoint's own (checked by sha256), where it has moved")
    p.add_argument("--samples", type=int, default=1, help=f"number of diverse takes (1 to {MAX_SAMPLES})")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help=f"seed of the takes' z (0 to {MAX_SEED})")
    p.add_argument("--image", help=f"reference portrait (with --renderer: writes the portrait video); any format "
                                   f"Pillow reads, from the renderer's size to {MAX_IMAGE_SIDE} pixels a side")
    p.add_argument("--renderer", help="face renderer checkpoint from `train.py --stage render` (with --image)")
    p.add_argument("--voice-only", action="store_true",
                   help="previews and portrait video carry the voice alone (default: voice mixed with --bgm)")
    p.add_argument("--out", default="out/generated")
    p.add_argument("--glb", action="store_true",
                   help="also write each take as a glTF 2.0 sample_K.glb, the song as sample_K.wav beside it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    knobs = p.add_argument_group("controls (0 holds a part at the training mean motion, 1 leaves the take as it is)")
    knobs.add_argument("--temperature", type=CONTROL, default=1.0,
                       help=f"z ~ N(0, T^2 I): 0 gives every take z = 0 ({CONTROL})")
    knobs.add_argument("--pose-scale", type=CONTROL, default=1.0, help=f"scale of the head pose (global + neck) "
                                                                        f"({CONTROL})")
    knobs.add_argument("--expression-scale", type=CONTROL, default=1.0, help=f"scale of the expression and jaw "
                                                                              f"({CONTROL})")
    knobs.add_argument("--still", action="store_true", help="head pose held at the mean (as --pose-scale 0)")
    p.add_argument("--grid", action="store_true", help="also write grid.mp4: every take side by side, with sound")
    p.add_argument("--size", type=int, default=PREVIEW_SIZE,
                   help=f"pixels a side of the shaded previews (even, {MIN_PREVIEW_SIZE} to {MAX_PREVIEW_SIZE})")
    live = p.add_argument_group("live streaming (one take, fed in chunks, frames out as soon as they are final)")
    live.add_argument("--stream", action="store_true", help="generate through MotionStream instead of whole windows")
    ranges = STREAM_RANGES
    live.add_argument("--chunk-ms", type=ranges["chunk_ms"], default=STREAM_CHUNK_MS,
                      help=f"audio chunk size fed at a time ({ranges['chunk_ms']})")
    live.add_argument("--lookahead-ms", type=ranges["lookahead_ms"], default=STREAM_LOOKAHEAD * 1000 / FPS,
                      help=f"audio after a frame the stream waits for before the frame is final "
                           f"({ranges['lookahead_ms']}, below --window-s)")
    live.add_argument("--window-s", type=ranges["window_s"], default=CLIP_FRAMES / FPS,
                      help=f"audio each stream pass reads ({ranges['window_s']})")
    live.add_argument("--fast", action="store_true", help="feed the file as fast as possible, not at real-time pace")
    args = p.parse_args(argv)
    args.controls = Controls(args.samples, args.seed, args.temperature, args.pose_scale, args.expression_scale,
                             args.still)
    args.lookahead, args.window = round(args.lookahead_ms * FPS / 1000), round(args.window_s * FPS)
    if args.song and (args.audio or args.bgm):
        p.error("--song is the voice and the band mixed: give it alone, or the two apart as --audio and --bgm")
    if not (args.song or args.audio):
        p.error("the following arguments are required: --audio (or --song)")
    if args.stems and not args.song:
        p.error("--stems writes the voice and accompaniment estimated from a --song: give --song")
    if args.stream and args.song:
        p.error("--stream with --song: separating a mixed song needs about 30 s of it at a time, far beyond the "
                "stream's latency; separate it first (--song SONG --stems DIR), then stream --audio DIR/voice.wav "
                "--bgm DIR/accompaniment.wav")
    if args.stream and (args.samples != 1 or not 0 <= args.lookahead < args.window):
        p.error("--stream plays one take (--samples 1), with 0 <= --lookahead-ms < --window-s")
    return args


def check_inputs(args):
    """Every argument, input file and output folder checked before a model is loaded or anything is written.
    Returns the sound (the voice, or with --song the mixed song: AudioFiles, read a stretch at a time, so any
    length), the music (or None) and the --shape (or None)."""
    if not 1 <= args.samples <= MAX_SAMPLES:
        raise ValueError(f"--samples {args.samples}: must be at least 1 and at most {MAX_SAMPLES}")
    if not MIN_PREVIEW_SIZE <= args.size <= MAX_PREVIEW_SIZE or args.size % 2:
        raise ValueError(f"--size {args.size}: must be even (the video encoder's 4:2:0 colour) and at least "
                         f"{MIN_PREVIEW_SIZE}, at most {MAX_PREVIEW_SIZE}")
    if bool(args.image) != bool(args.renderer):
        given, missing = ("--image", "--renderer") if args.image else ("--renderer", "--image")
        raise ValueError(f"{given} without {missing}: the portrait video needs both (the reference image of "
                         f"`train.py --stage render` is out/render/reference.png, its checkpoint out/render/best.pt)")
    check_device(args.device)
    check_output_folder(args.out, "sample_0.npz")
    if args.stems:
        check_output_folder(args.stems, f"{STEMS[0]}.wav", "--stems")
    check_file(args.checkpoint, "motion checkpoint", "; train one with `python train.py --stage motion` (writes "
                                                     "out/motion/best.pt) or pass --checkpoint PATH")
    source = args.song or args.audio
    sound = AudioFile(source)
    if args.song and len(sound) < SONG_MIN_S * SAMPLE_RATE:
        raise ValueError(f"{source}: {len(sound) / SAMPLE_RATE:.3f} s of song; telling its voice from its band "
                         f"needs {SONG_MIN_S:g} s at least")
    if song_frames(len(sound)) < 1:
        raise ValueError(f"{source}: {len(sound) / SAMPLE_RATE:.3f} s of audio is shorter than one motion "
                         f"frame (1/{FPS} s)")
    bgm = AudioFile(args.bgm) if args.bgm else None
    shape = read_shape(args.shape) if args.shape else None
    if args.image:
        open_reference(args.image).close()            # an image, not too large: said before the renderer is read
        check_file(args.renderer, "renderer checkpoint", "; train one with `python train.py --stage render`")
        renderer = load_renderer(args.renderer)       # a damaged one is refused now, not after the whole song
        load_reference(args.image, renderer.config.image_size)     # decoded: damage or a small one refused now
    if args.flame:
        check_file(args.flame, "FLAME model file")
    return sound, bgm, shape


def separate_song(song, name, folder, keep):
    """The mixed song (an AudioFile) -> (voice, accompaniment) estimates, separated a stretch at a time by
    audio.separate_stream and written as 16-bit wavs in folder: voice.wav and accompaniment.wav when keep (each
    appears whole), else hidden temporaries the caller removes. A silent song, or one whose voice estimate holds
    almost nothing, is refused naming `name`. Returns the two paths."""
    from audio import separate_stream                # here: the import lines above the banner list the method's
    paths = [Path(folder) / (f"{stem}.wav" if keep else f".{stem}.{os.getpid()}.tmp.wav") for stem in STEMS]
    started, peak, energy = time.perf_counter(), 0.0, np.zeros(2)       # energy: the song's, the voice's
    print(f"separating the voice and the accompaniment of {name} ({len(song) / SAMPLE_RATE:.1f} s)", flush=True)
    with wav_writer(paths[0]) as write_voice, wav_writer(paths[1]) as write_band:
        for voice, band in separate_stream(lambda a, b: song[a:b], len(song)):
            voiced = voice.astype(np.float64)
            mix = voiced + band
            peak, energy = max(peak, float(np.abs(mix).max(initial=0))), energy + [mix @ mix, voiced @ voiced]
            write_voice(voice)
            write_band(band)
        if peak < SILENT_PEAK:
            raise ValueError(f"{name}: the song is silent (no sample louder than {20 * np.log10(SILENT_PEAK):.0f} "
                             f"dBFS); there is no voice to animate")
        if energy[1] < NO_VOICE_SHARE * energy[0]:
            raise ValueError(f"{name}: no voice found in the song (its voice estimate holds "
                             f"{energy[1] / energy[0]:.2%} of its energy); give the song with singing, or the "
                             f"voice as --audio")
    print(f"separated {name} into voice ({energy[1] / energy[0]:.0%} of its energy) and accompaniment in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    if keep:
        for path, stem in zip(paths, STEMS):
            announce(path, f"the {stem} estimated from {name}, as the model heard it")
    return paths


def person_shape(trained, shape, person, checkpoint):
    """The shape to animate: --shape, else --person's from the checkpoint, else its first person's."""
    if shape is not None:
        return shape
    if person and person not in trained.people:
        raise ValueError(f"{checkpoint}: no person {person!r}; known: {', '.join(sorted(trained.people))}")
    return trained.people[person] if person else next(iter(trained.people.values()), np.zeros(N_SHAPE, np.float32))


def command(argv=None):
    args = parse_args(argv)
    sound, bgm, shape = check_inputs(args)
    with output_folder(args.out), output_folder(args.stems):     # one this run made goes again if it fails
        if not args.song:
            return animate(args, sound, bgm, shape, args.audio)
        stems = separate_song(sound, args.song, args.stems or args.out, keep=bool(args.stems))
        try:
            animate(args, AudioFile(stems[0]), AudioFile(stems[1]), shape, args.song, mix=sound)
        finally:
            if not args.stems:
                for path in stems:
                    path.unlink(missing_ok=True)


def animate(args, voice, bgm, shape, source, mix=None):
    """The model on voice and music (AudioFiles), then every output; source names the song in messages, mix is
    the song as heard when the voice and music were separated from it (the previews carry it)."""
    out, n_frames = Path(args.out), song_frames(len(voice))
    trained = load_checkpoint(args.checkpoint, args.device)
    import builtin           # the head a checkpoint names, or the stand-in head of one trained on built-in data
    flame = builtin.load_flame(builtin.resolve_flame(trained.flame_record, args.flame, args.checkpoint))
    shape = person_shape(trained, shape, args.person, args.checkpoint)
    if n_frames < CLIP_FRAMES:
        print(f"note: {source} is {len(voice) / SAMPLE_RATE:.2f} s, shorter than one motion window "
              f"({CLIP_FRAMES / FPS:.0f} s): the model hears it padded with silence, and the {n_frames} frames "
              f"of the song are kept", flush=True)
    t0 = time.time()
    if args.stream:
        stream = MotionStream(trained.model, shape, args.controls, args.lookahead, args.window)
        take, stats = stream_song(stream, voice, bgm, args.chunk_ms, realtime=not args.fast)
        motion = take[None]
        print(stream_summary(stats, realtime=not args.fast))
    else:
        batch = max(1, min(8, GENERATE_BATCH // args.samples))   # windows at once: takes x windows stay bounded
        motion = generate(trained.model, voice, bgm, shape, args.controls, batch_windows=batch, progress=True)
    seconds = time.time() - t0
    check_finite(motion, args.checkpoint, f"the motion made of {source} (nothing written)")
    print(f"{motion.shape[0]} take(s) of {motion.shape[1]} frames in {seconds:.2f} s "
          f"({motion.shape[0] * motion.shape[1] / seconds:.0f} frames/s)", flush=True)
    song = voice if bgm is None or args.voice_only else mix if mix is not None else SongMix(voice, bgm)
    write_motion(out, motion, flame, shape, song, args.size)
    if args.glb:
        for k, m in enumerate(motion):
            with atomic_output(out / f"sample_{k}.glb") as tmp, open(tmp, "wb") as file:
                save_glb(file, flame, shape, m, FPS)
            announce(out / f"sample_{k}.glb", f"take {k} as a glTF 2.0 animated head, its sound beside it")
            write_wav(out / f"sample_{k}.wav", song)
            announce(out / f"sample_{k}.wav", f"the sound of take {k}'s .glb")
    if args.grid:
        grid = write_grid(out / "grid.mp4", motion, flame, shape, song, args.size)
        announce(grid, f"every take side by side, takes 0..{len(motion) - 1} left to right then down, with sound")
    if args.image:
        renderer = load_renderer(args.renderer, args.device)
        video = portrait_video(renderer, args.image, flame, shape, motion[0], out / "portrait.mp4", song, True)
        announce(video, "the portrait video of take 0, with sound")
        announce(video.with_name("depth.mp4"), "the depth frames the renderer was given, with sound")


def main(argv=None):
    """The command line: bad input or a failed write ends in `error: <file>: <problem>` and exit status 1."""
    run_command(command, argv)


if __name__ == "__main__":
    main()
