"""
Rendering for UniSinger (paper IV-B), in the order data flows: the depth rasterizer (rasterize, interpolate),
the orthographic camera (project), the renderer's depth input (render_depth), the reference warped into place
(reference_flow, warp_image), then the face renderer (FaceRenderer, a UNet; PatchDiscriminator; VGG19; the
losses) and its presets (RendererConfig). Below the support banner: the previews' shading (shade).
Depends on torch and numpy; imports nothing of ours, so it can be copied alone.

Conventions (shared with the rest of the project):
- Projected space: x, y in [-1, 1] map to the image's left/right and bottom/top edges; pixel (i, j) has
  its centre at x = (j + 0.5) / W * 2 - 1, y = 1 - (i + 0.5) / H * 2.
- z is the distance from the camera plane (smaller is nearer) in half image widths, so the projection is a
  similarity mirrored in z, and normals computed in projected space are true normals with z mirrored.
- The camera is orthographic as in DECA/EMOCA, cam = [scale, tx, ty]: x = s (X + tx), y = s (Y + ty), and it
  sits CAMERA_DISTANCE in front of the head's origin on +Z looking toward -Z: z = CAMERA_DISTANCE - s Z.

Use alone:
    verts = torch.rand(1, 100, 3) * 2 - 1; faces = torch.randint(0, 100, (50, 3))
    depth, face_id = rasterize(verts, faces, 256)          # (1,256,256) float, (1,256,256) long
    frames = shade(verts, faces, 256)                       # (1,256,256,3) uint8, one shaded frame
"""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 256                 # pixels, the renderer's resolution
CAMERA_DISTANCE = 3.0            # half image widths from the camera plane to the head's origin
DEPTH_NEAR = CAMERA_DISTANCE - 1.0   # depth_to_image maps this depth to 1 (nearest shown)
DEPTH_FAR = CAMERA_DISTANCE + 1.0    # ... and this one to 0, like the background
WINDOW_ELEMENTS = 1 << 20        # (triangle, pixel) pairs tested at once; bounds rasterizer memory
EMPTY_KEY = (1 << 63) - 1        # the z-buffer's key of a pixel no triangle covers
HIDDEN_MARGIN = 1e-4             # depth a culled triangle must lie behind, relative to 1 + |its depth|: rounding's room


