"""Semantic segmentation on S3DIS: fine-tune the pretrained encoder on 1 m blocks, test on
one area (Area 5) with per-epoch random blocks and, optionally, whole-room sliding-window voting.

    python semseg.py --preset tiny                                   # synthetic rooms, ~11 s on 2 CPU cores
    python semseg.py --pretrained runs/pretrain/ckpt-epoch-300       # the reference recipe, 1 GPU
    torchrun --nproc_per_node=4 semseg.py --pretrained ... --test-rooms   # + whole-room test
    python semseg.py --eval-ckpt runs/semseg/ckpt-best               # whole-room test only

Data: `python -m data_prep.s3dis` writes one HDF5 file; all rooms are held on the device and
each batch's blocks are cut out there (`pqae.s3dis`), so there is no DataLoader. The blocks of a
training step are a function of (seed, step, rank), so a resumed run sees the data of an
uninterrupted one; the per-epoch test blocks are a function of (seed, epoch), different every
epoch as in the reference but the same on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pqae import checkpoint as ckpt
from pqae import amp, cli, dist, syncbn
from pqae import s3dis
from pqae.log import (Timer, finish, format_eta, log_scalars, print0, run_header,
                      run_outputs, tensorboard, write_json)
from pqae.optim import param_groups, set_epoch_lr
from pqae.seeding import epoch_perm, step_seed
from pqae.errors import BadInput
from pqae.model import TINY_ENCODER
from pqae.segmentation import PointSegmenter, feature_blocks_for, load_pretrained


@dataclass(frozen=True)
class Config:
    # data
    data: Literal["s3dis", "synthetic"] = "s3dis"
    """s3dis: the HDF5 from `python -m data_prep.s3dis` (or a directory of the reference's
    Area_k_<room>.npy files); synthetic: generated rooms, no files."""
    data_path: str = "data/s3dis.h5"
    """the HDF5 from `python -m data_prep.s3dis`, or a directory of the reference's
    Area_k_<room>.npy files (data = s3dis)."""
    test_area: int = 5
    """the held-out area; every other area trains."""
    synthetic_rooms: int = 12
    """number of generated rooms (two per area) when data = synthetic."""
    num_points: int = 2048
    """points per block."""
    block_size: float = 1.0
    """block edge in x and y (metres); z is unrestricted."""
    min_block_points: int = 1024
    """a training block needs MORE than this many points, else its centre is redrawn."""
    sample_rate: float = 1.0
    """training blocks per epoch = training points x sample_rate / num_points."""
    eval_blocks: int = 0
    """random test blocks per epoch evaluation (0: the reference's test points / num_points)."""
    # model; the defaults are the reference's
    pretrained: str = ""
    """pretraining checkpoint whose encoder initialises the backbone ("" trains from scratch)."""
    dim: int = 384
    """transformer width (channels per token)."""
    depth: int = 12
    """number of transformer blocks of the encoder."""
    heads: int = 6
    """attention heads per transformer block."""
    drop_path_rate: float = 0.1
    """stochastic depth rate of the last block, increasing linearly from 0 at the first block."""
    num_group: int = 128
    """patches per block (FPS centres)."""
    group_size: int = 32
    """points per patch (kNN neighbours of its centre)."""
    embed_hidden: int = 128
    """width of the patch embedding's first layer (128 -> 256 -> 512 in the reference)."""
    feature_blocks: tuple[int, ...] = ()
    """1-based encoder blocks whose (normed) outputs form the per-centre feature; empty: the
    last block of each third of the encoder ((4, 8, 12) at depth 12, as the reference)."""
    fp_dims: tuple[int, ...] = (1536, 1024)
    """output channels of the feature propagation's 1x1 conv layers, one entry per layer."""
    head_dims: tuple[int, int] = (512, 256)
    """channels of the per-point head's two hidden 1x1 conv layers."""
    dropout: float = 0.5
    """dropout probability in the per-point head (after its first hidden layer)."""
    # optimisation
    batch_size: int = 32
    """GLOBAL batch in blocks, split evenly over the processes."""
    eval_batch_size: int = 32
    """blocks per forward pass (per process) in evaluation and in the whole-room test."""
    lr: float = 2e-4
    """base learning rate of AdamW (peak of the per-epoch cosine schedule, after warm-up)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, 1-D parameters and tokens)."""
    epochs: int = 60
    """cosine length in epochs; the loop runs exactly this many epochs (0..epochs-1)."""
    warmup_epochs: int = 10
    """epochs of linear learning-rate warm-up from 1e-6 to lr (0: none)."""
    grad_clip: float = 10.0
    """maximum global L2 norm of the gradients (clipped before the step; see --double-step)."""
    double_step: bool = True
    """the reference's loop (from Point-MAE): backward, AdamW step with the UNclipped gradients,
    clip to grad_clip, AdamW step AGAIN with the clipped ones (two updates per batch). False:
    clip, then one step."""
    max_loss: float = 1000.0
    """stop when the logged training loss exceeds this (a run that explodes without NaN), as
    for a NaN loss: the last confirmed checkpoint is kept and named."""
    max_steps: int = 0
    """stop after this many optimizer steps (0: the whole schedule). For debugging."""
    seed: int = 0
    """seed of every random draw (model init, data order, blocks, augmentation, test blocks);
    the reference sets no seed, we always do."""
    # whole-room test
    test_rooms: bool = False
    """after training, test the best-mIoU weights by whole-room sliding-window voting."""
    eval_ckpt: str = ""
    """skip training: run the whole-room test of this fine-tuned checkpoint, into
    out_dir/eval-NAME.json and out_dir/test_predictions. The model's fields come from it. A
    reference `best_model.pth` is converted on the fly (the reference architecture)."""
    num_votes: int = 3
    """sliding-window passes over every test room in the whole-room test; each pass gives every
    point it covers one vote for its predicted label, and the most voted label wins."""
    stride: float = 0.5
    """window stride of the whole-room test (metres)."""
    # speed
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    amp: bool = False
    """bf16 autocast in training and evaluation. Deviation when on: the reference runs float32."""
    compile: bool = False
    """torch.compile the encoder (`PointSegmenter.compile_fixed_shapes`); grouping, feature
    propagation and the head stay eager."""
    fused_adamw: bool = True
    """AdamW as one fused kernel (torch's fused=True): the same update rule as the reference's
    default (for-each) AdamW, up to rounding in the last bits."""
    collective_timeout: float = 600.0
    """seconds a process waits for the others at a collective (torchrun) before the job stops,
    naming the ranks that did not answer (a stopped, hung or dead peer); torch's default is
    30 minutes."""
    sync_bn: bool = True
    """BatchNorm over the global batch under multi-process DDP (pqae.syncbn: all-reduced
    statistics, no host sync), as the reference's single-GPU run sees it; off: per-process
    BatchNorm."""
    # output
    out_dir: str = "runs/semseg"
    """directory of the run's config.json, checkpoints, TensorBoard logs and the whole-room
    test's predictions (test_predictions/<room>.txt)."""
    resume: bool = False
    """continue from out_dir/ckpt-last."""
    overwrite: bool = False
    """delete out_dir first when it already holds a run (without this or --resume, such a run
    is refused and left untouched)."""
    log_every: int = 50
    """print a progress line (and log TensorBoard scalars) every this many optimizer steps."""


PRESETS = {
    "reference": Config(),
    "tiny": Config(
        data="synthetic", num_points=512, min_block_points=256, sample_rate=0.5, eval_blocks=32,
        **TINY_ENCODER, num_group=32, group_size=16,
        feature_blocks=(2, 3, 4), fp_dims=(128, 96), head_dims=(64, 32), batch_size=16,
        # 12 epochs: BatchNorm's running variance starts at 1 while these activations' is
        # ~1e-3 (trunc-normal init); fewer steps leave eval-mode predictions meaningless.
        lr=1e-3, epochs=12, warmup_epochs=0, log_every=5, num_votes=1,
        out_dir="runs/semseg-tiny"),
}


MODEL_FIELDS = ckpt.ENCODER_FIELDS + ("num_group", "group_size", "feature_blocks", "fp_dims",
                                      "head_dims", "dropout")
"""The fields that build the segmenter: an evaluated checkpoint brings its own."""
RUN_FIELDS = ("data", "data_path", "test_area", "synthetic_rooms", "num_points", "block_size",
              "seed", "out_dir")
"""What else an evaluated checkpoint brings unless flags say otherwise: its data and run."""


def resolve(cfg: Config, explicit: set[str], run: bool = True) -> Config:
    """The model of --eval-ckpt (and its data and run when `run`), the encoder shape of --pretrained, and --data-path only with
    --data s3dis (`cli.from_checkpoints`)."""
    return cli.from_checkpoints(cfg, explicit, MODEL_FIELDS, RUN_FIELDS if run else (),
                                "synthetic")


def percent(s: dict) -> dict:
    """Scores of `s3dis.scores` (fractions) in %: mIoU, mAcc, OA and the per-class IoU."""
    return {**s, **{k: 100.0 * s[k] for k in ("miou", "macc", "oa")},
            "iou": {c: 100.0 * v for c, v in s["iou"].items()}}


def eval_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of test batch `batch` in the evaluation after `epoch` (independent of rank)."""
    return (seed * 1_000_003 + 500_000 + epoch) * 100_003 + batch


def load_data(cfg: Config) -> tuple[s3dis.Rooms, s3dis.Rooms]:
    """(train rooms, test rooms), on the CPU."""
    areas = (1, 2, 3, 4, 5, 6)
    train_areas = tuple(a for a in areas if a != cfg.test_area)
    if cfg.data == "synthetic":
        arrays = s3dis.synthetic_rooms(tuple(r % 6 + 1 for r in range(cfg.synthetic_rooms)),
                                       seed=cfg.seed)
        pick = lambda keep: s3dis.make_rooms(  # noqa: E731
            {k: v for k, v in arrays.items() if s3dis.area_of(k) in keep}, "synthetic")
        return pick(train_areas), pick((cfg.test_area,))
    return s3dis.load_rooms(cfg.data_path, train_areas), s3dis.load_rooms(cfg.data_path,
                                                                           (cfg.test_area,))


def build_model(cfg: Config) -> PointSegmenter:
    return PointSegmenter(
        s3dis.NUM_CLASSES, num_categories=0, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
        drop_path_rate=cfg.drop_path_rate, num_group=cfg.num_group, group_size=cfg.group_size,
        embed_hidden=cfg.embed_hidden,
        feature_blocks=cfg.feature_blocks or feature_blocks_for(cfg.depth), fp_dims=cfg.fp_dims,
        head_dims=cfg.head_dims, dropout=cfg.dropout, init="trunc_normal")


@torch.no_grad()
def evaluate_blocks(model, rooms: s3dis.Rooms, slots: torch.Tensor, cfg: Config, epoch: int,
                    rank: int, world: int, device: torch.device) -> dict:
    """§6.5: predict random test blocks (one per slot) and score the summed confusion counts.
    Batches are sharded over ranks and each is drawn from its own seed, so every block is
    evaluated exactly once whatever the world size. OA divides by the points actually
    evaluated (the reference divides by batches x 32 x 2048, which assumed full batches)."""
    model.eval()
    conf = torch.zeros(s3dis.NUM_CLASSES, s3dis.NUM_CLASSES, dtype=torch.long, device=device)
    batches = math.ceil(len(slots) / cfg.eval_batch_size)
    for b in dist.shard(batches, rank, world):
        torch.manual_seed(eval_seed(cfg.seed, epoch, b))
        ids = slots[b * cfg.eval_batch_size:(b + 1) * cfg.eval_batch_size].tolist()
        points, labels, _ = s3dis.sample_blocks(rooms, ids, cfg.num_points, cfg.block_size,
                                                cfg.min_block_points)
        with amp.autocast(device, cfg.amp):
            logp = model(points)
        conf += s3dis.confusion(logp.argmax(dim=-1), labels)
    model.train()
    return s3dis.scores(dist.all_reduce_sum(conf))


@torch.no_grad()
def test_whole_rooms(model, rooms: s3dis.Rooms, cfg: Config, rank: int, world: int,
                     device: torch.device, pred_dir: Path) -> dict:
    """§6.6: num_votes sliding-window passes over every test room; each predicted label is one
    vote for its point; the final label is the most voted (class 0 for a point never covered,
    which the cover rules out). Rooms are sharded over ranks, confusion counts summed once.
    Writes `pred_dir/<room>.txt`, one predicted label per line in the room's point order.

    The reference only counts a vote where the test label weight of the point's TRUE class is
    finite and non-zero; that holds for every class present in the test rooms, i.e. always."""
    model.eval()
    pred_dir.mkdir(parents=True, exist_ok=True)
    conf = torch.zeros(s3dis.NUM_CLASSES, s3dis.NUM_CLASSES, dtype=torch.long, device=device)
    for r in dist.shard(len(rooms), rank, world):
        xyz, labels = rooms.room(r)
        votes = torch.zeros(len(xyz), s3dis.NUM_CLASSES, dtype=torch.int32, device=device)
        for v in range(cfg.num_votes):
            torch.manual_seed(step_seed(cfg.seed, r * 1000 + v, 7))
            idx, points = s3dis.window_chunks(xyz, cfg.num_points, cfg.block_size, cfg.stride)
            for b in range(0, len(idx), cfg.eval_batch_size):
                with amp.autocast(device, cfg.amp):
                    pred = model(points[b:b + cfg.eval_batch_size]).argmax(dim=-1)  # (b, n)
                one = torch.ones(pred.numel(), dtype=torch.int32, device=device)
                votes.index_put_((idx[b:b + cfg.eval_batch_size].flatten(), pred.flatten()), one,
                                 accumulate=True)
        final = votes.argmax(dim=1)  # first maximum, as np.argmax
        conf += s3dis.confusion(final, labels)
        np.savetxt(pred_dir / f"{rooms.names[r]}.txt", final.cpu().numpy(), fmt="%d")
    model.train()
    return s3dis.scores(dist.all_reduce_sum(conf))


def format_scores(tag: str, s: dict) -> str:
    return (f"{tag} | mIoU {s['miou']:.2f} % | mAcc {s['macc']:.2f} % | OA {s['oa']:.2f} % | "
            f"{s['points']} points")


def format_iou(s: dict) -> str:
    return "per-class IoU (%): " + ", ".join(f"{c} {v:.1f}" for c, v in s["iou"].items())


def run_test(model, test: s3dis.Rooms, cfg: Config, rank: int, world: int, device, out_dir: Path,
             writer, step: int) -> dict:
    t0 = time.perf_counter()
    result = percent(test_whole_rooms(model, test, cfg, rank, world, device,
                                      out_dir / "test_predictions"))
    print0(format_scores(f"whole-room test ({len(test)} rooms, {cfg.num_votes} votes)", result)
           + f" | {time.perf_counter() - t0:.0f} s", rank=rank)
    print0(format_iou(result), rank=rank)
    log_scalars(writer, step, {f"test/{k}": result[k] for k in ("miou", "macc", "oa")})
    return result


def make_train_step(cfg: Config, model, train_model, optimizer, train: s3dis.Rooms,
                    weights: torch.Tensor, env: dist.Dist):
    """The optimizer step of `step` (§6.2 blocks, §5.2 augmentation, weighted NLL, the double
    step and clipping of §6.4), with no host sync: its randomness comes from (seed, step, rank)
    and `order` (the epoch's room slots, on the host)."""
    rank, world, device = env.rank, env.world_size, env.device
    local_bs = cfg.batch_size // world

    def train_step(step: int, order: torch.Tensor) -> torch.Tensor:
        """One batch; returns [this process's share of the global weighted loss, its
        correct-point fraction, its fallback blocks]: summed over ranks, the first is the loss
        of the global batch."""
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        i = step % (len(order) // cfg.batch_size)  # order: this epoch's room slots (host)
        ids = order[i * cfg.batch_size + rank * local_bs:][:local_bs].tolist()
        points, labels, fallbacks = s3dis.sample_blocks(
            train, ids, cfg.num_points, cfg.block_size, cfg.min_block_points)  # (b, n, 3), (b, n)
        # §5.2 augmentation: isotropic scale U(0.8, 1.25), then a shift U(-0.1, 0.1) per axis.
        scale = 0.8 + 0.45 * torch.rand(local_bs, 1, 1, device=device)
        shift = -0.1 + 0.2 * torch.rand(local_bs, 1, 3, device=device)
        with amp.autocast(device, cfg.amp):
            logp = train_model(points * scale + shift).float()  # (b, n, 13)
        nll = -logp.gather(-1, labels[..., None])[..., 0]  # (b, n)
        w = weights[labels]
        # PyTorch's weighted NLL mean (sum of w * nll / sum of w) over the GLOBAL batch: the
        # denominator is summed over ranks and DDP averages gradients, hence the x world.
        denom = dist.all_reduce_sum(w.sum().detach())
        loss = (w * nll).sum() * world / denom
        loss.backward()
        if cfg.double_step:
            optimizer.step()  # the reference's first step: unclipped gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        acc = (logp.argmax(dim=-1) == labels).float().mean()
        return torch.stack([loss.detach() / world, acc, fallbacks.float()])

    return train_step


def main(cfg: Config) -> dict:
    cfg = resolve(cfg, set(), run=False)  # the model of --eval-ckpt / encoder of --pretrained
    env = dist.setup(cfg.device, cfg.collective_timeout)
    rank, world, device = env.rank, env.world_size, env.device
    if cfg.batch_size % world:
        raise BadInput(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    local_bs = cfg.batch_size // world
    out_dir = Path(cfg.out_dir)
    header = run_header(device, world)
    print0(header, rank=rank)
    if not cfg.eval_ckpt:  # before anything is read or written
        ckpt.claim_out_dir(out_dir, cfg.resume, cfg.overwrite, rank)
        dist.barrier()

    torch.manual_seed(cfg.seed)  # model init: identical on every rank
    train, test = (rooms.to(device) for rooms in load_data(cfg))
    model = build_model(cfg).to(device)
    print0(f"PointSegmenter: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
           f" | train {len(train)} rooms ({len(train.xyz)} points) | test area {cfg.test_area}: "
           f"{len(test)} rooms ({len(test.xyz)} points)", rank=rank)
    if cfg.eval_ckpt:  # whole-room test of a fine-tuned model, no training
        from data_prep.convert_checkpoint import load_any  # ours, or a reference .pth
        ckpt.load_strict(model, load_any(cfg.eval_ckpt, "semseg"), source=cfg.eval_ckpt,
                         hint="the model's fields differ from the checkpoint's; leave them out")
        result = run_test(model, test, cfg, rank, world, device, out_dir, None, 0)
        path = out_dir / f"eval-{Path(cfg.eval_ckpt).stem}.json"
        if rank == 0:
            write_json(path, {"config": dataclasses.asdict(cfg), "mode": "eval",
                              "checkpoint": cfg.eval_ckpt, "test": result})
        finish(format_scores(f"{cfg.eval_ckpt}: whole-room test", result),
               {"results": path, "predictions": out_dir / "test_predictions"}, [], rank=rank)
        dist.cleanup()
        return {"test": result, "model": model, "out_dir": str(out_dir)}

    writer = tensorboard(out_dir, cfg, header) if rank == 0 else None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    if cfg.pretrained:
        dropped = load_pretrained(model, cfg.pretrained)
        print0(f"loaded the encoder of {cfg.pretrained} (ignored {len(dropped)} pretraining-only "
               f"keys)", rank=rank)
    weights = s3dis.class_weights(train.labels).to(device)  # (13,) §6.2
    print0("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(s3dis.CLASSES, weights)),
           rank=rank)
    train_slots = s3dis.epoch_rooms(train.sizes(), cfg.num_points, cfg.sample_rate)
    test_slots = s3dis.epoch_rooms(test.sizes(), cfg.num_points)  # the reference's test length
    if cfg.eval_blocks:  # spread a smaller evaluation evenly over the rooms
        test_slots = test_slots[torch.linspace(0, len(test_slots) - 1, cfg.eval_blocks).long()]
    steps_per_epoch = len(train_slots) // cfg.batch_size  # drop_last, as the reference
    if steps_per_epoch == 0:
        raise BadInput(f"{len(train_slots)} training blocks per epoch are fewer than one "
                       f"batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    print0(f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs | global batch {cfg.batch_size} "
           f"({local_bs} per process) | {len(test_slots)} test blocks per evaluation", rank=rank)

    if env.enabled and cfg.sync_bn:
        model = syncbn.convert(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  fused=cfg.fused_adamw)
    if cfg.compile:
        model.compile_fixed_shapes()

    step, best_miou, history, best_state = 0, -1.0, [], None
    if cfg.resume:
        last, state, meta = ckpt.resume_from(out_dir, model, optimizer, rank)
        step, best_miou = state["step"], state["best_miou"]
        history = meta.get("history", [])
        best = ckpt.find_checkpoint(out_dir / "ckpt-best")  # written before that run ended
        best_state = ckpt.load_weights(best) if best is not None else None
        print0(f"resumed from {last} at step {step} (best mIoU {best_miou:.4f})", rank=rank)

    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if env.enabled else model

    train_step = make_train_step(cfg, model, train_model, optimizer, train, weights, env)

    def save(epoch: int, step: int, metrics: dict) -> None:
        if rank == 0:
            meta = {"config": dataclasses.asdict(cfg), "epoch": epoch, "step": step,
                    "metrics": metrics, "history": history, "header": header}
            resume = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                      "best_miou": best_miou}
            ckpt.save_checkpoint(out_dir / "ckpt-last", model, meta, resume)

    timer, metrics = Timer(device), {}
    sums = torch.zeros(3, device=device)  # loss, accuracy, fallback blocks since the last log
    t_start, start_step = time.perf_counter(), step
    epoch = step // steps_per_epoch
    order = train_slots[epoch_perm(cfg.seed, epoch, len(train_slots))]  # rooms, shuffled
    train_model.train()
    while step < total_steps:
        lr = set_epoch_lr(optimizer, epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        sums += train_step(step, order)
        step += 1
        timer.steps += 1
        epoch_end = step % steps_per_epoch == 0
        if step % cfg.log_every == 0 or epoch_end or step == total_steps:
            dist.all_reduce_sum(sums)  # every rank logs at the same steps
            loss, acc, fallbacks = (sums / timer.steps).tolist()
            acc, fallbacks = 100 * acc / world, round(fallbacks * timer.steps)  # acc in %
            ckpt.stop_if_diverged(loss, step, epoch, out_dir, cfg.max_loss, rank)
            if fallbacks:
                print0(f"note: {fallbacks} training block(s) since the last line had no candidate "
                       f"centre with more than {cfg.min_block_points} points; the fullest "
                       f"candidate block was used (see s3dis.sample_block)", rank=rank)
            ms = timer.ms_per_step()
            eta = (time.perf_counter() - t_start) / (step - start_step) * (total_steps - step)
            metrics = {"loss": loss, "train_acc": acc}
            print0(f"epoch {epoch}/{cfg.epochs - 1} | step {step}/{total_steps} | loss {loss:.4f} | "
                   f"train acc {acc:.2f} % | lr {lr:.3g} | {ms:.0f} ms/step | "
                   f"{cfg.batch_size * 1000 / ms:.0f} blocks/s | ETA {format_eta(eta)}", rank=rank)
            log_scalars(writer, step, {"train/loss": loss, "train/acc": acc, "train/lr": lr,
                                       "perf/ms_per_step": ms})
            sums.zero_()
            timer.reset()
        if epoch_end:
            t0 = time.perf_counter()
            dist.broadcast_buffers(model)  # every rank evaluates rank 0's model
            ev = percent(evaluate_blocks(model, test, test_slots, cfg, epoch, rank, world, device))
            metrics.update(miou=ev["miou"], macc=ev["macc"], oa=ev["oa"], points=ev["points"])
            history.append({"epoch": epoch, "step": step, **metrics})
            improved = ev["miou"] >= best_miou  # ">=" as the reference
            best_miou = max(best_miou, ev["miou"])
            print0(format_scores(f"eval epoch {epoch} ({len(test_slots)} blocks)", ev)
                   + f" | best mIoU {best_miou:.2f} % | {time.perf_counter() - t0:.0f} s", rank=rank)
            print0(format_iou(ev), rank=rank)
            log_scalars(writer, step, {**{f"eval/{k}": ev[k] for k in ("miou", "macc", "oa")},
                                       **{f"eval_iou/{c}": v for c, v in ev["iou"].items()}})
            if improved:  # every rank keeps a copy (ranks are identical): no file race later
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if improved and rank == 0:
                ckpt.save_checkpoint(out_dir / "ckpt-best", model,
                                     {"config": dataclasses.asdict(cfg), "epoch": epoch,
                                      "step": step, "metrics": metrics, "header": header})
        if epoch_end or step == total_steps:
            save(epoch, step, metrics)
        if epoch_end:
            epoch += 1
            order = train_slots[epoch_perm(cfg.seed, epoch, len(train_slots))]  # rooms, shuffled

    ckpt.confirm(out_dir / "ckpt-last", rank)  # the run ended normally
    evals = [h for h in history if "miou" in h]
    best_epoch = max(evals, key=lambda h: h["miou"])["epoch"] if evals else None
    result = {"config": dataclasses.asdict(cfg), "step": step, "total_steps": total_steps,
              "history": history, "metrics": metrics, "best_miou": best_miou if evals else None,
              "best_epoch": best_epoch, "test": None,
              "best_note": "best_miou selects the epoch on the TEST area's random blocks (the "
                           "reference's ckpt-best); scores in %"}
    if cfg.test_rooms:
        if best_state is not None:
            model.load_state_dict(best_state)
            print0(f"whole-room test of the best-mIoU weights (mIoU {best_miou:.2f} %)", rank=rank)
        result["test"] = run_test(model, test, cfg, rank, world, device, out_dir, writer, step)
    if rank == 0:
        write_json(out_dir / "results.json", result)
    if writer is not None:
        writer.close()
    if evals:
        summary = (format_scores(f"last epoch {evals[-1]['epoch']}", evals[-1]) + f" | best mIoU "
                   f"{best_miou:.2f} % (epoch {best_epoch}, selected on the test area)")
        if result["test"] is not None:
            summary += "\n     " + format_scores("whole-room test", result["test"])
    else:
        summary = f"no evaluation (stopped at step {step}, before the first epoch ended)"
    tiny = "--preset tiny " if cfg.data == "synthetic" else ""
    best_ckpt = out_dir / ("ckpt-best" if evals else "ckpt-last")
    finish(summary, run_outputs(out_dir, best_ckpt),
           [f"python semseg.py {tiny}--eval-ckpt {best_ckpt}"], rank=rank)
    dist.cleanup()
    return {**result, "out_dir": str(out_dir), "model": model}


if __name__ == "__main__":
    cli.run(main, Config, PRESETS, doc=__doc__.split("\n\n")[0], resolve=resolve)
