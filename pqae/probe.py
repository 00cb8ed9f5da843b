"""What pretraining learned: frozen-feature probes of an encoder on a classification set.

    python -m pqae.probe --ckpt runs/pretrain/ckpt-final --data-path data/modelnet40.h5
    python -m pqae.probe --ckpt random --like runs/pretrain/ckpt-final --data-path ...   # baseline
    python -m pqae.probe --ckpt ... --data-path data/scanobjectnn_hardest.h5 --save-embeddings e.npz
    python -m pqae.probe --ckpt runs/pretrain-tiny/ckpt-final --data procedural          # no files

The train and test splits are embedded once (`pqae.embed`: the encoder in eval mode, the
pretraining grouping, class token + max-pooled patches). On the official split it reports:
* linear: multinomial logistic regression on the standardised features, trained in torch
  (L-BFGS) on the device; its L2 strength is chosen by k-fold cross-validation on the TRAINING
  split only (the test split is never used to choose anything), then refit on all of it;
* knn_k: k-nearest-neighbour accuracy, cosine similarity, majority vote (ties to the nearest).
Accuracies are in %. The encoder's BatchNorm runs in eval mode with its running statistics
from pretraining; a random encoder's are the initial ones (mean 0, variance 1), so its patch
embedding sees unnormalised activations: that is the baseline, not a tuned one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pqae import data
from pqae.embed import PointEmbedder, encoder_for
from pqae.errors import BadInput, reading
from pqae.log import write_json


@dataclass(frozen=True)
class Config:
    ckpt: str = ""
    """pretraining checkpoint (directory or .safetensors, ours or converted); `random`: a
    randomly initialised encoder of the shape of --like (the reference's without it)."""
    like: str = ""
    """with --ckpt random: the checkpoint whose shape and grouping the random encoder takes."""
    data: Literal["auto", "scanobjectnn", "modelnet40", "procedural"] = "auto"
    """the classification set: auto = from the file (a ScanObjectNN file of data_prep records
    its variant); procedural = built-in 5-class shapes, no file."""
    data_path: str = "data/modelnet40.h5"
    """a classification HDF5 from `python -m data_prep.modelnet40` or `data_prep.scanobjectnn`."""
    procedural_train: int = 200
    """training shapes with --data procedural."""
    procedural_test: int = 100
    """test shapes with --data procedural."""
    procedural_points: int = 1024
    """points per shape with --data procedural (ModelNet40 files hold 8192)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    batch_size: int = 256
    """clouds per embedding batch."""
    folds: int = 3
    """cross-validation folds on the training split that choose the linear probe's L2 strength."""
    l2: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    """candidate L2 strengths of the linear probe (per-sample mean loss + l2 * |W|^2)."""
    knn: tuple[int, ...] = (1, 20)
    """the k of the k-NN probes."""
    seed: int = 0
    """seed of the cross-validation folds (and of the random encoder)."""
    out: str = ""
    """JSON of the results; empty: probe-<checkpoint name>-<data name>.json beside the
    checkpoint (runs/probe/probe-random-<data name>.json for --ckpt random)."""
    save_embeddings: str = ""
    """also write the embeddings to this .npz: train/test features, labels and names."""


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class ProbeData:
    """A classification set's two splits, points on the CPU: (S, N, 3), labels (S,)."""
    name: str
    train_points: torch.Tensor
    train_labels: torch.Tensor
    test_points: torch.Tensor
    test_labels: torch.Tensor
    train_names: list[str] | None = None
    test_names: list[str] | None = None


def load_data(kind: str, path: str, procedural_train: int = 200, procedural_test: int = 100,
              seed: int = 0, procedural_points: int = 1024) -> ProbeData:
    """The probe set: a data_prep classification file (kind auto / scanobjectnn / modelnet40)
    or the built-in procedural classes."""
    if kind == "procedural":
        tr = data.procedural_classes(procedural_train, procedural_points, seed=2 * seed)
        te = data.procedural_classes(procedural_test, procedural_points, seed=2 * seed + 1)
        return ProbeData("procedural", *tr, *te)
    import h5py
    if not Path(path).is_file():
        how = ("python -m data_prep.modelnet40 --root data/ModelNet/modelnet40_normal_resampled "
               f"--out {path}" if kind != "scanobjectnn" else
               f"python -m data_prep.scanobjectnn --root data/ScanObjectNN --variant hardest --out {path}")
        raise BadInput(f"probe data {path} does not exist. Create it with `{how}`, or probe on "
                       f"the built-in shapes with --data procedural")
    with reading(path, "a classification HDF5 file (data_prep.modelnet40 or .scanobjectnn)"), \
            h5py.File(path, "r") as f:
        variant = f.attrs.get("variant")
        names = {s: [n.decode() if isinstance(n, bytes) else str(n) for n in f[f"{s}/names"][()]]
                 if f"{s}/names" in f else None for s in ("train", "test")}
    if kind == "auto":
        kind = "scanobjectnn" if variant is not None else "modelnet40"
    load = data.load_scanobjectnn if kind == "scanobjectnn" else data.load_modelnet40
    tr, te = load(path, "train"), load(path, "test")
    label = f"{kind}-{variant}" if variant is not None else kind
    return ProbeData(label, *tr, *te, names["train"], names["test"])


def embed_split(embedder: PointEmbedder, points: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(S, N, 3) on the CPU -> (S, 2C) features on the embedder's device, batch by batch."""
    device = next(embedder.parameters()).device
    return torch.cat([embedder.embed(points[i:i + batch_size].to(device), batch_size)
                      for i in range(0, len(points), batch_size)])


# --------------------------------------------------------------------------------------------
# The probes


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
               iterations: int = 200) -> torch.Tensor:
    """Multinomial logistic regression, (W, b) as one (D + 1, K) matrix, by L-BFGS: mean
    cross-entropy + l2 * |W|^2 (the bias is not penalised)."""
    xb = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    w = torch.zeros(xb.shape[1], num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9, history_size=20)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict_linear(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones_like(x[:, :1])], dim=1) @ w).argmax(1)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, l2s: tuple[float, ...], folds: int, seed: int) -> dict:
    """Test accuracy (%) of the linear probe whose L2 strength wins `folds`-fold
    cross-validation on the training split; the cross-validation accuracies per strength."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)  # from train only
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    g = torch.Generator().manual_seed(seed)
    fold_of = (torch.randperm(len(train_y), generator=g) % max(2, folds)).to(train_x.device)
    cv = {}
    for l2 in l2s:
        correct = 0
        for k in range(max(2, folds)):
            fit, held = fold_of != k, fold_of == k
            w = fit_linear(train_x[fit], train_y[fit], num_classes, l2)
            correct += int((predict_linear(w, train_x[held]) == train_y[held]).sum())
        cv[l2] = 100.0 * correct / len(train_y)
    best = max(l2s, key=lambda l2: (cv[l2], l2))  # ties: the stronger regularisation
    w = fit_linear(train_x, train_y, num_classes, best)
    acc = 100.0 * int((predict_linear(w, test_x) == test_y).sum()) / len(test_y)
    return {"acc": acc, "l2": best, "cv_acc": {str(k): v for k, v in cv.items()}}


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
              test_y: torch.Tensor, ks: tuple[int, ...], chunk: int = 1024) -> dict[int, float]:
    """k-NN accuracy (%) per k: cosine similarity, majority vote, ties to the nearer
    neighbours (each vote weighs 1 + a hair more the nearer it is)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    a, b = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    kmax = min(max(ks), len(train_y))
    correct = {k: 0 for k in ks}
    for i in range(0, len(b), chunk):
        sims = b[i:i + chunk] @ a.T  # (q, S)
        idx = sims.topk(kmax, dim=1).indices  # (q, kmax), nearest first
        votes = F.one_hot(train_y[idx], num_classes).float()  # (q, kmax, K)
        rank_weight = 1 + 1e-4 * torch.linspace(1, 0, kmax, device=votes.device)
        for k in ks:
            kk = min(k, kmax)
            pred = (votes[:, :kk] * rank_weight[:kk, None]).sum(1).argmax(1)
            correct[k] += int((pred == test_y[i:i + chunk]).sum())
    return {k: 100.0 * c / len(test_y) for k, c in correct.items()}