def _image_size(size):
    """size int or (H, W) -> (H, W)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def rasterize(verts, faces, size):
    """Z-buffer rasterization: verts (B, V, 3) projected, faces (F, 3) long, size int or (H, W) -> depth (B, H, W)
    (+inf where uncovered) and face_id (B, H, W) long (-1 where uncovered). A pixel is covered when its centre
    lies inside a triangle or on its edges; depth is z interpolated with screen-space barycentrics (exact for
    the orthographic camera). Among equal depths the lowest face id wins, so shared edges are deterministic.
    Visibility comes from depth alone (meshes of any winding work); there is no near plane."""
    if verts.dim() != 3 or verts.shape[-1] != 3:
        raise ValueError(f"rasterize: verts must be (B, V, 3), got {tuple(verts.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"rasterize: faces must be (F, 3), got {tuple(faces.shape)}")
    height, width = _image_size(size)
    batch, n_faces, device = verts.shape[0], faces.shape[0], verts.device
    if not verts.is_floating_point():
        verts = verts.float()
    faces = faces.to(device=device, dtype=torch.long)
    depth = torch.full((batch * height * width,), float("inf"), dtype=verts.dtype, device=device)
    face_id = torch.full((batch * height * width,), -1, dtype=torch.long, device=device)
    if verts.dtype == torch.float32:
        pixel, nearest, face = _zbuffer(verts, faces, height, width)
        depth[pixel], face_id[pixel] = nearest, face
    else:                                            # no room for a double's bits beside the face id in a key
        coef, ints, keep, box_w, box_h = _edge_functions(verts, faces, height, width)
        chunks = list(_covered_pixels(coef, ints, keep, box_w, box_h, height, width))
        if chunks:
            pixel, z, face = (torch.cat(parts) for parts in zip(*chunks))
            depth.scatter_reduce_(0, pixel, z, "amin")
            nearest = z == depth[pixel]
            face_id.fill_(n_faces).scatter_reduce_(0, pixel[nearest], face[nearest], "amin")
            face_id[torch.isinf(depth)] = -1
    return depth.view(batch, height, width), face_id.view(batch, height, width)


def _zbuffer(verts, faces, height, width, front=None):
    """The nearest fragment of every covered pixel (float32 verts): flat pixel indices into (B*H*W) (P,), in
    order, and their depth and face id, reduced as one int64 key (_depth_key). The faces turned toward the
    camera (front, _front's) are drawn first, then those of the others the depth so far does not hide
    (_hidden): the same result as drawing all at once."""
    coef, ints, keep, box_w, box_h = _edge_functions(verts, faces, height, width)
    key = torch.full((len(verts) * height * width,), EMPTY_KEY, dtype=torch.long, device=verts.device)
    first = (_front(verts, faces) if front is None else front).reshape(-1)
    near = face_corners(verts[..., 2:], faces)[..., 0].amin(-1).reshape(-1)                  # (N,) nearest corner
    for later, part in enumerate((keep & first, keep & ~first)):
        if later and bool(part.any()):
            part = part & ~_hidden(key, ints, box_w, box_h, near, part, (height, width))
        for pixel, depth, face in _covered_pixels(coef, ints, part, box_w, box_h, height, width):
            key.scatter_reduce_(0, pixel, _depth_key(depth, face), "amin")
    pixel = (key != EMPTY_KEY).nonzero().squeeze(1)
    key = key.index_select(0, pixel)
    bits = (key >> 32).int()                                                    # _depth_key undone
    return pixel, (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32), key & 0xFFFFFFFF


def _depth_key(z, face):
    """float32 depths and face ids (P,) -> int64 keys that order as (depth, face id): the depth's bits, made to
    order as integers (a negative depth's magnitude bits flipped), above the face id."""
    bits = (z + 0.0).view(torch.int32)                         # + 0.0 turns -0.0 into 0.0, equal as depths
    return ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() << 32) | face


def _edge_functions(verts, faces, height, width):
    """Per triangle (N = B·F), the 3 barycentrics and the depth as affine functions of the offset (dx, dy) from its
    clipped box's first pixel: coef (N, 3, 4) over [1, dx, dy]; ints (N, 2) = (flat index of the box's first
    pixel in (B·H·W), face id); which to keep; the box's width and height (N,)."""
    batch, n_faces, device = verts.shape[0], faces.shape[0], verts.device
    tri = face_corners(verts, faces).reshape(batch * n_faces, 3, 3)  # (N, 3 corners, xyz)
    # pixel coordinates in which pixel (i, j) has its centre at (j, i)
    px = (tri[..., 0] + 1) * (width / 2) - 0.5   # (N, 3)
    py = (1 - tri[..., 1]) * (height / 2) - 0.5  # (N, 3)
    pz = tri[..., 2]                              # (N, 3)
    finite = torch.isfinite(tri).flatten(1).all(1)
    px, py, pz = (torch.where(finite[:, None], t, torch.zeros_like(t)) for t in (px, py, pz))
    x0, x1 = px.amin(1).ceil().clamp(0, width), px.amax(1).floor().clamp(-1, width - 1)
    y0, y1 = py.amin(1).ceil().clamp(0, height), py.amax(1).floor().clamp(-1, height - 1)
    box_w, box_h = x1 - x0 + 1, y1 - y0 + 1  # (N,) pixels in the clipped bounding box, <= 0 if none
    # Corner k's barycentric is the edge function of the opposite edge (a -> c) over the signed area; its
    # constant term comes from coordinate differences so that it stays precise far from the image origin.
    xa, xc = px.roll(-1, 1), px.roll(-2, 1)
    ya, yc = py.roll(-1, 1), py.roll(-2, 1)
    area = (xc[:, :1] - xa[:, :1]) * (py[:, :1] - ya[:, :1]) - (yc[:, :1] - ya[:, :1]) * (px[:, :1] - xa[:, :1])
    bary_0 = ((xc - xa) * (y0[:, None] - ya) - (yc - ya) * (x0[:, None] - xa)) / area  # (N, 3)
    bary_dx, bary_dy = (ya - yc) / area, (xc - xa) / area                              # (N, 3) each
    coef = torch.zeros(batch * n_faces, 3, 4, dtype=px.dtype, device=device)  # (N, [1, dx, dy], 4)
    for row, bary in enumerate((bary_0, bary_dx, bary_dy)):
        coef[:, row, :3] = bary
        coef[:, row, 3] = (bary * pz).sum(1)
    keep = finite & (area[:, 0] != 0) & (box_w > 0) & (box_h > 0)
    tri_id = torch.arange(batch * n_faces, device=device)
    first_pixel = tri_id // n_faces * (height * width) + y0.long() * width + x0.long()  # into (B*H*W)
    ints = torch.stack([first_pixel, tri_id % n_faces], 1)                              # (N, 2)
    return coef, ints, keep, box_w, box_h


@functools.lru_cache(maxsize=256)
def _window(win_w, win_h, width, dtype, device):
    """A window's pixels, row by row: their dx, dy (win,) from its first pixel, flat offsets in a width-pixel
    image, and the rows [1, dx, dy] (win, 3) its triangles' functions are evaluated on (kept: windows recur)."""
    dx = torch.arange(win_w, device=device).repeat(win_h)                         # (win,), win = win_h*win_w
    dy = torch.arange(win_h, device=device).repeat_interleave(win_w)              # (win,)
    return dx, dy, dy * width + dx, torch.stack([torch.ones_like(dx), dx, dy], 1).to(dtype)


def _covered_pixels(coef, ints, keep, box_w, box_h, height, width):
    """Every (pixel, depth, face id) whose pixel centre a triangle covers, yielded a chunk at a time. Triangles
    are grouped by box size, rounded up to a power of two per axis (few window shapes, few groups), and each
    chunk is tested with one matrix product. A window reaching past its box finds pixels outside the triangle,
    except off the image: only triangles whose window passes the right or bottom edge are also box-tested."""
    tri = keep.nonzero().squeeze(1)
    if len(tri) == 0:
        return
    box = torch.stack([box_w, box_h], 1).index_select(0, tri).long()                   # (n, 2)
    sides = torch.tensor([1 << k for k in range((int(box.max()) - 1).bit_length() + 1)], device=coef.device)
    side = torch.bucketize(box, sides)                                                 # (n, 2) window sides
    group, order = (side[:, 0] * len(sides) + side[:, 1]).sort()
    classes, counts = group.unique_consecutive(return_counts=True)
    tri, box, side = tri.index_select(0, order), box.index_select(0, order), side.index_select(0, order)
    coef, ints = coef.index_select(0, tri), ints.index_select(0, tri)                   # (n, 3, 4), (n, 2)
    x0, y0 = ints[:, 0] % width, (ints[:, 0] % (height * width)).div(width, rounding_mode="floor")
    past = (x0 + sides[side[:, 0]] > width) | (y0 + sides[side[:, 1]] > height)
    ends = torch.cumsum(counts, 0)
    any_past = torch.zeros(len(tri) + 1, dtype=torch.long, device=coef.device)
    any_past[1:] = past.long().cumsum(0)
    any_past = (any_past[ends] - any_past[ends - counts]).tolist()        # triangles past the edge, per group
    start = 0
    for g, count, past_edge in zip(classes.tolist(), counts.tolist(), any_past):
        win_w, win_h = sides[g // len(sides)].item(), sides[g % len(sides)].item()
        dx, dy, offset, grid = _window(win_w, win_h, width, coef.dtype, coef.device)
        step = max(1, WINDOW_ELEMENTS // (win_w * win_h))
        for lo in range(start, start + count, step):
            n = min(step, start + count - lo)
            # one GEMM: (win, 4, n), each function's values over the triangles contiguous
            values = (grid @ coef[lo:lo + n].permute(1, 2, 0).reshape(3, 4 * n)).view(-1, 4, n)
            inside = torch.minimum(torch.minimum(values[:, 0], values[:, 1]), values[:, 2]) >= 0
            if past_edge:
                inside &= (dx[:, None] < box[lo:lo + n, 0]) & (dy[:, None] < box[lo:lo + n, 1])
            w, t = inside.nonzero().unbind(1)                                  # window pixel, triangle
            depth = values.view(-1).index_select(0, (w * 4 + 3) * n + t)       # values[w, 3, t]
            t = t + lo
            yield ints[:, 0].index_select(0, t) + offset.index_select(0, w), depth, ints[:, 1].index_select(0, t)
        start += count


def interpolate(verts, faces, face_id, attributes):
    """Per-pixel values (B, H, W, C) of per-vertex attributes (B, V, C) or (V, C), weighted by the pixel centre's
    screen-space barycentrics in its face of face_id (rasterize's on verts (B, V, 3) projected, faces), 0 if none."""
    batch, height, width = face_id.shape
    attributes = attributes.to(verts.dtype).expand(batch, -1, -1) if attributes.dim() == 2 else attributes
    channels = attributes.shape[-1]
    face_id = face_id.flatten()
    pixel = (face_id >= 0).nonzero().squeeze(1)                                     # (P,) covered, into (B*H*W)
    b, ij = pixel.div(height * width, rounding_mode="floor"), pixel % (height * width)
    corner = (faces.to(verts.device).index_select(0, face_id[pixel]) + (b * verts.shape[1])[:, None]).flatten()  # (3P,)
    xy = verts[..., :2].reshape(-1, 2).index_select(0, corner).view(-1, 3, 2)       # (P, 3, 2)
    x = ((ij % width).to(verts.dtype) + 0.5) / width * 2 - 1
    y = 1 - (ij.div(width, rounding_mode="floor").to(verts.dtype) + 0.5) / height * 2
    d1, d2 = xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]                               # (P, 2) edges from corner 0
    dx, dy = x - xy[:, 0, 0], y - xy[:, 0, 1]
    area = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    w1 = (dx * d2[:, 1] - d2[:, 0] * dy) / area
    w2 = (d1[:, 0] * dy - dx * d1[:, 1]) / area
    weights = torch.stack([1 - w1 - w2, w1, w2], 1)                                 # (P, 3)
    values = attributes.reshape(-1, channels).index_select(0, corner).view(-1, 3, channels)   # (P, 3, C)
    out = torch.zeros(batch * height * width, channels, dtype=verts.dtype, device=verts.device)
    out.index_copy_(0, pixel, torch.bmm(weights[:, None], values)[:, 0])
    return out.view(batch, height, width, channels)


def face_corners(values, faces):
    """Per-vertex values (..., V, C), faces (F, 3) -> each face's corners' values (..., F, 3, C)."""
    return values.index_select(-2, faces.reshape(-1)).unflatten(-2, (len(faces), 3))


def project(verts, cam):
    """Orthographic DECA/EMOCA camera: verts (..., V, 3) metres, cam (..., 3) = [scale, tx, ty] (or a 3-sequence)
    -> (..., V, 3) projected: x = s (X + tx), y = s (Y + ty), z = CAMERA_DISTANCE - s Z."""
    cam = torch.as_tensor(cam, dtype=verts.dtype, device=verts.device)
    if cam.shape[-1] != 3:
        raise ValueError(f"project: cam must end in 3 values [scale, tx, ty], got {tuple(cam.shape)}")
    scale, shift = cam[..., None, :1], cam[..., None, 1:]  # (..., 1, 1), (..., 1, 2)
    return torch.cat([scale * (verts[..., :2] + shift), CAMERA_DISTANCE - scale * verts[..., 2:]], dim=-1)


def depth_to_image(depth):
    """depth (B, H, W) from rasterize -> (B, 1, H, W) float in [0, 1]: 1 at DEPTH_NEAR, 0 at DEPTH_FAR and beyond
    and for the background. The range is fixed, so equal depths give equal values in every frame."""
    image = ((DEPTH_FAR - depth) / (DEPTH_FAR - DEPTH_NEAR)).clamp(0, 1)
    image = torch.where(torch.isinf(depth), torch.zeros_like(image), image)
    return image[:, None].float()


def render_depth(verts, faces, cam, size=IMAGE_SIZE):
    """FLAME vertices (B, V, 3) metres, cam (B, 3) or (3,) -> the renderer's depth input (B, 1, H, W)."""
    depth, _ = rasterize(project(verts, cam), faces, size)
    return depth_to_image(depth)


def reference_flow(verts, faces, cam, reference_verts, reference_cam, size=IMAGE_SIZE):
    """Where each pixel's point of the head lies in the reference frame: FLAME vertices (B, V, 3) metres under cam
    (B, 3) or (3,), the reference's vertices (V, 3) under reference_cam (3,) -> (B, 2, H, W), x then y in
    grid_sample's units (y downward), the offset from the pixel's centre to the same surface point in the
    reference; 0 off the head. warp_image(reference, flow) moves the reference there."""
    projected = project(verts, cam)
    _, face_id = rasterize(projected, faces, size)
    there = project(reference_verts, reference_cam)[..., :2]                             # (V, 2), y upward
    there = interpolate(projected, faces, face_id, there.reshape(-1, 2))                  # (B, H, W, 2)
    here = pixel_grid(face_id.shape[-2:], verts.device)                                   # (H, W, 2), y downward
    flow = torch.stack([there[..., 0], -there[..., 1]], -1) - here
    return torch.where((face_id >= 0)[..., None], flow, torch.zeros_like(flow)).permute(0, 3, 1, 2)


def pixel_grid(size, device=None):
    """The pixels' centres in grid_sample's units (align_corners=False): (H, W, 2), x then y, y downward."""
    height, width = _image_size(size)
    rows = (torch.arange(height, device=device) * 2 + 1) / height - 1
    columns = (torch.arange(width, device=device) * 2 + 1) / width - 1
    return torch.stack([columns[None].expand(height, -1), rows[:, None].expand(-1, width)], -1)


def warp_image(image, flow):
    """image (B, C, H, W) sampled bilinearly at each pixel's centre moved by flow (B, 2, H, W) (reference_flow's
    units); outside the image the border repeats."""
    grid = pixel_grid(image.shape[-2:], image.device) + flow.float().permute(0, 2, 3, 1)
    return F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


# Face renderer (the paper's, section IV-B): depth + reference image + temporal encoding -> portrait frame
TPE_CHANNELS = 8                 # temporal positional encoding channels (sin/cos pairs)
TPE_BASE = 1000.0                # longest TPE period is ~2*pi*TPE_BASE**(3/4) frames (~37 s at 30 fps)
RENDERER_IN_CHANNELS = 1 + 3 + TPE_CHANNELS  # depth, reference RGB, TPE
ENCODER_CHANNELS = (64, 128, 256, 512, 512, 512, 512, 512)  # levels at 256², 128², ..., 2²
DISCRIMINATOR_CHANNELS = (64, 128, 256, 512)
TINY_DIVISOR = 8                 # the tiny preset's widths: the paper's divided by this (0.92 M generator parameters)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# torchvision vgg19 `features`: numbers are 3x3 conv widths (each followed by ReLU), "M" a 2x2 max pool
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
VGG19_TAPS = (1, 6, 11, 20, 29)  # indices in `features` of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
VGG_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # pix2pixHD's balance of the five layers


def temporal_encoding(frame_index, size):
    """MODA-style temporal positional encoding: frame_index (B,) -> (B, TPE_CHANNELS, H, W), sin/cos of the
    frame index at geometric frequencies, constant over the image."""
    height, width = _image_size(size)
    index = torch.as_tensor(frame_index, dtype=torch.float32).reshape(-1, 1)             # (B, 1)
    freq = TPE_BASE ** (-torch.arange(TPE_CHANNELS // 2, dtype=torch.float32) / (TPE_CHANNELS // 2))
    angle = index * freq.to(index.device)                                                # (B, C/2)
    code = torch.cat([angle.sin(), angle.cos()], dim=1)                                  # (B, C)
    return code[:, :, None, None].expand(-1, -1, height, width)


def _norm(channels):
    """GroupNorm: independent of batch size and still defined at the 2x2 level."""
    return nn.GroupNorm(min(32, channels // 4), channels)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with a projected shortcut; stride 2 halves the resolution."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1), _norm(out_channels), nn.LeakyReLU(0.2),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1), _norm(out_channels))
        self.shortcut = nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                                      nn.Conv2d(in_channels, out_channels, 1))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class UpBlock(nn.Module):
    """Upsample x2, concatenate the encoder's skip of that resolution, residual block."""

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.block = ResidualBlock(in_channels + skip_channels, out_channels)

    def forward(self, x, skip):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.block(torch.cat([x, skip], dim=1))


class FaceRenderer(nn.Module):
    """The paper's UNet generator. Encoder: 8 residual down blocks at 256², 128², ..., 2² (ENCODER_CHANNELS).
    Decoder: 7 residual up blocks, each joined by the encoder level of its resolution, back to 64 channels at
    256²; a 3x3 conv and tanh give RGB in [-1, 1]. Input sides must be multiples of 128.
    warp=True (ours): the reference moved by the meshes' correspondence (reference_flow) is three more input
    channels, and a fourth output channel is a mask mixing it with the generated colours, as few-shot vid2vid
    does: skin, eyes and brows come from the reference, and the UNet draws what it cannot show (the open mouth)."""

    def __init__(self, channels=ENCODER_CHANNELS, warp=False):
        super().__init__()
        self.warp = warp
        ins = (RENDERER_IN_CHANNELS + (3 if warp else 0),) + tuple(channels[:-1])
        self.down = nn.ModuleList(
            ResidualBlock(i, o, 1 if level == 0 else 2) for level, (i, o) in enumerate(zip(ins, channels)))
        self.up = nn.ModuleList(UpBlock(channels[level + 1], channels[level], channels[level])
                                for level in reversed(range(len(channels) - 1)))
        self.to_rgb = nn.Conv2d(channels[0], 4 if warp else 3, 3, 1, 1)

    def forward(self, depth, reference, frame_index, flow=None, parts=False):
        """depth (B,1,H,W) in [0,1], reference (B,3,H,W) in [-1,1], frame_index (B,), flow (B,2,H,W) from
        reference_flow (a warping renderer needs it) -> (B,3,H,W) in [-1,1]; parts=True: (frame, warped or None)."""
        x = renderer_input(depth, reference, frame_index)
        warped = None
        if self.warp:
            if flow is None:
                raise ValueError("FaceRenderer: this renderer warps the reference; give it reference_flow's flow")
            warped = warp_image(reference, flow)
            x = torch.cat([x, warped.to(x)], 1)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(x, skip)
        out = self.to_rgb(x)
        if warped is None:
            frame = torch.tanh(out)
        else:
            mask = torch.sigmoid(out[:, 3:].float())
            frame = mask * warped + (1 - mask) * torch.tanh(out[:, :3].float())
        return (frame, warped) if parts else frame


def renderer_input(depth, reference, frame_index):
    """The generator's (and discriminator's condition) channels: (B, RENDERER_IN_CHANNELS, H, W)."""
    if depth.shape[-1] % 128 or depth.shape[-2] % 128:
        raise ValueError(f"FaceRenderer: image sides must be multiples of 128, got {tuple(depth.shape[-2:])}")
    tpe = temporal_encoding(frame_index, depth.shape[-2:]).to(depth)
    return torch.cat([depth, reference.to(depth), tpe], dim=1)


class PatchDiscriminator(nn.Module):
    """pix2pix 70x70 PatchGAN, conditional: sees the renderer's input channels beside the image. forward returns
    the four intermediate activations (for feature matching) and, last, the patch logits."""

    def __init__(self, in_channels=RENDERER_IN_CHANNELS + 3, channels=DISCRIMINATOR_CHANNELS):
        super().__init__()
        layers, previous = [], in_channels
        for k, c in enumerate(channels):
            stride = 1 if k == len(channels) - 1 else 2
            norm = nn.Identity() if k == 0 else nn.InstanceNorm2d(c)
            layers.append(nn.Sequential(nn.Conv2d(previous, c, 4, stride, 1), norm, nn.LeakyReLU(0.2)))
            previous = c
        layers.append(nn.Conv2d(previous, 1, 4, 1, 1))
        self.layers = nn.ModuleList(layers)

    def forward(self, condition, image):
        x = torch.cat([condition, image], dim=1)
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class VGG19(nn.Module):
    """torchvision's vgg19 `features` (same indices), for the perceptual loss; weights from the user's file."""

    def __init__(self):
        super().__init__()
        layers, previous = [], 3
        for item in VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(previous, item, 3, 1, 1), nn.ReLU()]
                previous = item
        self.features = nn.Sequential(*layers)
        self.requires_grad_(False)

    @classmethod
    def load(cls, path):
        """A torchvision vgg19 state-dict file -> VGG19, eval (read_vgg19)."""
        return read_vgg19(cls, path)

    def forward(self, x):
        """x (B,3,H,W) ImageNet-normalised RGB -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1]."""
        taps = []
        for index, layer in enumerate(self.features[:VGG19_TAPS[-1] + 1]):
            x = layer(x)
            if index in VGG19_TAPS:
                taps.append(x)
        return taps


def gan_loss(logits, real):
    """LSGAN (pix2pixHD's choice, steadier than the log loss): mean (D - 1)^2 for real, mean D^2 for fake."""
    logits = logits.float()  # losses in float32 even under bf16 autocast
    return ((logits - 1) ** 2).mean() if real else (logits ** 2).mean()


def feature_matching_loss(fake_features, real_features):
    """pix2pixHD feature matching: mean L1 over the discriminator's intermediate activations (real detached)."""
    pairs = list(zip(fake_features[:-1], real_features[:-1]))
    return sum((f.float() - r.detach().float()).abs().mean() for f, r in pairs) / len(pairs)


def photometric_loss(fake, real, weight=None):
    """Pixel L1; with weight (B or 1, 1, H, W), the weighted mean over the pixels."""
    error = (fake.float() - real.float()).abs()
    if weight is None:
        return error.mean()
    weight = weight.float().expand(len(error), 1, -1, -1)
    return (weight * error).mean() / weight.mean()


def perceptual_loss(vgg, fake, real):
    """L1 between VGG-19 relu1_1..relu5_1 of images in [-1, 1] (ImageNet-normalised), weighted by VGG_LAYER_WEIGHTS."""
    mean = torch.tensor(IMAGENET_MEAN, device=fake.device, dtype=fake.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=fake.device, dtype=fake.dtype)[:, None, None]
    fake_taps, real_taps = (vgg(((image + 1) / 2 - mean) / std) for image in (fake, real))
    return sum(w * (f.float() - r.detach().float()).abs().mean()
               for w, f, r in zip(VGG_LAYER_WEIGHTS, fake_taps, real_taps))


@dataclass
class RendererLossWeights:
    """Weights of the generator's loss terms (pix2pixHD's 10 for feature matching and VGG; L1 alike)."""
    gan: float = 1.0
    feature_matching: float = 10.0
    perceptual: float = 10.0
    photometric: float = 10.0


def generator_loss(discriminator, condition, fake, real, vgg=None, weights=None, pixel_weight=None):
    """The renderer's training objective for one batch -> (total, dict of the unweighted terms as floats). vgg None
    drops the perceptual term; pixel_weight (B or 1, 1, H, W) weights the photometric term's pixels."""
    weights = weights or RendererLossWeights()
    fake_features = discriminator(condition, fake)
    with torch.no_grad():
        real_features = discriminator(condition, real)
    terms = {"gan": gan_loss(fake_features[-1], True),
             "feature_matching": feature_matching_loss(fake_features, real_features),
             "photometric": photometric_loss(fake, real, pixel_weight)}
    if vgg is not None:
        terms["perceptual"] = perceptual_loss(vgg, fake, real)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: value.item() for name, value in terms.items()}


def discriminator_loss(discriminator, condition, fake, real):
    """LSGAN discriminator objective: real patches toward 1, generated (detached) toward 0."""
    return 0.5 * (gan_loss(discriminator(condition, real)[-1], True)
                  + gan_loss(discriminator(condition, fake.detach())[-1], False))


@dataclass
class RendererConfig:
    """Widths of the face renderer and its discriminator, and whether it warps the reference. Presets: 'paper'
    (58.6 M generator parameters, for GPUs); 'tiny', the 8 levels at 1/TINY_DIVISOR of the widths, warping, for CPUs."""
    channels: tuple = ENCODER_CHANNELS
    discriminator_channels: tuple = DISCRIMINATOR_CHANNELS
    image_size: int = IMAGE_SIZE          # pixels a side; a multiple of 128 (the 8 levels halve it 7 times)
    warp: bool = False                    # FaceRenderer's mesh-guided warp of the reference (ours; not the paper's)

    @classmethod
    def preset(cls, name):
        if name not in RENDERER_PRESETS:
            raise ValueError(f"unknown renderer preset {name!r} ({', '.join(RENDERER_PRESETS)})")
        return RENDERER_PRESETS[name]


RENDERER_PRESETS = dict(
    paper=RendererConfig(),
    tiny=RendererConfig(tuple(c // TINY_DIVISOR for c in ENCODER_CHANNELS),
                        tuple(c // TINY_DIVISOR for c in DISCRIMINATOR_CHANNELS), warp=True))


# ------------------------------------------------------------ support: the previews' shading

PREVIEW_SIZE = 512               # pixels a side of the shaded previews (unisinger.py --size)
PREVIEW_CAM = (5.5, 0.0, 0.042)  # [scale, tx (m), ty (m)]: the previews' camera, head and neck whole inside the frame
SKIN_RGB = (224, 172, 150)       # preview surface colour
BACKGROUND_RGB = (40, 40, 40)    # preview background
KEY_LIGHT = (-0.55, 0.45, 0.70)  # toward the previews' (and the filmed person's) key light, camera on +Z: above left
FILL_LIGHT = (0.80, -0.10, 0.60) # toward their fill light: to the right, a little below
KEY, FILL, AMBIENT = 0.65, 0.25, 0.25   # shares of the surface colour each light gives a surface facing it
SHININESS, GLOSS = 24.0, 0.07    # the key light's Blinn-Phong highlight: exponent, share of white at its peak
INSIDE_SHARE = 0.45              # share of its light a surface seen from behind keeps (a mouth's, a neck's inside)
SUPERSAMPLE = 2                  # samples a side of a pixel on a silhouette or occlusion edge, box-filtered
EDGE_DEPTH_STEP = 16.0           # pixel widths of depth within 3x3 pixels that mark an occlusion edge among them
SHADE_PIXELS = 1 << 22           # pixels shade works on at once (16 frames at 512²); bounds its memory


def image_tensor(image, size=IMAGE_SIZE):
    """uint8 (H, W, 3|4) or (H, W) image -> float (3, size, size) in [-1, 1], centre square crop, resized."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float()   # (3, H, W)
    height, width = x.shape[1:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    x = x[:, top:top + side, left:left + side]
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp(0, 255) / 127.5 - 1


def to_uint8(images):
    """float (B, C, H, W) in [-1, 1] (C = 3) or [0, 1] depth (C = 1) -> uint8 (B, H, W, 3)."""
    if images.shape[1] == 1:
        images = images * 2 - 1
    images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1)


def vertex_normals(verts, faces):
    """verts (..., V, 3), faces (F, 3) long -> unit vertex normals (..., V, 3), the area-weighted mean of the
    normals of the faces around each vertex."""
    tri = face_corners(verts, faces)                                                    # (..., F, 3, 3)
    face_normal = torch.linalg.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :])
    normals = torch.zeros_like(verts)
    for k in range(3):
        normals.index_add_(-2, faces[:, k], face_normal)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def shade(verts, faces, size):
    """The previews' shading: verts (B, V, 3) projected, faces (F, 3) -> uint8 (B, H, W, 3), SKIN_RGB on
    BACKGROUND_RGB. Phong shading (vertex normals interpolated and renormalised) under a key, a fill and an ambient
    light, with the key light's Blinn-Phong highlight; two-sided, so meshes of any winding and their open rims shade
    alike. A pixel on a silhouette or occlusion edge is the mean of SUPERSAMPLE² samples spread evenly over it;
    every other pixel lies on one smooth surface and is shaded at its centre."""
    height, width = _image_size(size)
    verts = verts.float()
    faces = faces.to(device=verts.device, dtype=torch.long)
    frames = max(1, SHADE_PIXELS // (height * width))
    return torch.cat([_shade_frames(verts[lo:lo + frames], faces, height, width)
                      for lo in range(0, len(verts), frames)]) if len(verts) else \
        torch.zeros(0, height, width, 3, dtype=torch.uint8, device=verts.device)


def _shade_frames(verts, faces, height, width):
    """shade for a few frames (float32 verts): every covered pixel at its centre, then the edge pixels' means."""
    batch, n_faces = len(verts), len(faces)
    background = torch.tensor(BACKGROUND_RGB, dtype=torch.uint8, device=verts.device)
    image = background.repeat(width).repeat(batch * height).view(-1, 3)
    front = _front(verts, faces)
    pixel, depth, face = _zbuffer(verts, faces, height, width, front)
    if not len(pixel):
        return image.view(batch, height, width, 3)
    planes = _normal_planes(verts, faces, front, height, width)
    frame, row, col = _frame_row_col(pixel, height, width)
    colour = _lit(planes, frame * n_faces + face, col.float(), row.float())
    image[pixel] = colour.round_().clamp_(0, 255).to(torch.uint8)
    # the edge pixels: those beside a neighbour (left, right, above, below) whose depth differs by more than
    # EDGE_DEPTH_STEP pixel widths, background infinitely far (silhouettes, one surface in front of another),
    # found in the box around all covered pixels (and a pixel of background)
    top, left = max(int(row.min()) - 1, 0), max(int(col.min()) - 1, 0)
    rows, cols = min(int(row.max()) + 2, height) - top, min(int(col.max()) + 2, width) - left
    inner = (frame * rows + row - top) * cols + col - left                          # into (B, rows, cols)
    depth_box = torch.full((batch * rows * cols,), float("inf"), device=verts.device).index_put_((inner,), depth)
    face_box = torch.full((batch * rows * cols,), -1, device=verts.device).index_put_((inner,), face)
    depth_box = depth_box.view(batch, rows, cols)
    edge = torch.zeros_like(depth_box, dtype=torch.bool)
    for axis in (1, 2):
        n = depth_box.shape[axis] - 1
        jump = (depth_box.narrow(axis, 1, n) - depth_box.narrow(axis, 0, n)).abs_() > EDGE_DEPTH_STEP * 2 / width
        edge.narrow(axis, 1, n).logical_or_(jump)                                    # inf - inf: nan, no jump
        edge.narrow(axis, 0, n).logical_or_(jump)
    edges = edge.view(-1).nonzero().squeeze(1)                                       # into (B, rows, cols)
    if len(edges):
        e_frame, e_row, e_col = _frame_row_col(edges, rows, cols)
        # (E, 9): the faces seen at the pixel (the 5th, index 4) and its 8 neighbours, -1 where none: those that
        # can cover a point inside it (but for slivers no centre shows)
        near = [(e_frame * rows + (e_row + dy).clamp(0, rows - 1)) * cols + (e_col + dx).clamp(0, cols - 1)
                for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        candidates = face_box[torch.stack(near, 1)]
        colour = _supersampled(verts, faces, planes, candidates, e_frame, e_row + top, e_col + left, (height, width))
        image[(e_frame * height + e_row + top) * width + e_col + left] = colour.round_().clamp_(0, 255).to(torch.uint8)
    return image.view(batch, height, width, 3)


def _frame_row_col(pixel, height, width):
    """Flat indices into (B, H, W) -> frame, row and column, each (P,) long."""
    pixel = pixel.int()
    frame, rest = pixel.div(height * width, rounding_mode="floor"), pixel % (height * width)
    return frame.long(), rest.div(width, rounding_mode="floor").long(), (rest % width).long()


def _normal_planes(verts, faces, front, height, width):
    """Per frame and face (10, B*F): the view-space normal interpolated over the face (screen-space barycentrics)
    as an affine function of an (H, W) image's pixel column and row: its value at pixel (0, 0), its change per
    column and per row; then the share of light the face keeps, INSIDE_SHARE where seen from behind (front
    False: a mouth's or neck's inside), else 1. Normals are flipped toward the camera: two-sided shading."""
    corners = face_corners(verts, faces)                                                # (B, F, 3, 3)
    d1, d2 = corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0]   # (B, F, 3)
    area = d1[..., 0] * d2[..., 1] - d2[..., 0] * d1[..., 1]                            # (B, F), 2x signed area
    # projected space mirrors z (z grows away from the camera): view space is (x, y, -z), and a face with
    # area > 0 has its winding's normal pointing away from the camera
    normals = vertex_normals(verts, faces) * torch.tensor([1.0, 1.0, -1.0], device=verts.device)
    normals = face_corners(normals, faces) * torch.where(area > 0, -1.0, 1.0)[..., None, None]       # (B, F, 3, 3)
    n1, n2 = normals[:, :, 1] - normals[:, :, 0], normals[:, :, 2] - normals[:, :, 0]
    grad_x = (d2[..., 1:2] * n1 - d1[..., 1:2] * n2) / area[..., None]                   # per unit of x
    grad_y = (d1[..., 0:1] * n2 - d2[..., 0:1] * n1) / area[..., None]                   # per unit of y
    # pixel (row i, column j) has its centre at x = (2j + 1) / W - 1, y = 1 - (2i + 1) / H
    x0, y0 = 1 / width - 1, 1 - 1 / height
    at_origin = normals[:, :, 0] + (x0 - corners[:, :, 0, :1]) * grad_x + (y0 - corners[:, :, 0, 1:2]) * grad_y
    share = torch.where(front, 1.0, INSIDE_SHARE)[..., None]
    planes = torch.cat([at_origin, grad_x * (2 / width), grad_y * (-2 / height), share], -1)
    return planes.reshape(-1, 10).T.contiguous()


def _lit(planes, face, col, row):
    """The shaded colour (P, 3) float of points at pixel column col and row (P,) float on faces `face` (indices
    into _normal_planes' columns): the renormalised normal there lit by the key, fill and ambient light, plus
    the key light's highlight, times the face's share of light; one component at a time on 1-D tensors."""
    value = [plane.index_select(0, face) for plane in planes]                       # 10 x (P,)
    normal = [torch.addcmul(torch.addcmul(value[k], col, value[3 + k]), row, value[6 + k]) for k in range(3)]
    inverse = torch.addcmul(torch.addcmul(normal[0] * normal[0], normal[1], normal[1]), normal[2], normal[2]).rsqrt_()
    key, fill, halfway = ((normal[0] * d[0]).add_(normal[1], alpha=d[1]).add_(normal[2], alpha=d[2])
                          .mul_(inverse).clamp_min_(0) for d in _LIGHTS)
    light = key.mul_(KEY).add_(AMBIENT).add_(fill, alpha=FILL).mul_(value[9])
    highlight = halfway.pow_(SHININESS).mul_(value[9]).mul_(GLOSS * 255)
    colour = torch.empty(len(face), 3, device=face.device)
    for k, c in enumerate(SKIN_RGB):
        torch.add(highlight, light, alpha=float(c), out=colour[:, k])
    return colour


def _unit(v):
    """A direction (3,) -> the unit vector along it, as three floats."""
    length = sum(c * c for c in v) ** 0.5
    return tuple(c / length for c in v)


# toward the key light, the fill light, and halfway between the key light and the camera (Blinn-Phong)
_LIGHTS = (_unit(KEY_LIGHT), _unit(FILL_LIGHT), _unit(tuple(k + v for k, v in zip(_unit(KEY_LIGHT), (0, 0, 1)))))


def _supersampled(verts, faces, planes, candidates, frame, row, col, size):
    """The mean colour (E, 3) of SUPERSAMPLE² evenly spread samples in each pixel (row, col) of frame `frame` (E,)
    of an (H, W) image, each shaded on the nearest candidate face (E, 9) covering it (edges count), else background."""
    (height, width), ss = size, SUPERSAMPLE
    step = (torch.arange(ss, device=verts.device) + 0.5) / ss - 0.5                      # sample offsets, pixels
    sample_row, sample_col = row[:, None] + step.repeat_interleave(ss), col[:, None] + step.repeat(ss)  # (E, S)
    x, y = (sample_col + 0.5) * (2 / width) - 1, 1 - (sample_row + 0.5) * (2 / height)    # in projected space
    corner = faces.index_select(0, candidates.clamp_min(0).view(-1)).view(*candidates.shape, 3) \
        + (frame * verts.shape[1])[:, None, None]                                       # (E, 9, 3)
    tri = verts.reshape(-1, 3).index_select(0, corner.view(-1)).view(*corner.shape, 3)[:, :, None]  # (E, 9, 1, 3, xyz)
    px, py = x[:, None], y[:, None]                                                    # (E, 1, S)
    weights = []
    for a, b in ((1, 2), (2, 0), (0, 1)):                  # corner k's edge function: the edge facing it
        ax, ay, bx, by = tri[..., a, 0], tri[..., a, 1], tri[..., b, 0], tri[..., b, 1]
        weights.append((bx - ax) * (py - ay) - (by - ay) * (px - ax))                  # (E, 9, S)
    area = weights[0] + weights[1] + weights[2]
    inside = (area != 0) & (candidates[..., None] >= 0)
    for w in weights:
        inside &= w * area >= 0
    depth = torch.where(inside, (weights[0] * tri[..., 0, 2] + weights[1] * tri[..., 1, 2]
                                 + weights[2] * tri[..., 2, 2]) / area, float("inf"))    # (E, 9, S)
    nearest, best = torch.zeros_like(depth[:, 0], dtype=torch.long), depth[:, 0]      # (E, S): the first nearest
    for k in range(1, depth.shape[1]):
        nearer = depth[:, k] < best
        nearest, best = torch.where(nearer, k, nearest), torch.where(nearer, depth[:, k], best)
    covered = torch.isfinite(best)
    # a sample no candidate covers, in a pixel with no background around it, lies on a face no pixel centre
    # nearby shows (a sliver): the pixel's own face is shaded there instead of a speck of background
    enclosed = (candidates >= 0).all(1, keepdim=True) & ~covered
    nearest = torch.where(enclosed, 4, nearest)                                         # 4: the pixel itself
    face = candidates.gather(1, nearest)                                                  # (E, S)
    hit = (covered | enclosed).view(-1).nonzero().squeeze(1)
    colour = torch.tensor(BACKGROUND_RGB, dtype=torch.float32, device=verts.device).repeat(face.numel(), 1)
    owner = hit.div(ss * ss, rounding_mode="floor")
    colour[hit] = _lit(planes, frame[owner] * len(faces) + face.view(-1)[hit], sample_col.view(-1)[hit],
                       sample_row.view(-1)[hit])
    return colour.view(-1, ss * ss, 3).mean(1)


# The rasterizer's culling: faces facing away drawn second, unless a depth pyramid shows them hidden

def _front(verts, faces):
    """(B, F) bool: the faces turned the way (by their winding, in projected x, y) whose faces lie nearer the
    camera on average in that frame: the outside of a closed mesh facing the camera, whichever its winding."""
    tri = face_corners(verts, faces)                                                    # (B, F, 3, 3)
    d1, d2 = tri[:, :, 1, :2] - tri[:, :, 0, :2], tri[:, :, 2, :2] - tri[:, :, 0, :2]
    turned = d1[..., 0] * d2[..., 1] > d2[..., 0] * d1[..., 1]                          # (B, F)
    z = tri[..., 2].mean(-1)
    mean_z = lambda way: torch.where(way.any(1), (z * way).sum(1) / way.sum(1).clamp_min(1), float("inf"))
    return turned == (mean_z(turned) <= mean_z(~turned))[:, None]


def _hidden(key, ints, box_w, box_h, near, candidates, size):
    """(N,) bool: the candidate triangles whose nearest corner lies behind (by more than rounding) the farthest
    depth the keys hold in the triangle's box, so none of its pixels can win. The farthest is the largest key
    (EMPTY_KEY above all), read from a pyramid of 2x2 maxima at the level where the box spans 3x3 cells."""
    (height, width), batch = size, len(key) // (size[0] * size[1])
    levels = [key.view(batch, height, width)]
    while max(levels[-1].shape[1:]) > 1:
        level = levels[-1]
        if level.shape[1] % 2 or level.shape[2] % 2:                     # odd sides: a smallest key beyond
            level = F.pad(level, (0, level.shape[2] % 2, 0, level.shape[1] % 2), value=-1 << 62)
        levels.append(torch.maximum(torch.maximum(level[:, 0::2, 0::2], level[:, 0::2, 1::2]),
                                    torch.maximum(level[:, 1::2, 0::2], level[:, 1::2, 1::2])))
    tri = candidates.nonzero().squeeze(1)
    start = ints[:, 0].index_select(0, tri)
    frame, y0, x0 = start // (height * width), start % (height * width) // width, start % width
    x1, y1 = x0 + box_w.index_select(0, tri).long() - 1, y0 + box_h.index_select(0, tri).long() - 1
    which = (torch.maximum(x1 - x0, y1 - y0) + 1).float().log2().ceil().long().sub(1).clamp_min(0)  # 3x3 cells
    farthest = torch.empty_like(tri)
    for k in which.unique().tolist():
        at, level = (which == k).nonzero().squeeze(1), levels[min(k, len(levels) - 1)]
        f, r0, r1, c0, c1 = (v.index_select(0, at) >> (0 if v is frame else k) for v in (frame, y0, y1, x0, x1))
        rows, cols = level.shape[1:]
        cells = level.reshape(-1)
        most = None
        for r in (r0, (r0 + 1).minimum(r1), r1):
            for c in (c0, (c0 + 1).minimum(c1), c1):
                cell = cells.index_select(0, (f * rows + r.clamp(max=rows - 1)) * cols + c.clamp(max=cols - 1))
                most = cell if most is None else torch.maximum(most, cell)
        farthest[at] = most
    near = near.index_select(0, tri)
    hidden = torch.zeros_like(candidates)
    hidden[tri] = _depth_key(near - HIDDEN_MARGIN * (1 + near.abs()), torch.zeros_like(tri)) > farthest
    return hidden


def read_vgg19(cls, path):
    """A torchvision vgg19 state-dict file (features.N.weight/bias; classifier.* ignored) -> cls (VGG19), eval."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: VGG-19 weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable torch state-dict file ({error})") from error
    vgg = cls()
    wanted = vgg.state_dict()
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    missing = sorted(set(wanted) - set(features), key=lambda k: int(k.split(".")[1]))
    if missing:
        raise ValueError(f"{path}: not a torchvision vgg19 state dict (missing {missing[0]})")
    for key, value in wanted.items():
        if features[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(features[key].shape)}, vgg19 needs {tuple(value.shape)}")
    vgg.load_state_dict({k: features[k] for k in wanted})
    return vgg.eval()
