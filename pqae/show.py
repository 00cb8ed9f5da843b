"""Something to look at for every model: coloured point clouds as .ply (any viewer) and .png
(three orthographic views), from a checkpoint alone.

    python -m pqae.show pretrain --ckpt runs/pretrain-tiny/ckpt-final    # view, target, cross reconstruction
    python -m pqae.show partseg --ckpt runs/partseg-tiny/ckpt-best       # predicted and true parts
    python -m pqae.show semseg --ckpt runs/semseg-tiny/ckpt-best         # a whole room: prediction, truth
    python -m pqae.show features --ckpt runs/pretrain-tiny/ckpt-final    # patch features, 3-component PCA

Each reads the data its checkpoint was trained on (the built-in data of a tiny run, else the
run's data file; `--data-path` to choose another), takes `--shapes` examples (a room for
semseg), and writes into `--out-dir` (default: `<ckpt>/show-<what>`) one PNG per example, with
a row per cloud and a column per view (front x-y, side z-y, top x-z), and one .ply per cloud.
The PNGs need matplotlib (`pip install -e ".[plots]"`), the .ply files plyfile (`[io]`); a
missing one is named and its files skipped. Colours: grey the view, blue its target patches,
orange the reconstruction from the other view; parts and classes by a fixed palette;
features by their first three principal components.
"""

from __future__ import annotations

import colorsys
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

from pqae import checkpoint as ckpt
from pqae import cli, data, formats
from pqae.errors import BadInput
from pqae.log import print0

VIEWS = (("front (x-y)", 0, 1), ("side (z-y)", 2, 1), ("top (x-z)", 0, 2))
GREY, BLUE, ORANGE, RED = (120, 120, 120), (40, 110, 220), (235, 110, 30), (220, 30, 30)


@dataclass(frozen=True)
class Config:
    what: tyro.conf.Positional[Literal["pretrain", "partseg", "semseg", "features"]]
    """what to show: a pretraining checkpoint's cross reconstruction, a part segmenter's or a
    semantic segmenter's predictions, or any encoder's patch features."""
    ckpt: str
    """the checkpoint directory (or a converted reference .pth for features)."""
    out_dir: str = ""
    """where the files go; empty: <ckpt>/show-<what>."""
    shapes: int = 3
    """examples to show (shapes; semseg: rooms)."""
    data_path: str = ""
    """another data file than the checkpoint's own run read (the same kind)."""
    seed: int = 0
    """the draws of the shown examples (points sampled, crops)."""
    device: str = "cpu"


def palette(n: int) -> np.ndarray:
    """n distinct colours (n, 3) uint8: golden-angle hues, alternating lightness."""
    return np.array([[round(255 * c) for c in colorsys.hls_to_rgb((i * 0.618034) % 1,
                                                                   0.45 + 0.15 * (i % 2), 0.75)]
                     for i in range(n)], np.uint8)