def probe(embedder: PointEmbedder, probe_data: ProbeData, batch_size: int = 256,
          l2s: tuple[float, ...] = Config.l2, folds: int = 3, ks: tuple[int, ...] = (1, 20),
          seed: int = 0) -> dict:
    """Embed both splits and run the linear and k-NN probes; accuracies in %, timings in s.
    Returns also the features ("train_features", "test_features") on the device."""
    t0 = time.perf_counter()
    device = next(embedder.parameters()).device
    train_x = embed_split(embedder, probe_data.train_points, batch_size)
    test_x = embed_split(embedder, probe_data.test_points, batch_size)
    train_y, test_y = probe_data.train_labels.to(device), probe_data.test_labels.to(device)
    t1 = time.perf_counter()
    linear = linear_probe(train_x, train_y, test_x, test_y, l2s, folds, seed)
    knn = knn_probe(train_x, train_y, test_x, test_y, ks)
    return {"data": probe_data.name, "train": len(train_y), "test": len(test_y),
            "linear_acc": linear["acc"], "linear_l2": linear["l2"], "linear_cv_acc": linear["cv_acc"],
            **{f"knn{k}_acc": v for k, v in knn.items()},
            "embed_s": t1 - t0, "probe_s": time.perf_counter() - t1,
            "train_features": train_x, "test_features": test_x}


