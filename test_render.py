"""
Tests for render.py: the rasterizer against trimesh ray casting, the camera convention, shading, the
depth image, mp4 output with audio, and the face renderer networks and losses.
Run alone: python -m pytest -q test_render.py
"""
import math
import re
import subprocess

import numpy as np
import pytest
import torch

import render

EDGE_TOLERANCE = 1e-6  # projected units; pixels whose centre is this close to an edge may go either way


def perturbed_sphere(seed, subdivisions, radius, centre):
    """A closed star-shaped mesh (random radii, random rotation) that occludes itself."""
    import trimesh
    rng = np.random.default_rng(seed)
    sphere = trimesh.creation.icosphere(subdivisions)
    verts = sphere.vertices * rng.uniform(0.75, 1.25, (len(sphere.vertices), 1)) * radius
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return verts @ rotation.T + centre, np.asarray(sphere.faces)


def occluding_scene():
    """Two interpenetrating closed meshes in front of a tilted plane that runs off the image."""
    a_verts, a_faces = perturbed_sphere(1, 2, 0.45, [-0.2, 0.1, 2.0])
    b_verts, b_faces = perturbed_sphere(2, 2, 0.35, [0.25, -0.15, 2.1])
    plane = np.array([[-1.3, -0.7, 2.6], [0.6, -0.9, 2.9], [0.8, 1.3, 2.8], [-1.2, 1.1, 2.5]])
    verts = np.concatenate([a_verts, b_verts, plane])
    faces = np.concatenate([a_faces, b_faces + len(a_verts),
                            np.array([[0, 1, 2], [0, 2, 3]]) + len(a_verts) + len(b_verts)])
    return verts, faces


def triangle_soup(seed, n=60):
    """Random triangles of mixed sizes at random depths, crossing each other."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-1, 1, (n, 1, 3)) + [0, 0, 3]
    verts = (centres + rng.normal(size=(n, 3, 3)) * rng.uniform(0.02, 0.4, (n, 1, 1))).reshape(-1, 3)
    return verts, np.arange(3 * n).reshape(n, 3)


def pixel_centres(height, width):
    """(H*W, 2) projected x, y of every pixel centre, row-major, by the contract's formula."""
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([(j.ravel() + 0.5) / width * 2 - 1, 1 - (i.ravel() + 0.5) / height * 2], 1)


def near_edge_mask(verts, faces, height, width):
    """(H, W) bool: pixel centre within EDGE_TOLERANCE of a triangle edge in the image plane."""
    centres = pixel_centres(height, width)
    tri = verts[faces][:, :, :2]
    start = tri.reshape(-1, 2)
    end = np.roll(tri, -1, axis=1).reshape(-1, 2)
    near = np.zeros(len(centres), bool)
    for lo in range(0, len(start), 512):
        a, b = start[lo:lo + 512], end[lo:lo + 512]                      # (e, 2)
        ab = b - a
        ap = centres[:, None] - a[None]                                  # (P, e, 2)
        t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-300), 0, 1)
        dist = np.linalg.norm(ap - t[..., None] * ab, axis=-1)
        near |= (dist < EDGE_TOLERANCE).any(1)
    return near.reshape(height, width)


def ray_cast(verts, faces, height, width):
    """
    trimesh reference: rays along +z through pixel centres from far in front of everything.
    Returns depth (H, W) (+inf where missed), face (H, W) (-1), tied (H, W) bool (two faces within 1e-9).
    """
    import trimesh
    mesh = trimesh.Trimesh(verts, faces, process=False)
    origins = np.concatenate([pixel_centres(height, width), np.full((height * width, 1), -100.0)], 1)
    directions = np.tile([0.0, 0.0, 1.0], (height * width, 1))
    tri, ray, loc = mesh.ray.intersects_id(origins, directions, multiple_hits=True, return_locations=True)
    depth = np.full(height * width, np.inf)
    face = np.full(height * width, -1)
    tied = np.zeros(height * width, bool)
    order = np.lexsort((loc[:, 2], ray))
    tri, ray, z = tri[order], ray[order], loc[order, 2]
    first = np.r_[True, ray[1:] != ray[:-1]]
    depth[ray[first]], face[ray[first]] = z[first], tri[first]
    second = np.r_[False, ray[1:] == ray[:-1]] & np.r_[False, first[:-1]]
    tied[ray[second]] = np.abs(z[second] - depth[ray[second]]) < 1e-9
    return depth.reshape(height, width), face.reshape(height, width), tied.reshape(height, width)


