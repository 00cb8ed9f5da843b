"""Part segmentation on ShapeNetPart: a pretrained encoder + per-point head.

    python -m data_prep.shapenetpart --root data/shapenetcore_partanno_segmentation_benchmark_v0_normal \
        --out data/shapenetpart.h5                                        # once
    python partseg.py --pretrained runs/pretrain/ckpt-epoch-300           # reference, one GPU
    torchrun --nproc_per_node=4 partseg.py --pretrained runs/pretrain/ckpt-epoch-300
    python partseg.py --eval-ckpt runs/partseg/ckpt-best-on-test          # evaluate only
    python partseg.py --preset tiny                                       # built-in shapes, CPU

Both splits are held whole on the device (points concatenated, with offsets) and each step
draws its batch there: 2048 points per shape WITH replacement, then scale and translate
(§5.2). All randomness of a step is a pure function of (seed, step, rank), and the test
sampling of an epoch (the reference resamples the test set every epoch) of (seed, epoch), so
a resumed run is exact and evaluation does not depend on the number of processes. After every
epoch the test split is evaluated (each shape exactly once across processes): accuracy,
class mIoU and instance mIoU, restricted to each shape's category (§5.5).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from pqae import checkpoint as ckpt
from pqae import amp, cli, dist, syncbn
from pqae import shapenetpart as spart
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
    data: Literal["shapenetpart", "synthetic"] = "shapenetpart"
    """shapenetpart: the HDF5 from `python -m data_prep.shapenetpart`; synthetic: built-in
    two-part shapes (no files), for smoke runs only."""
    data_path: str = "data/shapenetpart.h5"
    """the HDF5 from `python -m data_prep.shapenetpart` (data = shapenetpart)."""
    synthetic_shapes: int = 160
    """training shapes when data = synthetic (a quarter as many test shapes)."""
    train_split: Literal["train", "test"] = "train"
    """train = the reference's trainval. (test only for smoke runs on slices without train.)"""
    num_points: int = 2048
    """points per shape, drawn with replacement for training and evaluation."""
    # model; the defaults are the reference's
    pretrained: str = ""
    """pretraining checkpoint (directory or .safetensors) whose encoder is loaded strictly;
    empty: train from scratch."""
    dim: int = 384
    """transformer width (channels per token)."""
    depth: int = 12
    """number of transformer blocks of the encoder."""
    heads: int = 6
    """attention heads per transformer block."""
    drop_path_rate: float = 0.1
    """stochastic depth rate of the last block, increasing linearly from 0 at the first block."""
    num_group: int = 128
    """patches per shape (FPS centres)."""
    group_size: int = 32
    """points per patch (kNN neighbours of its centre)."""
    embed_hidden: int = 128
    """width of the patch embedding's first layer (128 -> 256 -> 512 in the reference)."""
    feature_blocks: tuple[int, ...] = ()
    """1-based encoder blocks whose (normed) outputs form the per-center feature; empty: the
    last block of each third of the encoder ((4, 8, 12) at depth 12, as the reference)."""
    fp_dims: tuple[int, ...] = (1536, 1024)
    """output channels of the feature propagation's 1x1 conv layers, one entry per layer."""
    head_dims: tuple[int, int] = (512, 256)
    """channels of the per-point head's two hidden 1x1 conv layers."""
    # optimisation
    batch_size: int = 16
    """GLOBAL batch in shapes, split evenly over the processes (drop_last, as the reference)."""
    eval_batch_size: int = 32
    """GLOBAL evaluation batch in shapes (does not change results: the model is in eval mode)."""
    lr: float = 2e-4
    """base learning rate of AdamW (at 1e-4 or 5e-5 the head's conv layers use 10x it, as the
    reference)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, 1-D parameters and tokens outside the 10x
    group)."""
    epochs: int = 300
    """cosine length in epochs; the loop runs exactly this many epochs (0..epochs-1), unlike
    pretraining."""
    warmup_epochs: int = 10
    """epochs of linear learning-rate warm-up from 1e-6 to lr (0: none)."""
    grad_clip: float = 10.0
    """maximum global L2 norm of the gradients (clipped before the step; see --double-step)."""
    double_step: bool = True
    """the reference (from Point-MAE) steps AdamW with the unclipped gradients, clips, and steps
    again: two updates per batch. False: clip, then one step."""
    max_loss: float = 1000.0
    """stop when the logged training loss exceeds this (a run that explodes without NaN), as
    for a NaN loss: the last confirmed checkpoint is kept and named."""
    max_steps: int = 0
    """stop after this many optimizer steps (0: the whole schedule). For debugging."""
    eval_ckpt: str = ""
    """skip training: evaluate this fine-tuned checkpoint once on the test split (the
    reference's --test), with the test points drawn as in epoch 0's evaluation, into
    out_dir/eval-NAME.json. The model's fields come from the checkpoint. A
    reference `best_model.pth` is converted on the fly (the reference architecture)."""
    seed: int = 0
    """seed of every random draw (model init, data order, point sampling, augmentation)."""
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
    out_dir: str = "runs/partseg"
    """directory of the run's config.json, checkpoints and TensorBoard logs."""
    resume: bool = False
    """continue from out_dir/ckpt-last (same lr, data order and random draws)."""
    overwrite: bool = False
    """delete out_dir first when it already holds a run (without this or --resume, such a run
    is refused and left untouched)."""
    log_every: int = 50
    """print a progress line (and log TensorBoard scalars) every this many optimizer steps."""


