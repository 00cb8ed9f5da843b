"""Semantic segmentation on S3DIS: fine-tune the pretrained encoder on 1 m blocks, test on
one area (Area 5) with per-epoch random blocks and, optionally, whole-room sliding-window voting.

    python semseg.py --preset tiny                                   # built-in rooms, ~11 s on 2 CPU cores
    python semseg.py --pretrained runs/pretrain/ckpt-epoch-300       # the reference recipe, 1 GPU
    torchrun --nproc_per_node=4 semseg.py --pretrained ... --test-rooms   # + whole-room test
    python semseg.py --eval-ckpt runs/semseg/ckpt-best               # evaluate a saved model

Data: `python -m data_prep.s3dis` writes one HDF5 file; all rooms are held on the device and
each batch's blocks are cut out there (`pqae.s3dis`), so there is no DataLoader. The blocks of a
training step are a function of (seed, step, rank), so a resumed run sees the data of an
uninterrupted one; the per-epoch test blocks are a function of (seed, epoch), different every
epoch as in the reference but the same on any number of processes.

A checkpoint stores, with the block scores it reports, the epoch whose blocks they were
computed on and what else they depend on (`EVAL_FIELDS`, device, processes: its
metrics["evaluation"]). `--eval-ckpt` evaluates that epoch's blocks again, with those fields
from the checkpoint, then runs the whole-room test; each is compared with the run's own figure
for those weights (the block scores in the checkpoint, a --test-rooms test in results.json),
and the output says whether they are identical, or what differs (eval-NAME.json:
"reproduction").
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pqae import checkpoint as ckpt
from pqae import amp, cli, costmodel, dist, formats, s3dis, syncbn
from pqae.errors import reading
from pqae.log import print0
from pqae.model import TINY_ENCODER, EncoderShape, fuse_embed
from pqae.optim import param_groups, set_epoch_lr
from pqae.run import Progress, Run, RunOptions, micro_batches, start
from pqae.seeding import epoch_perm, step_seed
from pqae.segmentation import PointSegmenter, feature_blocks_for


@dataclass(frozen=True)
class Task:
    """What semantic segmentation reads, builds and optimises, and how it tests."""
    # data
    data: Literal["s3dis", "procedural"] = "s3dis"
    """s3dis: the HDF5 from `python -m data_prep.s3dis` (or a directory of the reference's
    Area_k_<room>.npy files); procedural: built-in generated rooms, no files."""
    data_path: str = "data/s3dis.h5"
    """the HDF5 from `python -m data_prep.s3dis`, or a directory of the reference's
    Area_k_<room>.npy files (data = s3dis)."""
    test_area: int = 5
    """the held-out area; every other area trains."""
    procedural_rooms: int = 12
    """number of generated rooms (two per area) when data = procedural."""
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
    # the pretrained encoder
    pretrained: str = ""
    """pretraining checkpoint whose encoder initialises the backbone ("" trains from scratch)."""
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
    # whole-room test
    test_rooms: bool = False
    """after training, test the best-mIoU weights by whole-room sliding-window voting."""
    eval_ckpt: str = ""
    """skip training: evaluate this fine-tuned checkpoint on the random test blocks of the epoch
    its scores were recorded at (see --eval-epoch), then by the whole-room test, into
    out_dir/eval-NAME.json and out_dir/test_predictions, and say whether the scores are those
    the run recorded. The model's fields come from the checkpoint, its evaluation's fields
    (EVAL_FIELDS) too unless given. A reference `best_model.pth` is converted on the fly (the
    reference architecture)."""
    eval_epoch: int = -1
    """with --eval-ckpt: evaluate the random test blocks of this epoch's evaluation (they are
    drawn anew every epoch); -1: the epoch the checkpoint's scores were recorded at (0 for a
    checkpoint that records none, e.g. a reference best_model.pth)."""
    num_votes: int = 3
    """sliding-window passes over every test room in the whole-room test; each pass gives every
    point it covers one vote for its predicted label, and the most voted label wins."""
    stride: float = 0.5
    """window stride of the whole-room test (metres)."""
    # model architecture (a checkpoint brings its own; the defaults are the reference's)
    drop_path_rate: float = 0.1
    """stochastic depth rate of the last block, increasing linearly from 0 at the first block."""
    num_group: int = 128
    """patches per block (FPS centres)."""
    group_size: int = 32
    """points per patch (kNN neighbours of its centre)."""
    feature_blocks: tuple[int, ...] = ()
    """1-based encoder blocks whose (normed) outputs form the per-centre feature; empty: the
    last block of each third of the encoder ((4, 8, 12) at depth 12, as the reference)."""
    fp_dims: tuple[int, ...] = (1536, 1024)
    """output channels of the feature propagation's 1x1 conv layers, one entry per layer."""
    head_dims: tuple[int, int] = (512, 256)
    """channels of the per-point head's two hidden 1x1 conv layers."""
    dropout: float = 0.5
    """dropout probability in the per-point head (after its first hidden layer)."""


