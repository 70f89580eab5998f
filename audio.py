"""Audio for UniSinger (paper IV-A), in the order data flows: sound files in (load_audio), the voice encoder
(Wav2Vec2, wav2vec 2.0 in plain PyTorch, "base" group-norm + post-norm and "large/lv60" layer-norm + pre-norm
checkpoints) and the music encoder (mfcc / mfcc_at_fps: torch, batched, equal to librosa.feature.mfcc). Below the
support banner: the beat pipeline of the beat-alignment metric (hpss ... beats: numpy, following librosa 0.11 step
by step so that beat frames equal librosa's), the separation of a mixed song into voice and accompaniment (separate,
separate_stream: REPET and the voice's pitch; our addition), the sound file readers (AudioFile; formats libsndfile
lacks are decoded by imageio-ffmpeg's ffmpeg) and the Hugging Face checkpoint readers (safetensors, key mapping).

Depends on torch, numpy, soundfile and scipy (imageio-ffmpeg for m4a, aac, webm, video sound); imports nothing
of ours, so it can be copied alone:
    wave = load_audio("song.wav")                                  # (N,) float32, 16 kHz
    w2v = Wav2Vec2.from_pretrained("wav2vec2-base-960h").eval()
    with torch.inference_mode():
        feats = w2v(torch.from_numpy(normalize_wave(wave))[None])  # (1, frames, 768), 50 frames per second
        at_30fps = w2v(torch.from_numpy(normalize_wave(wave))[None], n_frames=240)  # FaceFormer style
    coeffs = mfcc(wave)                                            # (64, frames) tensor, 512-sample hop
    frames, times = beats(wave)                                    # onset-frame indices (hop 512) and seconds
    voice, band = separate(load_audio("mixed_song.mp3"))           # (N,) float32 each, voice + band == the mix
"""
import functools
import json
import math
import subprocess
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.fft import next_fast_len

SAMPLE_RATE = 16_000  # Hz, what wav2vec 2.0 was trained on
FPS = 30                   # motion frames per second, the rate mfcc_at_fps resamples to


def load_audio(path, sr=SAMPLE_RATE):
    """Read a sound file as mono float32 at `sr` Hz: channels averaged, then polyphase resampling (AudioFile).

    Refuses (ValueError naming the file) unreadable, empty, truncated (WAV: checked against its header, which
    libsndfile ignores) and non-finite files. Formats libsndfile does not know are decoded by ffmpeg.
    """
    song = AudioFile(path, sr)
    return song[0:len(song)]


def normalize_wave(wave, eps=1e-7):
    """Zero mean, unit variance along the last axis (numpy or torch), as the Hugging Face processor's
    do_normalize does: checkpoints with do_normalize=true (all "base" ones) expect it; Wav2Vec2 takes the wave
    as given."""
    mean = wave.mean(-1)[..., None]
    var = ((wave - mean) ** 2).mean(-1)[..., None]
    return (wave - mean) / (var + eps) ** 0.5


@dataclass
class Wav2Vec2Config:
    """The Hugging Face config.json fields the encoder needs; defaults are the base model's."""
    conv_dim: tuple = (512,) * 7
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)  # product 320 samples = 20 ms per frame at 16 kHz
    conv_bias: bool = False
    feat_extract_norm: str = "group"  # 'group': GroupNorm on the first conv only; 'layer': LayerNorm after each
    feat_extract_activation: str = "gelu"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False  # True: pre-norm encoder ("large/lv60" checkpoints)

    @classmethod
    def from_dict(cls, d):
        """From a config.json dict, checked before anything is made (config_from_dict)."""
        return config_from_dict(cls, d)


# In place: every call site applies them to a tensor it has just made, so no second buffer of that size is needed.
ACTIVATIONS = {"gelu": torch.ops.aten.gelu_, "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
               "relu": torch.relu_, "silu": lambda x: F.silu(x, inplace=True)}
ACTIVATIONS["swish"] = ACTIVATIONS["silu"]


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (known: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class ConvLayer(nn.Module):
    """One layer of the feature extractor: strided conv over time, optional norm, activation.

    Runs channels-last (B, T, C) as matrix products (no transposes between layers). weight is (kernel*C_in,
    C_out), tap-major: the HF conv weight (C_out, C_in, kernel) permuted. norm: None, 'group' (one group per
    channel, each normalised over time; first layer only) or 'layer' (LayerNorm over channels per time step).
    """

    def __init__(self, c_in, c_out, kernel, stride, bias, norm, activation):
        super().__init__()
        self.kernel, self.stride, self.norm_kind = kernel, stride, norm
        self.weight = nn.Parameter(torch.empty(kernel * c_in, c_out))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.norm = {"group": nn.GroupNorm(c_out, c_out), "layer": nn.LayerNorm(c_out), None: None}[norm]
        self.act = _activation(activation)

    def forward(self, x):  # x (B, N, C_in) -> (B, T, C_out)
        y = self._conv(x)
        if self.norm_kind == "group":  # seen as (B, C, 1, T), y is channels-last to GroupNorm: no transposing copy
            y = self.norm(y.transpose(1, 2)[:, :, None]).squeeze(2).transpose(1, 2)
        elif self.norm_kind == "layer":
            y = self.norm(y)
        return self.act(y)

    def _conv(self, x):
        B, N, c_in = x.shape
        T = (N - self.kernel) // self.stride + 1
        if c_in == 1:  # the raw wave: its (overlapping) window matrix is small, so one product over it
            windows = x.contiguous().as_strided((B, T, self.kernel), (N, self.stride, 1))
            return F.linear(windows, self.weight.t(), self.bias)
        # wide inputs: one product per tap over strided views of x, no window copy. All in autocast's dtype when
        # it is on: the in-place sums below are not autocast, and x may arrive in float32 or bf16.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x = x.to(dtype).contiguous()
        w = self.weight.to(dtype).view(self.kernel, c_in, -1)  # (kernel, C_in, C_out)
        taps = [x[:, k:k + self.stride * (T - 1) + 1:self.stride] for k in range(self.kernel)]  # (B, T, C_in) each
        w = [w_k.expand(B, -1, -1) for w_k in w]
        y = torch.bmm(taps[0], w[0]) if self.bias is None else torch.baddbmm(self.bias.to(dtype), taps[0], w[0])
        for k in range(1, self.kernel):
            y.baddbmm_(taps[k], w[k])
        return y  # (B, T, C_out)


class FeatureExtractor(nn.Module):
    """Raw wave (B, N) -> conv features (B, frames, conv_dim[-1]), frames = 1 + (N - receptive field) // 320."""

    def __init__(self, cfg):
        super().__init__()
        dims = (1,) + tuple(cfg.conv_dim)
        norms = [cfg.feat_extract_norm if (cfg.feat_extract_norm == "layer" or i == 0) else None
                 for i in range(len(cfg.conv_dim))]
        self.layers = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], k, s, cfg.conv_bias, norms[i], cfg.feat_extract_activation)
            for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride)))
        self.receptive_field = 1 + sum((k - 1) * math.prod(cfg.conv_stride[:i]) for i, k in enumerate(cfg.conv_kernel))

    def forward(self, wave):  # (B, N)
        if wave.shape[-1] < self.receptive_field:
            raise ValueError(f"wave of {wave.shape[-1]} samples is shorter than one frame "
                             f"({self.receptive_field} samples)")
        x = wave[..., None]  # (B, N, 1)
        for layer in self.layers:
            x = layer(x)
        return x


