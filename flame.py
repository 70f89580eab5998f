"""FLAME head model: loaders, a procedural stand-in head, and fast batched linear blend skinning.

Holds `Flame` (an nn.Module mapping shape / expression / joint rotations to mesh vertices in metres),
the chumpy-free reader of the official model files (`DataUnpickler`, `load_data_pickle`, `load_npy_object`:
every pickle-based file read as data only, one that names code refused), the procedural head used when no
FLAME file is available, the 59-d motion helper (`split_motion`), mesh exports (`save_obj`, one frame,
and `save_glb`: a take as an animated, skinned glTF 2.0 file with its song beside it),
the forward over a vertex subset (`Flame.region`) and with the head pose zeroed (`from_motion(...,
zero_head_pose=True)`, skinned in closed form by `jaw_only_forward`: the meshes of the face metrics and the loss),
and what a checkpoint records about its head (`flame_record`: the file and its sha256) with the check that a
later run uses the same one (`resolve_flame`). Depends on torch and numpy only; imports nothing else of the
project.

Use alone:
    flame = Flame.procedural()                         # or Flame.load('FLAME2020/generic_model.pkl')
    verts = flame.from_motion(torch.zeros(100), torch.zeros(240, MOTION_DIM))   # (240, V, 3)
    save_obj('frame0.obj', verts[0], flame.faces)
    save_glb('take.glb', flame, torch.zeros(100), torch.zeros(240, MOTION_DIM))    # plays in Blender, three.js
"""
import copy
import hashlib
import json
import math
import os
import pickle
import struct
import wave
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
JAW_JOINT = JOINT_NAMES.index('jaw')
MOTION_DIM = N_EXPR + 9           # [expression 50 | global 3 | neck 3 | jaw 3]
EXPRESSION = slice(0, N_EXPR)     # motion columns: expression coefficients
HEAD_POSE = slice(N_EXPR, N_EXPR + 6)       # global + neck rotation (axis-angle)
JAW_POSE = slice(N_EXPR + 6, MOTION_DIM)    # jaw rotation
MM_PER_M = 1000.0                 # vertices are in metres; losses and metrics read millimetres
MOUTH_LANDMARKS = slice(48, 68)   # iBUG-68's mouth among the 68 landmarks: outer and inner lip contours
BROW_LANDMARKS = slice(17, 27)    # iBUG-68's eyebrows, right then left
EYE_LANDMARKS = slice(36, 48)     # iBUG-68's eye contours, right then left
FLAME_SHAPE_COLUMNS = 300         # official shapedirs: 300 shape columns, then the expression columns
N_POSE_FEATURES = 9 * (N_JOINTS - 1)
FLAME_KEYS = ('v_template', 'shapedirs', 'posedirs', 'J_regressor', 'weights', 'kintree_table', 'f')
RODRIGUES_OFFSET = 1e-8           # smplx adds this to the rotation vector before its norm; kept for equal numbers


# ----------------------------------------------------------------------------------------------
# Reading pickles as data: model files without chumpy, and nothing that runs code
#
# Unpickling calls whatever callable a file names, so a pickle from elsewhere could run any program.
# DataUnpickler resolves only the exact (module, name) pairs below, all of which build data whatever their
# arguments: arrays, dtypes and numpy scalars (numpy >= 2 and the numpy.core spellings of older files), sets,
# complex numbers, the latin-1 bytes of protocol-2 pickles, and inert stand-ins for the chumpy and scipy-sparse
# objects of FLAME 2020 (nothing of chumpy or scipy is imported). Any other name is refused before it is loaded.

class _ChumpyArray:
    """Stand-in for a chumpy object inside a FLAME 2020 pickle: keeps only its value, state['x']."""

    def __setstate__(self, state):
        self.x = state.get('x') if isinstance(state, dict) else None


class _CompressedSparse:
    """Stand-in for a scipy csc/csr matrix inside a pickle, so reading needs no scipy."""
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


class _CscStandIn(_CompressedSparse):
    column_major = True


class _CsrStandIn(_CompressedSparse):
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
    for module in ('scipy.sparse', 'scipy.sparse.csc', 'scipy.sparse._csc', 'scipy.sparse.csr', 'scipy.sparse._csr'):
        table.update({(module, 'csc_matrix'): _CscStandIn, (module, 'csc_array'): _CscStandIn,
                      (module, 'csr_matrix'): _CsrStandIn, (module, 'csr_array'): _CsrStandIn})
    return table


def _plain_dtype(dtype):
    """Whether a dtype is one numpy itself makes from its type string: no record fields, no sub-array, and the
    itemsize, alignment and flags of that type (a pickled __setstate__ can set them to values that make arrays
    of Python objects read raw memory as pointers)."""
    made = np.dtype(dtype.str)
    return (dtype.names is None and dtype.subdtype is None and dtype == made and dtype.itemsize == made.itemsize
            and dtype.alignment == made.alignment and dtype.flags == made.flags)


class DataUnpickler(pickle._Unpickler):
    """
    Unpickler for files from elsewhere: builds data only (see above) and refuses any other class or function,
    naming it, before it is loaded. Every chumpy class becomes the inert _ChumpyArray (chumpy is never imported).
    The pure-Python unpickler, because its BUILD step (an object's __setstate__) must be vetted too: only arrays,
    dtypes and the stand-ins take a state, and a dtype must come out plain.
    """
    GLOBALS = _data_globals()
    BUILDABLE = (np.ndarray, np.dtype, _ChumpyArray, _CompressedSparse)

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
    """
    The object of a pickle file read with DataUnpickler (Python 2 strings as latin-1); `file` an open binary
    file positioned at the pickle (default: path opened). Refusals and unreadable bytes -> one-line ValueError
    naming path.
    """
    try:
        if file is not None:
            return DataUnpickler(file, encoding='latin1').load()
        with open(path, 'rb') as fh:
            return DataUnpickler(fh, encoding='latin1').load()
    except pickle.UnpicklingError as error:
        if str(error).startswith('refused'):
            raise ValueError(f"{path}: {error}") from None
        raise ValueError(f"{path}: not a readable pickle ({error})") from None
    except Exception as error:
        raise ValueError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None


def load_npy_object(path):
    """
    The object inside a .npy file of a pickled object (np.save of a dict, e.g. DECA's landmark_embedding.npy),
    read with DataUnpickler: the header is parsed here rather than by np.load(allow_pickle=True).
    """
    with open(path, 'rb') as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version}, not 1.0 or 2.0")
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(fh)
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
    """
    dict of the arrays of an .npz file, as data only (no pickled objects). A damaged file is refused with a
    ValueError naming it: not a zip, a bad checksum, a bad array header, or a header that claims more values
    than its member holds, which is checked before anything is allocated.
    """
    try:
        with zipfile.ZipFile(path) as z:
            data = {}
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = header(f)
                    if dtype.hasobject:
                        raise ValueError(f"array {info.filename} holds Python objects")
                    if math.prod(shape) * dtype.itemsize > info.file_size:
                        raise ValueError(f"array {info.filename} claims {math.prod(shape)} values of {dtype} but "
                                         f"holds {info.file_size} bytes")
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
    """(faces (L,), barycentric (L,3)) from DECA's landmark_embedding.npy (68) or
    flame_static_embedding.pkl (51, iBUG points 17..67, no jaw contour); None when neither exists."""
    for name, read, faces_key, bary_key in (
            ('landmark_embedding.npy', load_npy_object, 'full_lmk_faces_idx', 'full_lmk_bary_coords'),
            ('flame_static_embedding.pkl', load_data_pickle, 'lmk_face_idx', 'lmk_b_coords')):
        path = folder / name
        if path.exists():
            emb = read(path)
            if not isinstance(emb, dict) or faces_key not in emb or bary_key not in emb:
                raise ValueError(f"{path}: missing keys {faces_key} / {bary_key}")
            return np.asarray(emb[faces_key]).reshape(-1), np.asarray(emb[bary_key]).reshape(-1, 3)
    return None


