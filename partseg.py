"""Part segmentation on ShapeNetPart: a pretrained encoder + per-point head.

    python -m data_prep.shapenetpart --root data/shapenetcore_partanno_segmentation_benchmark_v0_normal \
        --out data/shapenetpart.h5                                        # once
    python partseg.py --pretrained runs/pretrain/ckpt-epoch-300           # reference, one GPU
    torchrun --nproc_per_node=4 partseg.py --pretrained runs/pretrain/ckpt-epoch-300
    python partseg.py --eval-ckpt runs/partseg/ckpt-best                  # evaluate only
    python partseg.py --preset tiny                                       # built-in shapes, CPU

Both splits are held whole on the device (points concatenated, with offsets) and each step
draws its batch there: 2048 points per shape WITH replacement, then scale and translate, as
the reference. All randomness of a step is a pure function of (seed, step, rank), and the test
sampling of an epoch (the reference resamples the test set every epoch) of (seed, epoch), so
a resumed run is exact and evaluation does not depend on the number of processes. After every
epoch the test split is evaluated (each shape exactly once across processes): accuracy,
class mIoU and instance mIoU, each prediction restricted to the parts of the shape's category.
The best checkpoint, `ckpt-best`, is the reference's `best_model.pth`: the epoch of the best
instance mIoU, selected on the test set.

A checkpoint stores, with the scores it reports, the epoch whose test points they were
computed on and what else they depend on (`EVAL_FIELDS`, device, processes: its
metrics["evaluation"]). `--eval-ckpt` draws the test points of that epoch and takes those
fields from it, so it prints exactly the scores the run reported for those weights; where a
setting differs (another device, process count or batch: float rounding; another seed or
epoch: other test points), its output names it (eval-NAME.json: "reproduction").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from pqae import checkpoint as ckpt
from pqae import amp, cli, costmodel, dist, formats, syncbn
from pqae import shapenetpart as spart
from pqae.errors import reading
from pqae.log import print0
from pqae.model import TINY_ENCODER, EncoderShape, fuse_embed
from pqae.optim import param_groups, set_epoch_lr
from pqae.run import Progress, Run, RunOptions, micro_batches, start
from pqae.seeding import epoch_perm, step_seed
from pqae.segmentation import PointSegmenter, feature_blocks_for


@dataclass(frozen=True)
class Task:
    """What part segmentation reads, builds and optimises."""
    # data
    data: Literal["shapenetpart", "procedural"] = "shapenetpart"
    """shapenetpart: the HDF5 from `python -m data_prep.shapenetpart`; procedural: built-in
    generated two-part shapes (no files), for smoke runs only."""
    data_path: str = "data/shapenetpart.h5"
    """the HDF5 from `python -m data_prep.shapenetpart` (data = shapenetpart)."""
    procedural_shapes: int = 160
    """training shapes when data = procedural (a quarter as many test shapes)."""
    train_split: Literal["train", "test"] = "train"
    """train = the reference's trainval. (test only for smoke runs on slices without train.)"""
    num_points: int = 2048
    """points per shape, drawn with replacement for training and evaluation."""
    # the pretrained encoder
    pretrained: str = ""
    """pretraining checkpoint (directory or .safetensors) whose encoder is loaded strictly;
    empty: train from scratch."""
    # optimisation
    batch_size: int = 16
    """GLOBAL batch in shapes, split evenly over the processes (drop_last, as the reference)."""
    eval_batch_size: int = 32
    """GLOBAL evaluation batch in shapes (the model is in eval mode: another batch changes the
    scores by float rounding at most)."""
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
    eval_ckpt: str = ""
    """skip training: evaluate this fine-tuned checkpoint once on the test split (the
    reference's --test) into out_dir/eval-NAME.json, with the test points of the epoch its
    scores were recorded at (see --eval-epoch), and say whether they are the recorded ones. The
    model's fields come from the checkpoint, its evaluation's fields (EVAL_FIELDS) too unless
    given. A reference `best_model.pth` is converted on the fly (the reference architecture)."""
    eval_epoch: int = -1
    """with --eval-ckpt: draw the test points of this epoch's evaluation (the reference
    resamples them every epoch); -1: the epoch the checkpoint's scores were recorded at (0 for
    a checkpoint that records none, e.g. a reference best_model.pth)."""
    # model architecture (a checkpoint brings its own; the defaults are the reference's)
    drop_path_rate: float = 0.1
    """stochastic depth rate of the last block, increasing linearly from 0 at the first block."""
    num_group: int = 128
    """patches per shape (FPS centres)."""
    group_size: int = 32
    """points per patch (kNN neighbours of its centre)."""
    feature_blocks: tuple[int, ...] = ()
    """1-based encoder blocks whose (normed) outputs form the per-center feature; empty: the
    last block of each third of the encoder ((4, 8, 12) at depth 12, as the reference)."""
    fp_dims: tuple[int, ...] = (1536, 1024)
    """output channels of the feature propagation's 1x1 conv layers, one entry per layer."""
    head_dims: tuple[int, int] = (512, 256)
    """channels of the per-point head's two hidden 1x1 conv layers."""