class PositionalConv(nn.Module):
    """Relative position information: a wide grouped conv over time with 'same' length, then activation.

    HF's padding: left kernel//2, right (kernel-1)//2. weight is the plain conv weight (C, C/groups, kernel), the
    checkpoint's weight norm folded in at load time.
    """

    def __init__(self, channels, kernel, groups, activation):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.act = _activation(activation)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        x = F.pad(x.transpose(1, 2), (self.kernel // 2, (self.kernel - 1) // 2))  # (B, C, T + kernel - 1)
        return self.act(F.conv1d(x, self.weight, self.bias, groups=self.groups)).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, channels, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(channels, 3 * channels)  # HF's q_proj, k_proj, v_proj stacked at load time
        self.out = nn.Linear(channels, channels)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(D), as HF
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, channels, hidden, activation):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.act = _activation(activation)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Transformer layer; post-norm (base checkpoints) or pre-norm (stable-layer-norm checkpoints)."""

    def __init__(self, cfg):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):  # (B, T, C)
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x))
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x))
        return self.ffn_norm(x + self.ffn(x))


class Wav2Vec2(nn.Module):
    """wav2vec 2.0 encoder, inference only (no dropout, no masking), equal to transformers' Wav2Vec2Model.

    forward(wave (B, N) at 16 kHz, taken as given (see normalize_wave), n_frames=None) -> the last hidden state
    (B, frames, hidden_size), 50 frames per second; with n_frames, exactly n_frames: the conv features are
    interpolated in time to n_frames BEFORE the projection and the transformer, as FaceFormer does.
    """

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or Wav2Vec2Config()
        self.features = FeatureExtractor(cfg)
        self.proj_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)
        self.pos_conv = PositionalConv(cfg.hidden_size, cfg.num_conv_pos_embeddings,
                                       cfg.num_conv_pos_embedding_groups, cfg.feat_extract_activation)
        self.encoder_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """transformers' initialisation for training from scratch: He-normal convolutions, N(0, 0.02) linear
        layers, the positional conv scaled to its fan-in."""
        for module in self.modules():
            if isinstance(module, ConvLayer):
                nn.init.kaiming_normal_(module.weight.T)
            elif isinstance(module, PositionalConv):
                nn.init.normal_(module.weight, std=math.sqrt(4.0 / (module.kernel * module.weight.shape[0])))
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, wave, n_frames=None):
        x = self.features(wave)  # (B, T, conv_dim[-1])
        if n_frames is not None:
            x = resample_features(x, n_frames)  # (B, n_frames, conv_dim[-1])
        x = self.proj(self.proj_norm(x))  # (B, T, C)
        x = x + self.pos_conv(x)
        if not self.cfg.do_stable_layer_norm:
            x = self.encoder_norm(x)
        for layer in self.layers:
            x = layer(x)
        if self.cfg.do_stable_layer_norm:
            x = self.encoder_norm(x)
        return x

    @classmethod
    def from_pretrained(cls, path, config=None):
        """A Hugging Face wav2vec 2.0 checkpoint folder or weights file; see load_pretrained."""
        return load_pretrained(cls, path, config)


def resample_features(feats, n_frames):
    """(B, T, C) -> (B, n_frames, C): linear interpolation in time, first and last frames kept (align_corners)."""
    return F.interpolate(feats.transpose(1, 2), size=n_frames, mode="linear", align_corners=True).transpose(1, 2)


N_FFT = 2048               # samples per analysis window
HOP_LENGTH = 512           # samples between analysis frames (31.25 frames per second at 16 kHz)
N_MELS = 128               # mel bands
N_MFCC = 64                # cepstral coefficients kept
AMIN = 1e-10               # power floor before taking dB
TOP_DB = 80.0              # dB below each signal's peak that the log-mel spectrogram keeps
MEL_LINEAR_HZ = 200.0 / 3   # Hz per mel below MEL_LOG_START
MEL_LOG_START = 1000.0      # Hz where the mel scale turns logarithmic
MEL_LOG_STEP = np.log(6.4) / 27.0   # natural-log Hz per mel above MEL_LOG_START


@functools.lru_cache(maxsize=None)
def hann_window(n):
    """Periodic Hann window of n samples, float64, rounded exactly as scipy.signal.get_window('hann')."""
    phase = np.linspace(-np.pi, np.pi, n + 1)[:-1]
    window = 0.5 + 0.5 * np.cos(phase)
    window.flags.writeable = False
    return window


def _hz_to_mel(hz):
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's rounding of the constants)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / MEL_LINEAR_HZ
    log_octaves = np.log(np.maximum(hz, MEL_LOG_START) / MEL_LOG_START)
    logarithmic = MEL_LOG_START / MEL_LINEAR_HZ + log_octaves / MEL_LOG_STEP
    return np.where(hz >= MEL_LOG_START, logarithmic, linear)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    start = MEL_LOG_START / MEL_LINEAR_HZ
    linear = mel * MEL_LINEAR_HZ
    logarithmic = MEL_LOG_START * np.exp(MEL_LOG_STEP * (np.maximum(mel, start) - start))
    return np.where(mel >= start, logarithmic, linear)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sr, n_fft, n_mels):
    """Slaney-normalised triangular mel filters on 0..sr/2, float32 (n_mels, n_fft//2 + 1)."""
    bin_hz = np.fft.rfftfreq(n_fft, d=1.0 / sr)                                        # (F,)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2.0), n_mels + 2))  # (n_mels+2,)
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - bin_hz[None, :]                                      # (n_mels+2, F)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    # librosa stores the triangles as float32 before scaling, then rounds again after; do the same
    triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])
    basis = (triangles * area_norm[:, None]).astype(np.float32)
    basis.flags.writeable = False
    return basis