PRESETS = {
    "reference": Config(),
    "tiny": Config(
        data="synthetic", num_points=512, **TINY_ENCODER, num_group=32, group_size=16,
        fp_dims=(64, 32), head_dims=(32, 16), batch_size=4,
        eval_batch_size=8, lr=1e-3, epochs=3, warmup_epochs=0, log_every=1,
        out_dir="runs/partseg-tiny"),
}

# The lrs at which the reference builds its extra 10x group (§5.4).
TEN_X_LRS = (1e-4, 5e-5)

MODEL_FIELDS = ckpt.ENCODER_FIELDS + ("num_group", "group_size", "feature_blocks", "fp_dims",
                                      "head_dims")
"""The fields that build the segmenter: an evaluated checkpoint brings its own."""
RUN_FIELDS = ("data", "data_path", "synthetic_shapes", "num_points", "seed", "out_dir")
"""What else an evaluated checkpoint brings unless flags say otherwise: its data and run."""
METRICS = ("acc", "class_miou", "instance_miou")
"""The scores of an evaluation, reported in % (point accuracy, class mIoU, instance mIoU)."""


def resolve(cfg: Config, explicit: set[str], run: bool = True) -> Config:
    """The model of --eval-ckpt (and its data and run when `run`), the encoder shape of --pretrained, and --data-path only with
    --data shapenetpart (`cli.from_checkpoints`)."""
    return cli.from_checkpoints(cfg, explicit, MODEL_FIELDS, RUN_FIELDS if run else (),
                                "synthetic")


def build_model(cfg: Config) -> PointSegmenter:
    return PointSegmenter(spart.NUM_CLASSES, len(spart.CATEGORIES), dim=cfg.dim, depth=cfg.depth,
                          heads=cfg.heads, drop_path_rate=cfg.drop_path_rate,
                          num_group=cfg.num_group, group_size=cfg.group_size,
                          embed_hidden=cfg.embed_hidden,
                          feature_blocks=cfg.feature_blocks or feature_blocks_for(cfg.depth),
                          fp_dims=cfg.fp_dims, head_dims=cfg.head_dims, init="default")


def build_param_groups(model: PointSegmenter, lr: float, weight_decay: float) -> list[dict]:
    """The reference's groups (§5.4): no-decay (1-D / `.bias` / `token`) and decay; at lr 1e-4
    or 5e-5 also a 10x group, with decay, of the parameters named `conv` but not `encoder`
    (label_conv incl. its BatchNorm, propagation.mlp_convs, convs1-3; not mlp_bns, bns1-2).

    The reference's builder returns nothing for any other lr than {2e-4, 3e-4, 5e-4, 1e-3,
    1e-4, 5e-5} and the script crashes: a bug, not a recipe, so every other lr gets the two
    ordinary groups here."""
    if lr not in TEN_X_LRS:
        return param_groups(model, weight_decay)
    # Our encoder's modules carry no `conv` in their names, so `conv` alone selects the group.
    groups = param_groups(model, weight_decay, head_lr_scale=10.0, head_key="conv")
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any(names[id(p)].startswith("encoder.") for p in groups[0]["params"])
    return groups