def _read_masks(folder):
    """dict region -> vertex ids from FLAME_masks.pkl, with 'upper_face' = forehead ∪ eye_region; None if absent."""
    path = folder / 'FLAME_masks.pkl'
    if not path.exists():
        return None
    masks = load_data_pickle(path)
    if not isinstance(masks, dict):
        raise ValueError(f"{path}: expected a dict of vertex id arrays, found {type(masks).__name__}")
    masks = {k: _dense(v, path, k).astype(np.int64).reshape(-1) for k, v in masks.items()}
    if 'forehead' in masks and 'eye_region' in masks:
        masks['upper_face'] = np.union1d(masks['forehead'], masks['eye_region'])
    return masks


# ----------------------------------------------------------------------------------------------
# The model

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
    """FLAME-structured head: blendshapes, pose correctives and 5-joint linear blend skinning.

    Buffers keep the arrays in matmul-ready layouts: every blendshape basis is a (K, 3·V) matrix whose
    columns run coordinate-major (all x, then all y, then all z), so blendshapes are one matmul and the
    skinning works on contiguous (frames, 3, V) slabs.
    """

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
        if posedirs.shape != (V, 3, N_POSE_FEATURES) or J_regressor.shape != (N_JOINTS, V) or weights.shape != (V, N_JOINTS):
            raise ValueError(f"{source}: expected posedirs ({V}, 3, 36), J_regressor (5, {V}), weights ({V}, 5); "
                             f"found {posedirs.shape}, {J_regressor.shape}, {weights.shape}")
        parents = [int(p) for p in np.asarray(arrays['kintree_table'])[0].astype(np.int64)]
        parents[0] = -1
        if len(parents) != N_JOINTS or any(not 0 <= p < i for i, p in enumerate(parents) if i):
            raise ValueError(f"{source}: kintree_table must list 5 joints, each after its parent; found {parents}")
        self.n_shape, self.n_expr, self.parents, self.source = n_shape, n_expr, parents, str(source)
        self.sha256 = None                # the model file's sha256 when read from one (load)

        def basis(dirs):  # (V, 3, K) -> (K, 3·V)
            return np.ascontiguousarray(dirs.transpose(2, 1, 0).reshape(dirs.shape[2], 3 * V))

        shape_dirs = shapedirs[:, :, :n_shape]
        expr_dirs = shapedirs[:, :, shape_columns:shape_columns + n_expr]
        # Joints are linear in the blendshape coefficients, so they get their own small bases.
        joint_basis = lambda dirs: np.einsum('jv,vck->kjc', J_regressor, dirs).reshape(dirs.shape[2], 3 * N_JOINTS)
        buffers = {
            'template': v_template.T.reshape(3 * V),                              # (3·V,)
            'blend_dirs': np.concatenate([basis(shape_dirs), basis(expr_dirs), basis(posedirs)]),  # (n_shape + n_expr + 36, 3·V)
            'joint_template': (J_regressor @ v_template).reshape(3 * N_JOINTS),   # (15,)
            'joint_dirs': np.concatenate([joint_basis(shape_dirs), joint_basis(expr_dirs)]),       # (n_shape + n_expr, 15)
            'weights_t': np.ascontiguousarray(weights.T),                         # (5, V)
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=dtype))
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

    @classmethod
    def procedural(cls, seed=0, dtype=torch.float32):
        """The procedural stand-in head (see procedural_head)."""
        head = procedural_head(seed)
        return cls(head, N_SHAPE, N_EXPR, N_SHAPE, (head['lmk_faces_idx'], head['lmk_bary_coords']),
                   head['masks'], f'procedural head (seed {seed})', dtype)

    def region(self, ids):
        """The same model on the vertices `ids` only: forward gives (..., len(ids), 3), equal to the whole
        head's [..., ids, :], at a fraction of the cost (a loss or a metric on one region of every frame). Joints
        still come from the whole head; faces, landmarks and masks are dropped, as they index the whole head.
        from_motion(..., zero_head_pose=True) is fastest when the vertices the jaw moves lead (jaw_first)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.template.device)
        V = self.template.shape[0] // 3
        cols = torch.cat([ids, ids + V, ids + 2 * V])                           # coordinate-major (3·U,)
        sub = copy.copy(self)
        sub._buffers = dict(template=self.template[cols], blend_dirs=self.blend_dirs[:, cols].contiguous(),
                            joint_template=self.joint_template, joint_dirs=self.joint_dirs,
                            weights_t=self.weights_t[:, ids].contiguous())
        sub.mask_names, sub.source = None, f"{self.source}, {len(ids)} vertices"
        return sub

    def jaw_first(self, ids):
        """ids (U,) reordered: the vertices the jaw moves first, each group in its given order. A region in this
        order skins a head-pose-free forward on one contiguous slab."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.weights_t.device)
        moved = self._jaw_share()[ids] > 0
        return torch.cat([ids[moved], ids[~moved]])

    def _jaw_share(self):
        """(V,) each vertex's skinning weight on the jaw and the joints below it: what turns with the jaw."""
        below = [JAW_JOINT]
        for j in range(JAW_JOINT + 1, N_JOINTS):
            if self.parents[j] in below:
                below.append(j)
        return self.weights_t[below].sum(0)

    @property
    def masks(self):
        """dict region name -> LongTensor of vertex ids."""
        if self.mask_names is None:
            raise ValueError(f"{self.source}: no FLAME_masks.pkl beside the model, so no region masks")
        return {name: getattr(self, f'mask_{name}') for name in self.mask_names}

    def forward(self, shape, expression, global_pose, neck_pose, jaw_pose):
        """Vertices (..., V, 3) in metres; the leading dims of all inputs broadcast together. The eyes stay still
        (the 59-d motion has no eye pose)."""
        ref = self.template
        shape, expression, global_pose, neck_pose, jaw_pose = (
            t.to(ref) for t in (shape, expression, global_pose, neck_pose, jaw_pose))
        eye_pose = torch.zeros_like(jaw_pose).repeat_interleave(2, -1)          # left and right eye, (..., 6)
        if shape.shape[-1] != self.n_shape or expression.shape[-1] != self.n_expr:
            raise ValueError(f"{self.source}: expects shape (..., {self.n_shape}) and expression (..., {self.n_expr}); "
                             f"got {tuple(shape.shape)} and {tuple(expression.shape)}")
        poses = (global_pose, neck_pose, jaw_pose, eye_pose)
        full = torch.broadcast_shapes(shape.shape[:-1], expression.shape[:-1], *(p.shape[:-1] for p in poses))
        N, V = math.prod(full), self.template.shape[0] // 3

        pose = torch.cat([p.expand(full + p.shape[-1:]) for p in poses], -1).reshape(N, N_JOINTS, 3)
        rot = rodrigues(pose)                                                     # (N, 5, 3, 3)
        eye = torch.eye(3, dtype=ref.dtype, device=ref.device)
        pose_feature = (rot[:, 1:] - eye).reshape(N, N_POSE_FEATURES)             # (N, 36)
        shape_full = shape.expand(full + shape.shape[-1:]).reshape(N, self.n_shape)
        expr = expression.expand(full + expression.shape[-1:]).reshape(N, self.n_expr)
        coeffs = torch.cat([shape_full, expr, pose_feature], 1)                   # (N, n_shape + n_expr + 36)
        if math.prod(shape.shape[:-1]) == 1:  # one head for every frame: its shape enters as the GEMM's bias
            head = torch.addmm(self.template, shape.reshape(1, self.n_shape), self.blend_dirs[:self.n_shape])
            v_posed = torch.addmm(head, coeffs[:, self.n_shape:], self.blend_dirs[self.n_shape:])
        else:
            v_posed = torch.addmm(self.template, coeffs, self.blend_dirs)         # (N, 3·V)
        v_posed = v_posed.view(N, 3, V)
        joints = torch.addmm(self.joint_template, coeffs[:, :self.n_shape + self.n_expr], self.joint_dirs)
        joints = joints.view(N, N_JOINTS, 3)

        # Kinematic chain: world rotation and joint position per joint.
        world_rot, world_pos = [rot[:, 0]], [joints[:, 0]]
        for j in range(1, N_JOINTS):
            p = self.parents[j]
            world_rot.append(world_rot[p] @ rot[:, j])
            world_pos.append((world_rot[p] @ (joints[:, j] - joints[:, p])[..., None])[..., 0] + world_pos[p])
        world_rot = torch.stack(world_rot, 1)                                     # (N, 5, 3, 3)
        offset = torch.stack(world_pos, 1) - (world_rot @ joints[..., None])[..., 0]  # (N, 5, 3): moves rest joints
        rigid = torch.cat([world_rot, offset[..., None]], -1)                     # (N, 5, 3, 4)

        # Skinning, column by column of the (3, 4) rigid transforms: blending one column over the 5 joints is
        # an (N·3, 5) @ (5, V) matmul; per column the intermediate stays (N, 3, V), like the output, which
        # keeps allocations small (a single (N, 12, V) blend would be 4x larger and page-fault on every call).
        columns = rigid.permute(3, 0, 2, 1).reshape(4, N * 3, N_JOINTS)          # (4, N·3, 5)
        verts = (columns[3] @ self.weights_t).view(N, 3, V)                       # blended translations
        for k in range(3):
            verts.addcmul_((columns[k] @ self.weights_t).view(N, 3, V), v_posed[:, None, k])
        return verts.transpose(1, 2).reshape(full + (V, 3))

    def from_motion(self, shape, motion, zero_head_pose=False):
        """Vertices (..., V, 3) of 59-d motion (..., 59); shape's leading dims are a prefix of motion's
        (shape (B, 100) with motion (B, T, 59) gives (B, T, V, 3)). zero_head_pose zeroes global and neck: the
        meshes the face metrics and the head-pose-free mesh loss read, skinned by jaw_only_forward."""
        expression, global_pose, neck_pose, jaw_pose = split_motion(motion, self.n_expr)
        extra = motion.dim() - shape.dim()
        shape = shape.reshape(shape.shape[:-1] + (1,) * max(extra, 0) + shape.shape[-1:])
        if zero_head_pose:
            return self.jaw_only_forward(shape, expression, jaw_pose)
        return self(shape, expression, global_pose, neck_pose, jaw_pose)

    def jaw_only_forward(self, shape, expression, jaw_pose):
        """forward with global, neck and eye rotations zero: vertices (..., V, 3), a view of a (..., 3, V) array.

        Every joint but the jaw then keeps the identity transform, so the skinning reduces to
        v = v_posed + w_jaw (R_jaw - I)(v_posed - J_jaw) (the weights sum to 1 at every vertex; w_jaw counts the
        joints below the jaw too), where v_posed needs only the shape, expression and the jaw's 9 pose-corrective
        rows of the bases. Only the vertices the jaw moves are turned: one contiguous slab when they lead (a
        region in jaw_first order), else gathered. Equal to forward to float rounding and about twice as fast on
        the metrics' region (1 808 vertices: 0.22-0.24 s against 0.37-0.47 s for 2 400 frames on one thread).
        """
        ref = self.template
        shape, expression, jaw_pose = (t.to(ref) for t in (shape, expression, jaw_pose))
        if shape.shape[-1] != self.n_shape or expression.shape[-1] != self.n_expr:
            raise ValueError(f"{self.source}: expects shape (..., {self.n_shape}) and expression (..., {self.n_expr}); "
                             f"got {tuple(shape.shape)} and {tuple(expression.shape)}")
        full = torch.broadcast_shapes(shape.shape[:-1], expression.shape[:-1], jaw_pose.shape[:-1])
        N, V, n_shape, n_expr = math.prod(full), ref.shape[0] // 3, self.n_shape, self.n_expr
        expr = expression.expand(full + (n_expr,)).reshape(N, n_expr)
        rot = rodrigues(jaw_pose.expand(full + (3,)).reshape(N, 3))                 # (N, 3, 3)
        turn = rot - torch.eye(3, dtype=ref.dtype, device=ref.device)                # R_jaw - I: the jaw's pose feature
        # expression, then the pose features up to the jaw's (those of the joints before it are zero): the
        # leading rows of the bases after the shape's, one GEMM
        feats = torch.cat([expr, expr.new_zeros(N, 9 * (JAW_JOINT - 1)), turn.reshape(N, 9)], 1)  # (N, n_expr + 9·j)
        rows, jaw_cols = slice(n_shape, n_shape + feats.shape[1]), slice(3 * JAW_JOINT, 3 * JAW_JOINT + 3)
        if math.prod(shape.shape[:-1]) == 1:  # one head for every frame: its shape enters as the GEMM's bias
            head = torch.addmv(ref, self.blend_dirs[:n_shape].T, shape.reshape(n_shape))    # (3·V,)
            joint = torch.addmv(self.joint_template[jaw_cols], self.joint_dirs[:n_shape, jaw_cols].T,
                                shape.reshape(n_shape))                                    # (3,)
        else:
            head = shape.expand(full + (n_shape,)).reshape(N, n_shape)
            joint = torch.addmm(self.joint_template[jaw_cols], head, self.joint_dirs[:n_shape, jaw_cols])  # (N, 3)
            head = head @ self.blend_dirs[:n_shape] + ref                                  # (N, 3·V)
        v_posed = torch.addmm(head, feats, self.blend_dirs[rows]).view(N, 3, V)
        joint = (joint + expr @ self.joint_dirs[n_shape:, jaw_cols])[:, :, None]    # (N, 3, 1) J_jaw
        share = self._jaw_share()                                                   # (V,)
        moved = share.nonzero()[:, 0]
        if len(moved) and moved[-1] == len(moved) - 1:                              # the moved vertices lead
            part = v_posed[:, :, :len(moved)]                                       # (N, 3, U) view
            part.add_(torch.bmm(turn, part - joint).mul_(share[:len(moved)]))
        else:
            part = v_posed.index_select(2, moved)
            v_posed = v_posed.index_add(2, moved, torch.bmm(turn, part - joint).mul_(share[moved]))
        return v_posed.view(full + (3, V)).transpose(-1, -2)

    def landmarks(self, verts):
        """68 landmarks (..., 68, 3) of vertices (..., V, 3) (51 with only flame_static_embedding.pkl)."""
        if not hasattr(self, 'lmk_bary'):
            raise ValueError(f"{self.source}: no landmark_embedding.npy or flame_static_embedding.pkl beside the model")
        corners = verts[..., self.lmk_vertex_ids, :]                              # (..., L, 3, 3)
        return (corners * self.lmk_bary.to(verts.dtype)[..., None]).sum(-2)