def table(result: dict, what: str) -> str:
    knn = "  ".join(f"k-NN@{k.removeprefix('knn').removesuffix('_acc')} {v:6.2f} %"
                    for k, v in result.items() if k.startswith("knn"))
    return (f"probe of {what} on {result['data']} (train {result['train']}, test {result['test']})\n"
            f"  linear {result['linear_acc']:6.2f} % (L2 {result['linear_l2']:g}, chosen by "
            f"cross-validation on train)  {knn}\n"
            f"  {result['embed_s']:.1f} s embedding, {result['probe_s']:.1f} s probes")


def main(cfg: Config) -> dict:
    if not cfg.ckpt:
        raise BadInput("--ckpt is required: a pretraining checkpoint, or `random` (with --like "
                       "CKPT for its shape)")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    embedder, what = encoder_for(cfg.ckpt, cfg.like, device, cfg.seed)
    probe_data = load_data(cfg.data, cfg.data_path, cfg.procedural_train, cfg.procedural_test,
                           cfg.seed, cfg.procedural_points)
    result = probe(embedder, probe_data, cfg.batch_size, cfg.l2, cfg.folds, cfg.knn, cfg.seed)
    train_x, test_x = result.pop("train_features"), result.pop("test_features")
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.ckpt == "random":
        out = Path("runs/probe") / f"probe-random-{probe_data.name}.json"
    else:
        # beside the checkpoint (not in it: a checkpoint directory is replaced when rewritten)
        out = Path(cfg.ckpt).parent / f"probe-{Path(cfg.ckpt).stem}-{probe_data.name}.json"
    record = {"config": dataclasses.asdict(cfg), "encoder": what, **result,
              "encoder_settings": {"num_points": embedder.num_points, "num_group": embedder.num_group,
                                   "group_size": embedder.group_size, "feature_dim": embedder.dim}}
    write_json(out, record)
    print(table(result, what), flush=True)
    print(f"  results     {out}", flush=True)
    if cfg.save_embeddings:
        save = Path(cfg.save_embeddings)
        save.parent.mkdir(parents=True, exist_ok=True)
        names = {f"{s}_names": np.array(n) for s, n in (("train", probe_data.train_names),
                                                        ("test", probe_data.test_names)) if n}
        np.savez(save, train_features=train_x.cpu().numpy(), test_features=test_x.cpu().numpy(),
                 train_labels=probe_data.train_labels.numpy(),
                 test_labels=probe_data.test_labels.numpy(), **names)
        print(f"  embeddings  {save}", flush=True)
    return record


if __name__ == "__main__":
    from pqae.cli import run
    run(main, Config, {"default": Config()}, doc=__doc__.split("\n\n")[0],
        prog="python -m pqae.probe")