def assert_matches_ray_casting(verts, faces, height, width):
    depth, face_id = render.rasterize(torch.from_numpy(verts)[None], torch.from_numpy(faces), (height, width))
    depth, face_id = depth[0].numpy(), face_id[0].numpy()
    ref_depth, ref_face, tied = ray_cast(verts, faces, height, width)
    clear = ~near_edge_mask(verts, faces, height, width)
    covered = np.isfinite(ref_depth)
    assert 0.2 < covered.mean() < 1.0 and clear.mean() > 0.9
    assert np.array_equal(np.isfinite(depth)[clear], covered[clear])
    assert np.array_equal(face_id[clear & ~covered], np.full((clear & ~covered).sum(), -1))
    both = clear & covered
    assert np.abs(depth[both] - ref_depth[both]).max() <= 1e-5
    assert np.array_equal(face_id[both & ~tied], ref_face[both & ~tied])


def test_rasterize_matches_trimesh_ray_casting_on_occluding_closed_meshes():
    verts, faces = occluding_scene()
    assert_matches_ray_casting(verts, faces, 72, 96)


def test_rasterize_matches_trimesh_ray_casting_on_crossing_triangle_soup():
    verts, faces = triangle_soup(3)
    assert_matches_ray_casting(verts, faces, 64, 64)


def test_rasterize_batch_equals_separate_calls():
    verts, faces = occluding_scene()
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(np.stack([verts * rng.uniform(0.6, 1.1) + rng.normal(0, 0.1, 3) for _ in range(3)]))
    faces = torch.from_numpy(faces)
    depth, face_id = render.rasterize(batch, faces, 48)
    for b in range(3):
        one_depth, one_face = render.rasterize(batch[b:b + 1], faces, 48)
        assert torch.equal(depth[b:b + 1], one_depth) and torch.equal(face_id[b:b + 1], one_face)


def test_rasterize_marks_uncovered_and_skips_degenerate_and_offscreen():
    verts = torch.tensor([[[-0.5, -0.5, 1.0], [0.5, -0.5, 1.0], [0.0, 0.5, 1.0],     # visible
                           [-0.9, 0.9, 0.5], [0.9, -0.9, 0.5], [0.0, 0.0, 0.5],      # degenerate
                           [2.0, 2.0, 0.1], [3.0, 2.0, 0.1], [2.5, 3.0, 0.1]]])      # off-screen
    depth, face_id = render.rasterize(verts, torch.arange(9).view(3, 3), 32)
    assert set(face_id.unique().tolist()) == {-1, 0}
    assert torch.isinf(depth[face_id < 0]).all() and torch.all(depth[face_id == 0] == 1.0)


def test_rasterize_pixel_centre_convention():
    height, width = 6, 8
    for i, j in [(0, 0), (0, width - 1), (height - 1, 0), (2, 5)]:
        x, y = (j + 0.5) / width * 2 - 1, 1 - (i + 0.5) / height * 2
        tiny = torch.tensor([[[x - 0.01, y - 0.01, 1.0], [x + 0.01, y - 0.01, 1.0], [x, y + 0.01, 1.0]]])
        _, face_id = render.rasterize(tiny, torch.tensor([[0, 1, 2]]), (height, width))
        assert face_id[0, i, j] == 0 and (face_id >= 0).sum() == 1