@dataclass(frozen=True)
class Config(RunOptions, EncoderShape, Task):
    """partseg.py's command line: Task's fields, the encoder's shape, then the run options of
    every script (--help lists them in that order)."""
    out_dir: str = "runs/partseg"


PRESETS = {
    "reference": Config(),
    "tiny": Config(
        data="procedural", num_points=512, **TINY_ENCODER, num_group=32, group_size=16,
        fp_dims=(64, 32), head_dims=(32, 16), batch_size=4,
        eval_batch_size=8, lr=1e-3, epochs=3, warmup_epochs=0, log_every=1,
        out_dir="runs/partseg-tiny"),
}

# The lrs at which the reference builds its extra 10x group for the head's conv layers.
TEN_X_LRS = (1e-4, 5e-5)

MODEL_FIELDS = ckpt.ENCODER_FIELDS + ("num_group", "group_size", "feature_blocks", "fp_dims",
                                      "head_dims")
"""The fields that build the segmenter: an evaluated checkpoint brings its own."""
EVAL_FIELDS = ("data", "data_path", "procedural_shapes", "num_points", "seed", "eval_batch_size",
               "amp")
"""What an evaluation's scores depend on besides the weights and its epoch (the test data, the
seed of its points, the batch, bf16): recorded with the scores, and taken by --eval-ckpt from
the checkpoint unless flags say otherwise."""
RUN_FIELDS = EVAL_FIELDS + ("out_dir",)
"""What else an evaluated checkpoint brings unless flags say otherwise: its data and run."""
METRICS = ("acc", "class_miou", "instance_miou")
"""The scores of an evaluation, reported in % (point accuracy, class mIoU, instance mIoU)."""


def resolve(cfg: Config, explicit: set[str], run: bool = True) -> Config:
    """The model of --eval-ckpt (and its data and run when `run`), the encoder shape of
    --pretrained, and --data-path only with --data shapenetpart (`cli.from_checkpoints`)."""
    return cli.from_checkpoints(cfg, explicit, MODEL_FIELDS, RUN_FIELDS if run else (),
                                "procedural")


def build_model(cfg: Config) -> PointSegmenter:
    model = PointSegmenter(spart.NUM_CLASSES, len(spart.CATEGORIES), dim=cfg.dim, depth=cfg.depth,
                           heads=cfg.heads, drop_path_rate=cfg.drop_path_rate,
                           num_group=cfg.num_group, group_size=cfg.group_size,
                           embed_hidden=cfg.embed_hidden,
                           feature_blocks=cfg.feature_blocks or feature_blocks_for(cfg.depth),
                           fp_dims=cfg.fp_dims, head_dims=cfg.head_dims, init="default")
    return fuse_embed(model, cfg.fused_embed)