@functools.lru_cache(maxsize=None)
def dct_matrix(n_out, n_in):
    """Orthonormal DCT-II as a matrix (n_out, n_in), float64: coefficients = matrix @ signal."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    matrix = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    matrix[0] /= np.sqrt(2.0)
    matrix.flags.writeable = False
    return matrix


@functools.lru_cache(maxsize=16)
def _mfcc_operators(sr, n_fft, n_mels, n_mfcc, device, dtype):
    """Window and DCT (float64) and mel basis (`dtype`) on `device`, built once per setting."""
    window = torch.from_numpy(hann_window(n_fft).copy()).to(device)
    mel = torch.from_numpy(mel_filterbank(sr, n_fft, n_mels).copy()).to(device, dtype)
    dct = torch.from_numpy(dct_matrix(n_mfcc, n_mels).copy()).to(device)
    return window, mel, dct


def mfcc(y, sr=SAMPLE_RATE, n_mfcc=N_MFCC, hop_length=HOP_LENGTH, n_fft=N_FFT, n_mels=N_MELS):
    """MFCCs of y (..., N) (numpy or tensor) -> tensor (..., n_mfcc, 1 + N // hop_length) on y's device.

    Centred frames (zero padding), periodic Hann, power spectrum, Slaney mel filters, dB floored TOP_DB below
    each signal's own peak, orthonormal DCT-II. float64 input stays float64, anything else is float32.
    """
    x = torch.as_tensor(y)
    if not x.is_floating_point() or x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"mfcc: expected a non-empty real waveform (..., N), got {tuple(x.shape)} {x.dtype}")
    if n_mfcc > n_mels:
        raise ValueError(f"mfcc: n_mfcc={n_mfcc} exceeds n_mels={n_mels}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    window, mel, dct = _mfcc_operators(sr, n_fft, n_mels, n_mfcc, x.device, dtype)
    lead = x.shape[:-1]
    # |S|^2 in float64, then rounded: librosa's complex64 rounding before squaring is within float32's (1e-7 dB)
    spec = torch.stft(x.reshape(-1, x.shape[-1]).to(torch.float64), n_fft, hop_length, window=window,
                      center=True, pad_mode="constant", return_complex=True)          # (B, F, T)
    re_im = torch.view_as_real(spec)                                                 # (B, F, T, 2)
    power = (re_im[..., 0] ** 2).addcmul_(re_im[..., 1], re_im[..., 1]).to(dtype)     # (B, F, T)
    db = (mel @ power).clamp_(min=AMIN).log10_().mul_(10.0)                          # (B, n_mels, T)
    db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - TOP_DB)
    # in float64: a float32 product drifts ~1e-3 dB from scipy's DCT on loud frames
    coeffs = (dct @ db.to(torch.float64)).to(dtype)                                  # (B, n_mfcc, T)
    return coeffs.reshape(*lead, n_mfcc, coeffs.shape[-1])


def mfcc_at_fps(y, sr=SAMPLE_RATE, n_frames=None, n_mfcc=N_MFCC):
    """MFCCs at the motion frame rate: y (..., N) -> float32 tensor (..., n_frames, n_mfcc).

    MFCCs are taken with hop round(sr / FPS), frame j centred at j * hop / sr seconds; motion frame t (at t / FPS
    seconds) gets the track linearly interpolated there, the last frame held past the end. n_frames defaults
    to round(N * FPS / sr).
    """
    x = torch.as_tensor(y)
    if n_frames is None:
        n_frames = round(x.shape[-1] * FPS / sr)
    if n_frames < 1:
        raise ValueError(f"mfcc_at_fps: n_frames must be positive, got {n_frames}")
    hop = round(sr / FPS)
    track = mfcc(x, sr=sr, n_mfcc=n_mfcc, hop_length=hop).to(torch.float32)        # (..., n_mfcc, J)
    last = track.shape[-1] - 1
    position = torch.arange(n_frames, dtype=torch.float64, device=track.device) * (sr / (FPS * hop))
    position = position.clamp(max=last)                                             # (n_frames,)
    left = position.floor().long()
    right = (left + 1).clamp(max=last)
    frac = (position - left).to(torch.float32)
    resampled = track[..., left] * (1.0 - frac) + track[..., right] * frac         # (..., n_mfcc, n_frames)
    return resampled.transpose(-1, -2).contiguous()


# -------------------------------------------------------- support: beats (Table II's BA), file readers, weights files

MAX_PARAMETERS = 4 * 10 ** 9    # a config.json asking for more is damaged (the largest wav2vec 2.0 has 2.2e9)


def config_from_dict(cls, d):
    """A Wav2Vec2Config (cls) from a config.json dict, ignoring keys only training or task heads use. Types, sizes
    and the parameter count (at most MAX_PARAMETERS) are checked first: a damaged file is refused (ValueError)."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})
    for name, f in known.items():
        value, default = getattr(cfg, name), f.default
        if isinstance(default, tuple):
            ok = isinstance(value, tuple) and all(type(v) is int and v > 0 for v in value)
        elif type(default) is int:
            ok = type(value) is int and value > 0
        else:
            ok = type(value) is type(default)
        if not ok:
            raise ValueError(f"{name} = {str(value)[:80]}: expected {type(default).__name__}"
                             + (" of positive ints" if isinstance(default, tuple) else "")
                             + (", positive" if type(default) is int else ""))
    if not len(cfg.conv_dim) == len(cfg.conv_kernel) == len(cfg.conv_stride):
        raise ValueError("conv_dim, conv_kernel and conv_stride must have one entry per layer")
    if cfg.feat_extract_norm not in ("group", "layer"):
        raise ValueError(f"feat_extract_norm must be 'group' or 'layer', not {cfg.feat_extract_norm!r}")
    h = cfg.hidden_size
    if h % cfg.num_attention_heads or h % cfg.num_conv_pos_embedding_groups:
        raise ValueError(f"hidden_size {h} must be a multiple of num_attention_heads "
                         f"{cfg.num_attention_heads} and num_conv_pos_embedding_groups "
                         f"{cfg.num_conv_pos_embedding_groups}")
    dims = (1,) + cfg.conv_dim
    n = sum(dims[i] * dims[i + 1] * k for i, k in enumerate(cfg.conv_kernel))          # feature extractor
    n += cfg.conv_dim[-1] * h + h * h // cfg.num_conv_pos_embedding_groups * cfg.num_conv_pos_embeddings
    n += cfg.num_hidden_layers * (4 * h * h + 2 * h * cfg.intermediate_size)            # transformer layers
    if n > MAX_PARAMETERS:
        raise ValueError(f"sizes that make {n:.3g} parameters, more than any wav2vec 2.0 "
                         f"({MAX_PARAMETERS:.0e}): hidden_size {h}, {cfg.num_hidden_layers} layers, "
                         f"intermediate_size {cfg.intermediate_size}, conv_dim {cfg.conv_dim}")
    return cfg


def load_pretrained(cls, path, config=None):
    """A Hugging Face wav2vec 2.0 checkpoint -> the model class cls with its weights.

    path: a directory with config.json and model.safetensors or pytorch_model.bin, or one such weights file (its
    config from `config`, a Wav2Vec2Config or config.json dict, else config.json beside it). Keys with or without
    'wav2vec2.'; task heads and pre-training parts are ignored; anything else missing or left over: ValueError.
    """
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()),
                       None)
        if weights is None:
            raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    elif path.is_file():
        weights = path
    else:
        raise ValueError(f"{path}: no such checkpoint file or directory")
    config_file = "the config given"                        # names the config in errors
    if config is None:
        config_file = weights.parent / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{weights}: no config.json beside it and no config given")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, Wav2Vec2Config):
        try:
            config = Wav2Vec2Config.from_dict(config)
        except (TypeError, ValueError) as e:                 # TypeError: a key's value of the wrong kind
            raise ValueError(f"{config_file}: not a usable wav2vec 2.0 config ({e})") from None
    if weights.suffix == ".safetensors":
        state = read_safetensors(weights)
    else:
        try:                                               # data only: tensors and plain containers
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:                             # torch raises many kinds on damaged bytes
            raise ValueError(f"{weights}: not a readable PyTorch weights file ({first_line(e)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{weights}: not a flat state dict of tensors")
    model = cls(config)
    try:
        model.load_state_dict(hf_to_ours(state, config, model.state_dict(), weights))
    except (ValueError, RuntimeError, IndexError, TypeError) as e:  # a tensor that does not fit where it goes
        detail = str(e).removeprefix(f"{weights}: ") if isinstance(e, ValueError) else first_line(e)
        raise ValueError(f"{weights}: does not fit {config_file} ({detail})") from None
    return model


