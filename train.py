"""Training for both stages of UniSinger.

    python train.py --stage motion      # the motion CVAE (tiny preset on the built-in data set by default)
    python train.py --stage render      # the per-person face renderer (built-in person id0 by default)
    torchrun --nproc_per_node=4 train.py --stage motion --preset paper --data /path/SingingHead \
        --flame /path/generic_model.pkl --wav2vec w2v/
    python train.py --no-music          # Table III's ablations: --no-music, --w-kl 0, --w-rec 0, --w-vel 0, --w-mesh 0

Depends on torch, numpy and our unisinger.py, metrics.py, builtin.py, data.py, flame.py, render.py.

Every run: a progress line every few steps (losses, steps/s, ETA), validation and `last.pt` / `best.pt` written
atomically into --out every epoch, bf16 autocast on a GPU (--bf16), DDP under torchrun. `--resume` continues from
`last.pt` exactly (model, optimiser, schedule, random generators, the epoch's data order): on the CPU a resumed run
gives the same losses as one that never stopped.
"""
import argparse
import ctypes
import errno
import fcntl
import hashlib
import io
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import weakref
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import data
import metrics
import render
from audio import SAMPLE_RATE, Wav2Vec2, load_audio, mfcc_at_fps
from builtin import STAND_IN, builtin_data, flame_record, load_flame, require_head
from flame import BROW_LANDMARKS, EYE_LANDMARKS, MOUTH_LANDMARKS, NOSE_LANDMARKS
from data import RATE_WINDOW, Parser, Progress, cpu_cores, one_thread, run_command
from unisinger import MotionConfig, MotionCVAE, SongMix, load_checkpoint, motion_losses

RENDER_FRAME_STRIDE = 6      # 1 frame in 6: neighbours at 30 fps are near copies; the 2-D metrics score these
RENDER_SIZES = (256, 512, 1024)   # the render stage's frame sides (--size); the paper's Table IV has 256 and 512
ADAM_BETAS = (0.5, 0.999)    # pix2pix's GAN-friendly momentum
MOUTH_WEIGHT = 25.0          # photometric weight of a mouth-box pixel over 1 elsewhere: a quarter of the loss
EYES_WEIGHT = 25.0           # the same for the brows-and-eyes box (half the loss): else the eyes come out speckled
NOSE_WEIGHT = 25.0           # the same for the nose box: its bridge otherwise carries colour fringes
EVAL_BATCH = 16              # frames rendered at once for validation and the summary


class MotionClips(Dataset):
    """SingingHead clips read from the files per item, with the music's MFCC at 30 fps computed on one thread, so
    that a loader worker (which runs one thread) makes exactly the numbers the training process would."""

    def __init__(self, root, split, clip_frames, index_dir=None):
        self.clips = data.SingingHead(root, split, clip_frames=clip_frames, index_dir=index_dir)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        item = self.clips[i]
        with one_thread():
            music = mfcc_at_fps(item["bgm"], SAMPLE_RATE, len(item["motion"]))
        return dict(voice=torch.as_tensor(item["audio"]), music=music, motion=torch.as_tensor(item["motion"]),
                    shape=torch.as_tensor(item["shape"]), person=item["person"], index=i)


@torch.no_grad()
def validate_motion(model, meshes, face, dataset, device, voice_cache=None, seed=0, workers=0):
    """LVE / FVE (mm, one sample per clip from a fixed z stream) and the training loss on a split."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    lve, fve, loss, n = 0.0, 0.0, 0.0, 0
    for batch in DataLoader(dataset, 8, num_workers=workers):
        motion, shape, music = (batch[k].to(device) for k in ("motion", "shape", "music"))
        feats = (voice_cache[batch["index"]].to(device) if voice_cache is not None
                 else model.voice_features(batch["voice"].to(device), motion.shape[1]))
        z = torch.randn(len(motion), model.cfg.d_model, generator=gen).to(device)
        pred = model.sample(shape, feats, music, z=z).float()
        for s, p, t in zip(shape, pred, motion):
            errors = metrics.vertex_errors(meshes(s, p), meshes(s, t))[None]                # (1, T, U) mm
            lve += metrics.lve(errors.index_select(-1, meshes.lips))[0]
            fve += metrics.fve(errors.index_select(-1, meshes.face))[0]
        rec, mu, logvar = model(motion, shape, music, voice_feats=feats)
        loss += motion_losses(model, face, rec, motion, shape, mu, logvar)[0].item() * len(motion)
        n += len(motion)
    model.train()
    return dict(lve=lve / n, fve=fve / n, loss=loss / n)


def train_motion(args, run):
    root = Path(args.data) if args.data else builtin_data()
    require_head(root, args.flame, args.procedural_head)
    cfg = motion_config(args)
    seed_everything(args.seed)
    if args.wav2vec:                                   # input files first: a damaged one is refused before any work
        pretrained = Wav2Vec2.from_pretrained(args.wav2vec)
        cfg.wav2vec = asdict(pretrained.cfg)           # the checkpoint decides the audio encoder's size
    index_dir = data.cache_folder(root, run.out / DATA_CACHE)
    train_set, val_set = (MotionClips(root, split, data.CLIP_FRAMES, index_dir) for split in ("train", "val"))
    flame = load_flame(args.flame).to(run.device)
    meshes = metrics.RegionMeshes(flame)
    face = flame.region(flame.masks["face"]) if cfg.w_mesh else None     # the mesh loss's vertices
    model = MotionCVAE(cfg).to(run.device)
    if args.wav2vec:
        model.wav2vec.load_state_dict(pretrained.state_dict())
        run.log(f"wav2vec 2.0 weights from {args.wav2vec}")
    elif args.preset == "paper":
        run.log("no --wav2vec given: the audio encoder starts from random weights. The paper starts from a "
                "pretrained checkpoint: download facebook/wav2vec2-base-960h (config.json + model.safetensors) "
                "into a folder and pass --wav2vec FOLDER")
    model.set_motion_stats(*motion_stats(train_set))
    people = {person: torch.from_numpy(shape) for person, shape in train_set.clips.first_shapes().items()}

    voice_cache = val_cache = None
    if args.cache_audio:
        model.wav2vec.requires_grad_(False)
        voice_cache = cache_voice_features(model, train_set, run.device, workers=args.workers)
        val_cache = cache_voice_features(model, val_set, run.device, workers=args.workers)
        run.log(f"cached frozen wav2vec 2.0 features: {tuple(voice_cache.shape)}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(loader(train_set, args.batch_size, run, args.seed, 0))
    total_steps = steps_per_epoch * args.epochs
    schedule = cosine_schedule(optimizer, total_steps)
    stateful = dict(model=model, optimizer=optimizer, schedule=schedule)
    start_epoch, step, best = resume(run, stateful)
    best = float("inf") if best is None else best      # the lowest validation LVE so far
    net = DistributedDataParallel(model) if run.ddp else model
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"motion CVAE '{args.preset}': {n_params / 1e6:.2f} M parameters, {len(train_set)} train / "
            f"{len(val_set)} val clips from {root}, {args.epochs} epochs of {steps_per_epoch} steps on {run.device}")
    progress = Progress(total_steps, "step", done=step, window=epochs_window(steps_per_epoch))
    first_step = step + 1                          # always said: how long start-up took
    history = []
    head = flame_record(args.flame)                # which head the checkpoint's meshes came from
    for epoch in range(start_epoch, args.epochs):
        model.train()
        for batch in loader(train_set, args.batch_size, run, args.seed, epoch, workers=args.workers):
            motion, shape, music = (batch[k].to(run.device) for k in ("motion", "shape", "music"))
            audio = (dict(voice=batch["voice"].to(run.device)) if voice_cache is None
                     else dict(voice_feats=voice_cache[batch["index"]].to(run.device)))
            with run.autocast():
                pred, mu, logvar = net(motion, shape, music, **audio)
            loss, parts = motion_losses(model, face, pred.float(), motion, shape, mu.float(), logvar.float())
            descend(loss, optimizer, params, args.grad_clip, run, (epoch, step + 1))
            schedule.step()
            step += 1
            if progress.advance() or step == first_step:
                log_progress(run, progress, epoch, dict(loss=loss.item(), **parts))
        val = validate_motion(model, meshes, face, val_set, run.device, val_cache, args.seed, args.workers)
        history.append(val)
        run.log(f"epoch {epoch} validation | LVE {val['lve']:.3f} mm | FVE {val['fve']:.3f} mm | "
                f"loss {val['loss']:.4f}")
        improved = val["lve"] < best
        best = min(best, val["lve"])
        save_epoch(run, stateful, improved, config=asdict(cfg), epoch=epoch, step=step, best=best, people=people,
                   val=val, **head)
    run.log(closing_line(run, "motion", f"the epoch with the lowest validation LVE, {best:.3f} mm",
                         "; `python unisinger.py` reads best.pt"))
    if run.main and args.summary:
        print(f"\nthe summary scores {run.out / 'best.pt'}")
        motion_summary(load_checkpoint(run.out / "best.pt", run.device).model, root, args)
    return history


# The render stage: every RENDER_FRAME_STRIDE-th frame of the person's videos with its depth input (and warp of
# the reference, frame 0 of the first training sequence) and its feature boxes, weighed up in the L1 term.
# best.pt has the best validation SSIM; the summary scores it on the test split against copying the reference.

class PortraitFrames(Dataset):
    """One person's frames with their depth inputs. Item: depth (1,H,W), frame (3,H,W) in [-1,1], index, the mouth,
    eyes and nose boxes (top, bottom, left, right; bottom and right excluded) and, when given, flow (2,H,W), the
    reference's warp. depth, frames and flow are tensors or FrameRows (read from files per item)."""

    def __init__(self, depth, frames, index, mouth, eyes, nose, flow=None):
        self.depth, self.frames, self.index = depth, frames, index   # (N,1,H,W) f16, (N,H,W,3) u8, (N,) long
        self.mouth, self.eyes, self.nose = mouth, eyes, nose         # (N, 4) long each
        self.flow = flow                                             # (N,2,H,W) f16 or None

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        item = dict(depth=self.depth[i].float(), frame=self.frames[i].permute(2, 0, 1).float() / 127.5 - 1,
                    index=self.index[i], mouth=self.mouth[i], eyes=self.eyes[i], nose=self.nose[i])
        return item if self.flow is None else dict(item, flow=self.flow[i].float())