def test_project_follows_orthographic_deca_camera():
    cam = torch.tensor([5.0, 0.1, -0.05])
    scale, tx, ty = cam.tolist()
    world = torch.tensor([[-1 / scale - tx, 1 / scale - ty, 0.0],   # -> x = -1 (left), y = +1 (top)
                          [0.0, 0.0, 0.02],                        # nearer the camera (+Z)
                          [0.0, 0.0, -0.02]])
    projected = render.project(world, cam)
    assert torch.allclose(projected[0, :2], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(projected[:, 2], render.CAMERA_DISTANCE - scale * world[:, 2])
    assert projected[1, 2] < projected[2, 2]
    # a triangle at the projected top-left corner covers pixel (0, 0)
    corner = world[:1] + torch.tensor([[0.0, 0, 0], [0.2 / scale, 0, 0], [0, -0.2 / scale, 0]])
    _, face_id = render.rasterize(render.project(corner, cam)[None], torch.tensor([[0, 1, 2]]), 16)
    assert face_id[0, 0, 0] == 0 and face_id[0, -1, -1] == -1
    # per-frame cameras broadcast over leading dims
    frames = render.project(world.expand(4, 3, 3), cam.expand(4, 3))
    assert torch.allclose(frames, projected.expand(4, 3, 3))


def test_shade_lambert_brighter_when_facing_camera():
    facing = [[-0.9, -0.9, 1.0], [-0.1, -0.9, 1.0], [-0.5, 0.9, 1.0]]
    tilted = [[0.1, -0.9, 1.0], [0.9, -0.9, 2.0], [0.5, 0.9, 1.5]]
    verts = torch.tensor([facing + tilted])
    image = render.shade(verts, torch.tensor([[0, 1, 2], [5, 4, 3]]), 64)
    assert image.dtype == torch.uint8 and image.shape == (1, 64, 64, 3)
    assert torch.equal(image[0, 0, 0], torch.tensor(render.BACKGROUND_RGB, dtype=torch.uint8))
    lit_facing, lit_tilted = image[0, 40, 16].float(), image[0, 40, 48].float()
    assert torch.allclose(lit_facing, torch.tensor(render.SKIN_RGB, dtype=torch.float32), atol=1)
    normal = np.cross(np.subtract(tilted[1], tilted[0]), np.subtract(tilted[2], tilted[0]))
    cos = abs(normal[2]) / np.linalg.norm(normal)
    expected = np.array(render.SKIN_RGB) * (render.AMBIENT + (1 - render.AMBIENT) * cos)
    assert np.abs(lit_tilted.numpy() - expected).max() <= 1


def test_depth_to_image_fixed_range_nearer_brighter():
    depth = torch.tensor([[[render.DEPTH_NEAR, render.CAMERA_DISTANCE, float("inf")]]])
    image = render.depth_to_image(depth)
    assert image.shape == (1, 1, 1, 3)
    assert torch.allclose(image.flatten(), torch.tensor([1.0, 0.5, 0.0]))
    other = render.depth_to_image(torch.tensor([[[render.CAMERA_DISTANCE, 0.5 + render.DEPTH_FAR]]]))
    assert other[0, 0, 0, 0] == image[0, 0, 0, 1] and other[0, 0, 0, 1] == 0


def audio_streams(path):
    import imageio_ffmpeg
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                           capture_output=True, text=True)
    return re.findall(r"Stream #.*Audio: (\w+)", probe.stderr)


def test_write_video_round_trip_with_audio(tmp_path):
    import imageio.v3 as iio
    frames = np.zeros((12, 64, 96, 3), np.uint8)
    frames[:, :, :48] = [200, 60, 30]
    frames[6:, 32:] = [20, 200, 90]
    audio = (0.3 * np.sin(np.linspace(0, 2 * np.pi * 440, 6400))).astype(np.float32)
    path = tmp_path / "clip.mp4"
    render.write_video(path, frames, fps=30, audio=audio, sample_rate=16_000)
    back = np.stack(list(iio.imiter(path)))
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 4
    assert audio_streams(path) == ["aac"]
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_render_preview_streams_batches(tmp_path, monkeypatch):
    import imageio.v3 as iio
    monkeypatch.setattr(render, "PREVIEW_BATCH", 2)
    verts, faces = perturbed_sphere(4, 2, 0.1, [0.0, 0.0, 0.0])

    class Mesh:
        pass
    head = Mesh()
    head.faces = torch.from_numpy(faces)
    verts = torch.from_numpy(verts).float()[None] + torch.linspace(-0.02, 0.02, 5)[:, None, None]
    path = tmp_path / "preview.mp4"
    render.render_preview(head, verts, path, audio=np.zeros(8000, np.float32), size=64)
    back = np.stack(list(iio.imiter(path)))
    assert back.shape == (5, 64, 64, 3)
    centre, corner = back[:, 32, 32].astype(int), back[:, 0, 0].astype(int)
    assert (centre.sum(-1) > corner.sum(-1) + 100).all()
    assert audio_streams(path) == ["aac"]


def test_default_cam_frames_procedural_head():
    import flame
    head = flame.Flame.procedural()
    verts = head.from_motion(torch.zeros(flame.N_SHAPE), torch.zeros(1, flame.MOTION_DIM))
    projected = render.project(verts, render.DEFAULT_CAM)
    assert projected[..., :2].abs().max() < 1
    depth, _ = render.rasterize(projected, head.faces, render.IMAGE_SIZE)
    image = render.depth_to_image(depth)
    covered = torch.isfinite(depth)
    assert 0.2 < covered.float().mean() < 0.7
    assert image[0, 0][covered[0]].min() > 0.1 and image.max() <= 1


def test_face_renderer_levels_follow_spec():
    torch.manual_seed(0)
    generator = render.FaceRenderer()
    shapes = []
    for block in generator.down:
        block.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape[1:])))
    depth = torch.rand(1, 1, 256, 256)
    reference = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        image = generator(depth, reference, torch.tensor([7]))
    sides = [256 >> level for level in range(8)]
    assert shapes == [(c, s, s) for c, s in zip((64, 128, 256, 512, 512, 512, 512, 512), sides)]
    assert generator.down[0].body[0].in_channels == 1 + 3 + render.TPE_CHANNELS
    assert len(generator.up) == 7 and generator.up[-1].block.body[0].in_channels == 128 + 64
    assert image.shape == (1, 3, 256, 256) and image.abs().max() <= 1


