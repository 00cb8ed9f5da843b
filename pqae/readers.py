"""Reading one point-cloud or mesh file of a user's own data: its coordinates and, where the
format has them, per-point colours, normals and intensity. Shared by `data_prep.folder` (a
folder to our files) and `pqae.embed` (a folder straight to features).

Native: `.npy`, `.npz` (the array `points`, `xyz` or the only one), `.txt` / `.xyz` / `.pts` /
`.csv` (whitespace or commas, the first three columns x y z, a header line skipped). Through
the [io] extra's well-kept readers: `.ply` (plyfile), `.pcd` (pypcd4), `.las` / `.laz`
(laspy), meshes `.obj` / `.off` / `.stl` / `.glb` (trimesh, sampled on their surface,
area-weighted). A file that cannot be used raises `Skip` with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = (".txt", ".xyz", ".pts", ".csv")
MESHES = (".obj", ".off", ".stl", ".glb")
EXTRA = {".ply": "plyfile", ".pcd": "pypcd4", ".las": "laspy", ".laz": "laspy",
         **{ext: "trimesh" for ext in MESHES}}  # extension -> its reader ([io] extra)
CHANNELS = ("colors", "normals", "intensity")  # the extra per-point arrays, in stored order


class Skip(Exception):
    """A file that cannot be used; the message is the reason."""


# --------------------------------------------------------------------------------------------
# Reading one file


def read_cloud(path: Path, mesh_points: int = 8192, seed: int = 0) -> np.ndarray:
    """(N, 3) float64 coordinates of one file, or Skip with the reason. A mesh gives
    `mesh_points` points sampled on its surface, area-weighted, at `seed`."""
    return read_file(path, mesh_points, np.random.default_rng(seed), channels=False)[0]


def read_file(path: Path, mesh_points: int, rng: np.random.Generator,
              channels: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(coordinates (N, 3) float64, {channel: values}) of one file, or Skip with the reason.
    The channels are those the file has, as stored: colors (N, 3) (any integer or float
    type), normals (N, 3), intensity (N,). A mesh gives `mesh_points` points sampled on its
    surface, area-weighted, drawn from `rng`, and their faces' normals."""
    ext = path.suffix.lower()
    extra: dict[str, np.ndarray] = {}
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                keys = [k for k in ("points", "xyz") if k in f.files] or f.files
                if len(keys) != 1 and not {"points", "xyz"} & set(f.files):
                    raise Skip(f"an .npz with arrays {f.files}: name one `points` or `xyz`")
                arr = f[keys[0]]
                extra = {name: f[name] for name in CHANNELS if name in f.files}
        elif ext in TEXT:
            arr = _read_text(path)
        elif ext in EXTRA:
            arr, extra = _read_extra(path, ext, mesh_points, rng)
        else:
            raise Skip(f"unknown extension {ext or '(none)'}")
    except Skip:
        raise
    except Exception as e:  # a damaged file of a known kind
        raise Skip(f"unreadable ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})")
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] < 3 or not np.issubdtype(arr.dtype, np.number):
        raise Skip(f"not a point array (found shape {arr.shape}, dtype {arr.dtype}; expected "
                   f"(N, >=3) numbers, the first three columns x y z)")
    if not channels:
        return arr[:, :3].astype(np.float64), {}
    for name, values in extra.items():
        want = (len(arr),) if name == "intensity" else (len(arr), 3)
        if np.shape(values) != want or not np.issubdtype(values.dtype, np.number):
            raise Skip(f"its {name} have shape {np.shape(values)} and dtype {values.dtype}; "
                       f"expected {want} numbers, one per point")
    return arr[:, :3].astype(np.float64), extra