def pca_colours(features: np.ndarray, fit: np.ndarray | None = None) -> np.ndarray:
    """(n, C) features -> (n, 3) uint8: their first three principal components (those of
    `fit`, default the features themselves), each scaled to 0..255 over the 2nd..98th
    percentile of `fit`."""
    fit = features if fit is None else fit
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    basis = np.pad(vt[:3].T, ((0, 0), (0, 3 - min(3, vt.shape[0]))))  # (C, 3)
    ref, comps = (fit - mean) @ basis, (features - mean) @ basis
    lo, hi = np.percentile(ref, 2, 0), np.percentile(ref, 98, 0)
    return (np.clip((comps - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ output
class Writer:
    """Writes the PNGs and .ply files, saying once which optional package is missing."""

    def __init__(self, out: Path):
        self.out, self.files, self.missing = out, [], set()
        out.mkdir(parents=True, exist_ok=True)

    def ply(self, name: str, xyz: np.ndarray, rgb: np.ndarray) -> None:
        try:
            from plyfile import PlyData, PlyElement
        except ImportError:
            self.missing.add('plyfile (pip install -e ".[io]") for the .ply files')
            return
        vertex = np.empty(len(xyz), [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"),
                                     ("green", "u1"), ("blue", "u1")])
        for k, c in enumerate("xyz"):
            vertex[c] = xyz[:, k]
        for k, c in enumerate(("red", "green", "blue")):
            vertex[c] = rgb[:, k]
        path = self.out / f"{name}.ply"
        PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
        self.files.append(path)

    def png(self, name: str, title: str, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.missing.add('matplotlib (pip install -e ".[plots]") for the .png files')
            return
        fig = figure(plt, title, rows)
        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self.files.append(path)

    def example(self, name: str, title: str, rows: list[tuple[str, np.ndarray, np.ndarray]]):
        """One example: a PNG of all its clouds, a .ply per cloud."""
        self.png(name, title, rows)
        for label, xyz, rgb in rows:
            self.ply(f"{name}-{label.split(' (')[0].replace(' ', '_')}", xyz, rgb)


def figure(plt, title: str, rows: list[tuple[str, np.ndarray, np.ndarray]]):
    """A figure: a row per cloud, a column per orthographic view, one scale for all."""
    allxyz = np.concatenate([xyz for _, xyz, _ in rows])
    lo, hi = allxyz.min(0), allxyz.max(0)
    pad = 0.05 * (hi - lo).max()
    size = 6 if max(len(x) for _, x, _ in rows) < 5000 else 1
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (label, xyz, rgb) in enumerate(rows):
        for c, (view, a, b) in enumerate(VIEWS):
            ax = axes[r, c]
            ax.scatter(xyz[:, a], xyz[:, b], c=rgb / 255.0, s=size, linewidths=0)
            ax.set_xlim(lo[a] - pad, hi[a] + pad)
            ax.set_ylim(lo[b] - pad, hi[b] + pad)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view, fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def rendering(title: str, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """The PNG's picture as an (H, W, 3) uint8 array (for TensorBoard), or None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = figure(plt, title, rows)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def solid(xyz: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (len(xyz), 3))


# ------------------------------------------------------------------------------ what to show
def script(name: str):
    """One of the training scripts (pretrain, partseg, semseg) as a module: they sit at the top
    of the checkout, beside this package."""
    import importlib
    import sys
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(name)


def script_config(module, path: str, device: str, data_path: str = ""):
    """The script's config of the run that saved `path`, as its --eval-ckpt reads it."""
    args = ["--eval-ckpt", path, "--device", device]
    args += ["--data-path", data_path] if data_path else []
    return cli.parse(module.Config, module.PRESETS, args=args, resolve=module.resolve)


def reconstruction_rows(out: dict, b: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Sample b of a pretraining forward's outputs: view 1, its target patches, and their
    reconstruction from view 2 (each patch placed at its centre)."""
    centre = out["center1"][b, :, None]  # (G, 1, 3)
    view = out["view1"][b].cpu().numpy()
    target = (out["neighborhood1"][b] + centre).reshape(-1, 3).cpu().numpy()
    pred = (out["pred1"][b] + centre).reshape(-1, 3).detach().cpu().numpy()
    return [("view 1", view, solid(view, GREY)), ("target patches", target, solid(target, BLUE)),
            ("reconstruction (from view 2)", pred, solid(pred, ORANGE))]


def show_pretrain(cfg: Config, w: Writer) -> None:
    pretrain = script("pretrain")
    saved = ckpt.checkpoint_config(cfg.ckpt)
    if saved is None:
        raise BadInput(f"{cfg.ckpt}: not a pretraining checkpoint of ours (no config); "
                       f"`python -m pqae.show features` shows any encoder")
    pcfg = cli.from_dict(pretrain.Config, saved, pretrain.Config(), f"{cfg.ckpt} (its config)")
    if cfg.data_path:
        pcfg = dataclasses.replace(pcfg, data_path=cfg.data_path)
    model = pretrain.build_model(pcfg).to(cfg.device).eval()
    formats.load_model(model, cfg.ckpt, "pretrain")
    clouds = example_clouds(pcfg, cfg.shapes).to(cfg.device)
    torch.manual_seed(cfg.seed)
    points = data.sample_points(clouds, torch.arange(len(clouds)), pcfg.num_points)
    ratios = model.draw_crop_ratios(random.Random(cfg.seed))
    with torch.no_grad():
        out = model(points, ratios, return_outputs=True)
    for b in range(len(clouds)):
        w.example(f"shape-{b}", f"{cfg.ckpt}: shape {b}, crop ratios {ratios[0]:.2f} / "
                                f"{ratios[1]:.2f}", reconstruction_rows(out, b))


def example_clouds(pcfg, n: int) -> torch.Tensor:
    """The first n clouds of the pretraining data (read one by one: not the whole file)."""
    if pcfg.data == "procedural":
        return data.procedural_shapes(max(n, 1), pcfg.procedural_points, seed=pcfg.seed)[:n]
    pretrain = script("pretrain")
    path = pcfg.data_path or pretrain.DATA_PATHS[pcfg.data]
    if pcfg.data == "airplanes":
        return data.load_airplanes(path, pcfg.split)[:n]
    from pqae.stream import CloudFiles
    files = CloudFiles(data.pretrain_blocks(path, pcfg.split))
    out = np.empty((min(n, len(files)), files.points, 3), files.dtype)
    for i in range(len(out)):
        files.read(i, out[i])
    files.close()
    return torch.from_numpy(out.astype(np.float32))


def segmenter(name: str, cfg: Config):
    """(the script's config, the saved segmenter in eval mode, its test split) of a partseg
    or semseg checkpoint."""
    module = script(name)
    scfg = script_config(module, cfg.ckpt, cfg.device, cfg.data_path)
    model = module.build_model(scfg).to(cfg.device).eval()
    formats.load_model(model, cfg.ckpt, name)
    return scfg, model, module.load_data(scfg)[1]


def show_partseg(cfg: Config, w: Writer) -> None:
    from pqae import shapenetpart as spart
    pcfg, model, test = segmenter("partseg", cfg)
    test = test.to(cfg.device)
    n = min(cfg.shapes, len(test))
    idx = torch.arange(n)
    u = torch.rand(n, pcfg.num_points, generator=torch.Generator().manual_seed(cfg.seed))
    points, labels = test.sample(idx, u)
    with torch.no_grad():
        logp = model(points, test.category[idx.to(cfg.device)]).float()
    pred = spart.restricted_argmax(logp, labels)
    colours = palette(spart.NUM_CLASSES)
    for b in range(n):
        xyz = points[b].cpu().numpy()
        p, t = pred[b].cpu().numpy(), labels[b].cpu().numpy()
        iou = float(spart.shape_ious(pred[b:b + 1], labels[b:b + 1])[0]) * 100
        wrong = np.where((p != t)[:, None], np.array(RED, np.uint8), np.array(GREY, np.uint8))
        w.example(f"shape-{b}", f"{test.names[b] if test.names else b}: shape mIoU {iou:.1f} %",
                  [("predicted parts", xyz, colours[p]), ("true parts", xyz, colours[t]),
                   ("errors (red)", xyz, wrong)])


def show_semseg(cfg: Config, w: Writer) -> None:
    from pqae import dist, s3dis
    semseg = script("semseg")
    scfg, model, test = segmenter("semseg", cfg)
    env = dist.Dist(0, 0, 1, torch.device(cfg.device))
    colours = palette(s3dis.NUM_CLASSES)
    for r in range(min(cfg.shapes, len(test))):
        xyz, labels = test.room(r)
        one = s3dis.Rooms(test.names[r:r + 1], xyz.to(cfg.device), labels.to(cfg.device),
                          (0, len(xyz)))
        with torch.no_grad():
            scores = semseg.test_whole_rooms(model, one, scfg, env, w.out / "predictions")
        pred = np.loadtxt(w.out / "predictions" / f"{test.names[r]}.txt", dtype=np.int64,
                          ndmin=1)
        p, t, x = pred, labels.cpu().numpy(), xyz.cpu().numpy()
        present = np.unique(t)  # this room's classes (the test's mIoU averages all 13)
        miou = np.mean([((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum()
                        for c in present])
        w.example(f"room-{r}", f"{test.names[r]}: mIoU {100 * miou:.1f} % over its "
                               f"{len(present)} classes, OA {100 * scores['oa']:.1f} %",
                  [("prediction", x, colours[p]), ("ground truth", x, colours[t])])


def show_features(cfg: Config, w: Writer) -> None:
    from pqae.embed import load_encoder
    encoder = load_encoder(cfg.ckpt, cfg.device)
    saved = ckpt.checkpoint_config(cfg.ckpt) or {}
    pretrain = script("pretrain")
    kind = saved.get("data") if saved.get("data") in pretrain.DATA_PATHS else None
    path = cfg.data_path or (kind and (saved.get("data_path") or pretrain.DATA_PATHS[kind]))
    if path:  # a pretraining file (--data-path, or the pretraining run's own)
        kind = "airplanes" if str(path).endswith(".npz") else "shapenet55"
        clouds = example_clouds(pretrain.Config(data=kind, data_path=path), cfg.shapes)
    else:
        clouds = data.procedural_shapes(cfg.shapes, 2048, seed=cfg.seed)
    patches, centers = encoder.embed(clouds.to(cfg.device), level="patch")  # (B, G, C)
    per_point, used = encoder.embed(clouds.to(cfg.device), level="point")  # (B, n, C)
    for b in range(len(clouds)):
        fit = patches[b].float().cpu().numpy()
        w.example(f"shape-{b}", f"{cfg.ckpt}: patch features, first 3 principal components",
                  [("points (interpolated features)", used[b].cpu().numpy(),
                    pca_colours(per_point[b].float().cpu().numpy(), fit)),
                   ("patch centres", centers[b].cpu().numpy(), pca_colours(fit))])


def main(cfg: Config) -> dict:
    out = Path(cfg.out_dir or Path(cfg.ckpt).with_suffix("") / f"show-{cfg.what}")
    if not Path(cfg.ckpt).exists():
        raise BadInput(f"--ckpt {cfg.ckpt}: no such checkpoint")
    w = Writer(out)
    {"pretrain": show_pretrain, "partseg": show_partseg, "semseg": show_semseg,
     "features": show_features}[cfg.what](cfg, w)
    for what in sorted(w.missing):
        print0(f"note: skipped, needs {what}")
    print0(f"done | {len(w.files)} files in {out}")
    for f in w.files:
        print0(f"  {f}")
    return {"out_dir": str(out), "files": [str(f) for f in w.files]}


if __name__ == "__main__":
    import sys

    import tyro

    from pqae.errors import UserError
    try:
        main(tyro.cli(Config, description=__doc__.split("\n\n")[0], prog="python -m pqae.show"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