def test_temporal_encoding_is_sinusoidal_and_constant_over_image():
    code = render.temporal_encoding(torch.tensor([0, 1, 90]), 4)
    assert code.shape == (3, render.TPE_CHANNELS, 4, 4)
    half = render.TPE_CHANNELS // 2
    assert torch.allclose(code[0, :half], torch.zeros(half, 4, 4)) and torch.allclose(code[0, half:], torch.ones(half, 4, 4))
    assert torch.allclose(code[1, 0], torch.full((4, 4), math.sin(1.0)))
    assert torch.allclose(code[..., :1, :1].expand_as(code), code)
    assert not torch.allclose(code[1], code[2])


def test_patch_discriminator_sees_70_pixel_patches():
    torch.manual_seed(0)
    disc = render.PatchDiscriminator()
    condition = torch.rand(1, render.RENDERER_IN_CHANNELS, 128, 128)
    image = torch.rand(1, 3, 128, 128, requires_grad=True)
    features = disc(condition, image)
    assert [f.shape[1] for f in features] == [64, 128, 256, 512, 1]
    assert features[-1].shape[-2:] == (14, 14)
    for layer in disc.layers[1:-1]:  # instance norm mixes the whole image; the convs alone set the patch
        layer[1] = torch.nn.Identity()
    disc(condition, image)[-1][0, 0, 7, 7].backward()
    rows, cols = image.grad[0].abs().sum(0).nonzero().unbind(1)
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory):
    """A random state dict in torchvision's vgg19 key layout (with a classifier to ignore): (path, state)."""
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    generator = torch.Generator().manual_seed(0)
    state, index, previous = {}, 0, 3
    for item in render.VGG19_LAYOUT:
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(item, previous, 3, 3, generator=generator) * (2 / (9 * previous)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(item, generator=generator) * 0.1
        index, previous = index + 2, item
    state["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(state, path)
    return path, state


def test_vgg19_loads_torchvision_state_dict_and_matches_functional_reference(vgg19_file):
    import torch.nn.functional as F
    path, state = vgg19_file
    vgg = render.VGG19.load(path)
    x = torch.randn(2, 3, 48, 48)
    taps = vgg(x)
    expected, y, index = [], x, 0
    for item in render.VGG19_LAYOUT:
        if item == "M":
            y, index = F.max_pool2d(y, 2), index + 1
            continue
        y = F.relu(F.conv2d(y, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))
        if index + 1 in (1, 6, 11, 20, 29):  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
            expected.append(y)
        index += 2
    assert len(taps) == 5
    for ours, ref in zip(taps, expected):
        assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_vgg19_load_names_the_file_on_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        render.VGG19.load(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth.*features.0.bias"):
        render.VGG19.load(tmp_path / "partial.pth")


def test_renderer_losses(vgg19_file):
    torch.manual_seed(0)
    vgg = render.VGG19.load(vgg19_file[0])
    disc = render.PatchDiscriminator()
    condition = torch.rand(2, render.RENDERER_IN_CHANNELS, 32, 32)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = (real + 0.3 * torch.randn_like(real)).clamp(-1, 1)
    features = disc(condition, real)
    assert render.feature_matching_loss(features, features) == 0
    assert render.feature_matching_loss(disc(condition, fake), features) > 0
    assert render.perceptual_loss(vgg, real, real) == 0 and render.perceptual_loss(vgg, fake, real) > 0
    assert torch.isclose(render.photometric_loss(fake, real), (fake - real).abs().mean())
    logits = torch.tensor([0.0, 1.0, 2.0])
    assert torch.isclose(render.gan_loss(logits, True), torch.tensor(2 / 3))
    assert torch.isclose(render.gan_loss(logits, False), torch.tensor(5 / 3))
    weights = render.RendererLossWeights(gan=0, feature_matching=0, perceptual=0, photometric=1)
    fake.requires_grad_(True)
    total, terms = render.generator_loss(disc, condition, fake, real, vgg, weights)
    assert set(terms) == {"gan", "feature_matching", "perceptual", "photometric"}
    assert torch.isclose(total, render.photometric_loss(fake, real))
    total.backward()
    assert fake.grad.abs().sum() > 0
    d_loss = render.discriminator_loss(disc, condition, fake, real)
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters()) and d_loss > 0