def _read_text(path: Path) -> np.ndarray:
    """x y z, the first three columns, separated by commas or whitespace; a header line is
    skipped. NumPy's parser reads a clean file; any other is read line by line, which names
    the first bad line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first, second = f.readline(), f.readline()
    header = _is_header(first)
    sample = second if header else first
    if not sample.strip():
        return _read_text_lines(path)
    try:
        return np.loadtxt(path, delimiter="," if "," in sample else None, usecols=(0, 1, 2),
                          skiprows=int(header), comments=None, ndmin=2, encoding="utf-8")
    except ValueError:
        return _read_text_lines(path)


def _is_header(line: str) -> bool:
    """Three values or more, not all numbers: a header (as the line-by-line reader sees it)."""
    parts = line.replace(",", " ").split()
    if len(parts) < 3:
        return False
    try:
        [float(v) for v in parts[:3]]
    except ValueError:
        return True
    return False


def _read_text_lines(path: Path) -> np.ndarray:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            parts = line.replace(",", " ").split()
            if not parts:
                continue
            try:
                rows.append([float(v) for v in parts[:3]] if len(parts) >= 3 else None)
            except ValueError:
                if i == 0:
                    continue  # a header line
                raise Skip(f"line {i + 1} is not numbers: {line.strip()[:80]!r}") from None
            if rows[-1] is None:
                raise Skip(f"line {i + 1} has fewer than 3 values")
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _read_extra(path: Path, ext: str, mesh_points: int,
                rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The formats read by a well-kept library of the [io] extra: (x y z, channels)."""
    package = EXTRA[ext]
    try:
        module = __import__(package)
    except ImportError:
        raise Skip(f'a {ext} file needs the {package} package: pip install -e ".[io]"') from None
    if ext == ".ply":
        vertex = module.PlyData.read(str(path))["vertex"].data  # a structured array
        return _columns(vertex, vertex.dtype.names, ("x", "y", "z"), ("red", "green", "blue"),
                        ("nx", "ny", "nz"), "intensity")
    if ext == ".pcd":  # ASCII, binary and binary_compressed
        data = module.PointCloud.from_path(path).pc_data
        xyz, extra = _columns(data, data.dtype.names, ("x", "y", "z"), ("r", "g", "b"),
                              ("normal_x", "normal_y", "normal_z"), "intensity")
        packed = next((k for k in ("rgb", "rgba") if k in data.dtype.names), None)
        if packed and data.dtype[packed].itemsize == 4:  # 0x00RRGGBB in a float32 or uint32
            bits = np.ascontiguousarray(data[packed]).view(np.uint32)
            extra["colors"] = np.stack([(bits >> s) & 255 for s in (16, 8, 0)], 1)
        return xyz, extra
    if ext in (".las", ".laz"):  # scaled and offset coordinates; .laz needs a LAZ backend
        las = module.read(str(path))
        dims = set(las.point_format.dimension_names)
        extra = {"intensity": np.asarray(las.intensity)}
        if {"red", "green", "blue"} <= dims:
            extra["colors"] = np.stack([np.asarray(las[c]) for c in ("red", "green", "blue")], 1)
        return np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], 1), extra
    mesh = module.load(str(path), force="mesh")
    if len(getattr(mesh, "faces", ())) == 0:
        raise Skip("a mesh without faces")
    if not mesh.area > 0:
        raise Skip("a mesh of zero surface area (every face degenerate)")
    points, face = module.sample.sample_surface(mesh, mesh_points, seed=rng)  # area-weighted
    return np.asarray(points), {"normals": np.asarray(mesh.face_normals)[face]}


def _columns(table: np.ndarray, names, xyz, rgb, normal, intensity):
    """x y z (N, 3) and the channels found among a structured array's fields."""
    names = set(names)

    def stack(cols):
        return np.stack([np.asarray(table[c]) for c in cols], 1)

    extra = {}
    if set(rgb) <= names:
        extra["colors"] = stack(rgb)
    if set(normal) <= names:
        extra["normals"] = stack(normal)
    if intensity in names:
        extra["intensity"] = np.asarray(table[intensity])
    return stack(xyz).astype(np.float64), extra


def to_colors(values: np.ndarray) -> np.ndarray | None:
    """Colours (N, 3) as uint8 0-255: 8-bit values as they are, 16-bit ones (any above 255,
    as LAS stores them) scaled down, floats in [0, 1] scaled up; None if any is not finite."""
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            return None
        values = np.rint(values * 255 if values.size and values.max() <= 1 else values)
    elif values.size and values.max() > 255:
        values = (values.astype(np.int64) * 255 + 32767) // 65535
    return np.clip(values, 0, 255).astype(np.uint8)