# ----------------------------------------------------------------------------------------------
# Which head a checkpoint was trained with

PROCEDURAL = 'procedural'         # what a checkpoint records when it was trained on the procedural head
FLAME_SOURCE = 'FLAME 2020 generic_model.pkl from flame.is.tue.mpg.de'


def file_sha256(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes: identifies a FLAME file wherever it was copied."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def flame_record(path=None):
    """What a checkpoint keeps about its head: {'flame': the file's path or 'procedural', 'flame_sha256': hex or None}."""
    if path is None:
        return dict(flame=PROCEDURAL, flame_sha256=None)
    return dict(flame=str(path), flame_sha256=file_sha256(path))


def resolve_flame(record, given, owner):
    """The FLAME file (or None: the procedural head) to use with a checkpoint `owner` trained with `record`
    (flame_record's dict): `given` when it is that very file (same sha256), else the recorded file. Refuses in
    one line a different file, a FLAME file for a procedural-head checkpoint, and a recorded file that is gone."""
    trained, digest = record.get('flame') or PROCEDURAL, record.get('flame_sha256')
    if trained == PROCEDURAL:
        if given is not None:
            raise ValueError(f"{given}: {owner} was trained on the procedural stand-in head, not on a FLAME file; "
                             f"drop --flame or use a checkpoint trained with this file")
        return None
    path = Path(given if given is not None else trained)
    if not path.is_file():
        raise ValueError(f"{path}: {owner} was trained with this FLAME file (sha256 {digest}), which is not there; "
                         f"pass the same file with --flame")
    if digest is not None and file_sha256(path) != digest:
        raise ValueError(f"{path}: not the FLAME file {owner} was trained with ({trained}, sha256 {digest}); "
                         f"pass that file with --flame")
    return path


def split_motion(m, n_expr=N_EXPR):
    """59-d motion (..., 59) -> expression (..., 50), global (..., 3), neck (..., 3), jaw (..., 3)."""
    if m.shape[-1] != n_expr + 9:
        raise ValueError(f"motion: expected last dim {n_expr + 9}, got {tuple(m.shape)}")
    return m[..., :n_expr], m[..., n_expr:n_expr + 3], m[..., n_expr + 3:n_expr + 6], m[..., n_expr + 6:n_expr + 9]


# ----------------------------------------------------------------------------------------------
# Exports

def _numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def save_obj(path, verts, faces):
    """Wavefront OBJ of one mesh: verts (V, 3) metres, faces (F, 3) 0-based (written 1-based)."""
    verts, faces = _numpy(verts), _numpy(faces)

    def write(tmp):
        with open(tmp, 'w') as fh:
            np.savetxt(fh, verts.reshape(-1, 3), fmt='v %.6f %.6f %.6f')
            np.savetxt(fh, faces.reshape(-1, 3).astype(np.int64) + 1, fmt='f %d %d %d')
    _write_atomic(path, write)


# ----------------------------------------------------------------------------------------------
# glTF 2.0 export: one take as a .glb that glTF players (Blender, three.js, game engines) play back exactly

GLTF_FLOAT, GLTF_UNSIGNED_BYTE, GLTF_UNSIGNED_INT = 5126, 5121, 5125   # accessor componentType codes
GLTF_ARRAY_BUFFER, GLTF_ELEMENT_ARRAY_BUFFER = 34962, 34963           # bufferView targets (vertex data, indices)
GLTF_TYPES = {1: 'SCALAR', 3: 'VEC3', 4: 'VEC4', 16: 'MAT4'}          # accessor type by component count
GLB_MAGIC, GLB_VERSION, GLB_JSON, GLB_BIN = b'glTF', 2, b'JSON', b'BIN\0'
INFLUENCES_PER_SET = 4            # joints per JOINTS_n / WEIGHTS_n attribute pair
WAV_FULL_SCALE = 32768            # 16-bit PCM: readers divide by 2^15


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
    """FLAME's skinning weights (V, 5) -> joint ids and weights (V, 4·n) for n JOINTS_n / WEIGHTS_n pairs, each
    vertex's influences largest first; n covers the vertex with the most non-zero weights (unused slots: joint 0,
    weight 0, as the specification asks)."""
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
        """One accessor over its own bufferView; array (count, components) of float32, uint8 or uint32.
        min / max are written for every accessor (POSITION and animation inputs must have them)."""
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


def _write_atomic(path, write):
    """write(tmp_path), then rename over path: a crash or a full disk leaves no half-written file and the previous
    one intact; a failed write raises OSError naming path. The temporary name keeps the suffix, for writers
    that go by it (np.savez adds .npz otherwise)."""
    path = Path(path)
    tmp = path.with_name(f'.{path.stem}.{os.getpid()}.tmp{path.suffix}')
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


WAV_BLOCK = 1 << 20          # samples converted and written at a time


def _write_wav(path, audio, sample_rate):
    """Mono float audio in [-1, 1] as a 16-bit PCM wav (the standard library's wave module). audio: an array (N,)
    or anything with len() and audio[a:b] (a sound file read a stretch at a time), written WAV_BLOCK samples at
    a time, so that a long song is never held whole."""
    def write(tmp):
        with wave.open(str(tmp), 'wb') as fh:
            fh.setnchannels(1), fh.setsampwidth(2), fh.setframerate(int(sample_rate))
            for a in range(0, len(audio), WAV_BLOCK):
                block = np.asarray(audio[a:a + WAV_BLOCK], dtype=np.float64).reshape(-1)
                fh.writeframes(np.clip(np.round(block * WAV_FULL_SCALE), -WAV_FULL_SCALE,
                                       WAV_FULL_SCALE - 1).astype('<i2').tobytes())
    _write_atomic(path, write)


def save_glb(path, flame, shape, motion, fps=30, audio=None, sample_rate=16000):
    """One take as a binary glTF 2.0 file that plays back FLAME's own vertices; audio at sample_rate (an array
    (N,) or a sound read a stretch at a time, as _write_wav takes it), when given, goes to a .wav of the same
    name beside it. Returns the path.

    shape (n_shape,) is baked into the mesh; motion (T, 59) is [expression | global | neck | jaw] per frame.
    Inside: the person's neutral head; the expression blendshapes and the 36 pose correctives (features (R - I)
    of neck, jaw and eyes) as morph targets; FLAME's 5 joints as a skin with FLAME's weights; one animation
    with a key per frame for the morph weights and each joint's rotation and translation.

    Every morph weight stays in [0, 1] (Blender keeps shape keys inside their slider range): coefficient k,
    seen over the take in [lo_k, hi_k] (widened to hold 0), is stored as target span_k·d_k with weight
    (c_k - lo_k) / span_k, span_k = hi_k - lo_k, and lo_k·d_k is folded into the base mesh. mesh.extras keeps
    lo and span, so c_k = lo_k + span_k·weight_k. With weights -lo/span (the mesh's defaults) the file shows
    the neutral head at rest.

    The joints move with the expression (FLAME regresses them from the expression-blended mesh) while the
    inverse bind matrices are fixed at the neutral head's joints b_j. glTF's joint matrix global_j·IBM_j
    equals FLAME's transform G_j·translate(-J_j) when node j's local transform is rotation R_j with translation
    J_j - b_parent + R_j·(b_j - J_j) (b_parent = 0 for the root), so that is the animated translation.
    """
    path = Path(path)
    shape = _numpy(shape).astype(np.float64).reshape(-1)
    motion = _numpy(motion).astype(np.float64)
    if shape.shape != (flame.n_shape,) or motion.ndim != 2 or len(motion) == 0 or motion.shape[1] != flame.n_expr + 9:
        raise ValueError(f"{path}: expected shape ({flame.n_shape},) and motion (frames, {flame.n_expr + 9}); "
                         f"got {shape.shape} and {motion.shape}")
    if not (np.isfinite(shape).all() and np.isfinite(motion).all()):
        raise ValueError(f"{path}: shape and motion must be finite numbers")
    T, V = len(motion), flame.template.shape[0] // 3
    buffer = lambda name: getattr(flame, name).detach().cpu().double().numpy()
    expression, global_pose, neck_pose, jaw_pose = split_motion(motion, flame.n_expr)
    eyes = np.zeros_like(jaw_pose)                                            # the 59-d motion keeps the eyes still
    rotvec = np.stack([global_pose, neck_pose, jaw_pose, eyes, eyes], 1)      # (T, 5, 3)

    # Morph targets: expression and pose-corrective coefficients, each mapped onto [0, 1] over the take.
    rot = rodrigues(torch.from_numpy(rotvec)).numpy()                         # (T, 5, 3, 3) FLAME's own matrices
    coeffs = np.concatenate([expression, (rot[:, 1:] - np.eye(3)).reshape(T, N_POSE_FEATURES)], 1)  # (T, K)
    lo, hi = np.minimum(coeffs.min(0), 0), np.maximum(coeffs.max(0), 0)
    span = np.where(hi > lo, hi - lo, 1.0)                                    # always 0: keeps its unit target
    morph_weights = np.clip((coeffs - lo) / span, 0, 1)                       # (T, K)
    dirs = buffer('blend_dirs')                                               # (n_shape + K, 3·V), coordinate-major
    neutral = buffer('template') + shape @ dirs[:flame.n_shape]
    vertices = lambda flat: flat.reshape(-1, 3, V).swapaxes(1, 2).astype(np.float32)   # (..., 3·V) -> (..., V, 3)
    base = vertices(neutral + lo @ dirs[flame.n_shape:])[0]                   # (V, 3)
    targets = vertices(span[:, None] * dirs[flame.n_shape:])                  # (K, V, 3)

    # Joints: bind pose at the neutral head, and per frame the local rotation and translation.
    joint_dirs = buffer('joint_dirs')
    bind = (buffer('joint_template') + shape @ joint_dirs[:flame.n_shape]).reshape(N_JOINTS, 3)
    joints = bind + (expression @ joint_dirs[flame.n_shape:]).reshape(T, N_JOINTS, 3)             # (T, 5, 3)
    quats = _quaternions(rotvec)                                              # (T, 5, 4)
    # Keep each joint's quaternions on one hemisphere, so players that interpolate without the shortest-path
    # test still turn the short way between keys.
    flips = np.where((quats[1:] * quats[:-1]).sum(-1, keepdims=True) < 0, -1.0, 1.0)          # (T-1, 5, 1)
    quats *= np.concatenate([np.ones((1, N_JOINTS, 1)), np.cumprod(flips, 0)])
    parent_bind = np.stack([bind[p] if p >= 0 else np.zeros(3) for p in flame.parents])        # (5, 3)
    translations = joints - parent_bind + np.einsum('tjab,tjb->tja', _quaternion_matrices(quats), bind - joints)

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
    header = GLB_MAGIC + struct.pack('<II', GLB_VERSION, 12 + 8 + len(text) + 8 + buf.length)

    def write(tmp):
        with open(tmp, 'wb') as fh:
            fh.write(header + struct.pack('<I', len(text)) + GLB_JSON + text)
            fh.write(struct.pack('<I', buf.length) + GLB_BIN)
            for chunk in buf.chunks:                                          # not joined: one copy fewer
                fh.write(chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, write)
    if audio is not None:
        _write_wav(path.with_suffix('.wav'), audio, sample_rate)
    return path


# ----------------------------------------------------------------------------------------------
# Procedural stand-in head

# Grid of a deformed UV sphere, polar angle a from +y (0 top, pi bottom), azimuth phi from +z towards +x.
N_RINGS, N_LON = 68, 74
RING_DENSITY, LON_DENSITY = 0.45, 0.5     # how much denser rings/meridians are at the face than elsewhere
FACE_CENTRE_U = 0.55                      # ring parameter where rings are densest (between eyes and mouth)
HEAD_RADII = np.array([0.078, 0.112, 0.098])  # m: half width, half height, half depth of the head ellipsoid
NECK_RADIUS, NECK_Z, NECK_BOTTOM = 0.052, -0.02, -0.185  # m
MOUTH_A = 0.64 * math.pi                  # polar angle of the lips' seam (y ~ -4.3 cm)
MOUTH_HALF_WIDTH = 0.26                   # rad of azimuth (~2.4 cm)
EYE_A, EYE_PHI = 0.385 * math.pi, 0.36    # eye socket centres (y ~ +3.7 cm, x ~ +-3.4 cm)
BROW_A = 0.33 * math.pi
CHIN_A = 0.76 * math.pi
JAW_PIVOT = np.array([0.072, -0.02, 0.0])  # m, right-hand TMJ; mirrored for the left one


def smoothstep(x):
    """0 below 0, 1 above 1, the cubic 3x² - 2x³ between: a soft edge for painted and blended regions."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _bump(a, phi, a0, phi0, sa, sphi):
    """Gaussian on the (polar angle, azimuth) chart; azimuth differences wrap around."""
    dphi = np.angle(np.exp(1j * (phi - phi0)))
    return np.exp(-0.5 * ((a - a0) / sa) ** 2 - 0.5 * (dphi / sphi) ** 2)


def _nose(a, phi):
    """Nose ridge height, 0 at the brow rising to 1 at the tip, falling off sharply below it."""
    profile = smoothstep((a - 0.36 * math.pi) / (0.16 * math.pi)) \
        * np.exp(-0.5 * (np.maximum(a - 0.52 * math.pi, 0) / (0.025 * math.pi)) ** 2)
    return profile * np.exp(-0.5 * (phi / 0.09) ** 2)


def _relief(a, phi):
    """Radial relief (m) of the face features, a function of direction only."""
    relief = 0.022 * _nose(a, phi) + 0.006 * (_bump(a, phi, 0.53 * math.pi, 0.14, 0.03, 0.05) + _bump(a, phi, 0.53 * math.pi, -0.14, 0.03, 0.05))
    for side in (-1, 1):
        relief += -0.010 * _bump(a, phi, EYE_A, side * EYE_PHI, 0.05 * math.pi, 0.14)        # socket
        relief += 0.006 * _bump(a, phi, EYE_A, side * EYE_PHI, 0.022 * math.pi, 0.06)        # eyeball
        relief += 0.005 * _bump(a, phi, BROW_A, side * 0.35, 0.03 * math.pi, 0.25)           # brow ridge
        relief += 0.005 * _bump(a, phi, 0.47 * math.pi, side * 0.7, 0.06 * math.pi, 0.2)     # cheekbone
        relief += 0.012 * _bump(a, phi, 0.45 * math.pi, side * math.pi / 2, 0.06 * math.pi, 0.09)  # ear
    lips = np.cos(np.clip(phi / 0.34, -1, 1) * math.pi / 2) ** 2
    relief += lips * (0.004 * np.exp(-0.5 * ((a - MOUTH_A + 0.05) / 0.04) ** 2)
                      + 0.0045 * np.exp(-0.5 * ((a - MOUTH_A - 0.06) / 0.045) ** 2))
    relief += 0.010 * _bump(a, phi, CHIN_A, 0.0, 0.06 * math.pi, 0.35)
    return relief


def _radius(d):
    """Distance (m) from the origin to the head-plus-neck surface along unit directions d (..., 3)."""
    head = 1 / np.sqrt(((d / HEAD_RADII) ** 2).sum(-1))
    h2 = np.maximum(d[..., 0] ** 2 + d[..., 2] ** 2, 1e-12)
    dz = d[..., 2] * NECK_Z
    side = (dz + np.sqrt(dz ** 2 + h2 * (NECK_RADIUS ** 2 - NECK_Z ** 2))) / h2
    bottom = np.where(d[..., 1] < -1e-6, NECK_BOTTOM / np.minimum(d[..., 1], -1e-6), 1e3)
    neck = (side ** -12 + bottom ** -12) ** (-1 / 12)                  # soft min: side wall or bottom cap
    neck = np.where(d[..., 1] < 0, neck, 0.0)
    return (head ** 10 + neck ** 10) ** 0.1                            # soft max: head united with neck


def _grid():
    """Polar angles (R,) of the rings and azimuths (L,) of the meridians, denser over the face."""
    u = np.arange(1, N_RINGS + 1) / (N_RINGS + 1)
    u = u - RING_DENSITY * (np.sin(2 * math.pi * (u - FACE_CENTRE_U)) + math.sin(2 * math.pi * FACE_CENTRE_U)) / (2 * math.pi)
    x = -1 + 2 * np.arange(N_LON) / N_LON
    return math.pi * u, math.pi * (x - LON_DENSITY * np.sin(math.pi * x) / math.pi)


def _faces(R, L):
    """Triangles of the closed grid: top cap, bands between rings, bottom cap (outward, counter-clockwise)."""
    ring = lambda i, j: 1 + i * L + (j % L)
    j = np.arange(L)
    top = np.stack([np.zeros(L, np.int64), ring(0, j), ring(0, j + 1)], 1)
    bottom = np.stack([np.full(L, 1 + R * L), ring(R - 1, j + 1), ring(R - 1, j)], 1)
    i, j = np.meshgrid(np.arange(R - 1), np.arange(L), indexing='ij')
    a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)
    bands = np.stack([np.stack([a, c, b], -1), np.stack([b, c, d], -1)], 2).reshape(-1, 3)  # quad (i, j) -> 2 triangles
    return np.concatenate([top, bands, bottom]).astype(np.int64)


def vertex_normals(verts, faces):
    """verts (V, 3), faces (F, 3) -> unit vertex normals (V, 3), the area-weighted mean of the faces' normals."""
    n = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    out = np.zeros_like(verts)
    for k in range(3):
        np.add.at(out, faces[:, k], n)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _landmark_chart(a_mouth):
    """iBUG-68 landmarks as (polar angle, azimuth, lip side): side +1 on the upper lip's edge of the
    seam, -1 on the lower lip's, 0 elsewhere. Subject's right (iBUG 0, 36, 48) is -x."""
    pts = []
    t = np.linspace(-1, 1, 17)                                                        # 0-16 jaw contour
    pts += [(0.45 * math.pi + 0.31 * math.pi * (1 - abs(s) ** 1.6), 1.2 * s, 0) for s in t]
    pts += [(BROW_A - 0.02 * math.pi * math.sin(math.pi * k / 4), p, 0)              # 17-26 brows
            for side in (-1, 1) for k, p in enumerate(np.linspace(0.62, 0.14, 5)[::side] * side)]
    pts += [(a, 0.0, 0) for a in np.linspace(0.40, 0.52, 4) * math.pi]                # 27-30 nose ridge
    pts += [(0.545 * math.pi, p, 0) for p in (-0.12, -0.06, 0.0, 0.06, 0.12)]          # 31-35 nostrils
    h, w, m = 0.02 * math.pi, 0.13, 0.045
    for c, outer in ((-EYE_PHI, -1), (EYE_PHI, 1)):                                    # 36-47 eyes, iBUG order
        ring = [(EYE_A, c + outer * w), (EYE_A - h, c + outer * m), (EYE_A - h, c - outer * m),
                (EYE_A, c - outer * w), (EYE_A + h, c - outer * m), (EYE_A + h, c + outer * m)]
        if outer == 1:  # left eye starts at its inner corner
            ring = ring[3:4] + ring[2:3] + ring[1:2] + ring[0:1] + ring[5:6] + ring[4:5]
        pts += [(a, p, 0) for a, p in ring]
    pw = MOUTH_HALF_WIDTH
    pts += [(a_mouth, -pw, 0)] + [(a_mouth - 0.045, p, 0) for p in (-0.17, -0.08, 0, 0.08, 0.17)]   # 48-53
    pts += [(a_mouth, pw, 0)] + [(a_mouth + 0.055, p, 0) for p in (0.17, 0.08, 0, -0.08, -0.17)]    # 54-59
    pts += [(a_mouth, -0.9 * pw, 1)] + [(a_mouth, p, 1) for p in (-0.1, 0, 0.1)]                    # 60-63
    pts += [(a_mouth, 0.9 * pw, 1)] + [(a_mouth, p, -1) for p in (0.1, 0, -0.1)]                    # 64-67
    return pts


def _embed_landmarks(pts, rings_a, lon_phi, L, mouth_ring):
    """Face ids (68,) and barycentric coordinates (68, 3) of chart points on the grid's band triangles."""
    faces, bary = [], []
    for a, phi, side in pts:
        if side:  # on the seam: bottom edge of the band above (upper lip) or top edge of the band below
            i, fu = (mouth_ring - 1, 1.0) if side > 0 else (mouth_ring, 0.0)
        else:
            u = float(np.interp(a, rings_a, np.arange(len(rings_a))))
            i, fu = int(u), u - int(u)
        v = float(np.interp(phi, lon_phi, np.arange(L)))
        j = int(v)
        fv = v - j
        first = L + 2 * (i * L + j)
        if fu + fv <= 1:
            faces.append(first), bary.append((1 - fu - fv, fu, fv))          # triangle (a, c, b)
        else:
            faces.append(first + 1), bary.append((1 - fu, 1 - fv, fu + fv - 1))  # triangle (b, c, d)
    return np.array(faces, np.int64), np.array(bary)


def procedural_head(seed=0):
    """FLAME-format arrays of the stand-in head (dict of numpy float64 arrays plus landmarks and masks).

    A deformed UV sphere united with a neck, with nose, eye sockets, brows, cheekbones, ears, lips and chin.
    The lips' seam is cut (its lower edge duplicated) so the mouth opens when the jaw rotates: jaw weights
    cover the lower lip, chin and lower cheeks. Shape blendshapes 0-14 are hand-made (width, height, depth,
    nose, chin, jaw, forehead, cheeks, eyes, mouth, neck, crown, lower face, brows, ears), the rest smooth
    random fields; expressions 0-15 are hand-made (mouth open, smile, frown, pucker, lip raise/depress,
    brows, cheek puff, lip stretch, one-sided smiles, squint, nose wrinkle, jaw shift, funnel), the rest
    smooth localized random bumps. Only those random parts depend on the seed.
    """
    rng = np.random.default_rng(seed)
    rings_a, lon_phi = _grid()
    R, L = len(rings_a), len(lon_phi)
    A, P = np.meshgrid(rings_a, lon_phi, indexing='ij')
    a = np.concatenate([[0.0], A.reshape(-1), [math.pi]])                           # (V0,)
    phi = np.concatenate([[0.0], P.reshape(-1), [0.0]])
    d = np.stack([np.sin(a) * np.sin(phi), np.cos(a), np.sin(a) * np.cos(phi)], 1)  # (V0, 3) unit directions
    verts = d * (_radius(d) + _relief(a, phi))[:, None]
    faces = _faces(R, L)
    normals = vertex_normals(verts, faces)

    # Cut the lips' seam: the band below the mouth ring uses copies of the seam's inner vertices.
    mouth_ring = int(np.argmin(abs(rings_a - MOUTH_A)))
    seam = np.nonzero(abs(lon_phi) < MOUTH_HALF_WIDTH)[0]
    seam_ids = 1 + mouth_ring * L + seam
    copies = len(verts) + np.arange(len(seam))
    remap = np.arange(len(verts))
    remap[seam_ids] = copies
    band = slice(L + 2 * mouth_ring * L, L + 2 * (mouth_ring + 1) * L)
    faces[band] = remap[faces[band]]
    verts, normals = np.concatenate([verts, verts[seam_ids]]), np.concatenate([normals, normals[seam_ids]])
    a, phi = np.concatenate([a, a[seam_ids]]), np.concatenate([phi, phi[seam_ids]])
    lip_side = np.zeros(len(verts))
    lip_side[seam_ids], lip_side[copies] = 1, -1
    x, y, z = verts.T
    V = len(verts)
    a_mouth = rings_a[mouth_ring]

    # Lower-face weight: 1 below the seam, 0 above; sharp along the cut, blending over ~2 cm on the cheeks.
    below_m = (a - a_mouth) * np.linalg.norm(verts, axis=1)
    blend = 1e-4 + 0.02 * smoothstep((abs(phi) - MOUTH_HALF_WIDTH) / 0.5)
    lower = smoothstep(0.5 + below_m / (2 * blend))
    lower[lip_side == 1], lower[lip_side == -1] = 0.0, 1.0
    front = 1 - smoothstep((abs(phi) - 1.1) / 0.6)
    jaw = lower * front * (1 - smoothstep((a - 0.76 * math.pi) / (0.17 * math.pi)))  # fades over the under-chin
    root = smoothstep((-0.12 - y) / 0.05)
    weights = np.zeros((V, N_JOINTS))
    weights[:, 0], weights[:, 1], weights[:, 2] = root, (1 - root) * (1 - jaw), (1 - root) * jaw

    # Joint regressor: each joint the mean of a few surface vertices around it.
    def nearest(points):
        return [int(np.argmin(((verts - p) ** 2).sum(1))) for p in points]
    mirror = np.array([-1, 1, 1])
    def surface(a0, phi0):
        d0 = np.array([math.sin(a0) * math.sin(phi0), math.cos(a0), math.sin(a0) * math.cos(phi0)])
        return d0 * (_radius(d0[None])[0] + _relief(a0, phi0))
    rim = lambda s: [surface(EYE_A + da, s * EYE_PHI + dp) for da, dp in ((-0.06, 0), (0.06, 0), (0, -0.12), (0, 0.12))]
    joint_sets = [
        nearest([(0.03, NECK_BOTTOM, NECK_Z), (-0.03, NECK_BOTTOM, NECK_Z), (0, NECK_BOTTOM, NECK_Z + 0.03), (0, NECK_BOTTOM, NECK_Z - 0.03)]),
        nearest([(NECK_RADIUS, -0.11, NECK_Z), (-NECK_RADIUS, -0.11, NECK_Z)]),
        nearest([JAW_PIVOT, JAW_PIVOT * mirror]),
        nearest(rim(1)),
        nearest(rim(-1)),
    ]
    J_regressor = np.zeros((N_JOINTS, V))
    for j, ids in enumerate(joint_sets):
        np.add.at(J_regressor[j], ids, 1.0 / len(ids))

    # Shape blendshapes (V, 3, 100), metres per unit coefficient.
    side_x = np.sign(x)
    g = lambda a0, p0, sa, sp: _bump(a, phi, a0, p0, sa, sp)
    pair = lambda a0, p0, sa, sp: g(a0, p0, sa, sp) + g(a0, -p0, sa, sp)
    lower_face = smoothstep((-0.01 - y) / 0.05) * front
    col = lambda v: np.stack(v, 1)
    zeros = np.zeros(V)
    shape = [
        col([0.07 * x, zeros, zeros]),
        col([zeros, 0.06 * y, zeros]),
        col([zeros, zeros, 0.06 * z]),
        normals * (0.006 * _nose(a, phi))[:, None],
        col([zeros, -0.003 * g(CHIN_A, 0, 0.08 * math.pi, 0.4), 0.004 * g(CHIN_A, 0, 0.08 * math.pi, 0.4)]),
        col([0.06 * x * lower_face, zeros, zeros]),
        col([zeros, zeros, 0.005 * g(0.25 * math.pi, 0, 0.08 * math.pi, 0.6)]),
        normals * (0.005 * pair(0.55 * math.pi, 0.6, 0.07 * math.pi, 0.25))[:, None],
        col([0.003 * side_x * pair(EYE_A, EYE_PHI, 0.05 * math.pi, 0.15), zeros, zeros]),
        col([0.003 * side_x * pair(a_mouth, MOUTH_HALF_WIDTH, 0.04 * math.pi, 0.12), zeros, zeros]),
        col([0.08 * x, zeros, 0.08 * (z - NECK_Z)]) * smoothstep((-0.1 - y) / 0.04)[:, None],
        col([zeros, 0.006 * g(0, 0, 0.25 * math.pi, 10.0), zeros]),
        col([zeros, 0.05 * y * lower_face, zeros]),
        normals * (0.003 * pair(BROW_A, 0.35, 0.03 * math.pi, 0.3))[:, None],
        normals * (0.006 * pair(0.45 * math.pi, math.pi / 2, 0.06 * math.pi, 0.1))[:, None],
    ]
    for k in range(len(shape), N_SHAPE):
        waves = rng.normal(size=(3, 3)) * 20.0                                   # rad/m: wavelengths ~10-30 cm
        field = sum(np.cos(verts @ w + rng.uniform(0, 2 * math.pi)) for w in waves) / 3
        shape.append(normals * (0.003 / (1 + (k - 15) / 15) * field)[:, None])

    # Expression blendshapes (V, 3, 50). Fields that differ across the seam vanish at the mouth corners.
    corner = lambda s: g(a_mouth, s * MOUTH_HALF_WIDTH, 0.05 * math.pi, 0.1)
    corners = corner(1) + corner(-1)
    in_mouth = np.cos(np.clip(phi / (MOUTH_HALF_WIDTH + 0.05), -1, 1) * math.pi / 2) ** 2
    upper_lip = (1 - lower) * in_mouth * np.exp(-0.5 * (np.maximum(-below_m, 0) / 0.008) ** 2)
    lower_lip = lower * in_mouth * np.exp(-0.5 * (np.maximum(below_m, 0) / 0.012) ** 2)
    chin_down = lower * front * g(0.7 * math.pi, 0, 0.12 * math.pi, 0.5)
    brows = pair(BROW_A, 0.35, 0.05 * math.pi, 0.25)
    inner_brows = pair(BROW_A + 0.02 * math.pi, 0.15, 0.03 * math.pi, 0.12)
    lids = pair(EYE_A + 0.01 * math.pi, EYE_PHI, 0.025 * math.pi, 0.12)
    mouth_area = in_mouth * g(a_mouth, 0, 0.08, 10.0)
    expr = [
        col([zeros, -0.006 * lower_lip - 0.004 * chin_down + 0.0015 * upper_lip, zeros]),
        col([0.002 * side_x * corners, 0.004 * corners, -0.001 * corners]),
        col([zeros, -0.004 * corners, zeros]),
        col([-0.05 * x * mouth_area, zeros, 0.005 * mouth_area]),
        col([zeros, 0.004 * upper_lip, 0.001 * upper_lip]),
        col([zeros, -0.004 * lower_lip, 0.001 * lower_lip]),
        col([zeros, 0.003 * brows, zeros]),
        col([-0.003 * side_x * inner_brows, -0.003 * inner_brows, zeros]),
        normals * (0.006 * pair(0.58 * math.pi, 0.55, 0.06 * math.pi, 0.2))[:, None],
        col([0.004 * side_x * corners, zeros, -0.001 * corners]),
        col([0.002 * corner(1), 0.004 * corner(1), zeros]),
        col([-0.002 * corner(-1), 0.004 * corner(-1), zeros]),
        col([zeros, 0.002 * lids, zeros]),
        col([zeros, 0.003 * g(0.45 * math.pi, 0, 0.04 * math.pi, 0.15), -0.001 * g(0.45 * math.pi, 0, 0.04 * math.pi, 0.15)]),
        col([0.003 * jaw, zeros, zeros]),
        col([zeros, 0.003 * upper_lip - 0.004 * lower_lip, 0.003 * (upper_lip + lower_lip)]),
    ]
    for k in range(len(expr), N_EXPR):
        centre = (rng.uniform(0.3, 0.8) * math.pi, rng.uniform(-0.9, 0.9))
        width = rng.uniform(0.15, 0.3)
        direction = rng.normal(size=3) * 0.002 / (1 + (k - 16) / 20)
        expr.append(g(centre[0], centre[1], width, width)[:, None] * direction)

    # Pose correctives (V, 3, 36), columns 9·(joint - 1) + entry of (R - I): smooth fields where skinning
    # weights blend, so they fix the crease where neck meets head and the cheeks stretched by the jaw.
    posedirs = np.zeros((V, 3, N_POSE_FEATURES))
    for joint, influence in ((1, root * (1 - root) * 4), (2, jaw * (1 - jaw) * 4 + 0.5 * jaw)):
        for entry in range(9):
            wave = rng.normal(size=3) * 20.0
            field = np.cos(verts @ wave + rng.uniform(0, 2 * math.pi))
            posedirs[:, :, 9 * (joint - 1) + entry] = normals * (0.004 * influence * field)[:, None]

    lmk_faces, lmk_bary = _embed_landmarks(_landmark_chart(a_mouth), rings_a, lon_phi, L, mouth_ring)
    forehead = np.nonzero((abs(phi) < 0.8) & (a > 0.2 * math.pi) & (a < BROW_A))[0]
    eye_region = np.nonzero((abs(abs(phi) - EYE_PHI) < 0.25) & (a >= BROW_A) & (a < EYE_A + 0.06 * math.pi))[0]
    masks = {
        'face': np.nonzero((abs(phi) < 1.05) & (a > 0.28 * math.pi) & (a < 0.8 * math.pi) & (y > -0.11))[0],
        'lips': np.nonzero((abs(phi) < MOUTH_HALF_WIDTH + 0.1) & (abs(below_m) < 0.011))[0],
        'forehead': forehead,
        'eye_region': eye_region,
        'upper_face': np.union1d(forehead, eye_region),
        'neck': np.nonzero(y < -0.11)[0],
    }
    return {
        'v_template': verts, 'shapedirs': np.stack(shape + expr, 2), 'posedirs': posedirs,
        'J_regressor': J_regressor, 'weights': weights, 'kintree_table': np.array([[-1, 0, 1, 1, 1], np.arange(5)]),
        'f': faces, 'lmk_faces_idx': lmk_faces, 'lmk_bary_coords': lmk_bary, 'masks': masks,
    }