def build_param_groups(model: PointSegmenter, lr: float, weight_decay: float) -> list[dict]:
    """The reference's groups: no-decay (1-D / `.bias` / `token`) and decay; at lr 1e-4
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


def load_data(cfg: Config) -> tuple[spart.PartSplit, spart.PartSplit]:
    """(train split, test split), on the CPU."""
    if cfg.data == "procedural":
        return (spart.procedural_split(cfg.procedural_shapes, seed=cfg.seed),
                spart.procedural_split(cfg.procedural_shapes // 4, seed=cfg.seed + 1))
    return spart.load_split(cfg.data_path, cfg.train_split), spart.load_split(cfg.data_path, "test")


def build_training(cfg: Config, env: dist.Dist):
    """(model, the module to call for training (DDP wrapper or the model), optimizer), with the
    pretrained encoder of cfg.pretrained loaded when given."""
    torch.manual_seed(cfg.seed)  # model init: identical on every rank
    model = build_model(cfg).to(env.device)
    if cfg.pretrained:  # its encoder, strictly; the decoder side is dropped, and named
        print0(ckpt.loaded_note(cfg.pretrained, model.load_pretrained(cfg.pretrained)),
               rank=env.rank)
    if env.enabled and cfg.sync_bn:
        model = syncbn.convert(model)
    optimizer = torch.optim.AdamW(build_param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr,
                                  fused=cfg.fused_adamw)
    if cfg.compile:
        model.compile_fixed_shapes()
    return model, dist.ddp(model, env), optimizer


@torch.no_grad()
def evaluate(model: PointSegmenter, test: spart.PartSplit, cfg: Config, epoch: int,
             env: dist.Dist) -> dict:
    """Test metrics at `epoch` (point accuracy, class and instance mIoU, each prediction
    restricted to the parts of the shape's category). Every process evaluates its contiguous
    shard of the shapes; per-shape IoUs are summed into one (S,) tensor, so each shape counts
    exactly once. Returns the metrics plus "shape_ious" (S,) and "times_seen" (S,)."""
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
    chunk = max(1, cfg.eval_batch_size // env.world_size)
    mine = dist.shard(S, env.rank, env.world_size)
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
    """The optimizer step of `step` (points drawn with replacement, scale and shift, NLL, the
    reference's double AdamW step around the clipping), with no host sync: its randomness
    comes from (seed, step, rank) and the epoch order `perm` (on the device)."""
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
        category, k, losses, hits = train.category[idx], cfg.accum_steps, [], []
        for part, sync in micro_batches(train_model, k, local_bs):
            with sync:
                with amp.autocast(device, cfg.amp):
                    logp = train_model(points[part], category[part]).float()  # (b, n, 50)
                # NLL over all points and all 50 parts (no category restriction in the loss).
                loss = F.nll_loss(logp.reshape(-1, spart.NUM_CLASSES), labels[part].reshape(-1))
                (loss / k if k > 1 else loss).backward()
            losses.append(loss.detach())
            hits.append((logp.detach().argmax(-1) == labels[part]).sum())
        if cfg.double_step:
            optimizer.step()  # the reference's first update, with the UNclipped gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss, correct = (losses[0], hits[0]) if k == 1 else \
            (torch.stack(losses).mean(), torch.stack(hits).sum())
        return torch.stack([loss, correct.float(),
                            torch.full((), float(labels.numel()), device=device)])

    return train_step


def plan(cfg: Config) -> dict:
    """--plan: the run's size (the train split's, from the file's header when it exists) and
    its device memory per process for each --accum-steps, from the real step on the meta
    device."""
    import h5py
    meta, env = torch.device("meta"), costmodel.meta_env()
    shapes, points = (cfg.procedural_shapes, cfg.procedural_shapes * 2048) \
        if cfg.data == "procedural" else (None, None)
    if shapes is None and Path(cfg.data_path).is_file():
        with reading(cfg.data_path, f"an HDF5 file with {spart.FORMAT}"), \
                h5py.File(cfg.data_path) as f:
            g = f[cfg.train_split]
            shapes, points = g["category"].shape[0], g["points"].shape[0]

    def make_step_at(b: int):
        def make_step(amp_on: bool):
            c = dataclasses.replace(cfg, amp=False, compile=False, fused_adamw=False,
                                    pretrained="", batch_size=b)
            model = build_model(c).to(meta)
            optimizer = torch.optim.AdamW(build_param_groups(model, c.lr, c.weight_decay),
                                          lr=c.lr, foreach=True)
            n = 2048 * b  # the split's points: the step samples num_points per shape from them
            train = spart.PartSplit(torch.empty(n, 3, device=meta),
                                    torch.empty(n, dtype=torch.long, device=meta),
                                    torch.empty(b + 1, dtype=torch.long, device=meta),
                                    torch.empty(b, dtype=torch.long, device=meta), [])
            step = make_train_step(c, model, model, optimizer, train, env)
            perm = torch.empty(b, dtype=torch.long, device=meta)
            return lambda: step(0, perm)
        return make_step

    # on the device: points (12 B) and labels (8 B) per point, offsets and category per shape
    per_shape = (points * 20 // shapes + 16) if shapes else 0
    return costmodel.run_plan(make_step_at, cfg, shapes, per_shape,
                              sum(t.numel() for t in build_model(cfg).parameters()), cfg.epochs,
                              benchmark=False)


def percent(result: dict) -> dict:
    """The evaluation's scores in %."""
    return {k: 100.0 * result[k] for k in METRICS}


def main(cfg: Config) -> dict:
    if cfg.plan:
        return plan(cfg)
    cfg = resolve(cfg, set(), run=False)  # the model of --eval-ckpt / encoder of --pretrained
    run = start(cfg, cfg.batch_size, claim=not cfg.eval_ckpt, min_local_batch=2)
    train, test = (split.to(run.device) for split in load_data(cfg))
    if cfg.eval_ckpt:
        return evaluate_checkpoint(cfg, run, test)
    steps_per_epoch, total_steps = run.schedule(len(train), cfg.epochs)
    source = cfg.data if cfg.data == "procedural" else cfg.data_path
    run.print(f"data {source}: {cfg.train_split} {len(train)} shapes, test {len(test)} | "
              f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs | global batch "
              f"{cfg.batch_size} ({run.local_batch} per process)")

    model, train_model, optimizer = build_training(cfg, run.env)
    run.print(f"PointSegmenter: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
              f"parameters")
    state = run.resume(model, optimizer, step=0, history=[], best={}, pending=None,
                       evaluation=None)
    step, history, best = state["step"], state["history"], state["best"]
    evaluation = state["evaluation"]  # what the last scores depend on (`evaluation_record`)
    train_step = make_train_step(cfg, model, train_model, optimizer, train, run.env)
    run.open_outputs()

    progress = Progress(run, total_steps, step, cfg.epochs - 1, pending=state["pending"])
    # loss, correct points, points since the last line
    sums = progress.restore("sums", torch.zeros(3, device=run.device))
    epoch = step // steps_per_epoch
    perm = epoch_perm(cfg.seed, epoch, len(train), run.device)  # on the device: no copy per step
    last = history[-1] if history else {}
    train_model.train()
    while step < total_steps:
        lr = set_epoch_lr(optimizer, epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        sums += train_step(step, perm)
        step += 1
        progress.tick()
        epoch_end = step % steps_per_epoch == 0
        if progress.due(step, epoch_end):
            # Summed over ranks: the line shows the global batch and every rank takes the same
            # stop decision.
            sums = dist.all_reduce_sum(sums)
            loss = (sums[0] / (progress.steps * run.env.world_size)).item()
            acc = 100 * (sums[1] / sums[2]).item()  # %
            sums.zero_()
            run.check_loss(loss, step, epoch)
            progress.line(step, epoch, f"loss {loss:.4f} | train acc {acc:.2f} % | lr {lr:.3g}")
            run.log(step, {"train/loss": loss, "train/acc": acc, "train/lr": lr})
        if epoch_end:
            dist.broadcast_buffers(model)  # every rank evaluates rank 0's model
            scores = percent(evaluate(model, test, cfg, epoch, run.env))
            last = {"epoch": epoch, **scores}
            history.append(last)
            evaluation = eval_record(cfg, run, epoch, step)
            if scores["instance_miou"] >= best.get("instance_miou", -1.0):  # as the reference's
                run.save("ckpt-best", model, epoch, step,  # best_model.pth
                         {**last, "evaluation": evaluation})
            for k in METRICS:  # each best tracked separately; ">" as the reference: on a tie
                if scores[k] > best.get(k, -1.0):  # the first epoch is the reported one
                    best[k], best[f"{k}_epoch"] = scores[k], epoch
            run.print(f"epoch {epoch} test | {format_scores(scores)} | best on test: instance "
                      f"mIoU {best['instance_miou']:.2f} % (epoch {best['instance_miou_epoch']}),"
                      f" class mIoU {best['class_miou']:.2f} %")
            run.log(step, {f"test/{k}": scores[k] for k in METRICS})
            progress.restart_interval()
        stop = run.stopping(step)  # a preemption signal: save, then exit (every rank agrees)
        if epoch_end or step == total_steps or stop:
            # the last scores, which are these weights' unless saved mid-epoch (the record's step)
            run.save("ckpt-last", model, epoch, step, {**last, "evaluation": evaluation}
                     if last else {}, optimizer, history=history, best=best,
                     evaluation=evaluation, pending=progress.pending(sums=sums))
        if epoch_end:
            epoch += 1
            perm = epoch_perm(cfg.seed, epoch, len(train), run.device)
        if stop:
            run.exit_preempted(step)

    result = {"step": step, "total_steps": total_steps, "history": history, "last": last,
              "best_on_test": best, "best_note": "each best is selected on the TEST set (the "
              "reference's reported numbers); scores in %", "evaluation": evaluation}
    tiny = "--preset tiny " if cfg.data == "procedural" else ""
    best_ckpt = run.out_dir / ("ckpt-best" if history else "ckpt-last")
    result = run.finish(summary(last, best, step), result, best_ckpt,
                        [f"python partseg.py {tiny}--eval-ckpt {best_ckpt}"]
                        + ([f"python semseg.py {tiny}--pretrained {cfg.pretrained}"]
                           if cfg.pretrained else []))
    return {**result, "model": model, "optimizer": optimizer}


def summary(last: dict, best: dict, step: int) -> str:
    """The last and best scores for the `done |` line."""
    if not last:
        return f"no evaluation (stopped at step {step}, before the first epoch ended)"
    return (f"last epoch {last['epoch']}: {format_scores(last)} | best epoch (selected on the "
            f"TEST set): instance mIoU {best['instance_miou']:.2f} % (epoch "
            f"{best['instance_miou_epoch']}), class mIoU {best['class_miou']:.2f} % (epoch "
            f"{best['class_miou_epoch']})")


def eval_record(cfg: Config, run: Run, epoch: int, step: int) -> dict:
    """What the scores of the evaluation at `epoch` of the weights of `step` depend on."""
    return ckpt.evaluation_record(cfg, EVAL_FIELDS, run.device, run.env.world_size, epoch=epoch,
                                  step=step)


def evaluate_checkpoint(cfg: Config, run: Run, test: spart.PartSplit) -> dict:
    """--eval-ckpt: the saved segmenter (ours, or a reference best_model.pth converted on the
    fly) evaluated once on the test split, with the test points of the epoch its scores were
    recorded at (or --eval-epoch), and compared with those scores."""
    recorded = ckpt.recorded_evaluation(cfg.eval_ckpt, EVAL_FIELDS)
    record, step = (recorded["evaluation"], recorded["step"]) if recorded else (None, None)
    epoch = cfg.eval_epoch if cfg.eval_epoch >= 0 else (record or {}).get("epoch") or 0
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(run.device)
    formats.load_model(model, cfg.eval_ckpt, "partseg")
    if cfg.compile:
        model.compile_fixed_shapes()
    scores = percent(evaluate(model, test, cfg, epoch, run.env))
    check = ckpt.reproduction(scores, {k: recorded["metrics"].get(k) for k in METRICS}
                              if recorded else {}, record,
                              eval_record(cfg, run, epoch, step),
                              rounding=("eval_batch_size",))
    run.print(f"test points of epoch {epoch}'s evaluation: {check['note']}")
    result = run.finish_eval(f"{cfg.eval_ckpt}: {format_scores(scores)}",
                             {"test": scores, "epoch": epoch, "reproduction": check},
                             cfg.eval_ckpt)
    return {**result, "model": model}


def format_scores(m: dict) -> str:
    return (f"acc {m['acc']:.2f} % | class mIoU {m['class_miou']:.2f} % | instance mIoU "
            f"{m['instance_miou']:.2f} %")


if __name__ == "__main__":
    cli.run(main, Config, PRESETS, doc=__doc__.split("\n\n")[0], resolve=resolve)