@dataclass(frozen=True)
class Config(RunOptions, EncoderShape, Task):
    """semseg.py's command line: Task's fields, the encoder's shape, then the run options of
    every script (--help lists them in that order)."""
    out_dir: str = "runs/semseg"


PRESETS = {
    "reference": Config(),
    "tiny": Config(
        data="procedural", num_points=512, min_block_points=256, sample_rate=0.5, eval_blocks=32,
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
EVAL_FIELDS = ("data", "data_path", "test_area", "procedural_rooms", "num_points", "block_size",
               "min_block_points", "eval_blocks", "seed", "eval_batch_size", "num_votes", "stride",
               "amp")
"""What the block evaluation's and the whole-room test's scores depend on besides the weights
and the epoch (the test rooms, the blocks' and windows' draws, whose seeds follow the batches,
bf16): recorded with the scores, and taken by --eval-ckpt from the checkpoint unless flags say
otherwise."""
RUN_FIELDS = EVAL_FIELDS + ("out_dir",)
"""What else an evaluated checkpoint brings unless flags say otherwise: its data and run."""
SCORES = ("miou", "macc", "oa", "points")
"""The figures compared with a recorded evaluation."""


def resolve(cfg: Config, explicit: set[str], run: bool = True) -> Config:
    """The model of --eval-ckpt (and its data and run when `run`), the encoder shape of
    --pretrained, and --data-path only with --data s3dis (`cli.from_checkpoints`)."""
    return cli.from_checkpoints(cfg, explicit, MODEL_FIELDS, RUN_FIELDS if run else (),
                                "procedural")


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
    if cfg.data == "procedural":
        arrays = s3dis.procedural_rooms(tuple(r % 6 + 1 for r in range(cfg.procedural_rooms)),
                                        seed=cfg.seed)
        pick = lambda keep: s3dis.make_rooms(  # noqa: E731
            {k: v for k, v in arrays.items() if s3dis.area_of(k) in keep}, "procedural")
        return pick(train_areas), pick((cfg.test_area,))
    return s3dis.load_rooms(cfg.data_path, train_areas), s3dis.load_rooms(cfg.data_path,
                                                                           (cfg.test_area,))


def test_blocks(cfg: Config, test: s3dis.Rooms) -> torch.Tensor:
    """The room of every random test block of an evaluation: the reference's test length
    (test points / num_points), or --eval-blocks spread evenly over it."""
    slots = s3dis.epoch_rooms(test.sizes(), cfg.num_points)
    if cfg.eval_blocks:
        slots = slots[torch.linspace(0, len(slots) - 1, cfg.eval_blocks).long()]
    return slots


def build_model(cfg: Config) -> PointSegmenter:
    model = PointSegmenter(
        s3dis.NUM_CLASSES, num_categories=0, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
        drop_path_rate=cfg.drop_path_rate, num_group=cfg.num_group, group_size=cfg.group_size,
        embed_hidden=cfg.embed_hidden,
        feature_blocks=cfg.feature_blocks or feature_blocks_for(cfg.depth), fp_dims=cfg.fp_dims,
        head_dims=cfg.head_dims, dropout=cfg.dropout, init="trunc_normal")
    return fuse_embed(model, cfg.fused_embed)


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
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  fused=cfg.fused_adamw)
    if cfg.compile:
        model.compile_fixed_shapes()
    return model, dist.ddp(model, env), optimizer


@torch.no_grad()
def evaluate(model, rooms: s3dis.Rooms, slots: torch.Tensor, cfg: Config, epoch: int,
             env: dist.Dist) -> dict:
    """The evaluation after an epoch: predict random test blocks (one per slot, drawn as the
    training blocks are) and score the summed confusion counts. Batches are sharded over
    ranks and each is drawn from its own seed, so every block is evaluated exactly once
    whatever the world size. OA divides by the points actually evaluated (the reference
    divides by batches x 32 x 2048, which assumed full batches)."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(s3dis.NUM_CLASSES, s3dis.NUM_CLASSES, dtype=torch.long, device=env.device)
    batches = math.ceil(len(slots) / cfg.eval_batch_size)
    for b in dist.shard(batches, env.rank, env.world_size):
        torch.manual_seed(eval_seed(cfg.seed, epoch, b))
        ids = slots[b * cfg.eval_batch_size:(b + 1) * cfg.eval_batch_size].tolist()
        points, labels, _ = s3dis.sample_blocks(rooms, ids, cfg.num_points, cfg.block_size,
                                                cfg.min_block_points)
        with amp.autocast(env.device, cfg.amp):
            logp = model(points)
        conf += s3dis.confusion(logp.argmax(dim=-1), labels)
    model.train(was_training)
    return s3dis.scores(dist.all_reduce_sum(conf))


@torch.no_grad()
def test_whole_rooms(model, rooms: s3dis.Rooms, cfg: Config, env: dist.Dist,
                     pred_dir: Path) -> dict:
    """The reference's whole-scene test: num_votes sliding-window passes over every test room;
    each predicted label is one vote for its point; the final label is the most voted (class 0
    for a point never covered, which the cover rules out). Rooms are sharded over ranks,
    confusion counts summed once. Writes `pred_dir/<room>.txt`, one predicted label per line
    in the room's point order.

    The reference only counts a vote where the test label weight of the point's TRUE class is
    finite and non-zero; that holds for every class present in the test rooms, i.e. always."""
    was_training = model.training
    model.eval()
    pred_dir.mkdir(parents=True, exist_ok=True)
    conf = torch.zeros(s3dis.NUM_CLASSES, s3dis.NUM_CLASSES, dtype=torch.long, device=env.device)
    for r in dist.shard(len(rooms), env.rank, env.world_size):
        xyz, labels = rooms.room(r)
        votes = torch.zeros(len(xyz), s3dis.NUM_CLASSES, dtype=torch.int32, device=env.device)
        for v in range(cfg.num_votes):
            torch.manual_seed(step_seed(cfg.seed, r * 1000 + v, 7))
            idx, points = s3dis.window_chunks(xyz, cfg.num_points, cfg.block_size, cfg.stride)
            for b in range(0, len(idx), cfg.eval_batch_size):
                with amp.autocast(env.device, cfg.amp):
                    pred = model(points[b:b + cfg.eval_batch_size]).argmax(dim=-1)  # (b, n)
                one = torch.ones(pred.numel(), dtype=torch.int32, device=env.device)
                votes.index_put_((idx[b:b + cfg.eval_batch_size].flatten(), pred.flatten()), one,
                                 accumulate=True)
        final = votes.argmax(dim=1)  # first maximum, as np.argmax
        conf += s3dis.confusion(final, labels)
        np.savetxt(pred_dir / f"{rooms.names[r]}.txt", final.cpu().numpy(), fmt="%d")
    model.train(was_training)
    return s3dis.scores(dist.all_reduce_sum(conf))


def format_scores(tag: str, s: dict) -> str:
    return (f"{tag} | mIoU {s['miou']:.2f} % | mAcc {s['macc']:.2f} % | OA {s['oa']:.2f} % | "
            f"{s['points']} points")


def format_iou(s: dict) -> str:
    return "per-class IoU (%): " + ", ".join(f"{c} {v:.1f}" for c, v in s["iou"].items())


def run_test(model, test: s3dis.Rooms, cfg: Config, run: Run, step: int) -> dict:
    """The whole-room test with its lines and TensorBoard scalars; scores in %."""
    t0 = time.perf_counter()
    result = percent(test_whole_rooms(model, test, cfg, run.env, run.out_dir / "test_predictions"))
    run.print(format_scores(f"whole-room test ({len(test)} rooms, {cfg.num_votes} votes)", result)
              + f" | {time.perf_counter() - t0:.0f} s")
    run.print(format_iou(result))
    run.log(step, {f"test/rooms_{k}": result[k] for k in ("miou", "macc", "oa")})
    return result


def make_train_step(cfg: Config, model, train_model, optimizer, train: s3dis.Rooms,
                    weights: torch.Tensor, env: dist.Dist, sample_blocks=s3dis.sample_blocks):
    """The optimizer step of `step` (random 1 m blocks, scale and shift, class-weighted NLL, the
    reference's double AdamW step around the clipping), with no host sync: its randomness comes
    from (seed, step, rank) and `order` (the epoch's room slots, on the host)."""
    rank, world, device = env.rank, env.world_size, env.device
    local_bs = cfg.batch_size // world

    def train_step(step: int, order: torch.Tensor) -> torch.Tensor:
        """One batch; returns [this process's share of the global weighted loss, its
        correct-point fraction, its fallback blocks]: summed over ranks, the first is the loss
        of the global batch."""
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        i = step % (len(order) // cfg.batch_size)  # order: this epoch's room slots (host)
        ids = order[i * cfg.batch_size + rank * local_bs:][:local_bs].tolist()
        points, labels, fallbacks = sample_blocks(
            train, ids, cfg.num_points, cfg.block_size, cfg.min_block_points)  # (b, n, 3), (b, n)
        # The reference's augmentation: isotropic scale U(0.8, 1.25), then a shift U(-0.1, 0.1)
        # per axis.
        scale = 0.8 + 0.45 * torch.rand(local_bs, 1, 1, device=device)
        shift = -0.1 + 0.2 * torch.rand(local_bs, 1, 3, device=device)
        w = weights[labels]  # (b, n)
        # PyTorch's weighted NLL mean (sum of w * nll / sum of w) over the GLOBAL batch: the
        # denominator is summed over ranks and DDP averages gradients, hence the x world. Over
        # micro-batches the parts' sums add up to it exactly.
        denom = dist.all_reduce_sum(w.sum().detach())
        points, k, losses, logps = points * scale + shift, cfg.accum_steps, [], []
        for part, sync in micro_batches(train_model, k, local_bs):
            with sync:
                with amp.autocast(device, cfg.amp):
                    logp = train_model(points[part]).float()  # (b, n, 13)
                nll = -logp.gather(-1, labels[part][..., None])[..., 0]  # (b, n)
                loss = (w[part] * nll).sum() * world / denom
                loss.backward()
            losses.append(loss.detach())
            logps.append(logp.detach())
        if k > 1:  # the batch's
            loss, logp = torch.stack(losses).sum(), torch.cat(logps)
        if cfg.double_step:
            optimizer.step()  # the reference's first step: unclipped gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        acc = (logp.argmax(dim=-1) == labels).float().mean()
        return torch.stack([loss.detach() / world, acc, fallbacks.float()])

    return train_step


def plan(cfg: Config) -> dict:
    """--plan: the run's size (the training blocks of an epoch, from the file's header when it
    exists) and its device memory per process for each --accum-steps, from the real step on
    the meta device (the blocks' sampling, which reads the rooms' values, gives shapes only)."""
    meta, env = torch.device("meta"), costmodel.meta_env()
    points = None
    if cfg.data == "procedural":
        train, _ = load_data(cfg)
        points = len(train.xyz)
    elif Path(cfg.data_path).is_file():
        import h5py
        with reading(cfg.data_path, "the HDF5 file of data_prep.s3dis"), \
                h5py.File(cfg.data_path) as f:
            points = sum(ds.shape[0] for name, ds in f["rooms"].items()
                         if s3dis.area_of(name) != cfg.test_area)
    blocks = int(points * cfg.sample_rate / cfg.num_points) if points else None

    def blocks_on_meta(rooms, ids, n, *_):
        return (torch.empty(len(ids), n, 3, device=meta),
                torch.empty(len(ids), n, dtype=torch.long, device=meta),
                torch.zeros((), device=meta))

    def make_step_at(b: int):
        def make_step(amp_on: bool):
            c = dataclasses.replace(cfg, amp=False, compile=False, fused_adamw=False,
                                    pretrained="", batch_size=b)
            model = build_model(c).to(meta)
            optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.lr,
                                          foreach=True)
            weights = torch.empty(len(s3dis.CLASSES), device=meta)
            step = make_train_step(c, model, model, optimizer, None, weights, env, blocks_on_meta)
            order = torch.arange(b)  # room slots: on the host, as in training
            return lambda: step(0, order)
        return make_step

    # the rooms on the device: xyz (12 B) and labels (8 B) per point, over the epoch's blocks
    per_block = points * 20 // blocks if blocks else 0
    return costmodel.run_plan(make_step_at, cfg, blocks, per_block,
                              sum(t.numel() for t in build_model(cfg).parameters()), cfg.epochs,
                              benchmark=False)


def main(cfg: Config) -> dict:
    if cfg.plan:
        return plan(cfg)
    cfg = resolve(cfg, set(), run=False)  # the model of --eval-ckpt / encoder of --pretrained
    run = start(cfg, cfg.batch_size, claim=not cfg.eval_ckpt)
    train, test = (rooms.to(run.device) for rooms in load_data(cfg))
    run.print(f"data {cfg.data}: train {len(train)} rooms ({len(train.xyz)} points) | test area "
              f"{cfg.test_area}: {len(test)} rooms ({len(test.xyz)} points)")
    if cfg.eval_ckpt:
        return evaluate_checkpoint(cfg, run, test)
    weights = s3dis.class_weights(train.labels).to(run.device)  # (13,) rarer classes weigh more
    run.print("class weights: " + ", ".join(f"{c} {w:.2f}" if math.isfinite(w) else f"{c} absent"
                                            for c, w in zip(s3dis.CLASSES, weights.tolist())))
    train_slots = s3dis.epoch_rooms(train.sizes(), cfg.num_points, cfg.sample_rate)
    test_slots = test_blocks(cfg, test)
    steps_per_epoch, total_steps = run.schedule(len(train_slots), cfg.epochs,
                                                "training blocks per epoch")
    run.print(f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs | global batch "
              f"{cfg.batch_size} ({run.local_batch} per process) | {len(test_slots)} test blocks "
              f"per evaluation")

    model, train_model, optimizer = build_training(cfg, run.env)
    run.print(f"PointSegmenter: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
              f"parameters")
    state = run.resume(model, optimizer, step=0, history=[], best_miou=-1.0, pending=None,
                       evaluation=None)
    step, history, best_miou = state["step"], state["history"], state["best_miou"]
    evaluation = state["evaluation"]  # what the last scores depend on (`evaluation_record`)
    best = ckpt.find_checkpoint(run.out_dir / "ckpt-best") if cfg.resume else None
    best_state = ckpt.load_weights(best) if best is not None else None  # for --test-rooms
    best_step = ckpt.load_meta(best)["step"] if best is not None else None
    train_step = make_train_step(cfg, model, train_model, optimizer, train, weights, run.env)
    run.open_outputs()

    progress = Progress(run, total_steps, step, cfg.epochs - 1, unit="blocks",
                        pending=state["pending"])
    # loss, accuracy, fallback blocks since the last line
    sums = progress.restore("sums", torch.zeros(3, device=run.device))
    epoch, metrics = step // steps_per_epoch, {}
    order = train_slots[epoch_perm(cfg.seed, epoch, len(train_slots))]  # rooms, shuffled
    train_model.train()
    while step < total_steps:
        lr = set_epoch_lr(optimizer, epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        sums += train_step(step, order)
        step += 1
        progress.tick()
        epoch_end = step % steps_per_epoch == 0
        if progress.due(step, epoch_end):
            dist.all_reduce_sum(sums)  # every rank logs at the same steps
            loss, acc, fallbacks = (sums / progress.steps).tolist()
            acc, fallbacks = 100 * acc / run.env.world_size, round(fallbacks * progress.steps)
            sums.zero_()
            run.check_loss(loss, step, epoch)
            if fallbacks:
                run.print(f"note: {fallbacks} training block(s) since the last line had no "
                          f"candidate centre with more than {cfg.min_block_points} points; the "
                          f"fullest candidate block was used (see s3dis.sample_block)")
            metrics = {"loss": loss, "train_acc": acc}
            progress.line(step, epoch, f"loss {loss:.4f} | train acc {acc:.2f} % | lr {lr:.3g}")
            run.log(step, {"train/loss": loss, "train/acc": acc, "train/lr": lr})
        if epoch_end:
            t0 = time.perf_counter()
            dist.broadcast_buffers(model)  # every rank evaluates rank 0's model
            scores = percent(evaluate(model, test, test_slots, cfg, epoch, run.env))
            metrics.update({k: scores[k] for k in SCORES})
            history.append({"epoch": epoch, "step": step, **metrics})
            evaluation = eval_record(cfg, run, epoch, step)
            if scores["miou"] >= best_miou:  # ">=" as the reference
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_step = step
                run.save("ckpt-best", model, epoch, step,  # every rank keeps best_state
                         {**metrics, "evaluation": evaluation})
            best_miou = max(best_miou, scores["miou"])
            run.print(format_scores(f"epoch {epoch} test ({len(test_slots)} blocks)", scores)
                      + f" | best mIoU {best_miou:.2f} % | {time.perf_counter() - t0:.0f} s")
            run.print(format_iou(scores))
            run.log(step, {**{f"test/{k}": scores[k] for k in ("miou", "macc", "oa")},
                           **{f"test_iou/{c}": v for c, v in scores["iou"].items()}})
            progress.restart_interval()
        stop = run.stopping(step)  # a preemption signal: save, then exit (every rank agrees)
        if epoch_end or step == total_steps or stop:
            # the last scores, which are these weights' unless saved mid-epoch (the record's step)
            run.save("ckpt-last", model, epoch, step, {**metrics, "evaluation": evaluation}
                     if "miou" in metrics else metrics, optimizer, history=history,
                     best_miou=best_miou, evaluation=evaluation,
                     pending=progress.pending(sums=sums))
        if epoch_end:
            epoch += 1
            order = train_slots[epoch_perm(cfg.seed, epoch, len(train_slots))]  # rooms, shuffled
        if stop:
            run.exit_preempted(step)

    evals = [h for h in history if "miou" in h]
    result = {"step": step, "total_steps": total_steps, "history": history, "metrics": metrics,
              "best_miou": best_miou if evals else None,
              "best_epoch": max(evals, key=lambda h: h["miou"])["epoch"] if evals else None,
              "test": None, "best_note": "best_miou selects the epoch on the TEST area's random "
              "blocks (the reference's ckpt-best); scores in %", "evaluation": evaluation}
    if cfg.test_rooms:
        tested = step  # the step of the weights it tests: the last ones, or ckpt-best's
        if best_state is not None:
            model.load_state_dict(best_state)
            tested = best_step
            run.print(f"whole-room test of the best-mIoU weights (mIoU {best_miou:.2f} %)")
        result["test"] = run_test(model, test, cfg, run, step)
        result["test_evaluation"] = eval_record(cfg, run, None, tested)
    tiny = "--preset tiny " if cfg.data == "procedural" else ""
    best_ckpt = run.out_dir / ("ckpt-best" if evals else "ckpt-last")
    result = run.finish(summary(result, step), result, best_ckpt,
                        [f"python semseg.py {tiny}--eval-ckpt {best_ckpt}"])
    return {**result, "model": model}


def summary(result: dict, step: int) -> str:
    """The last, best and whole-room scores for the `done |` line."""
    evals = [h for h in result["history"] if "miou" in h]
    if not evals:
        return f"no evaluation (stopped at step {step}, before the first epoch ended)"
    text = (format_scores(f"last epoch {evals[-1]['epoch']}", evals[-1]) + f" | best mIoU "
            f"{result['best_miou']:.2f} % (epoch {result['best_epoch']}, selected on the test "
            f"area)")
    if result["test"] is not None:
        text += "\n     " + format_scores("whole-room test", result["test"])
    return text


def eval_record(cfg: Config, run: Run, epoch: int | None, step: int | None) -> dict:
    """What the scores of an evaluation (at `epoch`; None: the whole-room test) of the weights
    of `step` depend on."""
    return ckpt.evaluation_record(cfg, EVAL_FIELDS, run.device, run.env.world_size, epoch=epoch,
                                  step=step)


def evaluate_checkpoint(cfg: Config, run: Run, test: s3dis.Rooms) -> dict:
    """--eval-ckpt: the saved segmenter (ours, or a reference best_model.pth converted on the
    fly) on the random test blocks of the epoch its scores were recorded at (or --eval-epoch),
    then by the whole-room test, into out_dir/eval-NAME.json and the predictions; each compared
    with the run's own figure for these weights."""
    recorded = ckpt.recorded_evaluation(cfg.eval_ckpt, EVAL_FIELDS)
    record, step = (recorded["evaluation"], recorded["step"]) if recorded else (None, None)
    epoch = cfg.eval_epoch if cfg.eval_epoch >= 0 else (record or {}).get("epoch") or 0
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(run.device)
    formats.load_model(model, cfg.eval_ckpt, "semseg")
    if cfg.compile:
        model.compile_fixed_shapes()
    slots = test_blocks(cfg, test)
    blocks = percent(evaluate(model, test, slots, cfg, epoch, run.env))
    run.print(format_scores(f"epoch {epoch}'s test blocks ({len(slots)})", blocks))
    check = {"blocks": ckpt.reproduction(
        blocks, {k: recorded["metrics"].get(k) for k in SCORES} if recorded else {}, record,
        eval_record(cfg, run, epoch, step), ignore=("num_votes", "stride"))}
    run.print(f"epoch {epoch}'s test blocks: {check['blocks']['note']}")
    scores = run_test(model, test, cfg, run, 0)
    final = ckpt.run_results(cfg.eval_ckpt)  # a --test-rooms test of these weights, if any
    tested = final.get("test_evaluation")
    same = tested is not None and step is not None and tested.get("step") == step
    check["test"] = ckpt.reproduction(
        scores, {k: final["test"].get(k) for k in SCORES} if same else {},
        tested if same else None, eval_record(cfg, run, None, step),
        rounding=("eval_batch_size",), ignore=("epoch", "eval_blocks", "min_block_points"))
    if not same:
        check["test"]["note"] = ("the run recorded no whole-room test of these weights (its "
                                 "results.json, with --test-rooms) to compare with")
    run.print(f"whole-room test: {check['test']['note']}")
    result = run.finish_eval(format_scores(f"{cfg.eval_ckpt}: whole-room test", scores),
                             {"test": scores, "blocks": blocks, "epoch": epoch,
                              "reproduction": check}, cfg.eval_ckpt,
                             {"predictions": run.out_dir / "test_predictions"})
    return {**result, "model": model, "out_dir": str(run.out_dir)}


if __name__ == "__main__":
    cli.run(main, Config, PRESETS, doc=__doc__.split("\n\n")[0], resolve=resolve)
