"""FLAME, the head model UniSinger animates: shape, expression and joint rotations -> mesh vertices in metres.

Holds, model first: the constants of the 59-d motion vector ([expression 50 | global 3 | neck 3 | jaw 3]),
`rodrigues`, `Flame` (blendshapes, pose correctives and 5-joint linear blend skinning, batched; 68 landmarks,
region masks, `Flame.region`), `split_motion`. Then the readers of FLAME's files, as data only: a pickle that
names code is refused before it is loaded, chumpy and scipy are never imported (`DataUnpickler`,
`read_flame_arrays`). Then the exports: `save_obj` (one frame), `save_glb` (a take as animated, skinned glTF 2.0).

Depends on torch and numpy only; imports nothing of the project, so it can be copied alone:
    flame = Flame.load('FLAME2020/generic_model.pkl')  # + landmark_embedding.npy, FLAME_masks.pkl beside it
    verts = flame.from_motion(torch.zeros(100), torch.zeros(240, MOTION_DIM))   # (240, V, 3)
    with open('frame0.obj', 'w') as f:
        save_obj(f, verts[0], flame.faces)
    with open('take.glb', 'wb') as f:
        save_glb(f, flame, torch.zeros(100), torch.zeros(240, MOTION_DIM))     # plays in Blender, three.js
"""
import collections
import contextlib
import copy
import hashlib
import io
import json
import math
import pickle
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

N_SHAPE = 100
N_EXPR = 50
N_JOINTS = 5                      # root (global), neck, jaw, left eye, right eye
JOINT_NAMES = ('root', 'neck', 'jaw', 'left_eye', 'right_eye')
MOTION_DIM = N_EXPR + 9           # [expression 50 | global 3 | neck 3 | jaw 3]
EXPRESSION = slice(0, N_EXPR)     # motion columns: expression coefficients
HEAD_POSE = slice(N_EXPR, N_EXPR + 6)       # global + neck rotation (axis-angle)
JAW_POSE = slice(N_EXPR + 6, MOTION_DIM)    # jaw rotation
MM_PER_M = 1000.0                 # vertices are in metres; losses and metrics read millimetres
MOUTH_LANDMARKS = slice(48, 68)   # iBUG-68's mouth among the 68 landmarks: outer and inner lip contours
BROW_LANDMARKS = slice(17, 27)    # iBUG-68's eyebrows, right then left
EYE_LANDMARKS = slice(36, 48)     # iBUG-68's eye contours, right then left
NOSE_LANDMARKS = slice(27, 36)    # iBUG-68's nose: the bridge from between the eyes to the tip, then the nostrils
FLAME_SHAPE_COLUMNS = 300         # official shapedirs: 300 shape columns, then the expression columns
N_POSE_FEATURES = 9 * (N_JOINTS - 1)
N_POSED = 2                       # joints that turn besides the root: neck and jaw (the eyes stay still)
CPU_SLAB_BYTES = 2 << 20          # bytes of one (frames, 3, V) intermediate of the CPU forward: stays in cache
FLAME_KEYS = ('v_template', 'shapedirs', 'posedirs', 'J_regressor', 'weights', 'kintree_table', 'f')
WEIGHT_SUM_TOLERANCE = 1e-12      # a vertex's skinning weights whose sum is this close to one are taken to sum to one
RODRIGUES_OFFSET = 1e-8           # smplx adds this to the rotation vector before its norm; kept for equal numbers


def rodrigues(rotvec):
    """Axis-angle (..., 3) -> rotation matrices (..., 3, 3), closed form R = I + sin·K + (1 - cos)·K²."""
    angle = torch.linalg.vector_norm(rotvec + RODRIGUES_OFFSET, dim=-1, keepdim=True)  # (..., 1)
    axis = rotvec / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).unflatten(-1, (3, 3))  # (..., 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    KK = axis[..., :, None] * axis[..., None, :] - (axis * axis).sum(-1)[..., None, None] * eye  # K² for any axis
    return eye + torch.sin(angle)[..., None] * K + (1 - torch.cos(angle))[..., None] * KK