@torch.no_grad()
def evaluate(model: PointSegmenter, test: spart.PartSplit, cfg: Config, epoch: int,
             rank: int = 0, world: int = 1) -> dict:
    """Test metrics of §5.5 at `epoch`. Every process evaluates its contiguous shard of the
    shapes; per-shape IoUs are summed into one (S,) tensor, so each shape counts exactly once.
    Returns the metrics plus "shape_ious" (S,) and "times_seen" (S,)."""
    was_training = model.training
    model.eval()
    device = test.points.device
    S = len(test)
    # The test points of an epoch: a function of (seed, epoch), the same whatever the world size.
    g = torch.Generator().manual_seed(cfg.seed * 7919 + 104_729 + epoch)
    u = torch.rand(S, cfg.num_points, generator=g)  # (S, n)
    ious = torch.zeros(S, dtype=torch.float64, device=device)
    seen = torch.zeros(S, dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total points
    chunk = max(1, cfg.eval_batch_size // world)
    mine = dist.shard(S, rank, world)
    for start in range(mine.start, mine.stop, chunk):
        idx = torch.arange(start, min(start + chunk, mine.stop))
        points, labels = test.sample(idx, u[idx])  # (b, n, 3), (b, n)
        with amp.autocast(device, cfg.amp):
            logp = model(points, test.category[idx.to(device)]).float()  # (b, n, 50)
        pred = spart.restricted_argmax(logp, labels)
        ious[idx] = spart.shape_ious(pred, labels)
        seen[idx] += 1
        counts += torch.stack([(pred == labels).sum().double(),
                                torch.tensor(float(labels.numel()), device=device)])
    for t in (ious, seen, counts):
        dist.all_reduce_sum(t)
    if not bool((seen == 1).all()):
        raise RuntimeError(f"evaluation saw shapes {seen.tolist()} times instead of once each")
    model.train(was_training)
    metrics = spart.summarize(ious, test.category, int(counts[0]), int(counts[1]))
    return {**metrics, "shape_ious": ious.cpu(), "times_seen": seen.cpu()}


def make_train_step(cfg: Config, model, train_model, optimizer, train: spart.PartSplit,
                    env: dist.Dist):
    """The optimizer step of `step` (§5.2 sampling and augmentation, NLL, the double step and
    clipping of §5.4), with no host sync: its randomness comes from (seed, step, rank) and the
    epoch order `perm` (on the device)."""
    rank, device = env.rank, env.device
    local_bs = cfg.batch_size // env.world_size
    steps_per_epoch = len(train) // cfg.batch_size

    def train_step(step: int, perm: torch.Tensor) -> torch.Tensor:
        """One batch; returns [loss, correct points, points] of this process."""
        torch.manual_seed(step_seed(cfg.seed, step, rank))  # sampling, augmentation, DropPath
        i = step % steps_per_epoch
        idx = perm[i * cfg.batch_size + rank * local_bs:][:local_bs]
        u = torch.rand(local_bs, cfg.num_points, device=device)
        points, labels = train.sample(idx, u)  # (b, n, 3), (b, n)
        points = spart.augment(points)
        with amp.autocast(device, cfg.amp):
            logp = train_model(points, train.category[idx]).float()  # (b, n, 50)
        # NLL over all points and all 50 parts (no category restriction in the loss, §5.4).
        loss = F.nll_loss(logp.reshape(-1, spart.NUM_CLASSES), labels.reshape(-1))
        loss.backward()
        if cfg.double_step:
            optimizer.step()  # the reference's first update, with the UNclipped gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        correct = (logp.detach().argmax(-1) == labels).sum()
        return torch.stack([loss.detach(), correct.float(),
                            torch.full((), float(labels.numel()), device=device)])

    return train_step


def scores(result: dict) -> dict:
    """The evaluation's scores in %."""
    return {k: 100.0 * result[k] for k in METRICS}


def main(cfg: Config) -> dict:
    cfg = resolve(cfg, set(), run=False)  # the model of --eval-ckpt / encoder of --pretrained
    env = dist.setup(cfg.device, cfg.collective_timeout)
    rank, world, device = env.rank, env.world_size, env.device
    if cfg.batch_size % world:
        raise BadInput(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    local_bs = cfg.batch_size // world
    if local_bs < 2:
        raise BadInput(f"{local_bs} shape(s) per process: BatchNorm needs at least 2")
    out_dir = Path(cfg.out_dir)
    header = run_header(device, world)
    print0(header, rank=rank)
    if not cfg.eval_ckpt:  # before anything is read or written
        ckpt.claim_out_dir(out_dir, cfg.resume, cfg.overwrite, rank)
        dist.barrier()

    torch.manual_seed(cfg.seed)  # model init: identical on every rank
    if cfg.data == "synthetic":
        train = spart.synthetic_split(cfg.synthetic_shapes, seed=cfg.seed).to(device)
        test = spart.synthetic_split(cfg.synthetic_shapes // 4, seed=cfg.seed + 1).to(device)
    else:
        train = spart.load_split(cfg.data_path, cfg.train_split).to(device)
        test = spart.load_split(cfg.data_path, "test").to(device)
    steps_per_epoch = len(train) // cfg.batch_size  # drop_last, as the reference
    if steps_per_epoch == 0:
        raise BadInput(f"{len(train)} shapes are fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    source = cfg.data if cfg.data == "synthetic" else cfg.data_path
    print0(f"data {source}: {cfg.train_split} {len(train)} shapes, test {len(test)} | "
           f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs | global batch "
           f"{cfg.batch_size} ({local_bs} per process)", rank=rank)

    model = build_model(cfg).to(device)
    if cfg.eval_ckpt:  # one evaluation of a fine-tuned model, no training
        from data_prep.convert_checkpoint import load_any  # ours, or a reference .pth
        ckpt.load_strict(model, load_any(cfg.eval_ckpt, "partseg"), source=cfg.eval_ckpt,
                         hint="the model's fields differ from the checkpoint's; leave them out")
        metrics = scores(evaluate(model, test, cfg, 0, rank, world))
        path = out_dir / f"eval-{Path(cfg.eval_ckpt).stem}.json"
        if rank == 0:
            write_json(path, {"config": dataclasses.asdict(cfg), "mode": "eval",
                              "checkpoint": cfg.eval_ckpt, "test": metrics})
        finish(f"{cfg.eval_ckpt}: " + format_scores(metrics), {"results": path}, [], rank=rank)
        dist.cleanup()
        return {"test": metrics, "model": model}
    if cfg.pretrained:
        dropped = load_pretrained(model, cfg.pretrained)
        print0(f"loaded encoder from {cfg.pretrained}; dropped {len(dropped)} pretraining-only "
               f"keys: {dropped}", rank=rank)
    print0(f"PointSegmenter: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters",
           rank=rank)
    if env.enabled and cfg.sync_bn:
        model = syncbn.convert(model)
    optimizer = torch.optim.AdamW(build_param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr,
                                  fused=cfg.fused_adamw)
    if cfg.compile:
        model.compile_fixed_shapes()

    step, history, best = 0, [], {}
    if cfg.resume:
        last, state, meta = ckpt.resume_from(out_dir, model, optimizer, rank)
        step, history, best = state["step"], state["history"], state["best"]
        print0(f"resumed from {last} at step {step}", rank=rank)

    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if env.enabled else model

    writer = tensorboard(out_dir, cfg, header) if rank == 0 else None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def save(name: str, epoch: int, metrics: dict, resumable: bool) -> None:
        if rank != 0:
            return
        meta = {"config": dataclasses.asdict(cfg), "epoch": epoch, "step": step,
                "metrics": metrics, "header": header}
        resume = {"optimizer": optimizer.state_dict(), "step": step, "history": history,
                  "best": best} if resumable else None
        ckpt.save_checkpoint(out_dir / name, model, meta, resume)

    train_step = make_train_step(cfg, model, train_model, optimizer, train, env)
    timer = Timer(device)
    sums = torch.zeros(3, device=device)  # loss, correct points, points since the last log line
    t_start, start_step = time.perf_counter(), step
    epoch = step // steps_per_epoch
    perm = epoch_perm(cfg.seed, epoch, len(train), device)  # on the device: no copy per step
    last_metrics = history[-1] if history else {}
    train_model.train()
    while step < total_steps:
        lr = set_epoch_lr(optimizer, epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        sums += train_step(step, perm)
        step += 1
        timer.steps += 1
        epoch_end = step % steps_per_epoch == 0
        if step % cfg.log_every == 0 or epoch_end or step == total_steps:
            # Summed over ranks: the line shows the global batch and every rank takes the same
            # stop decision.
            sums = dist.all_reduce_sum(sums)
            loss_avg = (sums[0] / (timer.steps * world)).item()
            acc = 100 * (sums[1] / sums[2]).item()  # %
            ckpt.stop_if_diverged(loss_avg, step, epoch, out_dir, cfg.max_loss, rank)
            ms = timer.ms_per_step()
            eta = (time.perf_counter() - t_start) / (step - start_step) * (total_steps - step)
            print0(f"epoch {epoch}/{cfg.epochs - 1} | step {step}/{total_steps} | loss "
                   f"{loss_avg:.4f} | train acc {acc:.2f} % | lr {lr:.3g} | {ms:.0f} ms/step | ETA "
                   f"{format_eta(eta)}", rank=rank)
            log_scalars(writer, step, {"train/loss": loss_avg, "train/acc": acc, "train/lr": lr,
                                       "perf/ms_per_step": ms})
            sums.zero_()
            timer.reset()
        if epoch_end:
            dist.broadcast_buffers(model)
            result = scores(evaluate(model, test, cfg, epoch, rank, world))  # in %
            last_metrics = {"epoch": epoch, **result}
            history.append(last_metrics)
            improved = result["instance_miou"] >= best.get("instance_miou", -1.0)
            for k in METRICS:  # each best tracked separately; ">" as the reference: on a tie
                if result[k] > best.get(k, -1.0):  # the first epoch is the reported one
                    best[k], best[f"{k}_epoch"] = result[k], epoch
            print0(f"epoch {epoch} test | {format_scores(result)} | best on test: instance mIoU "
                   f"{best['instance_miou']:.2f} % (epoch {best['instance_miou_epoch']}), class "
                   f"mIoU {best['class_miou']:.2f} %", rank=rank)
            log_scalars(writer, step, {f"test/{k}": result[k] for k in METRICS})
            if improved:  # as the reference's best_model.pth: instance mIoU >= best
                save("ckpt-best-on-test", epoch, last_metrics, resumable=False)
        if epoch_end or step == total_steps:
            save("ckpt-last", epoch, last_metrics, resumable=True)
        if epoch_end:
            epoch += 1
            perm = epoch_perm(cfg.seed, epoch, len(train), device)
            timer.reset()  # the next progress line times training steps, not the evaluation

    ckpt.confirm(out_dir / "ckpt-last", rank)  # the run ended normally
    last = history[-1] if history else {}
    result = {"config": dataclasses.asdict(cfg), "step": step, "total_steps": total_steps,
              "history": history, "last": last, "best_on_test": best,
              "best_note": "each best is selected on the TEST set (the reference's reported "
                           "numbers); scores in %"}
    if rank == 0:
        write_json(out_dir / "results.json", result)
    if writer is not None:
        writer.close()
    if history:
        summary = (f"last epoch {last['epoch']}: {format_scores(last)} | best epoch (selected on "
                   f"the TEST set): instance mIoU {best['instance_miou']:.2f} % (epoch "
                   f"{best['instance_miou_epoch']}), class mIoU {best['class_miou']:.2f} % (epoch "
                   f"{best['class_miou_epoch']})")
    else:
        summary = f"no evaluation (stopped at step {step}, before the first epoch ended)"
    tiny = "--preset tiny " if cfg.data == "synthetic" else ""
    best_ckpt = out_dir / ("ckpt-best-on-test" if history else "ckpt-last")
    finish(summary, run_outputs(out_dir, best_ckpt),
           [f"python partseg.py {tiny}--eval-ckpt {best_ckpt}"]
           + ([f"python semseg.py {tiny}--pretrained {cfg.pretrained}"] if cfg.pretrained else []),
           rank=rank)
    dist.cleanup()
    return {**result, "out_dir": str(out_dir), "model": model, "optimizer": optimizer}


def format_scores(m: dict) -> str:
    return (f"acc {m['acc']:.2f} % | class mIoU {m['class_miou']:.2f} % | instance mIoU "
            f"{m['instance_miou']:.2f} %")


if __name__ == "__main__":
    cli.run(main, Config, PRESETS, doc=__doc__.split("\n\n")[0], resolve=resolve)