@torch.no_grad()
def portrait_frames(root, seqs, flame, size, stride, cache=None, reference=None):
    """Every stride-th frame of the sequences with its depth input, boxes and, with reference (reference_pose's),
    the reference's warp into it, one video at a time (on flame's device): frames, depth and warps go to files in
    `cache` (None: a temporary folder that goes with the data set), only the boxes stay in memory. A sequence's
    files are used again while its pickle and video, the head, the reference, size and stride are unchanged.
    Returns (PortraitFrames, cams (N, 3) float32, the first sequence's shape (100,) float32)."""
    folder = Path(tempfile.mkdtemp(prefix="unisinger_frames_") if cache is None else
                  Path(cache) / f"frames_{size}px_1in{stride}")
    folder.mkdir(parents=True, exist_ok=True)
    key = frames_key(flame, reference, size, stride)
    progress = Progress(len(seqs), "video", lines=FRAMES_PROGRESS_LINES)
    entries = []
    with open(folder / "frames.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # torchrun's ranks: the first decodes, the others reuse its files
        for seq in seqs:
            entries.append(cached_frames(root, seq, folder, key, size, reference is not None)
                           or decode_frames(root, seq, flame, folder, key, size, stride, reference))
            if len(seqs) >= FRAMES_PROGRESS_MIN and progress.advance():
                print(progress.line(f"frames of {seqs[0].split('_')[0]} at {size}² in {folder}:"), flush=True)
    cat = lambda name: torch.from_numpy(np.concatenate([e[name] for e in entries]).astype(np.int64))
    rows = lambda kind, shape, dtype: FrameRows([(folder / f"{seq}.{kind}", len(e["index"]))
                                                 for seq, e in zip(seqs, entries)], shape, dtype)
    dataset = PortraitFrames(rows("depth", (1, size, size), np.float16), rows("frames", (size, size, 3), np.uint8),
                             cat("index"), cat("mouth"), cat("eyes"), cat("nose"),
                             rows("flow", (2, size, size), np.float16) if reference is not None else None)
    if cache is None:                      # the files go when the data set does
        weakref.finalize(dataset, shutil.rmtree, folder, True)
    return dataset, np.concatenate([e["cam"] for e in entries]).astype(np.float32), entries[0]["shape"]


def box_weight(boxes, size):
    """The photometric loss's pixel weights (B, 1, size, size): 1, plus w inside each frame's box for each (boxes
    (B, 4), w) given. Most of a portrait never moves: unweighted, the mouth (a few percent of the frame) comes out
    as the reference's, shut, and the eyes as the discriminator's speckles."""
    at = torch.arange(size, device=boxes[0][0].device)
    weight = 1.0
    for box, w in boxes:
        top, bottom, left, right = (box[:, k, None, None] for k in range(4))           # (B, 1, 1) each
        inside = (at[:, None] >= top) & (at[:, None] < bottom) & (at >= left) & (at < right)   # (B, size, size)
        weight = weight + w * inside.float()
    return weight[:, None]


def person_frames(root, args, cfg, flame, run):
    """args.person's training and validation portrait_frames (in the data's cache folder) and, for a warping
    renderer, the reference image's head (reference_pose). Returns (train set, val set, the person's mean camera
    (3,) for portrait_video, the first sequence's shape (100,), the reference's head or None)."""
    cache = data.cache_folder(root, run.out / DATA_CACHE)
    ref_pose = reference_pose(root, person_sequences(root, "train", args.person)[0], flame) if cfg.warp else None
    (train_set, cams, shape), (val_set, _, _) = (
        portrait_frames(root, person_sequences(root, split, args.person), flame, cfg.image_size, RENDER_FRAME_STRIDE,
                        cache, ref_pose) for split in ("train", "val"))
    return train_set, val_set, cams.mean(0), shape, ref_pose


def train_render(args, run):
    root = Path(args.data) if args.data else builtin_data()
    require_head(root, args.flame, args.procedural_head)
    cfg = render.RendererConfig.preset(args.preset)
    cfg = replace(cfg, image_size=args.size) if args.size else cfg
    seed_everything(args.seed)
    vgg = load_vgg(args, run)
    flame = load_flame(args.flame).to(run.device)
    train_set, val_set, cam, shape, ref_pose = person_frames(root, args, cfg, flame, run)
    reference_u8 = train_set.frames[0].numpy()                # first frame of the first training sequence
    reference = render.image_tensor(reference_u8, cfg.image_size).to(run.device)   # (3, H, W)
    if run.main:
        with data.atomic_output(run.out / "reference.png") as tmp:
            imageio.imwrite(tmp, reference_u8)

    generator = render.FaceRenderer(cfg.channels, cfg.warp).to(run.device)
    discriminator = render.PatchDiscriminator(channels=cfg.discriminator_channels).to(run.device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.lr, betas=ADAM_BETAS)
    steps_per_epoch = len(loader(train_set, args.batch_size, run, args.seed, 0))
    total_steps = steps_per_epoch * args.epochs
    sched_g, sched_d = cosine_schedule(opt_g, total_steps), cosine_schedule(opt_d, total_steps)
    stateful = dict(generator=generator, discriminator=discriminator, optimizer_g=opt_g, optimizer_d=opt_d,
                 schedule_g=sched_g, schedule_d=sched_d)
    start_epoch, step, best = resume(run, stateful)
    best = -1.0 if best is None else best              # the highest validation SSIM so far
    # D's weights get gradients in G's step too; G's step uses the bare D so those are never all-reduced
    net_g = DistributedDataParallel(generator) if run.ddp else generator
    net_d = DistributedDataParallel(discriminator) if run.ddp else discriminator
    n_params = sum(p.numel() for p in generator.parameters())
    run.log(f"face renderer '{args.preset}': {n_params / 1e6:.2f} M generator parameters, person {args.person}: "
            f"{len(train_set)} train / {len(val_set)} val frames (1 in {RENDER_FRAME_STRIDE}) from {root}, "
            f"{args.epochs} epochs of {steps_per_epoch} steps on {run.device}")
    progress = Progress(total_steps, "step", done=step, window=epochs_window(steps_per_epoch))
    first_step = step + 1                          # always said: how long start-up took
    history = []
    head = flame_record(args.flame)                # the depth inputs' head: inference must render with it
    if ref_pose is not None:                       # and the reference's head, which portrait_video warps with
        head.update(reference_motion=ref_pose["motion"], reference_cam=ref_pose["cam"])
    gan = GanStep(net_g, net_d, discriminator, opt_g, opt_d, vgg, reference, args.grad_clip)
    for epoch in range(start_epoch, args.epochs):
        sums, n_batches = {}, 0
        for batch in loader(train_set, args.batch_size, run, args.seed, epoch, workers=args.workers):
            losses = gan(batch, run, (epoch, step + 1))
            sched_g.step()
            sched_d.step()
            step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            n_batches += 1
            if progress.advance() or step == first_step:
                log_progress(run, progress, epoch, losses)
        val, grid = validate_render(generator, val_set, reference, reference_u8, run)
        history.append(dict(train={k: v / n_batches for k, v in sums.items()}, val=val))
        run.log(f"epoch {epoch} validation | SSIM {val['ssim']:.4f} | PSNR {val['psnr']:.2f} dB | error / copying's "
                f"in the boxes: " + ", ".join(f"{box} {val[box]:.3f}" for box in BOX_BARS))
        if run.main:
            with data.atomic_output(run.out / f"samples_{epoch:03d}.png") as tmp:
                imageio.imwrite(tmp, grid)
        improved = val["ssim"] > best
        best = max(best, val["ssim"])
        save_epoch(run, stateful, improved, renderer_config=asdict(cfg), epoch=epoch, step=step, best=best,
                   cam=cam.tolist(), shape=torch.as_tensor(shape), person=args.person,
                   reference=torch.from_numpy(reference_u8), val=val, **head)
    run.log(closing_line(run, "render", f"the epoch with the highest validation SSIM, {best:.4f}", f", the "
                         f"reference image {run.out / 'reference.png'} and a sample grid per epoch trained "
                         f"({run.out / 'samples_<epoch>.png'}: rows of depth | generated | true frame)"))

    summary = None
    if run.main and args.summary and (run.out / "best.pt").is_file():
        generator.load_state_dict(data.read_checkpoint(run.out / "best.pt", run.device)["generator"])
        summary = render_summary(generator, root, args.person, flame, (reference_u8, ref_pose), cfg.image_size, run)
    return dict(history=history, summary=summary)


@dataclass
class GanStep:
    """One training step of the renderer: the discriminator on real and generated frames, then the generator
    (GAN, feature-matching, photometric with the feature boxes weighed up, perceptual when vgg is given)."""
    net_g: torch.nn.Module            # the generator as trained (DDP-wrapped under torchrun)
    net_d: torch.nn.Module            # the discriminator as trained
    discriminator: torch.nn.Module    # the bare one: G's step uses it, so D's gradients there are never all-reduced
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    vgg: torch.nn.Module              # or None: no perceptual term
    reference: torch.Tensor           # (3, H, W) in [-1, 1]
    grad_clip: float

    def __call__(self, batch, run, where):
        depth, real, index, mouth, eyes, nose = (batch[k].to(run.device)
                                                 for k in ("depth", "frame", "index", "mouth", "eyes", "nose"))
        flow = batch["flow"].to(run.device) if "flow" in batch else None
        ref = self.reference.expand(len(depth), -1, -1, -1)
        with run.autocast():
            fake = self.net_g(depth, ref, index, flow)
            condition = render.renderer_input(depth, ref, index)
            loss_d = render.discriminator_loss(self.net_d, condition, fake, real)
        descend(loss_d, self.opt_d, self.net_d.parameters(), math.inf, run, where)
        with run.autocast():
            boxes = [(mouth, MOUTH_WEIGHT), (eyes, EYES_WEIGHT), (nose, NOSE_WEIGHT)]
            loss_g, parts = render.generator_loss(self.discriminator, condition, fake, real, self.vgg,
                                                  render.RendererLossWeights(), box_weight(boxes, real.shape[-1]))
        descend(loss_g, self.opt_g, self.net_g.parameters(), self.grad_clip, run, where)
        return dict(g=loss_g.item(), d=loss_d.item(), **parts)


@torch.no_grad()
def rendered_batches(generator, dataset, reference, device, run):
    """(first item, generated uint8 (b, H, W, 3)) for the items of a PortraitFrames, EVAL_BATCH at a time."""
    generator.eval()
    for lo in range(0, len(dataset), EVAL_BATCH):
        depth = dataset.depth[lo:lo + EVAL_BATCH].float().to(device)
        with run.autocast():
            index = dataset.index[lo:lo + EVAL_BATCH].to(device)
            flow = None if dataset.flow is None else dataset.flow[lo:lo + EVAL_BATCH].float().to(device)
            fake = generator(depth, reference.expand(len(depth), -1, -1, -1), index, flow)
        yield lo, render.to_uint8(fake).cpu().numpy()
    generator.train()


def validate_render(generator, dataset, reference, reference_u8, run):
    """(scores, sample grid), a batch of frames at a time: frame_scores of the generated frames and each box's error
    over copying the reference's (box_scores' l1_ratio pooled over the split). reference (3, H, W) in [-1, 1],
    reference_u8 the same image (H, W, 3)."""
    pick = np.linspace(0, len(dataset) - 1, min(GRID_ROWS, len(dataset))).round().astype(int)   # evenly spaced
    ssim, psnr, picked = [], [], {}
    errors = {box: [0.0, 0.0] for box in BOX_BARS}            # summed over the box pixels: ours, copying's
    for lo, generated in rendered_batches(generator, dataset, reference, run.device, run):
        truth = dataset.frames[lo:lo + len(generated)].numpy()
        ssim.append(metrics.ssim(generated, truth))
        psnr.append(metrics.psnr(generated, truth))
        for box, sums in errors.items():
            scores = box_scores(generated, truth, reference_u8, getattr(dataset, box)[lo:lo + len(generated)])
            sums[0] += scores["l1"] * scores["pixels"]
            sums[1] += scores["copy_l1"] * scores["pixels"]
        picked.update({k: generated[k - lo] for k in pick if lo <= k < lo + len(generated)})
    scores = dict(ssim=float(np.mean(np.concatenate(ssim))), psnr=float(np.mean(np.concatenate(psnr))),
                  **{box: ours / max(copy, 1e-9) for box, (ours, copy) in errors.items()})
    return scores, sample_grid(dataset, np.stack([picked[k] for k in pick]), pick)


# ------------------------------------------------------------ support: frame files, summaries, runs, command line

DEPTH_BATCH = 32             # frames rasterized at once while precomputing the depth inputs
FRAMES_VERSION = 2           # of the render stage's frame files; another version's are made again
FRAMES_PROGRESS_LINES = 10   # progress lines while a person's videos are decoded, at most
FRAMES_PROGRESS_MIN = 10     # videos to prepare before progress lines are worth printing
GRID_ROWS = 4                # validation frames in each epoch's sample grid
SSIM_BAR, PSNR_BAR = 0.85, 25.0   # learning bars on held-out frames
SPECKLE_LEVELS = 40                # grey levels, in any channel, from the truth's that make a pixel a speckle
# the summary's bars inside each box: at most `l1_ratio` and `speckle`, at least `ssim` and `correlation` (box_scores)
BOX_BARS = dict(mouth=dict(l1_ratio=0.5, correlation=0.9),
                eyes=dict(l1_ratio=0.4, ssim=0.80, speckle=0.02),
                nose=dict(l1_ratio=0.4, ssim=0.85, speckle=0.02))
VGG_URL = "https://download.pytorch.org/models/vgg19-dcbfe0e4.pth"
SUMMARY_SAMPLES = 10       # samples per test clip in the closing summary (the paper's n)
LOCK_FILE = "train.lock"   # in --out, locked by the run writing there; the kernel drops it when that run dies
DATA_CACHE = "data_cache"  # in --out: the data set's index and frames when the data folder is not writable
MAX_WORKERS = 4            # loader worker processes by default, at most
# the command line's bounds, stated in --help: numbers outside them make no sense or no run (all are checked finite)
LR = data.float_in(1e-7, 1.0)              # --lr: Adam-type steps of more than 1 throw any network's weights about
WEIGHT_DECAY = data.float_in(0.0, 1.0)     # --weight-decay: AdamW's share of the weights (times the lr) a step takes
GRAD_CLIP = data.float_in(1e-4, 1e4)       # --grad-clip: the cap on the gradient's norm; 1e4 is as good as none here
LOSS_WEIGHT = data.float_in(0.0, 1e4)      # --w-kl / --w-rec / --w-vel / --w-mesh: 0 turns the term off
SEED = data.int_in(0, 2 ** 32 - 1)         # --seed: numpy's seeds
COUNT_RANGES = {"--epochs": (1, 100_000), "--batch-size": (1, 4096), "--workers": (0, 64)}
LOSS_TERMS = ("kl", "rec", "vel", "mesh")
CHECKPOINTS = ("best.pt", "last.pt")
# what a checkpoint of each stage holds besides rng, epoch, step and best: how --resume tells the stages apart
STAGE_KEYS = dict(motion=("model", "optimizer", "schedule"),
                  render=("generator", "discriminator", "optimizer_g", "optimizer_d", "schedule_g", "schedule_d"))
PR_SET_PDEATHSIG = 1       # Linux prctl option: the signal the kernel sends a process when its parent dies
LEARNT_LVE_RATIO = 0.5     # learning: test LVE-mean at most this share of the mean-motion baseline's
MOUTH_BOX_MARGIN = 0.25    # share of the mouth's width added on each side of its landmarks' box
EYES_BOX_MARGIN = 0.1      # share of the brows-and-eyes width added on each side of theirs
NOSE_BOX_MARGIN = 0.25     # share of the nostrils' width on each side: the box then holds the bridge's flanks


def feature_boxes(landmarks, size):
    """Projected landmarks (N, 68, 3) -> the mouth, brows-and-eyes and nose boxes (N, 4) of landmark_box."""
    brows_eyes = torch.cat([landmarks[:, BROW_LANDMARKS], landmarks[:, EYE_LANDMARKS]], 1)
    return dict(mouth=landmark_box(landmarks[:, MOUTH_LANDMARKS], size, MOUTH_BOX_MARGIN),
                eyes=landmark_box(brows_eyes, size, EYES_BOX_MARGIN),
                nose=landmark_box(landmarks[:, NOSE_LANDMARKS], size, NOSE_BOX_MARGIN))


def landmark_box(points, size, margin):
    """Projected landmarks (N, K, 3) -> (N, 4) long boxes (top, bottom, left, right) in pixels, bottom and right
    excluded: the points' bounding box widened on every side by `margin` times its width."""
    column = (points[..., 0] + 1) * (size / 2) - 0.5                 # (N, K) pixel coordinates, as rasterize's
    row = (1 - points[..., 1]) * (size / 2) - 0.5
    margin = margin * (column.amax(1) - column.amin(1))
    box = torch.stack([row.amin(1) - margin, row.amax(1) + margin + 1, column.amin(1) - margin,
                       column.amax(1) + margin + 1], 1)
    return box.round().clamp(0, size).long()


@torch.no_grad()
def cache_voice_features(model, dataset, device, batch_size=8, workers=0):
    """Frozen wav2vec 2.0 features of every clip, computed once: (N, T, C) on the CPU."""
    return torch.cat([model.voice_features(batch["voice"].to(device), batch["motion"].shape[1]).float().cpu()
                      for batch in DataLoader(dataset, batch_size, num_workers=workers)])


def motion_config(args):
    """The preset with the command line's model and loss switches applied (those given)."""
    switches = dict(use_music=args.music, loss_space=args.loss_space, mesh_head_pose=args.mesh_head_pose,
                    w_kl=args.w_kl, w_rec=args.w_rec, w_vel=args.w_vel, w_mesh=args.w_mesh)
    return replace(MotionConfig.preset(args.preset), **{k: v for k, v in switches.items() if v is not None})


def motion_stats(dataset):
    """Per-dimension mean and std (59,) of the training motion, from the data set's index (no clip is read)."""
    return dataset.clips.index.motion_stats()


def motion_summary(model, root, args):
    """Does the model learn? Test split: the model, the mean-motion baseline and the model deaf (silence, no
    music), Table II columns, then the verdict in sentences; and one held-out clip to look at, its true motion
    beside the model's takes 0 and 1 (those the summary scores), written to <out>/test_<clip>.mp4."""
    flame = load_flame(args.flame)
    test = data.SingingHead(root, "test")
    baseline = metrics.mean_motion(root)
    # the draws python metrics.py makes: each clip its own seed from the same base seed
    predictors = {"UniSinger": metrics.model_predictor(model, SUMMARY_SAMPLES),
                  "mean motion": lambda item: np.tile(baseline, (1, len(item["motion"]), 1)),
                  "UniSinger, silence": metrics.model_predictor(model, SUMMARY_SAMPLES, silent=True)}
    rows = metrics.evaluate_motion(flame, test, predictors, Progress(len(test), "clip", lines=10), "summary:")
    print(f"\ntest split of {root}: {len(test)} clips, {SUMMARY_SAMPLES} samples each")
    print(metrics.score_table(rows, [c for c in metrics.MOTION_COLUMNS if c != "FPS"]))
    print(verdict(*(rows[k] for k in predictors)))
    clip = test[0]
    metrics.truth_and_takes(Path(args.out) / f"test_{clip['id']}.mp4", flame, clip, predictors["UniSinger"](clip))
    return rows


def verdict(ours, base, deaf):
    """The summary's three findings as sentences: learning, listening, diverse takes."""
    learnt = ours["LVE-mean"] / base["LVE-mean"]
    deafness = deaf["LVE-mean"] / ours["LVE-mean"]
    return "\n".join([
        f"{'It learns' if learnt <= LEARNT_LVE_RATIO else 'It has NOT learnt yet'}: its lip error (LVE-mean "
        f"{ours['LVE-mean']:.2f} mm) is {learnt:.2f} of the mean-motion baseline's ({base['LVE-mean']:.2f} mm); "
        f"learning means at most {LEARNT_LVE_RATIO}.",
        f"{'It listens' if deafness > 1 else 'It does NOT use the audio'}: fed silence, its lip error is "
        f"{deafness:.2f} times larger ({deaf['LVE-mean']:.2f} mm).",
        f"Its {SUMMARY_SAMPLES} takes of a clip differ by {ours['Div(mm)']:.1f} mm on average in the face (head pose "
        f"left out; the table's Diversity, {ours['Diversity']:.4f} m, keeps it), and "
        f"the best take is {'closer to' if ours['LVE-min'] < ours['LVE-mean'] else 'NOT closer to'} the truth "
        f"than the average one (LVE-min {ours['LVE-min']:.2f} mm, LVE-mean {ours['LVE-mean']:.2f} mm)."])


class FrameRows:
    """Rows of one shape and dtype stored back to back in files, [(path, rows), ...] in order, read with pread when
    indexed: rows[i] one row, rows[a:b] or rows[indices] stacked, as tensors; rows.numpy() all. Nothing is kept or
    memory-mapped (a mapped page counts in the resident memory once read): the kernel's page cache keeps them."""

    def __init__(self, segments, shape, dtype):
        self.segments = [(str(path), int(rows)) for path, rows in segments]
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.first = np.cumsum([0] + [rows for _, rows in self.segments])      # first row of each segment

    def __len__(self):
        return int(self.first[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            return torch.from_numpy(self._read(np.arange(len(self))[key]))
        rows = np.asarray(key.cpu() if torch.is_tensor(key) else key, dtype=np.int64)
        out = self._read(rows.reshape(-1) % max(1, len(self)))
        return torch.from_numpy(out[0] if rows.ndim == 0 else out)

    def numpy(self):
        return self._read(np.arange(len(self)))

    def _read(self, rows):
        """Rows (k,) -> (k, *shape): each run of consecutive rows of one file in one pread."""
        out = np.empty((len(rows), *self.shape), self.dtype)
        segment = np.searchsorted(self.first, rows, side="right") - 1
        # a run starts where the segment changes or the rows stop being consecutive (and at the first row)
        starts = np.flatnonzero(np.diff(segment, prepend=-1) | (np.diff(rows, prepend=-2) - 1))
        for at, end in zip(starts, [*starts[1:], len(rows)]):
            path, _ = self.segments[segment[at]]
            offset = (int(rows[at]) - int(self.first[segment[at]])) * self.row_bytes
            fd = os.open(path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [memoryview(out[at:end]).cast("B")], offset)
            finally:
                os.close(fd)
            if got != (end - at) * self.row_bytes:
                raise ValueError(f"{path}: cut short ({got} of {(end - at) * self.row_bytes} bytes at {offset})")
        return out


def person_sequences(root, split, person):
    """Sequence ids of `person` in root/<split>.txt that have a video."""
    seqs = [s for s in data.read_split(root, split)
            if s.split("_")[0] == person and data.video_path(root, s).is_file()]
    if not seqs:
        raise ValueError(f"{Path(root) / f'{split}.txt'}: person {person!r} has no sequence with a video "
                         f"in video_seqs/")
    return sorted(seqs)


def frames_key(flame, reference, size, stride):
    """sha256 of what a sequence's frame files depend on besides its own files: the head's arrays, the reference
    head (its motion, camera and shape; none without a warp), the size and the stride."""
    digest = hashlib.sha256(f"{FRAMES_VERSION} {size} {stride}".encode())
    named = sorted(flame.state_dict().items()) + [(name, reference[name].float()) for name in ("motion", "cam", "shape")
                                                  if reference is not None]
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def frame_stamps(root, seq):
    """The files a sequence's render-stage frames come from, stamped (data.file_stamps)."""
    return data.file_stamps([data.flame_path(root, seq), data.video_path(root, seq)])


def cached_frames(root, seq, folder, key, size, warp):
    """The sequence's entry (index, mouth, eyes, nose, cam, shape) when its files in `folder` were made from the
    same pickle and video (stamps, and old enough to tell: data.RACY_NS) and frames_key, whole; else None."""
    try:
        with np.load(folder / f"{seq}.npz", allow_pickle=False) as z:
            entry = {name: z[name] for name in z.files}
    except Exception:                         # absent, cut short or foreign: made again
        return None
    stamps = frame_stamps(root, seq)
    same = (str(entry.get("key")) == key and np.array_equal(entry.get("stamps"), stamps)
            and stamps[1::2].max() < entry["checked"] - data.RACY_NS)
    rows = len(entry.get("index", ()))
    kinds = (("frames", size * size * 3), ("depth", size * size * 2)) + ((("flow", size * size * 4),) if warp else ())
    whole = all((folder / f"{seq}.{kind}").is_file() and (folder / f"{seq}.{kind}").stat().st_size == rows * per_row
                for kind, per_row in kinds)
    return entry if same and whole else None


def decode_frames(root, seq, flame, folder, key, size, stride, reference):
    """Decode the sequence's video at the stride into folder/<seq>.frames (uint8), render the depth inputs into
    <seq>.depth and, with a reference, its warps into <seq>.flow (float16), and write <seq>.npz (the boxes, the
    stamps) last, so an entry with its npz is whole. Returns the entry as cached_frames does."""
    pkl, mp4 = data.flame_path(root, seq), data.video_path(root, seq)
    checked, stamps = time.time_ns(), frame_stamps(root, seq)      # before reading: a write during it is too new
    params = data.read_flame_pickle(pkl)
    rows = len(params["expression"])
    video = data.VideoFrames(mp4, size, stride, stop=rows, batch=DEPTH_BATCH)
    with data.atomic_output(folder / f"{seq}.frames") as frames_tmp, open(frames_tmp, "wb") as file:
        for batch in video:
            file.write(batch.tobytes())
        if abs(video.count - rows) > 1:
            raise ValueError(f"{mp4}: {video.count} frames but {pkl.name} has {rows} rows")
    keep = torch.arange(0, min(video.count, rows), stride)                                 # (n',)
    motion = torch.from_numpy(params["motion"])[keep]                                      # (n', 59)
    cam = params["cam"] if params["cam"] is not None else np.broadcast_to(data.DEFAULT_CAM, (rows, 3))
    cam = torch.as_tensor(np.asarray(cam, dtype=np.float32))[keep]                         # (n', 3)
    device = flame.faces.device
    beta = torch.from_numpy(params["shape"]).to(device)
    boxes = dict(mouth=[], eyes=[], nose=[])
    with ExitStack() as files:                # each file appears whole, or not at all
        written = lambda kind: files.enter_context(open(files.enter_context(
            data.atomic_output(folder / f"{seq}.{kind}")), "wb"))
        depth_file = written("depth")
        flow_file = None if reference is None else written("flow")
        for lo in range(0, len(keep), DEPTH_BATCH):
            verts = flame.from_motion(beta, motion[lo:lo + DEPTH_BATCH].to(device))
            frame_cam = cam[lo:lo + DEPTH_BATCH].to(device)
            depth = render.render_depth(verts, flame.faces, frame_cam, size).half().cpu()    # (b, 1, H, W)
            depth_file.write(depth.numpy().tobytes())
            if flow_file is not None:
                flow = render.reference_flow(verts, flame.faces, frame_cam, reference["verts"].to(device),
                                             reference["cam"].to(device), size)                # (b, 2, H, W)
                flow_file.write(flow.half().cpu().numpy().tobytes())
            for name, box in feature_boxes(render.project(flame.landmarks(verts), frame_cam), size).items():
                boxes[name].append(box.cpu())
    entry = dict(key=key, stamps=stamps, checked=checked, index=keep.numpy(), cam=cam.numpy(), shape=params["shape"],
                 **{name: torch.cat(box).numpy() for name, box in boxes.items()})
    with data.atomic_output(folder / f"{seq}.npz") as tmp:
        np.savez(tmp, **entry)
    return entry


def reference_pose(root, seq, flame):
    """The reference image's head, frame 0 of seq: dict of motion (59,), cam (3,), shape (100,) and verts (V, 3)."""
    params = data.read_flame_pickle(data.flame_path(root, seq))
    cam = params["cam"][0] if params["cam"] is not None else data.DEFAULT_CAM
    pose = dict(motion=torch.from_numpy(params["motion"][0]), cam=torch.as_tensor(np.asarray(cam, dtype=np.float32)),
                shape=torch.from_numpy(params["shape"]))
    with torch.no_grad():
        device = flame.faces.device
        pose["verts"] = flame.from_motion(pose["shape"].to(device), pose["motion"].to(device)).cpu()
    return pose


def render_dataset(generator, dataset, reference, device, run):
    """Generated frames for every item of a PortraitFrames: uint8 (N, H, W, 3)."""
    return np.concatenate([batch for _, batch in rendered_batches(generator, dataset, reference, device, run)])


def box_scores(generated, truth, reference, boxes):
    """One feature judged inside each frame's box: uint8 (N, H, W, 3) generated and true frames, the reference
    (H, W, 3), boxes (N, 4); errors pooled over all `pixels` of the boxes. l1: mean absolute error in grey levels,
    l1_ratio: that over copying the reference's (< 1: closer to the truth); ssim: mean over the frames of the box's
    SSIM, copy_ssim the reference's; speckle: share of the pixels more than SPECKLE_LEVELS off in some channel;
    correlation: Pearson's, over the frames, of the box's mean brightness with the truth's (a mouth in step)."""
    error, copy_error, speckles, pixels, ssim, copy_ssim, light, true_light = 0.0, 0.0, 0, 0, [], [], [], []
    for gen, true, (top, bottom, left, right) in zip(generated, truth, boxes.tolist()):
        g, t, r = (x[top:bottom, left:right].astype(np.float64) for x in (gen, true, reference))
        error += np.abs(g - t).sum()
        copy_error += np.abs(r - t).sum()
        speckles += int((np.abs(g - t).max(-1) > SPECKLE_LEVELS).sum())
        pixels += g.shape[0] * g.shape[1]
        ssim.append(metrics.ssim(g, t))
        copy_ssim.append(metrics.ssim(r, t))
        light.append(g.mean())
        true_light.append(t.mean())
    correlation = float(np.corrcoef(light, true_light)[0, 1]) if len(light) > 1 and np.std(light) > 0 else 0.0
    error, copy_error = float(error), float(copy_error)      # plain floats: checkpoints hold no numpy scalars
    return dict(l1=error / (3 * pixels), copy_l1=copy_error / (3 * pixels), l1_ratio=error / max(copy_error, 1e-9),
                ssim=float(np.mean(ssim)), copy_ssim=float(np.mean(copy_ssim)), speckle=speckles / pixels,
                correlation=correlation, pixels=pixels)


def frame_scores(generated, truth):
    """Mean SSIM and PSNR (dB) of uint8 (N, H, W, 3) frames against the true ones."""
    return dict(ssim=float(np.mean(metrics.ssim(generated, truth))),
                psnr=float(np.mean(metrics.psnr(generated, truth))))


def sample_grid(dataset, generated, pick):
    """uint8 image: the frames `pick` of the data set, a row each of depth | generated (given for those) | truth."""
    depth = render.to_uint8(dataset.depth[pick].float()).numpy()
    return np.concatenate([np.concatenate([d, g, t], axis=1)
                           for d, g, t in zip(depth, generated, dataset.frames[pick].numpy())], axis=0)


def load_vgg(args, run):
    """The perceptual loss's VGG-19 from --vgg, or None (said once) when no file was given."""
    if args.vgg:
        run.log(f"perceptual loss on VGG-19 weights from {args.vgg}")
        return render.VGG19.load(args.vgg).to(run.device)
    run.log(f"no --vgg given: the perceptual (VGG-19) loss term is off. For it, download torchvision's vgg19 "
            f"weights vgg19-dcbfe0e4.pth ({VGG_URL}) and pass --vgg vgg19-dcbfe0e4.pth")
    return None


def render_summary(generator, root, person, flame, reference, size, run):
    """The best generator on the person's test split against copying the reference (reference: the image, uint8
    (H, W, 3), and its reference_pose or None), over the whole frame and inside the boxes, and a held-out clip
    written side by side with its sound; printed and returned."""
    reference_u8, ref_pose = reference
    test_seqs = person_sequences(root, "test", person)
    test_set, _, _ = portrait_frames(root, test_seqs, flame, size, RENDER_FRAME_STRIDE, reference=ref_pose)
    truth = test_set.frames.numpy()
    generated = render_dataset(generator, test_set, render.image_tensor(reference_u8, size).to(run.device),
                               run.device, run)
    video = run.out / f"test_{test_seqs[0]}.mp4"
    write_test_video(generator, root, test_seqs[0], flame, reference, size, video, run)
    summary = dict(renderer=frame_scores(generated, truth),
                   copy_reference=frame_scores(np.repeat(reference_u8[None], len(truth), 0), truth),
                   video=str(video), frames=len(test_set),
                   **{box: box_scores(generated, truth, reference_u8, getattr(test_set, box)) for box in BOX_BARS})
    print_render_summary(run, person, summary)
    return summary


@torch.no_grad()
def write_test_video(generator, root, seq, flame, reference, size, path, run):
    """Every frame of a held-out sequence side by side, depth | generated | truth, with its voice and music
    (reference: render_summary's)."""
    reference_u8, ref_pose = reference
    clip, _, _ = portrait_frames(root, [seq], flame, size, 1, reference=ref_pose)
    generated = render_dataset(generator, clip, render.image_tensor(reference_u8, size).to(run.device), run.device,
                               run)
    depth = render.to_uint8(clip.depth[:].float()).numpy()                             # (T, H, W, 3)
    sound = SongMix(load_audio(data.audio_path(root, seq), SAMPLE_RATE),
                    load_audio(data.bgm_path(root, seq), SAMPLE_RATE))
    data.write_video(path, np.concatenate([depth, generated, clip.frames.numpy()], axis=2), audio=sound)


def print_render_summary(run, person, s):
    ours, copy = s["renderer"], s["copy_reference"]
    met = ours["ssim"] >= SSIM_BAR and ours["psnr"] >= PSNR_BAR
    names = dict(l1_ratio="ratio", ssim="SSIM", speckle="speckles", correlation="correlation")
    lines = [f"render summary of best.pt: person {person}, {s['frames']} held-out test frames "
             f"(1 in {RENDER_FRAME_STRIDE})",
             f"  face renderer   SSIM {ours['ssim']:.4f}   PSNR {ours['psnr']:.2f} dB",
             f"  copy reference  SSIM {copy['ssim']:.4f}   PSNR {copy['psnr']:.2f} dB",
             f"  renderer - copy SSIM {ours['ssim'] - copy['ssim']:+.4f}   PSNR {ours['psnr'] - copy['psnr']:+.2f} dB",
             f"  bars SSIM >= {SSIM_BAR} and PSNR >= {PSNR_BAR} dB: {'met' if met else 'NOT met'}",
             "  inside the boxes: L1 in grey levels (copying the reference's), its ratio to copying's, SSIM "
             f"(copying's), speckles (pixels > {SPECKLE_LEVELS} grey levels off), brightness correlation with the "
             "truth"]
    for box, bars in BOX_BARS.items():
        b = s[box]
        met = all(b[k] <= bar if k in ("l1_ratio", "speckle") else b[k] >= bar for k, bar in bars.items())
        wanted = ", ".join(f"{names[k]} {'<=' if k in ('l1_ratio', 'speckle') else '>='} "
                           + (f"{100 * bar:g} %" if k == "speckle" else f"{bar:g}") for k, bar in bars.items())
        lines.append(f"  {box + ' box':<9} L1 {b['l1']:5.2f} ({b['copy_l1']:5.2f})  ratio {b['l1_ratio']:.3f}  "
                     f"SSIM {b['ssim']:.3f} ({b['copy_ssim']:.3f})  speckles {100 * b['speckle']:4.1f} %  "
                     f"correlation {b['correlation']:.3f} | bars {wanted}: "
                     f"{'met' if met else 'NOT met'}")
    lines.append(f"  side by side (depth | generated | truth, with sound): {s['video']}")
    run.log("\n".join(lines))


class Run:
    """Device, DDP rank and the helpers every stage needs: logging, progress, atomic checkpoints."""

    def __init__(self, args):
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.ddp:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device(args.device)
        self.main = self.rank == 0
        self.bf16 = self.device.type == "cuda" if args.bf16 is None else args.bf16
        self.out = Path(args.out)
        self.saved, self.resumed = {}, None     # checkpoint name -> epoch, of those this run wrote; --resume's last.pt
        self.made = next((p for p in [*self.out.parents[::-1], self.out] if not p.exists()), None)  # mkdir's first
        self.lock = hold_folder(self.out) if self.main else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def log(self, *msg):
        if self.main:
            print(*msg, flush=True)

    def save(self, state, name):
        if self.main:
            save_checkpoint(state, self.out / name)

    def close(self, ok=True):
        """Release --out, its lock file removed while still held (hold_folder). A run that failed before its first
        checkpoint removes the folder it made, and the empty parents it made for it: a refusal leaves nothing."""
        if self.lock is not None:
            if not ok and self.made is not None and not any((self.out / n).is_file() for n in CHECKPOINTS):
                shutil.rmtree(self.out, ignore_errors=True)
                for parent in (p for p in self.out.parents if p.is_relative_to(self.made)):
                    with suppress(OSError):         # made by this run; kept if something else went in since
                        parent.rmdir()
            (self.out / LOCK_FILE).unlink(missing_ok=True)
            self.lock.close()                       # releases the folder
            self.lock = None
        if self.ddp:
            dist.destroy_process_group()


def hold_folder(folder):
    """Make and take --out for this run: a record lock (fcntl.lockf) on folder/LOCK_FILE, held while the returned
    file is open; a second run pointed at the same folder is refused (ValueError naming it). The kernel drops it
    when the holder's process ends, killed or not; unlike an flock, loader workers (which may outlive a killed
    run by a few seconds) do not inherit it."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        lock = open(folder / LOCK_FILE, "a+")
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise ValueError(f"{folder}: another training run (pid {holder}) is writing into this folder; wait for "
                             f"it to end or pass another --out") from None
        if same_file(lock, folder / LOCK_FILE):
            break
        lock.close()                          # the run before removed the file as it ended: lock the new one
    remove_dead_temporaries(folder)
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class _KeepWriteError(io.BufferedWriter):
    """A file for torch.save, which reports a failed write only as 'unexpected pos': it keeps the OSError."""
    error = None

    def write(self, data):
        try:
            return super().write(data)
        except OSError as error:
            self.error = error
            raise


def save_checkpoint(state, path):
    """torch.save to a temporary file, flushed to the disk, then renamed onto `path`: a run killed mid-write leaves
    the previous checkpoint intact; a failed write (a full disk) raises OSError naming `path`, the old file kept."""
    try:
        with data.atomic_output(path) as tmp, _KeepWriteError(io.FileIO(tmp, "w")) as file:
            try:
                torch.save(state, file)
            except RuntimeError:
                if file.error is None:
                    raise
                raise file.error from None
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise OSError(error.errno, f"checkpoint not written ({error.strerror}); the previous one is kept",
                      str(path)) from None


def same_file(file, path):
    """Whether the open file is the one at path now (not one removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def remove_dead_temporaries(folder):
    """Remove what runs killed while writing into folder left half-written: data.atomic_output's temporaries
    (.<name>.<pid>.tmp<suffix>) of processes that are gone. Called with the folder's lock held, so no live run
    of ours is writing there."""
    for path in folder.iterdir():
        head, tmp, suffix = path.name.partition(".tmp")
        pid = head.rpartition(".")[2]
        ours = path.name.startswith(".") and tmp and pid.isdigit() and suffix[:1] in ("", ".")
        if ours and not alive(int(pid)) and path.is_file():
            path.unlink(missing_ok=True)


def alive(pid):
    """Whether process pid is there (someone else's counts)."""
    try:
        os.kill(pid, 0)                       # signal 0: only asks
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def descend(loss, optimizer, params, clip, run, where):
    """One optimiser step on loss, the gradient's norm clipped to clip (inf: not clipped). A loss or gradient that is
    not finite ends the run before the weights take it (stopped): the checkpoints on disk stay good."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if not torch.isfinite(loss.detach() + norm):          # one synchronisation for both
        raise stopped(run, where, f"the loss is {loss.item():.4g}" if not torch.isfinite(loss) else
                      f"the gradient's norm is {norm.item():.4g}")
    optimizer.step()


def stopped(run, where, what):
    """The error that ends a run whose numbers stopped being finite at where, (epoch, step or None: its
    validation), saying which checkpoints (of earlier epochs, all finite) are kept."""
    kept = [str(run.out / name) for name in CHECKPOINTS if (run.out / name).is_file()]
    return ValueError(f"{run.out}: training stopped at epoch {where[0]} " + (f"step {where[1]}" if where[1] else
                      "validation") + f": {what}; " + (" and ".join(kept) + " of earlier epochs kept" if kept else
                      "no checkpoint was written") + " (a lower --lr or --grad-clip may help)")


def closing_line(run, stage, best, note):
    """'<stage> stage done: wrote ...', naming only the checkpoints this run wrote (best: what best.pt holds), and
    those of a resumed run's earlier epochs as kept; then the note, when this run trained an epoch."""
    what = {"best.pt": best, "last.pt": f"epoch {run.saved.get('last.pt')}"}
    wrote = [f"{run.out / name} ({what[name]})" for name in CHECKPOINTS if name in run.saved]
    kept = [str(run.out / name) for name in CHECKPOINTS if name not in run.saved and (run.out / name).is_file()]
    return (f"{stage} stage done: " + (f"wrote {' and '.join(wrote)}" if wrote else "no epoch left to train")
            + (f"; kept {' and '.join(kept)} of earlier epochs" if kept else "") + (note if wrote else ""))


def epochs_window(steps_per_epoch):
    """Steps in the ETA's rate window: whole epochs, so it times as many validation passes as the steps ahead."""
    return steps_per_epoch * math.ceil(RATE_WINDOW / steps_per_epoch)


def log_progress(run, progress, epoch, losses):
    """'epoch 3 step 40/480 | loss 1.2 ... | 0.85 step/s | ETA 8m30s': the ETA from the recent step rate."""
    parts = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    run.log(f"epoch {epoch} step {progress.done}/{progress.total} | {parts} | {progress.status()}")


def rng_state():
    """Every random generator's state as tensors and plain numbers: all a checkpoint may hold."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()          # ('MT19937', (624,) uint32, int, int, float)
    version, words, gauss_next = random.getstate()                  # (int, 625 ints < 2**32, float or None)
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, gauss=gauss),
                python=dict(version=version, words=torch.tensor(words, dtype=torch.int64), gauss_next=gauss_next))


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location=cuda moved it
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss_next"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def same_head(ckpt, flame_path, path):
    """A resumed run must mesh with the head it started with: refuse another FLAME file (or head) in one line."""
    if ckpt.get("flame_sha256") != flame_record(flame_path)["flame_sha256"]:
        raise ValueError(f"{path}: started with {ckpt.get('flame') or STAND_IN}, resumed with "
                         f"{flame_path or 'the stand-in head'}; resume with the same --flame")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loader(dataset, batch_size, run, seed, epoch, shuffle=True, workers=0):
    """Same order for the same (seed, epoch), so a resumed run continues exactly; items carry no randomness, so
    batches are the same for any number of `workers`. Pinned memory on CUDA, for copies that overlap the step."""
    feed = dict(num_workers=workers, pin_memory=run.device.type == "cuda", worker_init_fn=die_with_parent)
    if run.ddp:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size, sampler=sampler, drop_last=shuffle, **feed)
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(dataset, batch_size, shuffle=shuffle, generator=gen,
                      drop_last=shuffle and len(dataset) > batch_size, **feed)


def die_with_parent(worker_id):
    """A loader worker asks the kernel to SIGKILL it when its training process dies: PyTorch's own check lets a
    worker of a SIGKILL-ed run with batches in flight hang for good, holding memory and --out's files open."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def default_workers():
    """Loader workers a process gets by default: its share of the cores it may run on (torchrun's processes
    split them), less one for itself, at most MAX_WORKERS."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(0, min(MAX_WORKERS, cpu_cores() // processes - 1))


def cosine_schedule(optimizer, total):
    """Linear warm-up over the first tenth of the run (100 steps at most), then a cosine decay to zero."""
    warmup = min(100, total // 10 + 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resumed_checkpoint(args, run):
    """--resume's <out>/last.pt, read before any data are: refused in one line unless it is this stage's, of the
    same head, with finite weights; None for a new run, or one killed before its first checkpoint."""
    last = run.out / "last.pt"
    if not (args.resume and last.is_file()):
        if args.resume:                             # killed before its first checkpoint: starting over is exact
            run.log(f"--resume: no {last} yet (the run stopped before its first checkpoint); starting from the "
                    f"beginning")
        return None
    ckpt = data.read_checkpoint(last, run.device)
    other = next(stage for stage in STAGE_KEYS if stage != args.stage)
    missing = [key for key in (*STAGE_KEYS[args.stage], "rng", "epoch", "step", "best") if key not in ckpt]
    if missing:
        raise ValueError(f"{last}: " + (f"a {other} stage checkpoint" if all(k in ckpt for k in STAGE_KEYS[other])
                         else f"not a training checkpoint (no {missing[0]!r})") + f"; --stage {args.stage} "
                         f"--resume continues a {args.stage} run: pass its --out, or another --out for a new run")
    same_head(ckpt, args.flame, last)
    bad = next(filter(None, (metrics.first_nonfinite(ckpt[key], f"{key}.") for key in STAGE_KEYS[args.stage])), None)
    if bad:
        raise ValueError(f"{last}: {bad} holds NaN or infinite values; resume from a checkpoint of finite weights")
    return ckpt


def resume(run, stateful):
    """Where a stage starts (both stages): (epoch, step, best) = (0, 0, None) for a new run; with --resume, every
    object in `stateful` (name -> model / optimiser / schedule) and every random generator set from <out>/last.pt
    (run.resumed, resumed_checkpoint's), and the epoch after the one it saved."""
    ckpt, run.resumed = run.resumed, None           # its memory goes once it is loaded
    if ckpt is None:
        return 0, 0, None
    try:
        for key, obj in stateful.items():
            obj.load_state_dict(ckpt[key])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:      # another preset or switches
        raise ValueError(f"{run.out / 'last.pt'}: does not fit this run ({' '.join(str(error).split())[:300]}); "
                         f"resume with the settings it was started with") from None
    run.log(f"resumed from {run.out / 'last.pt'} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
    return ckpt["epoch"] + 1, ckpt["step"], ckpt["best"]


def save_epoch(run, stateful, improved, **record):
    """The end of an epoch: the state of every object in `stateful`, the random generators and `record` (epoch,
    step, best, config ...) to last.pt, and to best.pt as well when the epoch improved on the best."""
    state = dict({key: obj.state_dict() for key, obj in stateful.items()}, rng=rng_state(), **record)
    bad = [f"validation {k} {v}" for k, v in record["val"].items() if not (math.isfinite(v) or k == "psnr" and v > 0)]
    bad += [f"{name} holds NaN or infinity" for name in (metrics.first_nonfinite(state[key], f"{key}.")
                                                         for key in stateful) if name]
    if bad:                                         # never written: the checkpoints on disk stay good
        raise stopped(run, (record["epoch"], None), ", ".join(bad))
    for name in ("best.pt",) * improved + ("last.pt",):
        run.save(state, name)
        run.saved[name] = record["epoch"]


# the command line
def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["motion", "render"], default="motion")
    p.add_argument("--data", help="SingingHead folder (default: the built-in data set, made on first use)")
    p.add_argument("--out", help="checkpoint folder (default: out/<stage>)")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny",
                   help="model size: tiny (CPU, the built-in data) or paper (the paper's, for a GPU)")
    p.add_argument("--wav2vec", help="pretrained wav2vec 2.0 folder or weights file (motion stage)")
    p.add_argument("--flame", help="FLAME model file (default: the procedural stand-in head, for generated data only)")
    p.add_argument("--procedural-head", action="store_true",
                   help="use the procedural stand-in head on a data set of real FLAME parameters anyway")
    ablation = p.add_argument_group("motion model and loss switches (default: the preset's)")
    ablation.add_argument("--no-music", dest="music", action="store_const", const=False,
                          help="the 'w/o BGM' ablation: the model without its background-music branch")
    ablation.add_argument("--loss-space", choices=["raw", "standardised"],
                          help="rec / vel losses on raw FLAME parameters (the paper) or standardised ones")
    ablation.add_argument("--mesh-head-pose", action=argparse.BooleanOptionalAction,
                          help="the mesh loss's meshes with global and neck rotation (the paper) or without")
    for term in LOSS_TERMS:
        ablation.add_argument(f"--w-{term}", type=LOSS_WEIGHT,
                              help=f"weight of the {term} loss term, {LOSS_WEIGHT} (0: term off)")
    p.add_argument("--cache-audio", action="store_true", help="freeze wav2vec 2.0 and cache its features")
    p.add_argument("--person", default="id0", help="whose videos the renderer learns (render stage)")
    p.add_argument("--vgg", help="torchvision vgg19 state-dict file for the perceptual loss (render stage)")
    p.add_argument("--epochs", type=int, help="%d to %d (default: the stage's and preset's)" % COUNT_RANGES["--epochs"])
    p.add_argument("--batch-size", type=int, help="%d to %d (default 8)" % COUNT_RANGES["--batch-size"])
    p.add_argument("--lr", type=LR, help=f"learning rate, {LR} (default: the stage's and preset's)")
    p.add_argument("--weight-decay", type=WEIGHT_DECAY, default=0.01,
                   help=f"AdamW's weight decay (motion stage), {WEIGHT_DECAY}")
    p.add_argument("--grad-clip", type=GRAD_CLIP, default=1.0,
                   help=f"largest gradient norm (larger ones are scaled down to it), {GRAD_CLIP}")
    p.add_argument("--seed", type=SEED, default=0, help=f"{SEED}")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"loader processes (default: the cores less one, at most {MAX_WORKERS}, shared among "
                        f"torchrun's processes; here {default_workers()}); 0 reads in the training process; "
                        "%d to %d" % COUNT_RANGES["--workers"])
    p.add_argument("--size", type=int, choices=RENDER_SIZES,
                   help="render stage: the frames' side in pixels (default: the preset's, 256)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--no-summary", dest="summary", action="store_false", help="skip the closing test-split summary")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where there is one)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast for the forward passes (default: on a GPU, off on the CPU, where it is slow)")
    args = p.parse_args(argv)
    defaults = dict(motion=dict(epochs=60, batch_size=8, lr=1e-3 if args.preset == "tiny" else 1e-4),
                    render=dict(epochs=15 if args.preset == "tiny" else 10, batch_size=8,
                                lr=1e-3 if args.preset == "tiny" else 2e-4))[args.stage]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"out/{args.stage}"
    return args


def check_args(args):
    """Refuse bad arguments, a bad output place and missing input files before any data are read or anything is
    written (the numbers' types have checked the floats)."""
    for flag, (lo, hi) in COUNT_RANGES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if not lo <= value <= hi:
            raise ValueError(f"{flag} {value}: must be " + (f"at least {lo}" if value < lo else f"at most {hi}"))
    if args.size is not None and args.stage != "render":
        raise ValueError(f"--size {args.size}: only the render stage has a frame size")
    if args.stage == "motion" and not any(getattr(motion_config(args), f"w_{term}") for term in LOSS_TERMS):
        raise ValueError("--w-kl 0 --w-rec 0 --w-vel 0 --w-mesh 0: every loss term is off, so nothing would be "
                         "learnt; give one of them a positive weight")
    data.check_device(args.device)
    data.check_output_folder(args.out, "last.pt")
    if args.data and not data.split_path(args.data, "train").is_file():
        raise ValueError(f"{args.data}: not a SingingHead folder (no train.txt)")
    for flag, path in (("--flame", args.flame), ("--vgg", args.vgg), ("--wav2vec", args.wav2vec)):
        if path and not Path(path).exists():
            raise ValueError(f"{path}: no such file ({flag})")


def command(argv=None):
    args = parse_args(argv)
    check_args(args)
    run = Run(args)                                 # makes and locks --out once the arguments are good
    ok = False
    try:
        run.resumed = resumed_checkpoint(args, run)
        (train_motion if args.stage == "motion" else train_render)(args, run)
        ok = True
    finally:
        run.close(ok)                               # a refused or failed run leaves no folder it made


def main(argv=None):
    """The command line: bad input or a failed write ends in one line `error: <file>: <problem>`, exit status 1."""
    run_command(command, argv)


if __name__ == "__main__":
    main()