def first_line(error):
    """An exception's kind and the first line of its message, for one-line refusals."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


HPSS_KERNEL = 31           # median-filter length: frames for the harmonic part, bins for the percussive part
TEMPO_WINDOW_S = 8.0       # seconds of onset envelope per autocorrelation window
START_BPM = 120.0          # centre of the log-normal tempo prior, beats per minute
MAX_BPM = 320.0            # tempi at or above this are never chosen
TIGHTNESS = 100.0          # how strongly beat spacing is held to the tempo
PRIOR_STD_OCTAVES = 1.0    # width of the tempo prior, in octaves of bpm
AC_LOG_GAIN = 1e6          # autocorrelation is compressed as log1p(gain * ac) before the prior is added
MEDIAN_BLOCK = 4           # neighbouring median windows sharing one selection network
BEAT_SMOOTH = np.array([0.0, 0.5, 1.0, 0.5, 0.0])   # 5-point Hann used to judge weak edge beats


def _stft(y, n_fft, hop_length):
    """Centred STFT of y (..., N) -> (..., n_fft//2 + 1, 1 + N // hop_length), complex64 for float32 input.

    Zero padding of n_fft//2 on both sides; the window product and FFT are float64 and then rounded.
    """
    pad = [(0, 0)] * (y.ndim - 1) + [(n_fft // 2, n_fft // 2)]
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(y, pad), n_fft, axis=-1)[..., ::hop_length, :]
    spec = np.fft.rfft(frames * hann_window(n_fft), axis=-1)                         # (..., T, F)
    return np.swapaxes(spec, -1, -2).astype(np.complex128 if y.dtype == np.float64 else np.complex64)


@functools.lru_cache(maxsize=32)
def _window_envelope(n_fft, hop_length, n_frames, dtype):
    """Sum of squared analysis windows over the padded signal, accumulated frame by frame in `dtype`."""
    square = hann_window(n_fft) ** 2
    envelope = np.zeros(n_fft + hop_length * (n_frames - 1), dtype=dtype)
    for t in range(n_frames):
        envelope[t * hop_length:t * hop_length + n_fft] += square
    envelope.flags.writeable = False
    return envelope


def _istft(spec, n_fft, hop_length, length, dtype):
    """Inverse of _stft by windowed overlap-add, normalised by the summed squared window -> (..., length).
    Frames are added one by one into a `dtype` buffer, librosa's order and rounding (bit-identical results)."""
    n_frames = spec.shape[-1]
    chunks = hann_window(n_fft) * np.fft.irfft(np.swapaxes(spec, -1, -2), n=n_fft, axis=-1)  # (..., T, n_fft)
    signal = np.zeros(spec.shape[:-2] + (n_fft + hop_length * (n_frames - 1),), dtype=dtype)
    for t in range(n_frames):
        signal[..., t * hop_length:t * hop_length + n_fft] += chunks[..., t, :]
    keep = slice(n_fft // 2, n_fft // 2 + length)
    signal = signal[..., keep]
    envelope = _window_envelope(n_fft, hop_length, n_frames, np.dtype(dtype))[keep]
    covered = envelope > np.finfo(dtype).tiny
    signal[..., covered] /= envelope[covered]
    return signal


def _as_waveform(y, who):
    """numpy float32/float64 view of a waveform given as numpy or torch."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.dtype not in (np.float32, np.float64):
        y = y.astype(np.float32)
    if y.ndim == 0 or y.shape[-1] == 0:
        raise ValueError(f"{who}: expected a non-empty waveform (..., N), got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{who}: waveform holds NaN or infinite samples")
    return y


def _merge_sort_comparators(wires):
    """Batcher's odd-even merge sort on a power-of-two number of wires: (lo, hi) pairs, min to lo."""
    pairs = []
    block = 1
    while block < wires:
        stride = block
        while stride >= 1:
            for start in range(stride % block, wires - stride, 2 * stride):
                for i in range(min(stride, wires - start - stride)):
                    lo, hi = start + i, start + i + stride
                    if lo // (2 * block) == hi // (2 * block):
                        pairs.append((lo, hi))
            stride //= 2
        block *= 2
    return pairs


@functools.lru_cache(maxsize=None)
def _selection_program(n, ranks):
    """Min/max steps that bring the given ranks (0 = smallest) of n values into known registers.

    Batcher's network on the next power of two, with the padding wires (+inf) folded away and every
    comparator that cannot reach a wanted rank dropped. Returns (steps, registers holding the ranks); a step
    (a, b) puts min into register a and max into register b.
    """
    wires = 1 << (n - 1).bit_length()
    register = list(range(n)) + [None] * (wires - n)     # None: a +inf padding wire
    steps = []
    for lo, hi in _merge_sort_comparators(wires):
        a, b = register[lo], register[hi]
        if b is None:
            continue
        if a is None:
            register[lo], register[hi] = b, None
            continue
        steps.append((a, b))
    outputs = tuple(register[r] for r in ranks)
    live, kept = set(outputs), []
    for a, b in reversed(steps):
        if a in live or b in live:
            kept.append((a, b))
            live |= {a, b}
    return tuple(reversed(kept)), outputs


def _select(values, ranks):
    """The given ranks of a list of equal-shape arrays, elementwise."""
    steps, outputs = _selection_program(len(values), ranks)
    registers = [v.copy() for v in values]
    for a, b in steps:
        low = np.minimum(registers[a], registers[b])
        np.maximum(registers[a], registers[b], out=registers[b])
        registers[a] = low
    return [registers[r] for r in outputs]


def median_filter(x, size, axis):
    """Running median of odd length `size` along `axis`, edges mirrored (x[1] x[0] | x[0] x[1] ...), equal to
    scipy.ndimage.median_filter(mode='reflect') with a 1-D kernel on axes of 3 or more samples.

    Selection networks of elementwise min/max over whole planes. Groups of MEDIAN_BLOCK neighbouring windows
    share size - MEDIAN_BLOCK + 1 samples: one network finds the shared part's ranks that can still be the
    median, and each window's median is that of those and its own MEDIAN_BLOCK - 1 other samples.
    """
    if size % 2 == 0 or size < 1:
        raise ValueError(f"median_filter: size must be odd and positive, got {size}")
    group = min(MEDIAN_BLOCK, size // 2 + 1)
    x = np.moveaxis(np.asarray(x), axis, -1)
    n, half = x.shape[-1], size // 2
    n_groups = -(-n // group)
    span = (n_groups + (size + group - 2) // group + 1) * group                       # padded length
    # mirror indices, periodic with period 2n so that kernels longer than the axis reflect as scipy does
    index = np.arange(-half, span - half) % (2 * n)
    mirrored = np.take(x, np.where(index < n, index, 2 * n - 1 - index), axis=-1)    # (..., span)
    # phases[q % group][..., g + q // group] is sample q of group g's windows, so every wire is contiguous
    phases = np.moveaxis(mirrored.reshape(*x.shape[:-1], span // group, group), -1, 0).copy()

    def wire(q):                                                                      # (..., n_groups)
        return phases[q % group][..., q // group:q // group + n_groups]

    middle = size // 2
    shared = _select([wire(group - 1 + r) for r in range(size - group + 1)],
                     tuple(range(middle - group + 1, middle + 1)))
    medians = [_select(shared + [wire(q) for q in range(j, group - 1)] + [wire(size + q) for q in range(j)],
                       (group - 1,))[0]
               for j in range(group)]
    result = np.stack(medians, axis=-1).reshape(*x.shape[:-1], n_groups * group)[..., :n]
    return np.moveaxis(result, -1, axis)


def _soft_mask(part, other):
    """Wiener-style mask part² / (part² + other²), 0.5 where both vanish (librosa softmask, power 2)."""
    top = np.maximum(part, other)
    silent = top < np.finfo(part.dtype).tiny
    top[silent] = 1
    mask = (part / top) ** 2
    rest = (other / top) ** 2
    mask[~silent] /= mask[~silent] + rest[~silent]
    mask[silent] = 0.5
    return mask


def hpss_stft(spec, kernel_size=HPSS_KERNEL):
    """Split a complex STFT (..., F, T) into harmonic and percussive STFTs by median filtering the magnitude
    along time (harmonic) and frequency (percussive) and applying soft masks (power 2, margin 1)."""
    magnitude = np.abs(spec)
    silent = magnitude == 0
    scale = magnitude + silent
    phase = np.empty_like(spec)
    phase.real = spec.real / scale + silent
    phase.imag = spec.imag / scale
    harmonic = median_filter(magnitude, kernel_size, axis=-1)
    percussive = median_filter(magnitude, kernel_size, axis=-2)
    return ((magnitude * _soft_mask(harmonic, percussive)) * phase,
            (magnitude * _soft_mask(percussive, harmonic)) * phase)


def hpss(y, kernel_size=HPSS_KERNEL, n_fft=N_FFT, hop_length=HOP_LENGTH):
    """Harmonic and percussive waveforms of y (..., N), each (..., N) in y's float dtype (numpy)."""
    y = _as_waveform(y, "hpss")
    harmonic, percussive = hpss_stft(_stft(y, n_fft, hop_length), kernel_size)
    return (_istft(harmonic, n_fft, hop_length, y.shape[-1], y.dtype),
            _istft(percussive, n_fft, hop_length, y.shape[-1], y.dtype))


def onset_strength(y, sr=SAMPLE_RATE, aggregate=np.median, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS):
    """Spectral-flux onset envelope of y (..., N) -> (..., 1 + N // hop_length) numpy.

    Positive frame-to-frame rise of the log-mel power spectrogram (dB, TOP_DB floor per signal),
    aggregated over mel bands, shifted to sit on the frame centres (lag 1 plus half a window).
    """
    y = _as_waveform(y, "onset_strength")
    power = np.abs(_stft(y, n_fft, hop_length)) ** 2                                  # (..., F, T)
    # torch's product: it keeps to torch's threads, where numpy's BLAS would start its own on every core
    mel = (torch.tensor(mel_filterbank(sr, n_fft, n_mels), dtype=torch.from_numpy(power).dtype)
           @ torch.from_numpy(power)).numpy()                                          # (..., n_mels, T)
    db = 10.0 * np.log10(np.maximum(AMIN, mel))                                       # (..., n_mels, T)
    db = np.maximum(db, db.max(axis=(-2, -1), keepdims=True) - TOP_DB)
    flux = aggregate(np.maximum(0.0, db[..., 1:] - db[..., :-1]), axis=-2)           # (..., T - 1)
    shift = 1 + n_fft // (2 * hop_length)
    pad = [(0, 0)] * (flux.ndim - 1) + [(shift, 0)]
    return np.pad(flux, pad)[..., :db.shape[-1]]


def tempo(onset_envelope, sr=SAMPLE_RATE, hop_length=HOP_LENGTH, start_bpm=START_BPM):
    """Global tempo in bpm: mean windowed autocorrelation of the onset envelope (TEMPO_WINDOW_S windows,
    centred, ramped to zero at the ends), compressed and weighted by a log-normal prior around start_bpm."""
    env = np.asarray(onset_envelope)
    n = env.shape[-1]
    width = int(TEMPO_WINDOW_S * sr) // hop_length                                   # lags per window
    padded = np.pad(env, (width // 2, width // 2), mode="linear_ramp", end_values=0)
    frames = np.lib.stride_tricks.sliding_window_view(padded, width)[:n] * hann_window(width)   # (n, width)
    n_fft = next_fast_len(2 * width - 1, real=True)
    spectrum = np.fft.rfft(frames, n=n_fft, axis=-1)
    autocorr = np.fft.irfft(spectrum.real ** 2 + spectrum.imag ** 2, n=n_fft, axis=-1)[:, :width]
    peak = np.abs(autocorr).max(axis=-1, keepdims=True)
    peak[peak < np.finfo(np.float64).tiny] = 1.0
    mean_ac = (autocorr / peak).mean(axis=0)                                         # (width,)
    bpms = np.full(width, np.inf)
    bpms[1:] = 60.0 * sr / (hop_length * np.arange(1.0, width))
    log_prior = -0.5 * ((np.log2(bpms) - np.log2(start_bpm)) / PRIOR_STD_OCTAVES) ** 2
    log_prior[:int(np.argmax(bpms < MAX_BPM))] = -np.inf
    return float(bpms[np.argmax(np.log1p(AC_LOG_GAIN * mean_ac) + log_prior)])


def _local_score(onsets, period):
    """Onset envelope (normalised by its std) smoothed by a Gaussian of period/32 frames std.
    Sums run term by term in librosa's order; like librosa, frame 0 of the envelope is left out."""
    n = len(onsets)
    half = int(period)
    spread = np.arange(-period, period + 1) * 32.0 / period
    window = [math.exp(-0.5 * (z * z)) for z in spread]
    padded = np.zeros(n + 2 * half)
    padded[half + 1:half + n] = onsets[1:]
    score = np.zeros(n)
    for k, weight in enumerate(window):
        score += weight * padded[2 * half - k:2 * half - k + n]
    return score


def _beat_dp(score, period, tightness):
    """Best predecessor of every frame: cumulative score and back-link (-1: none), by dynamic programming.

    A frame may follow any frame 0.5..2 periods back, paying tightness * log(gap / period)². A block shorter than
    the minimum gap depends only on earlier blocks: one numpy step each; ties go to the nearest, as in librosa.
    """
    n = len(score)
    nearest = int(np.round(period / 2))
    if nearest < 1:
        raise ValueError(f"beat_track: beat period of {period} frames is too short")
    gaps = np.arange(nearest, int(2 * period) + 1)                                    # (G,)
    # math.log is the C library's log, the one librosa's compiled loop calls
    log_ratio = [math.log(g) - math.log(period) for g in gaps]
    penalty = np.array([tightness * (r * r) for r in log_ratio])
    cumscore = np.zeros(n)
    backlink = np.full(n, -1, dtype=np.int64)
    for start in range(0, n, nearest):
        frames = np.arange(start, min(start + nearest, n))                           # (b,)
        source = frames[:, None] - gaps[None, :]                                     # (b, G)
        candidates = np.where(source >= 0, cumscore[np.maximum(source, 0)] - penalty, -np.inf)
        best = candidates.argmax(axis=1)
        reachable = source[:, 0] >= 0
        rows = np.arange(len(frames))
        cumscore[frames] = score[frames] + np.where(reachable, candidates[rows, best], 0.0)
        backlink[frames] = np.where(reachable, source[rows, best], -1)
    # beats before the first frame with 1% of the peak score start nothing
    backlink[:int(np.argmax(score >= 0.01 * score.max()))] = -1
    return cumscore, backlink


def _last_beat(cumscore):
    """Latest local maximum of the cumulative score reaching half the median local-maximum score."""
    peaks = np.zeros(len(cumscore), dtype=bool)
    peaks[1:-1] = (cumscore[1:-1] > cumscore[:-2]) & (cumscore[1:-1] >= cumscore[2:])
    peaks[-1] = cumscore[-1] > cumscore[-2]
    if not peaks.any():
        return len(cumscore) - 1
    good = np.flatnonzero(peaks & (cumscore >= 0.5 * np.median(cumscore[peaks])))
    return int(good[-1]) if len(good) else len(cumscore) - 1


def _trim_weak_edges(score, beat_frames, trim):
    """Drop beats before the first and after the last frame scoring above a threshold: half the RMS of the
    smoothed beat scores when trimming, else zero."""
    threshold = 0.0
    if trim:
        smoothed = np.convolve(score[beat_frames], BEAT_SMOOTH)[2:len(score) + 2]
        threshold = 0.5 * np.sqrt(np.mean(smoothed ** 2))
    strong = np.flatnonzero(score > threshold)
    if len(strong) == 0:
        return beat_frames[:0]
    return beat_frames[(beat_frames >= strong[0]) & (beat_frames <= strong[-1])]


def beat_track(onset_envelope, sr=SAMPLE_RATE, hop_length=HOP_LENGTH, start_bpm=START_BPM,
               tightness=TIGHTNESS, trim=True):
    """Dynamic-programming beat tracker on a 1-D onset envelope -> (tempo bpm, beat frames int64 (K,))."""
    env = np.asarray(onset_envelope)
    if env.ndim != 1 or len(env) < 2:
        raise ValueError(f"beat_track: expected a 1-D onset envelope of 2+ frames, got shape {env.shape}")
    if not env.any():
        return 0.0, np.zeros(0, dtype=np.int64)
    bpm = tempo(env, sr=sr, hop_length=hop_length, start_bpm=start_bpm)
    period = float(np.round(sr / hop_length * 60.0 / bpm))                            # frames per beat
    normalised = env / (env.std(ddof=1) + np.finfo(env.dtype).tiny)
    score = _local_score(normalised.astype(np.float64), period)
    cumscore, backlink = _beat_dp(score, period, float(np.float32(tightness)))
    chain = [_last_beat(cumscore)]
    while backlink[chain[-1]] >= 0:
        chain.append(int(backlink[chain[-1]]))
    return bpm, _trim_weak_edges(score, np.array(chain[::-1], dtype=np.int64), trim)


def beats(y, sr=SAMPLE_RATE):
    """Music beats of a mono waveform y (N,): beat frames (hop HOP_LENGTH) int64 (K,) and times in s float64."""
    y = _as_waveform(y, "beats")
    if y.ndim != 1:
        raise ValueError(f"beats: expected a mono waveform (N,), got shape {y.shape}")
    _, percussive = hpss_stft(_stft(y, N_FFT, HOP_LENGTH))
    drums = _istft(percussive, N_FFT, HOP_LENGTH, len(y), y.dtype)
    _, frames = beat_track(onset_strength(drums, sr=sr, aggregate=np.median), sr=sr)
    return frames, frames * (HOP_LENGTH / sr)


# Separation (our addition: the paper's model hears voice and music apart, a user has one mixed song). No weights:
# REPET (Rafii & Pardo 2013) gives the band what repeats, as beats, bars and chord loops do and a melody seldom does
# note for note, and the voice's pitch gives the band what lies below it.

SEP_N_FFT, SEP_HOP = 1024, 256   # samples: a 64 ms window resolves a sung note's harmonics, a 16 ms hop its syllables
PERIOD_S = (1.0, 12.0)           # s, the repeating periods searched: a bar of fast music to 4 bars at 80 bpm
SHORTEST_LAG = 0.9               # take the shortest lag scoring this share of the best: more copies, firmer median
MIN_COPIES = 5                   # entries of each REPET median at least, the copies a block lacks counted as silence
F0_HZ = (130.0, 900.0)           # the fundamentals a sung voice is searched in
BELOW_F0 = 0.8                   # share of the voice's f0 under which every bin goes to the accompaniment
MASK_FRAMES = 2                  # frames each side (16 ms each) the powers of the voice mask are averaged over
BLOCK_S, OVERLAP_S = 30.0, 5.0   # s: blocks separated on their own, and the least stretch two are cross-faded over


def _repeat_period(magnitude):
    """The band's period in frames from the beat spectrum (autocorrelation of each bin's power over time, averaged
    over bins), or None when the block is too short to hold 1.5 of the shortest periods or no lag correlates."""
    power, n = magnitude ** 2, magnitude.shape[1]
    spectrum = torch.fft.rfft(power - power.mean(1, keepdim=True), 2 * n, dim=1)
    beat_spectrum = torch.fft.irfft(spectrum.abs() ** 2, dim=1)[:, :n].mean(0) / torch.arange(n, 0, -1)  # unbiased
    lo = round(PERIOD_S[0] * SAMPLE_RATE / SEP_HOP)
    hi = min(round(PERIOD_S[1] * SAMPLE_RATE / SEP_HOP), 2 * n // 3)
    if hi <= lo + 1 or not beat_spectrum[lo:hi].max() > 0:        # too short to tell, or nothing repeats
        return None
    scores = beat_spectrum[lo:hi]             # a bar and its multiples score alike: the shortest gives most copies
    return lo + int(torch.nonzero(scores >= SHORTEST_LAG * scores.max())[0])


def _band(magnitude, period):
    """REPET: the band is the median, bin by bin, of the block's frames at the same phase of the period, at most the
    magnitude itself; returns the band's magnitude (F, T). Missing copies fill the median up to MIN_COPIES as
    silence: a median of two copies would take half of any note sung twice, MIN_COPIES needs 3 that agree."""
    n_bins, n = magnitude.shape
    k = -(-n // period)                                                        # periods, the last one cut short
    copies = F.pad(magnitude, (0, k * period - n), value=float("nan")).view(n_bins, k, period)
    count = copies[0].isfinite().sum(0)                                        # (period,) copies of each phase
    silence = torch.where(torch.arange(MIN_COPIES - 1)[:, None] < MIN_COPIES - count, 0.0, float("nan"))
    model = torch.cat([copies, silence.expand(n_bins, -1, -1)], 1).nanmedian(1).values       # (F, period)
    return torch.minimum(model.repeat(1, k)[:, :n], magnitude)


def _f0(magnitude):
    """Each frame's f0 (Hz): the candidate, 1/8 semitone apart, whose first 8 harmonics hold the most log-magnitude,
    the h-th weighted 0.84^(h-1) so that a subharmonic does not win on its multiples alone."""
    cands = F0_HZ[0] * 2 ** (torch.arange(0, 12 * math.log2(F0_HZ[1] / F0_HZ[0]), 0.125) / 12)
    level = torch.log1p(magnitude / (magnitude.max() * 1e-3 + 1e-12))
    salience = torch.zeros(len(cands), magnitude.shape[1])
    for h in range(1, 9):
        index = torch.round(cands * h * SEP_N_FFT / SAMPLE_RATE).long()
        inside = index < len(magnitude)
        salience[inside] += 0.84 ** (h - 1) * level[index[inside]]
    return cands[salience.argmax(0)]


def _voice_mask(magnitude, period):
    """The voice's share of each bin (F, T): Wiener-like, voice² / (voice² + band²) with the band from REPET, the
    voice the rest of the magnitude, each power averaged over 2 MASK_FRAMES + 1 frames (80 ms). Where the copies'
    median misses some of the band (a strum or a hit that varies from copy to copy), 1 - band / magnitude gives
    the voice that share; squared, a bin goes mostly to the larger part, and averaged over time (a sung syllable
    lasts longer, a hit's excess does not) one frame's excess cannot outvote its neighbours' band. Less band in
    the voice's rests, and the voice's SDR up 0.4-2 dB on each of the 5 test songs (/work/sep)."""
    band = _band(magnitude, period)
    power = lambda x: F.avg_pool1d(x[None] ** 2, 2 * MASK_FRAMES + 1, 1, MASK_FRAMES, count_include_pad=False)[0]
    voice, band = power(magnitude - band), power(band)
    return voice / (voice + band).clamp_min(1e-20)


def _voice_of_block(mix):
    """The voice in one block of the mix (float32 (N,)): its STFT masked to what does not repeat, above the f0."""
    if len(mix) <= SEP_N_FFT // 2:            # not one frame's worth: nothing to tell a voice by, all accompaniment
        return np.zeros(len(mix), np.float32)
    window = torch.hann_window(SEP_N_FFT)
    spec = torch.stft(torch.from_numpy(mix), SEP_N_FFT, SEP_HOP, window=window, return_complex=True)
    magnitude = spec.abs()
    period = _repeat_period(magnitude)
    mask = torch.ones_like(magnitude) if period is None else _voice_mask(magnitude, period)
    hz = torch.arange(len(magnitude))[:, None] * (SAMPLE_RATE / SEP_N_FFT)
    mask *= hz >= BELOW_F0 * _f0(magnitude * mask)                     # bass and kick lie below a sung f0
    return torch.istft(spec * mask, SEP_N_FFT, SEP_HOP, window=window, length=len(mix)).numpy()


def separate_stream(read, n_samples):
    """The voice and the accompaniment of a mixed song of n_samples samples at SAMPLE_RATE, as (voice,
    accompaniment) pieces that cover it in order; read(start, stop) returns the mix's samples start..stop-1 (as
    AudioFile does), one block at a time. Equal blocks of BLOCK_S seconds, spread evenly so that the last ends with
    the song and each overlaps the next by OVERLAP_S or more: REPET needs several periods in every block. The
    voices of two blocks are cross-faded over their overlap (weights adding up to 1) and the accompaniment is the
    mix minus the voice, so the two add up to the mix. At most two blocks are held whatever the song's length;
    a song up to 1.5 blocks long is one block."""
    block, overlap = round(BLOCK_S * SAMPLE_RATE), round(OVERLAP_S * SAMPLE_RATE)
    n_blocks = 1 if n_samples <= 1.5 * block else -(-(n_samples - overlap) // (block - overlap))
    block = block if n_blocks > 1 else n_samples
    starts = np.linspace(0, n_samples - block, n_blocks).round().astype(int).tolist()
    tail, done = np.zeros(0, np.float32), 0             # the last block's voice past `done`, to cross-fade
    for i, start in enumerate(starts):
        mix = np.array(read(start, start + block), dtype=np.float32)   # writable (torch shares it), read may map
        voice = _voice_of_block(mix)
        fade = (0.5 - 0.5 * np.cos(np.pi * (np.arange(len(tail)) + 0.5) / len(tail))).astype(np.float32)
        voice[:len(tail)] = tail * (1 - fade) + voice[:len(tail)] * fade
        keep = starts[i + 1] if i + 1 < len(starts) else start + block    # the overlap waits for the next block
        piece, tail = voice[done - start:keep - start], voice[keep - start:]
        yield piece, mix[done - start:keep - start] - piece
        done = keep


def separate(mix):
    """A mixed song (N,) at SAMPLE_RATE -> (voice, accompaniment), float32 (N,) each, adding up to the mix."""
    mix = np.asarray(mix, dtype=np.float32)
    if mix.ndim != 1:
        raise ValueError(f"separate: expected a mono waveform (N,), got shape {mix.shape}")
    pieces = [voice for voice, _ in separate_stream(lambda start, stop: mix[start:stop], len(mix))]
    voice = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return voice, mix - voice


# Reading: sound files (load_audio, AudioFile) and Hugging Face checkpoints (read_safetensors, hf_to_ours)

def _wav_declared_frames(path, info):
    """Frames a WAV file's 'data' chunk header promises, or None when it is not a plain WAV we can read."""
    if info.format != "WAV":
        return None
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                bytes_per_frame = info.channels * _SUBTYPE_BYTES.get(info.subtype, 0)
                return size // bytes_per_frame if bytes_per_frame else None
            f.seek(size + (size & 1), 1)  # RIFF chunks are padded to even sizes


_SUBTYPE_BYTES = {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}
MIN_RATE, MAX_RATE = 1_000, 768_000   # Hz, the sample rates accepted; outside them a header is damaged
SCAN_FRAMES = 1 << 20                 # frames checked at a time when a sound file is opened
# The containers ffmpeg may open for us: none opens another file, as playlists, concat scripts or image sequences do.
FFMPEG_FORMATS = "mov,matroska,webm,mp3,aac,ogg,flac,wav,w64,aiff,caf,asf,avi,flv,mpegts,mpeg,amr,ac3,eac3,wv,ape,tta"
AAC_PRIMING = 1024                    # samples an AAC encoder puts before the sound; ADTS has no field to say so


def _decode_with_ffmpeg(path, sr):
    """The first audio stream of a file libsndfile does not know (m4a, aac, webm, mp4, ...) decoded by ffmpeg to
    mono float32 at `sr` Hz, as a read-only memory map of a temporary raw file. The path goes as 'file:' + the
    absolute path, only the file protocol allowed, so a file named 'concat:a|b', 'http://..' or '-i' is that file.
    Refusals (ValueError naming the file): no audio stream, or not readable by ffmpeg."""
    try:
        import imageio_ffmpeg    # only for formats libsndfile lacks: audio.py alone still reads wav without it
    except ImportError:
        raise ValueError(f"{path}: unreadable audio (libsndfile does not know it, and imageio-ffmpeg, which "
                         f"would decode it, is not installed)") from None
    with open(path, 'rb') as f:
        head = f.read(2)
    # A raw AAC (ADTS) stream opens with the 12-bit sync word; mp4 / m4a say their priming in an edit list instead
    adts = len(head) == 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0
    trim = ['-af', f'atrim=start_sample={AAC_PRIMING}'] if adts else []
    with tempfile.NamedTemporaryFile(suffix='.f32') as raw:
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-nostdin', '-v', 'error', '-protocol_whitelist', 'file',
                   '-format_whitelist', FFMPEG_FORMATS, '-i', f"file:{Path(path).resolve()}", '-map', '0:a:0',
                   *trim, '-ac', '1', '-ar', str(int(sr)), '-f', 'f32le', '-y', f"file:{raw.name}"]
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        said = done.stderr.decode(errors='replace')
        if 'matches no streams' in said:
            raise ValueError(f"{path}: no audio stream to read")
        if done.returncode != 0:    # ffmpeg's first complaint about the input is the specific one
            reasons = [line.split('] ', 1)[-1] for line in said.splitlines() if line.startswith('[in#')]
            reason = (reasons or said.strip().splitlines() or [f"exit status {done.returncode}"])[0]
            raise ValueError(f"{path}: unreadable audio (neither libsndfile nor ffmpeg reads it: {reason})")
        if Path(raw.name).stat().st_size == 0:
            return np.zeros(0, np.float32)
        # Mapped before the file is removed on leaving this block: its disk space goes with the mapping.
        return np.memmap(raw.name, np.float32, 'r')


class AudioFile:
    """A sound file read as load_audio reads it (mono float32 at `sr` Hz), a stretch at a time: song[a:b] holds
    samples a..b-1 (fewer past the end), len(song) counts them. Opening refuses (ValueError naming the file)
    unreadable, empty and truncated files, sample rates no recorder writes and NaN or infinite samples."""

    def __init__(self, path, sr=SAMPLE_RATE):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{path}: no such audio file")
        self.decoded = None                                         # samples ffmpeg decoded, for other formats
        try:
            info = sf.info(str(self.path))
        except (RuntimeError, OSError):  # soundfile's errors derive from RuntimeError
            self.decoded = _decode_with_ffmpeg(self.path, sr)
            info = SimpleNamespace(frames=len(self.decoded), samplerate=int(sr), format='ffmpeg')
        if info.frames <= 0:
            raise ValueError(f"{path}: empty audio (no samples)")
        if not MIN_RATE <= info.samplerate <= MAX_RATE:
            raise ValueError(f"{path}: sample rate {info.samplerate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
        declared = _wav_declared_frames(self.path, info)
        if declared is not None and info.frames < declared:
            raise ValueError(f"{path}: truncated audio ({info.frames} of {declared} frames present)")
        self.frames = info.frames                                   # at the file's rate
        g = math.gcd(int(sr), int(info.samplerate))
        self.up, self.down = int(sr) // g, int(info.samplerate) // g
        self.length = -(-self.frames * self.up // self.down)        # resample_poly's output length
        # One pass over the samples: damage (a NaN, data cut short) is refused before any model runs on the song.
        for start in range(0, self.frames, SCAN_FRAMES):
            self._read(start, min(self.frames, start + SCAN_FRAMES))

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        start, stop, step = index.indices(self.length)
        if step != 1 or stop <= start:
            raise IndexError(f"{self.path}: read a stretch song[a:b] with a < b, not {index}")
        if self.up == self.down:
            return self._read(start, stop)
        # The filter's reach of context on both sides, from an input sample that maps to a whole output sample:
        # the outputs are then those of resampling the whole file.
        reach = 10 * max(self.up, self.down) // self.up + 2          # resample_poly's half filter, input samples
        first = max(0, start * self.down // self.up - reach) // self.down * self.down
        last = min(self.frames, -(-stop * self.down // self.up) + reach)
        from scipy.signal import resample_poly   # here: slow to import, and a 16 kHz song never needs it
        wave = resample_poly(self._read(first, last), self.up, self.down)
        offset = first * self.up // self.down
        return np.ascontiguousarray(wave[start - offset:stop - offset], dtype=np.float32)

    def _read(self, start, stop):
        """Frames start..stop-1 at the file's rate, channels averaged: (stop - start,) float32."""
        try:
            if self.decoded is not None:
                wave = self.decoded[start:stop, None]
            else:
                with sf.SoundFile(str(self.path)) as f:
                    f.seek(start)
                    wave = f.read(stop - start, dtype="float32", always_2d=True)   # (n, channels)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: unreadable audio ({' '.join(str(e).split())})") from None
        if len(wave) < stop - start:
            raise ValueError(f"{self.path}: truncated audio ({start + len(wave)} of {self.frames} frames present)")
        if not np.isfinite(wave).all():
            raise ValueError(f"{self.path}: audio holds NaN or infinite samples")
        return np.ascontiguousarray(wave.mean(axis=1), dtype=np.float32)


# Parts of HF checkpoints outside the base encoder: CTC / classification heads and pre-training modules.
HF_IGNORED = ("lm_head.", "quantizer.", "project_q.", "project_hid.", "masked_spec_embed", "classifier.",
              "projector.", "layer_weights")
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors (numpy only): an 8-byte little-endian header length, a
    JSON header {name: {dtype, shape, data_offsets}}, then the little-endian data, offsets counted from the end of
    the header. BF16 is widened to float32."""
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8)
    if data.size < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    n = int(data[:8].view("<u8")[0])
    if 8 + n > data.size:
        raise ValueError(f"{path}: safetensors header length {n} runs past the end of the file")
    try:
        header = json.loads(data[8:8 + n].tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    body = data[8 + n:]
    tensors = {}
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(isinstance(n, int) for n in entry["data_offsets"])
                and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1]):
            raise ValueError(f"{path}: tensor {name} has a damaged entry in the header ({str(entry)[:80]})")
        if entry.get("dtype") not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
        begin, end = entry["data_offsets"]
        count = math.prod(entry["shape"])
        if end > body.size or end - begin != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} data is truncated or its offsets are wrong")
        arr = body[begin:end].view(dtype).astype(dtype.newbyteorder("="))  # a copy, native order
        if entry["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = torch.from_numpy(arr.reshape(entry["shape"]))
    return tensors


def hf_to_ours(state, cfg, expected, source):
    """Map a Hugging Face Wav2Vec2Model state dict to ours, by name: strips 'wav2vec2.', drops HF_IGNORED parts,
    permutes conv weights to channels-last, folds the positional conv's weight norm (either spelling) and
    stacks q/k/v. `expected` is our state dict (for shapes); `source` names the file in errors."""
    hf = {k.removeprefix("wav2vec2."): v for k, v in state.items()}
    hf = {k: v for k, v in hf.items() if not k.startswith(HF_IGNORED)}
    used, missing, ours = set(), [], {}  # ours: our name -> (tensor, the HF names it came from)

    def put(name, *keys, make=lambda t: t):
        """ours[name] = make(the HF tensors of keys) when all of them are there."""
        used.update(k for k in keys if k in hf)
        missing.extend(k for k in keys if k not in hf)
        if all(k in hf for k in keys):
            ours[name] = (make(*(hf[k] for k in keys)), keys)

    def tap_major(w):  # (C_out, C_in, kernel) -> (kernel*C_in, C_out)
        return w.permute(2, 1, 0).reshape(-1, w.shape[0]) if w.dim() == 3 else w

    def fold_weight_norm(g, v):  # torch weight_norm(dim=2), as HF applies it: w = g * v / ||v||, a norm per tap
        if g.shape != (1, 1, v.shape[2]):
            raise ValueError(f"{source}: {g_v[0]} has shape {tuple(g.shape)}, expected {(1, 1, v.shape[2])}")
        g32, v32 = g.float(), v.float()
        return (g32 * v32 / v32.norm(dim=(0, 1), keepdim=True)).to(v.dtype)

    for i in range(len(cfg.conv_dim)):
        hf_l, our_l = f"feature_extractor.conv_layers.{i}", f"features.layers.{i}"
        put(f"{our_l}.weight", f"{hf_l}.conv.weight", make=tap_major)
        if cfg.conv_bias:
            put(f"{our_l}.bias", f"{hf_l}.conv.bias")
        if cfg.feat_extract_norm == "layer" or i == 0:
            for p in ("weight", "bias"):
                put(f"{our_l}.norm.{p}", f"{hf_l}.layer_norm.{p}")
    for hf_n, our_n in (("feature_projection.layer_norm", "proj_norm"), ("feature_projection.projection", "proj"),
                        ("encoder.layer_norm", "encoder_norm")):
        for p in ("weight", "bias"):
            put(f"{our_n}.{p}", f"{hf_n}.{p}")

    pos = "encoder.pos_conv_embed.conv"
    spellings = [(f"{pos}.weight_g", f"{pos}.weight_v"),
                 (f"{pos}.parametrizations.weight.original0", f"{pos}.parametrizations.weight.original1")]
    g_v = next((s for s in spellings if s[0] in hf and s[1] in hf), None)
    if g_v is not None:
        put("pos_conv.weight", *g_v, make=fold_weight_norm)
    else:
        put("pos_conv.weight", f"{pos}.weight")  # weight norm already removed
    put("pos_conv.bias", f"{pos}.bias")

    for i in range(cfg.num_hidden_layers):
        hf_l, our_l = f"encoder.layers.{i}", f"layers.{i}"
        for p in ("weight", "bias"):
            put(f"{our_l}.attn.qkv.{p}", *(f"{hf_l}.attention.{n}_proj.{p}" for n in "qkv"),
                make=lambda *qkv: torch.cat(qkv))
            for hf_n, our_n in (("attention.out_proj", "attn.out"), ("layer_norm", "attn_norm"),
                                ("feed_forward.intermediate_dense", "ffn.fc1"),
                                ("feed_forward.output_dense", "ffn.fc2"), ("final_layer_norm", "ffn_norm")):
                put(f"{our_l}.{our_n}.{p}", f"{hf_l}.{hf_n}.{p}")

    unexpected = sorted(set(hf) - used)
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the config: missing {missing}; "
                         f"unexpected {unexpected}")
    out = {}
    for name, (tensor, hf_names) in ours.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: {' / '.join(hf_names)} has the wrong shape for the config "
                             f"(gives {tuple(tensor.shape)} for {name}, expected {tuple(expected[name].shape)})")
        out[name] = tensor.to(expected[name].dtype)
    return out