class Flame(nn.Module):
    """FLAME-structured head: blendshapes, pose correctives and 5-joint linear blend skinning. Buffers are
    matmul-ready: each blendshape basis is a (K, 3·V) matrix with coordinate-major columns (all x, then y, then z),
    so blendshapes are one matmul and the skinning works on contiguous (frames, 3, V) slabs."""

    def __init__(self, arrays, n_shape=N_SHAPE, n_expr=N_EXPR, shape_columns=FLAME_SHAPE_COLUMNS,
                 landmarks=None, masks=None, source='arrays', dtype=torch.float32):
        super().__init__()
        v_template = np.asarray(arrays['v_template'], np.float64)        # (V, 3)
        shapedirs = np.asarray(arrays['shapedirs'], np.float64)          # (V, 3, shape_columns + expression columns)
        posedirs = np.asarray(arrays['posedirs'], np.float64)            # (V, 3, 36)
        J_regressor = np.asarray(arrays['J_regressor'], np.float64)      # (5, V)
        weights = np.asarray(arrays['weights'], np.float64)              # (V, 5)
        faces = np.asarray(arrays['f'], np.int64)                        # (F, 3)
        V = v_template.shape[0]
        if shapedirs.shape[:2] != (V, 3) or n_shape > shape_columns or shape_columns + n_expr > shapedirs.shape[2]:
            raise ValueError(f"{source}: shapedirs {shapedirs.shape} cannot give {n_shape} shape and {n_expr} "
                             f"expression components after {shape_columns} shape columns")
        if posedirs.shape != (V, 3, N_POSE_FEATURES) or J_regressor.shape != (N_JOINTS, V) \
                or weights.shape != (V, N_JOINTS):
            raise ValueError(f"{source}: expected posedirs ({V}, 3, 36), J_regressor (5, {V}), weights ({V}, 5); "
                             f"found {posedirs.shape}, {J_regressor.shape}, {weights.shape}")
        parents = [int(p) for p in np.asarray(arrays['kintree_table'])[0].astype(np.int64)]
        parents[0] = -1
        if len(parents) != N_JOINTS or any(not 0 <= p < i for i, p in enumerate(parents) if i):
            raise ValueError(f"{source}: kintree_table must list 5 joints, each after its parent; found {parents}")
        self.skinned = list(range(N_POSED + 1))   # the joint of each skin_weights row (region drops unweighted ones)
        self.n_shape, self.n_expr, self.parents, self.source = n_shape, n_expr, parents, str(source)
        self.sha256 = None                # the model file's sha256 when read from one (load)

        def basis(dirs):  # (V, 3, K) -> (K, 3·V)
            return np.ascontiguousarray(dirs.transpose(2, 1, 0).reshape(dirs.shape[2], 3 * V))

        shape_dirs = shapedirs[:, :, :n_shape]
        expr_dirs = shapedirs[:, :, shape_columns:shape_columns + n_expr]
        # Joints are linear in the blendshape coefficients, so they get their own small bases.
        joint_basis = lambda dirs: np.einsum('jv,vck->kjc', J_regressor, dirs).reshape(dirs.shape[2], 3 * N_JOINTS)
        # The eyes never turn, so an eye moves as its parent does: the skinning gives its weights to the parent.
        skin_weights = weights.T.copy()
        for eye in reversed(range(N_POSED + 1, N_JOINTS)):
            skin_weights[parents[eye]] += skin_weights[eye]
        skin_weights = skin_weights[:N_POSED + 1]                                      # (3, V): root, neck, jaw
        # Skinning weights sum to one, which forward's skinning uses; weights that do not are honoured exactly.
        excess = skin_weights.sum(0) - 1                                               # (V,)
        buffers = {  # blend_dirs (n_shape + n_expr + 36, 3·V), joint_dirs (n_shape + n_expr, 15)
            'template': v_template.T.reshape(3 * V),                              # (3·V,)
            'blend_dirs': np.concatenate([basis(shape_dirs), basis(expr_dirs), basis(posedirs)]),
            'joint_template': (J_regressor @ v_template).reshape(3 * N_JOINTS),   # (15,)
            'joint_dirs': np.concatenate([joint_basis(shape_dirs), joint_basis(expr_dirs)]),
            'weights_t': np.ascontiguousarray(weights.T),                         # (5, V), as the file has them
            'skin_weights': skin_weights,                                          # (3, V)
            'weight_excess': excess if np.abs(excess).max() > WEIGHT_SUM_TOLERANCE else None,   # (V,) or None
        }
        for name, value in buffers.items():
            self.register_buffer(name, value if value is None else torch.tensor(value, dtype=dtype))
        self.register_buffer('faces', torch.from_numpy(faces))
        if landmarks is not None:
            lmk_faces, lmk_bary = landmarks
            self.register_buffer('lmk_vertex_ids', torch.from_numpy(faces[np.asarray(lmk_faces, np.int64)]))  # (L, 3)
            self.register_buffer('lmk_bary', torch.tensor(np.asarray(lmk_bary), dtype=dtype))                # (L, 3)
        self.mask_names = sorted(masks) if masks is not None else None
        for name in self.mask_names or ():
            self.register_buffer(f'mask_{name}', torch.as_tensor(np.asarray(masks[name], np.int64)))

    @classmethod
    def load(cls, path, n_shape=N_SHAPE, n_expr=N_EXPR, dtype=torch.float32):
        """Read generic_model.pkl (FLAME 2020, chumpy-free), a FLAME 2023 pickle or an .npz of the same arrays,
        plus landmark_embedding.npy / flame_static_embedding.pkl and FLAME_masks.pkl found beside it."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"{path}: no such FLAME model file")
        model = cls(read_flame_arrays(path), n_shape, n_expr, FLAME_SHAPE_COLUMNS,
                    _read_landmark_embedding(path.parent), _read_masks(path.parent), path, dtype)
        model.sha256 = file_sha256(path)      # which file it is, wherever it was copied (checkpoints record it)
        return model

    def region(self, ids):
        """The same model on the vertices `ids` only: forward gives (..., len(ids), 3), equal to the whole head's
        [..., ids, :]. Joints still come from the whole head; faces, landmarks and masks (whole-head) are dropped."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.template.device)
        V = self.template.shape[0] // 3
        cols = torch.cat([ids, ids + V, ids + 2 * V])                           # coordinate-major (3·U,)
        sub = copy.copy(self)
        sub._buffers = dict(template=self.template[cols], blend_dirs=self.blend_dirs[:, cols].contiguous(),
                            joint_template=self.joint_template, joint_dirs=self.joint_dirs,
                            weights_t=self.weights_t[:, ids].contiguous())
        weights = self.skin_weights[:, ids]
        weighted = weights.ne(0).any(1).tolist()
        sub.skinned = [j for j, w in zip(self.skinned, weighted) if w]
        sub._buffers['skin_weights'] = weights[torch.tensor(weighted, device=weights.device)].contiguous()
        sub._buffers['weight_excess'] = None if self.weight_excess is None else self.weight_excess[ids]
        sub.mask_names, sub.source = None, f"{self.source}, {len(ids)} vertices"
        return sub

    @property
    def masks(self):
        """dict region name -> LongTensor of vertex ids."""
        if self.mask_names is None:
            raise ValueError(f"{self.source}: no FLAME_masks.pkl beside the model, so no region masks")
        return {name: getattr(self, f'mask_{name}') for name in self.mask_names}

    def forward(self, shape, expression, global_pose, neck_pose, jaw_pose):
        """Vertices (..., V, 3) in metres; the leading dims of all inputs broadcast together. global_pose or neck_pose
        None: that joint does not turn (zero_head_pose), which skins with less work than zeros would. The eyes stay
        still (the 59-d motion has no eye pose)."""
        ref = self.template
        shape, expression, global_pose, neck_pose, jaw_pose = (
            t if t is None else t.to(ref) for t in (shape, expression, global_pose, neck_pose, jaw_pose))
        if shape.shape[-1] != self.n_shape or expression.shape[-1] != self.n_expr:
            raise ValueError(f"{self.source}: expects shape (..., {self.n_shape}) and expression (..., {self.n_expr}); "
                             f"got {tuple(shape.shape)} and {tuple(expression.shape)}")
        turning = [p is not None for p in (global_pose, neck_pose, jaw_pose)]            # root, neck, jaw
        poses = [p for p in (global_pose, neck_pose, jaw_pose) if p is not None]
        full = torch.Size(np.broadcast_shapes(shape.shape[:-1], expression.shape[:-1], *(p.shape[:-1] for p in poses)))
        N, V, J = math.prod(full), self.template.shape[0] // 3, N_POSED + 1

        eye = torch.eye(3, dtype=ref.dtype, device=ref.device)
        turned = iter(rodrigues(torch.stack([p.expand(full + (3,)).reshape(N, 3) for p in poses], 1)).unbind(1)
                      if poses else ())
        rot = [next(turned) if turns else eye.expand(N, 3, 3) for turns in turning]     # J x (N, 3, 3)
        pose_feature = torch.cat([(r - eye).reshape(N, 9) for r in rot[1:]], 1)          # (N, 18): neck, jaw
        shape_full = shape.expand(full + shape.shape[-1:]).reshape(N, self.n_shape)
        expr = expression.expand(full + expression.shape[-1:]).reshape(N, self.n_expr)
        coeffs = torch.cat([shape_full, expr, pose_feature], 1)                   # (N, n_shape + n_expr + 18)
        dirs = self.blend_dirs[:self.n_shape + self.n_expr + 9 * N_POSED]
        one_head = math.prod(shape.shape[:-1]) == 1
        if one_head:  # one head for every frame: its shape enters the blend as a bias
            head = torch.addmm(self.template, shape.reshape(1, self.n_shape), dirs[:self.n_shape])
            coeffs, dirs = coeffs[:, self.n_shape:], dirs[self.n_shape:]
        joints = torch.addmm(self.joint_template[:3 * J], torch.cat([shape_full, expr], 1), self.joint_dirs[:, :3 * J])
        joints = joints.view(N, J, 3)                                             # root, neck, jaw (eyes: no turn)

        # Kinematic chain: world rotation R_j and the shift t_j = p_j - R_j J_j that takes the rest joint J_j to its
        # world position p_j, for each joint that moves (it or a joint above it turns).
        moving, world_rot, world_pos, shift = [], [], [], {}
        for j in range(J):
            p = self.parents[j]
            moving.append(turning[j] or (j > 0 and moving[p]))
            world_rot.append(rot[0] if j == 0 else world_rot[p] @ rot[j])
            world_pos.append(joints[:, 0] if j == 0 else
                             (world_rot[p] @ (joints[:, j] - joints[:, p])[..., None])[..., 0] + world_pos[p])
            if moving[j]:
                shift[j] = (world_pos[j] - (world_rot[j] @ joints[:, j, :, None])[..., 0])[..., None]  # (N, 3, 1)
        moved = [(k, j) for k, j in enumerate(self.skinned) if moving[j]]

        # Blend and skin a slab of frames at a time, intermediates (n, 3, V) like the output; on the CPU a slab of
        # CPU_SLAB_BYTES keeps them in cache, which the memory-bound blend and skinning need to be fast. Skinning is
        # written relative to the rest pose: as a vertex's weights sum to one, sum_j w_j (R_j v + t_j) = v + sum_j w_j
        # ((R_j - I) v + t_j), so a joint that does not move adds nothing: without head pose only the jaw skins.
        # Under autograd one slab: the graph keeps every slab's intermediates anyway, and the backward of writing a
        # slab into the output copies the output's whole gradient, once a slab.
        slabs = (1 if ref.device.type != 'cpu' or coeffs.requires_grad
                 else max(1, -(-N * 3 * V * ref.element_size() // CPU_SLAB_BYTES)))
        slab = max(1, -(-N // slabs))                                             # frames a slab, slabs of equal size
        verts = None if slab == N else torch.empty(N, 3, V, dtype=ref.dtype, device=ref.device)
        for lo in range(0, N, slab):
            hi = min(N, lo + slab)
            v_posed = torch.addmm(head if one_head else self.template, coeffs[lo:hi], dirs).view(hi - lo, 3, V)
            skinned = v_posed if self.weight_excess is None else torch.addcmul(v_posed, v_posed, self.weight_excess)
            for k, j in moved:   # v_posed is read by every joint, so the first writes skinned anew
                rigid = torch.baddbmm(shift[j][lo:hi], world_rot[j][lo:hi] - eye, v_posed)   # (n, 3, V)
                skinned = (torch.addcmul(skinned, rigid, self.skin_weights[k]) if skinned is v_posed
                           else skinned.addcmul_(rigid, self.skin_weights[k]))
            if verts is None:
                verts = skinned
            else:
                verts[lo:hi] = skinned
        return verts.transpose(1, 2).reshape(full + (V, 3))

    def from_motion(self, shape, motion, zero_head_pose=False):
        """Vertices (..., V, 3) of motion (..., 59), shape's leading dims a prefix of motion's ((B, 100) with (B, T, 59)
        gives (B, T, V, 3)). zero_head_pose zeroes global and neck, for face metrics and the head-pose-free loss."""
        expression, global_pose, neck_pose, jaw_pose = split_motion(motion, self.n_expr)
        if zero_head_pose:
            global_pose = neck_pose = None
        extra = motion.dim() - shape.dim()
        shape = shape.reshape(shape.shape[:-1] + (1,) * max(extra, 0) + shape.shape[-1:])
        return self(shape, expression, global_pose, neck_pose, jaw_pose)

    def landmarks(self, verts):
        """68 landmarks (..., 68, 3) of vertices (..., V, 3) (51 with only flame_static_embedding.pkl)."""
        if not hasattr(self, 'lmk_bary'):
            raise ValueError(f"{self.source}: no landmark_embedding.npy or flame_static_embedding.pkl beside the model")
        corners = verts[..., self.lmk_vertex_ids, :]                              # (..., L, 3, 3)
        return (corners * self.lmk_bary.to(verts.dtype)[..., None]).sum(-2)


def split_motion(m, n_expr=N_EXPR):
    """59-d motion (..., 59) -> expression (..., 50), global (..., 3), neck (..., 3), jaw (..., 3)."""
    if m.shape[-1] != n_expr + 9:
        raise ValueError(f"motion: expected last dim {n_expr + 9}, got {tuple(m.shape)}")
    return m[..., :n_expr], m[..., n_expr:n_expr + 3], m[..., n_expr + 3:n_expr + 6], m[..., n_expr + 6:n_expr + 9]


# ------------------------------------------------------- support: reading FLAME's files, writing takes (OBJ, glTF 2.0)

def file_sha256(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes: identifies a FLAME file wherever it was copied."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


# Reading pickles as data. Unpickling calls whatever callable a file names, so a pickle from elsewhere could run
# any program. DataUnpickler resolves only exact (module, name) pairs that build data whatever their arguments:
# arrays, dtypes and numpy scalars (numpy.core and numpy._core spellings), sets, complex numbers, the latin-1 bytes
# of protocol-2 pickles, inert stand-ins for FLAME 2020's chumpy and scipy-sparse objects (neither is imported),
# and plain tensors of numbers (DECA saved some). Any other name is refused before it is loaded.

class _ChumpyArray:
    """Stand-in for a chumpy object inside a FLAME 2020 pickle: keeps only its value, state['x']."""

    def __setstate__(self, state):
        self.x = state.get('x') if isinstance(state, dict) else None


class _CscStandIn:
    """Stand-in for a scipy csc matrix inside a pickle, so reading needs no scipy (_CsrStandIn: csr)."""
    column_major = True

    def __setstate__(self, state):
        self.state = state

    def toarray(self):
        s = self.state
        shape = s.get('_shape', s.get('shape'))
        data, indices, indptr = np.asarray(s['data']), np.asarray(s['indices']), np.asarray(s['indptr'])
        major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        dense = np.zeros(shape, dtype=data.dtype)
        rows, cols = (indices, major) if self.column_major else (major, indices)
        np.add.at(dense, (rows, cols), data)  # duplicate entries add up, as in scipy
        return dense


class _CsrStandIn(_CscStandIn):
    column_major = False


def _latin1_bytes(text, encoding):
    """_codecs.encode as protocol-2 pickles use it for bytes (ndarray data): latin-1 only, no other codec."""
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused: _codecs.encode with {encoding!r}")
    return text.encode('latin1')


def _reconstructor(cls, base, state):
    """copyreg._reconstructor of protocol 0/1 pickles, for the stand-ins (all the real files reconstruct)."""
    if base is not object or cls not in (_ChumpyArray, _CscStandIn, _CsrStandIn) or state is not None:
        raise pickle.UnpicklingError(f"refused: copyreg._reconstructor of {getattr(cls, '__name__', cls)!r}")
    return object.__new__(cls)


# Numeric dtypes numpy also has: a tensor of these leaves the unpickler as data (e.g. DECA's landmark_embedding.npy)
TENSOR_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                 torch.float32, torch.float64, torch.complex64, torch.complex128)


def read_torch_data(file, map_location='cpu'):
    """torch.load of a file from elsewhere as data only (torch's weights-only reader). Its refusal or damage ->
    pickle.UnpicklingError: 'refused to load <name>', or the line of torch's paragraph that says what it met."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:                                   # torch raises many kinds on damaged bytes
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        if named:
            raise pickle.UnpicklingError(f"refused to load {named[1].rstrip('.')}: a data file holds only "
                                         f"tensors, numbers, strings and containers") from None
        said = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
        lines = str(error).strip().splitlines()
        raise pickle.UnpicklingError(said[1].strip() if said else
                                     f"{type(error).__name__}: {lines[0] if lines else ''}") from None


def _storage_from_bytes(b):
    """torch.storage._load_from_bytes without its torch.load(weights_only=False): the bytes (a torch.save file)
    are read by read_torch_data, and only a typed storage of numbers is kept."""
    if type(b) is not bytes:
        raise pickle.UnpicklingError(f"refused a tensor storage made from {type(b).__name__}, not bytes")
    try:
        storage = read_torch_data(io.BytesIO(b))
    except pickle.UnpicklingError as error:
        if str(error).startswith('refused to load'):
            raise pickle.UnpicklingError(str(error).replace(':', " inside a tensor's storage bytes:", 1)) from None
        raise pickle.UnpicklingError(f"unreadable tensor storage bytes ({str(error).split(':')[0]})") from None
    if not isinstance(storage, torch.TypedStorage) or storage.dtype not in TENSOR_DTYPES:
        what = storage.dtype if isinstance(storage, torch.TypedStorage) else type(storage).__name__
        raise pickle.UnpicklingError(f"refused tensor storage bytes holding {what}, not a storage of numbers")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 (and _rebuild_tensor of older torch) for a plain tensor only: a view of a
    storage from _storage_from_bytes that lies inside it, with no gradient, backward hooks or metadata."""
    view = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
    if not (view and isinstance(storage, torch.TypedStorage) and
            all(type(n) is int and n >= 0 for n in (offset, *size, *stride))):
        raise pickle.UnpicklingError("refused a tensor that is not a view of a storage by offset, sizes and strides")
    if requires_grad is not False or not all(x is None or isinstance(x, dict) and not x for x in (hooks, metadata)):
        raise pickle.UnpicklingError("refused a tensor with a gradient, backward hooks or metadata")
    values = storage._untyped_storage.nbytes() // torch.empty((), dtype=storage.dtype).element_size()
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= values:
        raise pickle.UnpicklingError(f"refused a tensor view {size} reaching past its storage of {values} values")
    return torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)


def _data_globals():
    """(module, name) -> what DataUnpickler gives for it; exact pairs, each spelling a real file uses."""
    core = np._core if hasattr(np, '_core') else np.core
    table = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype, ('_codecs', 'encode'): _latin1_bytes}
    for spelling in ('numpy.core', 'numpy._core'):             # numpy < 2 wrote numpy.core, numpy >= 2 numpy._core
        table.update({(f'{spelling}.multiarray', '_reconstruct'): core.multiarray._reconstruct,
                      (f'{spelling}.multiarray', 'scalar'): core.multiarray.scalar,
                      (f'{spelling}.numeric', '_frombuffer'): core.numeric._frombuffer})
    for builtins in ('builtins', '__builtin__'):               # Python 3 / Python 2 spellings
        table.update({(builtins, 'set'): set, (builtins, 'frozenset'): frozenset, (builtins, 'complex'): complex,
                      (builtins, 'object'): object})
    for copyreg in ('copyreg', 'copy_reg'):
        table[(copyreg, '_reconstructor')] = _reconstructor
    table.update({('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor, ('torch._utils', '_rebuild_tensor'):
                  _rebuild_tensor, ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
                  ('collections', 'OrderedDict'): collections.OrderedDict})    # a tensor's empty backward hooks
    for module in ('scipy.sparse', 'scipy.sparse.csc', 'scipy.sparse._csc', 'scipy.sparse.csr', 'scipy.sparse._csr'):
        table.update({(module, 'csc_matrix'): _CscStandIn, (module, 'csc_array'): _CscStandIn,
                      (module, 'csr_matrix'): _CsrStandIn, (module, 'csr_array'): _CsrStandIn})
    return table


def _plain_dtype(dtype):
    """Whether a dtype is one numpy itself makes from its type string: no fields or sub-array, its own itemsize,
    alignment and flags (a pickled __setstate__ could make object arrays read raw memory as pointers)."""
    made = np.dtype(dtype.str)
    return (dtype.names is None and dtype.subdtype is None and dtype == made and dtype.itemsize == made.itemsize
            and dtype.alignment == made.alignment and dtype.flags == made.flags)


class DataUnpickler(pickle._Unpickler):
    """Unpickler for files from elsewhere: builds data only (see above), refusing any other class or function by
    name before it is loaded; every chumpy class becomes _ChumpyArray. The pure-Python unpickler, as its BUILD step
    (__setstate__) is vetted too: only arrays, dtypes and the stand-ins take a state, and a dtype must be plain."""
    GLOBALS = _data_globals()
    BUILDABLE = (np.ndarray, np.dtype, _ChumpyArray, _CscStandIn)

    def find_class(self, module, name):
        if module.split('.')[0] in ('chumpy', 'chumpy_fork'):
            return _ChumpyArray
        if (module, name) in self.GLOBALS:
            return self.GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a data file holds only arrays, numbers, "
                                     f"strings and containers")

    def load_build(self):
        target = self.stack[-2]
        if not isinstance(target, self.BUILDABLE):
            what = getattr(target, '__qualname__', type(target).__name__)
            raise pickle.UnpicklingError(f"refused to set the state of {what}: only arrays, dtypes and the FLAME "
                                         f"stand-ins take one")
        super().load_build()
        if isinstance(target, np.dtype) and not _plain_dtype(target):
            raise pickle.UnpicklingError(f"refused a dtype that numpy would not make for {target.str!r} (record "
                                         f"fields, or altered size or flags)")

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def load_data_pickle(path, file=None):
    """The object of a pickle file read with DataUnpickler (Python 2 strings as latin-1); `file` an open binary file
    at the pickle (default: path opened). Refusals and unreadable bytes -> one-line ValueError naming path."""
    try:
        with open(path, 'rb') if file is None else contextlib.nullcontext(file) as fh:
            return DataUnpickler(fh, encoding='latin1').load()
    except pickle.UnpicklingError as error:
        if str(error).startswith('refused'):
            raise ValueError(f"{path}: {error}") from None
        raise ValueError(f"{path}: not a readable pickle ({error})") from None
    except Exception as error:
        raise ValueError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None


def read_npy_header(file, size=None):
    """(shape, dtype) from the header of the .npy file open at its start, leaving it at the data. ValueError for a
    version other than 1.0 / 2.0, or a header claiming more values than the file's `size` bytes hold."""
    version = np.lib.format.read_magic(file)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"format version {version}, not 1.0 or 2.0")
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = header(file)
    values = math.prod(shape)
    if size is not None and not dtype.hasobject and values * dtype.itemsize > size - file.tell():
        raise ValueError(f"its header claims {values} values of {dtype} but the file holds {size} bytes")
    return shape, dtype


def load_npy_object(path):
    """The object inside a .npy file of a pickled object (np.save of a dict, e.g. DECA's landmark_embedding.npy),
    read with DataUnpickler, the header parsed here, not by np.load(allow_pickle=True)."""
    with open(path, 'rb') as fh:
        try:
            shape, dtype = read_npy_header(fh)
        except ValueError as error:
            raise ValueError(f"{path}: not a readable .npy file ({error})") from None
        if not dtype.hasobject:
            raise ValueError(f"{path}: expected a pickled object, found a {dtype} array of shape {shape}")
        array = load_data_pickle(path, fh)
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise ValueError(f"{path}: the pickled payload is not the ({shape}) object array its header declares")
    return array[()] if shape == () else array


def _dense(value, path, key):
    """numpy array of a pickled value: plain array, chumpy stand-in or sparse matrix."""
    if isinstance(value, _ChumpyArray):
        value = value.x
        if value is None:
            raise ValueError(f"{path}: chumpy object '{key}' holds no array")
    if hasattr(value, 'toarray'):
        value = value.toarray()
    return np.asarray(value)


def read_npz(path):
    """dict of the arrays of an .npz file, as data only (no pickled objects). ValueError naming a damaged file: not a
    zip, a bad checksum or array header, or a header claiming more values than its member holds (checked first)."""
    try:
        with zipfile.ZipFile(path) as z:
            data = {}
            for info in z.infolist():
                with z.open(info) as f:
                    try:
                        _, dtype = read_npy_header(f, info.file_size)
                    except ValueError as error:
                        raise ValueError(f"array {info.filename}: {error}") from None
                    if dtype.hasobject:
                        raise ValueError(f"array {info.filename} holds Python objects")
                with z.open(info) as f:
                    data[info.filename.removesuffix('.npy')] = np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable .npz ({' '.join(str(e).split())})") from None
    return data


def read_flame_arrays(path):
    """dict of the FLAME arrays of a .pkl (2020 chumpy or 2023 plain) or .npz file."""
    if path.suffix == '.npz':
        data = read_npz(path)
    else:
        data = load_data_pickle(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict of FLAME arrays, found {type(data).__name__}")
    missing = [k for k in FLAME_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    return {k: _dense(data[k], path, k) for k in FLAME_KEYS}


def _read_landmark_embedding(folder):
    """(faces (L,), barycentric (L, 3)) from DECA's landmark_embedding.npy (68) or flame_static_embedding.pkl
    (51, iBUG points 17..67, no jaw contour); None when neither exists."""
    for name, read, faces_key, bary_key in (
            ('landmark_embedding.npy', load_npy_object, 'full_lmk_faces_idx', 'full_lmk_bary_coords'),
            ('flame_static_embedding.pkl', load_data_pickle, 'lmk_face_idx', 'lmk_b_coords')):
        path = folder / name
        if path.exists():
            emb = read(path)
            if not isinstance(emb, dict) or faces_key not in emb or bary_key not in emb:
                raise ValueError(f"{path}: missing keys {faces_key} / {bary_key}")
            faces, bary = np.asarray(emb[faces_key]), np.asarray(emb[bary_key])     # DECA's may be tensors
            if faces.dtype.kind not in 'iu' or bary.dtype.kind != 'f' or bary.shape != (*faces.shape, 3):
                raise ValueError(f"{path}: expected {faces_key} (L,) face ids and {bary_key} (L, 3) weights, found "
                                 f"{faces.dtype} {faces.shape} and {bary.dtype} {bary.shape}")
            return faces.reshape(-1), bary.reshape(-1, 3)
    return None


def _read_masks(folder):
    """dict region -> vertex ids from FLAME_masks.pkl, with 'upper_face' = forehead ∪ eye_region; None if absent."""
    path = folder / 'FLAME_masks.pkl'
    if not path.exists():
        return None
    masks = load_data_pickle(path)
    if not isinstance(masks, dict):
        raise ValueError(f"{path}: expected a dict of vertex id arrays, found {type(masks).__name__}")
    masks = {k: _dense(v, path, k) for k, v in masks.items()}
    not_ids = [k for k, v in masks.items() if v.dtype.kind not in 'iu']
    if not_ids:
        raise ValueError(f"{path}: expected arrays of vertex ids, found other values for {not_ids}")
    masks = {k: v.astype(np.int64).reshape(-1) for k, v in masks.items()}
    if 'forehead' in masks and 'eye_region' in masks:
        masks['upper_face'] = np.union1d(masks['forehead'], masks['eye_region'])
    return masks


# Exports

def _numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def save_obj(file, verts, faces):
    """Wavefront OBJ of one mesh into an open text file: verts (V, 3) metres, faces (F, 3) 0-based (written 1-based)."""
    np.savetxt(file, _numpy(verts).reshape(-1, 3), fmt='v %.6f %.6f %.6f')
    np.savetxt(file, _numpy(faces).reshape(-1, 3).astype(np.int64) + 1, fmt='f %d %d %d')


# glTF 2.0 export: one take as a .glb that glTF players (Blender, three.js, game engines) play back exactly

GLTF_FLOAT, GLTF_UNSIGNED_BYTE, GLTF_UNSIGNED_INT = 5126, 5121, 5125   # accessor componentType codes
GLTF_ARRAY_BUFFER, GLTF_ELEMENT_ARRAY_BUFFER = 34962, 34963           # bufferView targets (vertex data, indices)
GLTF_TYPES = {1: 'SCALAR', 3: 'VEC3', 4: 'VEC4', 16: 'MAT4'}          # accessor type by component count
GLB_MAGIC, GLB_VERSION, GLB_JSON, GLB_BIN = b'glTF', 2, b'JSON', b'BIN\0'
INFLUENCES_PER_SET = 4            # joints per JOINTS_n / WEIGHTS_n attribute pair


def _quaternions(rotvec):
    """Axis-angle (..., 3) -> unit quaternions (..., 4) in glTF's (x, y, z, w) order."""
    angle = np.linalg.norm(rotvec, axis=-1, keepdims=True)
    half_sinc = np.where(angle > 0, np.sin(angle / 2) / np.where(angle > 0, angle, 1), 0.5)  # sin(θ/2)/θ
    return np.concatenate([rotvec * half_sinc, np.cos(angle / 2)], -1)


def _quaternion_matrices(q):
    """Unit quaternions (..., 4), (x, y, z, w) -> rotation matrices (..., 3, 3)."""
    x, y, z, w = np.moveaxis(q, -1, 0)
    rows = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                     2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                     2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)
    return rows.reshape(q.shape[:-1] + (3, 3))


def _skin_sets(weights):
    """FLAME's skinning weights (V, 5) -> joint ids and weights (V, 4·n) for n JOINTS_n / WEIGHTS_n pairs, largest
    first, n enough for the vertex with the most non-zero weights (unused slots: joint 0, weight 0)."""
    order = np.argsort(-weights, axis=1, kind='stable')                        # (V, 5)
    ranked = np.take_along_axis(weights, order, 1)
    slots = INFLUENCES_PER_SET * -(-max(int((weights != 0).sum(1).max()), 1) // INFLUENCES_PER_SET)
    pad = max(slots - N_JOINTS, 0)
    order, ranked = np.pad(order, ((0, 0), (0, pad)))[:, :slots], np.pad(ranked, ((0, 0), (0, pad)))[:, :slots]
    return np.where(ranked != 0, order, 0), ranked


class _GlbBuffer:
    """The binary chunk under construction, with the bufferViews and accessors that describe it."""

    def __init__(self):
        self.chunks, self.length, self.views, self.accessors = [], 0, [], []

    def add(self, array, target=None):
        """One accessor over its own bufferView, with min / max; array (count, components) of float32, uint8, uint32."""
        component = {np.float32: GLTF_FLOAT, np.uint8: GLTF_UNSIGNED_BYTE,
                     np.uint32: GLTF_UNSIGNED_INT}[array.dtype.type]
        data = np.ascontiguousarray(array).tobytes()
        view = {'buffer': 0, 'byteOffset': self.length, 'byteLength': len(data)}
        if target is not None:
            view['target'] = target
        self.chunks.append(data + bytes(-len(data) % 4))                      # keeps every view 4-byte aligned
        self.length += len(self.chunks[-1])
        self.views.append(view)
        self.accessors.append({'bufferView': len(self.views) - 1, 'componentType': component, 'count': len(array),
                               'type': GLTF_TYPES[array.shape[1]], 'min': array.min(0).tolist(),
                               'max': array.max(0).tolist()})
        return len(self.accessors) - 1


def save_glb(file, flame, shape, motion, fps=30):
    """One take as binary glTF 2.0 into an open binary file, playing back FLAME's own vertices: shape (n_shape,)
    baked into the mesh, motion (T, 59) = [expression | global | neck | jaw] a frame.

    Inside: the neutral head; the expression blendshapes and the 36 pose correctives ((R - I) of neck, jaw and
    eyes) as morph targets (glb_morphs); FLAME's 5 joints as a skin with its weights (glb_joints); one animation
    with a key per frame for the morph weights and each joint's rotation and translation.
    """
    name = getattr(file, 'name', 'glb')
    shape = _numpy(shape).astype(np.float64).reshape(-1)
    motion = _numpy(motion).astype(np.float64)
    if shape.shape != (flame.n_shape,) or motion.ndim != 2 or len(motion) == 0 or motion.shape[1] != flame.n_expr + 9:
        raise ValueError(f"{name}: expected shape ({flame.n_shape},) and motion (frames, {flame.n_expr + 9}); "
                         f"got {shape.shape} and {motion.shape}")
    if not (np.isfinite(shape).all() and np.isfinite(motion).all()):
        raise ValueError(f"{name}: shape and motion must be finite numbers")
    T = len(motion)
    expression, global_pose, neck_pose, jaw_pose = split_motion(motion, flame.n_expr)
    eyes = np.zeros_like(jaw_pose)                                            # the 59-d motion keeps the eyes still
    rotvec = np.stack([global_pose, neck_pose, jaw_pose, eyes, eyes], 1)      # (T, 5, 3)
    base, targets, morph_weights, lo, span = glb_morphs(flame, shape, expression, rotvec)
    bind, parent_bind, quats, translations = glb_joints(flame, shape, expression, rotvec)

    # Binary chunk: mesh, skin, animation.
    buf = _GlbBuffer()
    position = buf.add(base, GLTF_ARRAY_BUFFER)
    indices = buf.add(_numpy(flame.faces).astype(np.uint32).reshape(-1, 1), GLTF_ELEMENT_ARRAY_BUFFER)
    joint_ids, joint_weights = _skin_sets(_numpy(flame.weights_t).T.astype(np.float32))
    attributes = {'POSITION': position}
    for n in range(joint_ids.shape[1] // INFLUENCES_PER_SET):
        cols = slice(INFLUENCES_PER_SET * n, INFLUENCES_PER_SET * (n + 1))
        attributes[f'JOINTS_{n}'] = buf.add(joint_ids[:, cols].astype(np.uint8), GLTF_ARRAY_BUFFER)
        attributes[f'WEIGHTS_{n}'] = buf.add(joint_weights[:, cols], GLTF_ARRAY_BUFFER)
    morph = [{'POSITION': buf.add(t, GLTF_ARRAY_BUFFER)} for t in targets]
    inverse_bind = np.tile(np.eye(4), (N_JOINTS, 1, 1))                       # (5, 4, 4): translate(-b_j)
    inverse_bind[:, :3, 3] = -bind
    skin_matrices = buf.add(inverse_bind.transpose(0, 2, 1).reshape(N_JOINTS, 16).astype(np.float32))  # column-major
    times = buf.add((np.arange(T) / fps).astype(np.float32)[:, None])
    samplers = [{'input': times, 'output': buf.add(morph_weights.astype(np.float32).reshape(-1, 1)),
                 'interpolation': 'LINEAR'}]
    channels = [{'sampler': 0, 'target': {'node': 0, 'path': 'weights'}}]
    for j in range(N_JOINTS):
        for prop, values in (('rotation', quats[:, j]), ('translation', translations[:, j])):
            channels.append({'sampler': len(samplers), 'target': {'node': 1 + j, 'path': prop}})
            samplers.append({'input': times, 'output': buf.add(values.astype(np.float32)), 'interpolation': 'LINEAR'})

    names = [f'expression_{k:02d}' for k in range(flame.n_expr)] + [
        f'{JOINT_NAMES[j]}_R{r}{c}' for j in range(1, N_JOINTS) for r in range(3) for c in range(3)]
    nodes = [{'name': 'head', 'mesh': 0, 'skin': 0}] + [
        {'name': JOINT_NAMES[j], 'translation': (bind[j] - parent_bind[j]).tolist()} for j in range(N_JOINTS)]
    for j, p in enumerate(flame.parents[1:], 1):
        nodes[1 + p].setdefault('children', []).append(1 + j)
    gltf = {
        'asset': {'version': '2.0', 'generator': 'flame.py save_glb'},
        'scene': 0, 'scenes': [{'nodes': [0, 1]}], 'nodes': nodes,
        'meshes': [{'name': 'head', 'primitives': [{'attributes': attributes, 'indices': indices, 'targets': morph,
                                                    'mode': 4}],
                    'weights': ((0 - lo) / span).tolist(),                   # every coefficient 0: the neutral head
                    'extras': {'targetNames': names, 'coefficientLow': lo.tolist(), 'coefficientSpan': span.tolist()}}],
        'skins': [{'name': 'flame', 'joints': list(range(1, 1 + N_JOINTS)), 'skeleton': 1,
                   'inverseBindMatrices': skin_matrices}],
        'animations': [{'name': 'take', 'samplers': samplers, 'channels': channels}],
        'buffers': [{'byteLength': buf.length}], 'bufferViews': buf.views, 'accessors': buf.accessors,
    }
    text = json.dumps(gltf, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 4)                                           # JSON chunk padded with spaces
    file.write(GLB_MAGIC + struct.pack('<II', GLB_VERSION, 12 + 8 + len(text) + 8 + buf.length))
    file.write(struct.pack('<I', len(text)) + GLB_JSON + text + struct.pack('<I', buf.length) + GLB_BIN)
    file.writelines(buf.chunks)                                               # not joined: one copy fewer


def glb_morphs(flame, shape, expression, rotvec):
    """The take's morph targets: base mesh (V, 3), targets (K, V, 3), weights (T, K) in [0, 1], and lo, span (K,).

    Weights stay in [0, 1] (Blender's slider range): coefficient k, over the take in [lo_k, hi_k] (widened to
    hold 0), is target span_k·d_k with weight (c_k - lo_k) / span_k, and lo_k·d_k is folded into the base mesh.
    mesh.extras keeps lo and span (c_k = lo_k + span_k·weight_k); the default weights -lo/span give the neutral head.
    """
    T, V = len(expression), flame.template.shape[0] // 3
    rot = rodrigues(torch.from_numpy(rotvec)).numpy()                         # (T, 5, 3, 3) FLAME's own matrices
    coeffs = np.concatenate([expression, (rot[:, 1:] - np.eye(3)).reshape(T, N_POSE_FEATURES)], 1)  # (T, K)
    lo, hi = np.minimum(coeffs.min(0), 0), np.maximum(coeffs.max(0), 0)
    span = np.where(hi > lo, hi - lo, 1.0)                                    # always 0: keeps its unit target
    morph_weights = np.clip((coeffs - lo) / span, 0, 1)                       # (T, K)
    dirs = _numpy(flame.blend_dirs).astype(np.float64)                        # (n_shape + K, 3·V), coordinate-major
    neutral = _numpy(flame.template).astype(np.float64) + shape @ dirs[:flame.n_shape]
    vertices = lambda flat: flat.reshape(-1, 3, V).swapaxes(1, 2).astype(np.float32)   # (..., 3·V) -> (..., V, 3)
    base = vertices(neutral + lo @ dirs[flame.n_shape:])[0]                   # (V, 3)
    targets = vertices(span[:, None] * dirs[flame.n_shape:])                  # (K, V, 3)
    return base, targets, morph_weights, lo, span


def glb_joints(flame, shape, expression, rotvec):
    """The skeleton: bind positions (5, 3), their parents' (5, 3), and per frame each joint's local rotation
    quaternion (T, 5, 4) and translation (T, 5, 3). Joints move with the expression while the inverse bind
    matrices stay at the neutral head's joints b_j: glTF's global_j·IBM_j equals FLAME's G_j·translate(-J_j) when
    node j has rotation R_j and translation J_j - b_parent + R_j·(b_j - J_j) (b_parent = 0 for the root).
    """
    T = len(expression)
    joint_dirs = _numpy(flame.joint_dirs).astype(np.float64)
    bind = (_numpy(flame.joint_template).astype(np.float64) + shape @ joint_dirs[:flame.n_shape]).reshape(N_JOINTS, 3)
    joints = bind + (expression @ joint_dirs[flame.n_shape:]).reshape(T, N_JOINTS, 3)             # (T, 5, 3)
    quats = _quaternions(rotvec)                                              # (T, 5, 4)
    # Keep each joint's quaternions on one hemisphere, so players that interpolate without the shortest-path
    # test still turn the short way between keys.
    flips = np.where((quats[1:] * quats[:-1]).sum(-1, keepdims=True) < 0, -1.0, 1.0)          # (T-1, 5, 1)
    quats *= np.concatenate([np.ones((1, N_JOINTS, 1)), np.cumprod(flips, 0)])
    parent_bind = np.stack([bind[p] if p >= 0 else np.zeros(3) for p in flame.parents])        # (5, 3)
    translations = joints - parent_bind + np.einsum('tjab,tjb->tja', _quaternion_matrices(quats), bind - joints)
    return bind, parent_bind, quats, translations
