"""Point-PQAE classification fine-tuning: ScanObjectNN and ModelNet40, three protocols.

    python finetune_cls.py --preset tiny                                     # built-in data, CPU
    python finetune_cls.py --preset scan-hardest --pretrained runs/pretrain/ckpt-epoch-300
    python finetune_cls.py --preset modelnet-1k --head linear --pretrained pqae-pretrain.safetensors
    torchrun --nproc_per_node=4 finetune_cls.py --preset scan-objbg --pretrained ... --seed 3
    python finetune_cls.py --eval-ckpt runs/finetune-cls/ckpt-best            # evaluate a saved model
    python finetune_cls.py aggregate runs/*/results.json                     # mean +- std, max

--head full|linear|mlp3 picks the protocol (linear and mlp3 train only the head, the class
token and its position); the learning rate defaults to the preset's value for that head. As in
pretrain.py, each split is held whole in one tensor on the device and batches are sampled there
(random point order, FPS to point_all, ONE random n-subset shared by the batch, then the
dataset's augmentation, as the reference); all randomness of a step is a pure function of
(seed, step, rank), so a resumed run is identical to an uninterrupted one.

Reported numbers, each named for what it is, written to out_dir/results.json:
* last_acc:  test accuracy after the last epoch;
* best_acc:  the best test accuracy over epochs. This SELECTS THE EPOCH ON THE TEST SET; it is
             the number the reference reports, so it is kept, under that name;
* vote_acc:  vote@10 of the last-epoch model with a fixed seed (`--vote-seed`): 10 random
             subsets (+ the vote transform), logits averaged. Each vote's subset is shared by
             the whole test set, so the result does not depend on batching or sharding (the
             reference draws one per test batch: same per-sample odds, a little more
             run-to-run spread here). The reference's `--test` reports the max over 299 such
             runs; we report one.
Under torchrun every test sample is evaluated exactly once (contiguous shards, summed counts).
After a mid-epoch resume, that epoch's logged train_loss/train_acc cover only the steps since
the resume; test accuracies and everything trained are exactly those of an unbroken run.

A checkpoint stores, with the accuracy it reports, what that evaluation depends on
(`EVAL_FIELDS`, device, processes: its metrics["evaluation"]). `--eval-ckpt` takes those fields
from it and says whether it gives exactly the figures the run recorded for those weights (the
plain test is deterministic; the vote test, recorded in results.json for the final weights,
draws from --vote-seed), or what differs (eval-NAME.json: "reproduction").
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from pqae import checkpoint as ckpt
from pqae import amp, bench, cli, costmodel, data, dist, formats, graphs, syncbn
from pqae.classifier import PointClassifier
from pqae.errors import BadInput, MissingFile, UserError, reading
from pqae.log import print0
from pqae.model import TINY_ENCODER, EncoderShape, fuse_embed
from pqae.optim import param_groups, set_epoch_lr
from pqae.profiling import phase
from pqae.run import Progress, Run, RunOptions, micro_batches, start
from pqae.seeding import epoch_perm, shared_seed, step_seed


@dataclass(frozen=True)
class Task:
    """What fine-tuning reads, builds and optimises, and how it evaluates."""
    # data
    data: Literal["scanobjectnn", "modelnet40", "procedural"] = "scanobjectnn"
    """scanobjectnn / modelnet40: the HDF5 from `python -m data_prep.scanobjectnn` /
    `python -m data_prep.modelnet40`; procedural: a built-in 5-class problem, no files."""
    data_path: str = "data/scanobjectnn_objbg.h5"
    """the .h5 file of the data set (one ScanObjectNN variant per file)."""
    num_classes: int = 15
    """number of classes of the data set (size of the head's output)."""
    num_points: int = 2048
    """points per cloud fed to the model (the reference's `npoints`)."""
    augment: Literal["rotate", "scale_translate", "none"] = "rotate"
    """train augmentation: rotation about y (ScanObjectNN) or scale & translate (ModelNet)."""
    vote_augment: Literal["rotate", "scale_translate", "none"] = "none"
    """transform of each vote of the vote test: none for OBJ_BG/OBJ_ONLY, rotate for PB_T50_RS,
    scale_translate for ModelNet."""
    procedural_train: int = 200
    """number of training shapes when data = procedural."""
    procedural_test: int = 45
    """number of test shapes when data = procedural."""
    procedural_points: int = 1024
    """points per procedural cloud."""
    # the pretrained encoder and the protocol
    head: Literal["full", "linear", "mlp3"] = "full"
    """protocol: full trains everything; linear / mlp3 train only `cls`-named parameters
    (head, class token, class pos) with the encoder left in train mode, as the reference."""
    pretrained: str = ""
    """pretraining checkpoint (ours, or one converted by data_prep.convert_checkpoint) whose
    encoder is loaded strictly; its shape (dim, depth, heads, embed_hidden) comes from it.
    Empty: train from scratch."""
    # optimisation
    batch_size: int = 32
    """GLOBAL batch in shapes, split evenly over the processes (drop_last, as the reference)."""
    lr: float | None = None
    """base learning rate of AdamW; None: the preset's value for --head (lr_full / lr_linear /
    lr_mlp3). `cls`-named parameters use 10x it."""
    lr_full: float = 2e-5
    """base learning rate of AdamW when lr is None and head = full."""
    lr_linear: float = 1e-4
    """base learning rate of AdamW when lr is None and head = linear."""
    lr_mlp3: float = 1e-4
    """base learning rate of AdamW when lr is None and head = mlp3."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, 1-D parameters and tokens, except `cls`-named
    parameters, which are all decayed)."""
    epochs: int = 300
    """cosine length in epochs; the loop runs epochs 0..epochs inclusive (one more than the
    cosine length), as the reference."""
    warmup_epochs: int = 10
    """epochs of linear learning-rate warm-up from 1e-6 to lr (0: none)."""
    grad_clip: float = 10.0
    """maximum global L2 norm of the gradients, clipped before every optimizer step."""
    # evaluation
    eval_ckpt: str = ""
    """skip training: evaluate this fine-tuned checkpoint (our ckpt dir / .safetensors, or a
    reference fine-tuned .pth) on the test set, plain and with votes, into
    out_dir/eval-NAME.json, and say whether the figures are those the run recorded for it. The
    model's fields come from the checkpoint, its evaluation's fields (EVAL_FIELDS) too unless
    given."""
    eval_batch_size: int = 32
    """test batch in shapes per process (BatchNorm is in eval mode: another batch changes the
    accuracy by float rounding at most)."""
    votes: int = 10
    """votes of the vote test after training, each a random point subset plus vote_augment;
    their logits are averaged (0: skip it)."""
    vote_seed: int = 0
    """seed of the vote test's draws (point subsets and vote transforms)."""
    val_fraction: float = 0.0
    """hold out this share of each class of the training set (drawn at --seed, recorded in
    results.json) as a validation set, scored with the test set at every evaluated epoch; the
    run then also reports val_selected_acc, the test accuracy at the epoch chosen on the
    validation set (an honest selection; best_acc chooses it on the test set). 0: none, the
    reference (it trains on the whole training set)."""
    vote_runs: int = 1
    """run the vote test this many times (seeds vote_seed, vote_seed + 1, ...) and also report
    vote_acc_max, the MAXIMUM over the runs: the reference's --test reports the maximum of 299
    runs (--vote-runs 299). The paper's table uses no voting (best_acc)."""
    # speed
    fast_point_all: bool = False
    """when the train-time FPS to point_all points takes every point (point_all == the cloud's
    points == num_points: ScanObjectNN, ModelNet 8k), compute its picks directly (exact as a set,
    `data.full_fps_indices`) instead of in N sequential FPS steps. Each cloud still gets the
    reference's points in a uniformly random order; what changes is which FPS rank the
    batch-shared subset makes the first point (the grouping's start) of every cloud: index
    rank here. Off (the reference): FPS from N to N points."""
    cuda_graph: bool = False
    """replay each training step (its batch's sampling and augmentation, FPS and kNN, forward,
    backward, gradient average, clip, AdamW: all fixed shapes) from one CUDA graph
    (pqae/graphs.py); only the batch-wide point subset is drawn eagerly. On a CPU the same
    step runs without a graph. Off by default until a GPU has measured it; needs
    --accum-steps 1."""
    benchmark_steps: int = 0
    """if > 0: time this many training steps (after 5 warm-up steps), print ms/step, and exit.
    Also times the plain-PyTorch float32 path in the same run (see --benchmark-compare)."""
    benchmark_compare: bool = True
    """with --benchmark-steps: also time the plain-PyTorch float32 path (reference kernels, no
    amp, no compile, for-each AdamW) and print the ratio."""
    benchmark_phases: bool = True
    """with --benchmark-steps: also print a breakdown of the step by phase (torch.profiler)."""
    cost_model: bool = False
    """print the step's estimated time on an H100 per phase, for the fp32 plain path and for
    --amp --compile, and exit: an estimate from the step's ops on the meta device
    (pqae/costmodel.py), no GPU and no data needed."""
    json: bool = False
    """with --cost-model: print one JSON object instead of the table."""
    # model architecture (a checkpoint brings its own; the defaults are the reference's)
    num_group: int = 128
    """patches per cloud (FPS centres)."""
    group_size: int = 32
    """points per patch (kNN neighbours of its centre)."""
    drop_path_rate: float = 0.2
    """stochastic depth rate of the last block, increasing linearly from 0 at the first block."""


@dataclass(frozen=True)
class Config(RunOptions, EncoderShape, Task):
    """finetune_cls.py's command line: Task's fields, the encoder's shape, then the run options of
    every script (--help lists them in that order)."""
    out_dir: str = "runs/finetune-cls"
    log_every: int = 20


_SCAN = Config()
_MODELNET = dataclasses.replace(
    _SCAN, data="modelnet40", data_path="data/modelnet40.h5", num_classes=40, num_points=1024,
    num_group=64, augment="scale_translate", vote_augment="scale_translate", lr_full=1e-5)
PRESETS = {
    "scan-objbg": _SCAN,
    "scan-objonly": dataclasses.replace(_SCAN, data_path="data/scanobjectnn_objonly.h5"),
    "scan-hardest": dataclasses.replace(_SCAN, data_path="data/scanobjectnn_hardest.h5",
                                        vote_augment="rotate"),
    "modelnet-1k": _MODELNET,
    "modelnet-8k": dataclasses.replace(_MODELNET, num_points=8192, num_group=512,
                                       lr_linear=5e-5, lr_mlp3=5e-5),
    "tiny": dataclasses.replace(
        _SCAN, data="procedural", num_classes=5, num_points=256, **TINY_ENCODER,
        num_group=16, group_size=16, drop_path_rate=0.1, batch_size=16,
        lr_full=1e-3, lr_linear=3e-3, lr_mlp3=3e-3, epochs=6, warmup_epochs=0, log_every=5,
        out_dir="runs/finetune-cls-tiny"),
}


MODEL_FIELDS = ("num_classes", "head", "num_group", "group_size") + ckpt.ENCODER_FIELDS
"""The fields that build the classifier: an evaluated checkpoint brings its own."""
EVAL_FIELDS = ("data", "data_path", "num_points", "procedural_test", "procedural_points", "seed",
               "eval_batch_size", "votes", "vote_seed", "vote_runs", "vote_augment", "amp")
"""What an evaluation's accuracies depend on besides the weights (the test data, the vote
test's draws, the batch, bf16): recorded with them, and taken by --eval-ckpt from the
checkpoint unless flags say otherwise."""
RUN_FIELDS = EVAL_FIELDS + ("procedural_train", "out_dir")
"""What else an evaluated checkpoint brings unless flags say otherwise: its data and run."""


def resolve(cfg: Config, explicit: set[str], prefix: str = "", run: bool = True) -> Config:
    """The model of --eval-ckpt (and its data and run when `run`), the encoder shape of
    --pretrained, and --data-path only with a data kind that reads it (`cli.from_checkpoints`).
    `prefix`: fewshot.py's `finetune.`."""
    return cli.from_checkpoints(cfg, explicit, MODEL_FIELDS, RUN_FIELDS if run else (),
                                "procedural", prefix)


def base_lr(cfg: Config) -> float:
    return cfg.lr if cfg.lr is not None else {
        "full": cfg.lr_full, "linear": cfg.lr_linear, "mlp3": cfg.lr_mlp3}[cfg.head]


def load_split(cfg: Config, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(points (S, N, 3), labels (S,)) of a split, normalised as the reference (ModelNet: unit
    sphere over all points; ScanObjectNN: as stored). Labels outside 0..num_classes-1 and
    clouds with fewer than num_points points are refused here, naming the file."""
    if cfg.data in ("scanobjectnn", "modelnet40"):
        load = data.load_scanobjectnn if cfg.data == "scanobjectnn" else data.load_modelnet40
        points, labels = load(cfg.data_path, split)
        if len(labels) and int(labels.max()) >= cfg.num_classes:
            raise BadInput(f"{cfg.data_path}: '{split}' labels span {int(labels.min())}.."
                           f"{int(labels.max())}, beyond --num-classes {cfg.num_classes}; give "
                           f"--num-classes {int(labels.max()) + 1} or the file of this task")
    else:
        n = cfg.procedural_train if split == "train" else cfg.procedural_test
        points, labels = data.procedural_classes(n, cfg.procedural_points, cfg.num_classes,
                                                 seed=cfg.seed * 2 + (split == "test"))
    if cfg.num_points > points.shape[1]:
        raise BadInput(f"num_points {cfg.num_points} > {points.shape[1]} points per cloud")
    return points, labels


def val_split(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """(S,) bool: the training rows held out for validation, round(fraction x n) of each
    class of n rows (at least one when n >= 2), a function of (labels, fraction, seed)."""
    if not 0 < fraction < 1:
        raise BadInput(f"--val-fraction must lie in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed * 7919 + 31)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for k in labels.unique().tolist():
        rows = (labels == k).nonzero().flatten()
        n = max(round(fraction * len(rows)), 1 if len(rows) >= 2 else 0)
        held[rows[torch.randperm(len(rows), generator=g)[:n]]] = True
    return held


def build_model(cfg: Config) -> PointClassifier:
    model = PointClassifier(num_classes=cfg.num_classes, head=cfg.head, num_group=cfg.num_group,
                            group_size=cfg.group_size, drop_path_rate=cfg.drop_path_rate,
                            dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                            embed_hidden=cfg.embed_hidden)
    return fuse_embed(model, cfg.fused_embed)


class TestSet:
    """This rank's shard of the test split, prepared once: FPS to num_points from index 0 of
    the stored order (the plain test), and FPS to point_all (the pool the votes draw from)."""

    def __init__(self, cfg: Config, points: torch.Tensor, labels: torch.Tensor, env: dist.Dist):
        self.size = points.shape[0]
        self.shard = dist.shard(self.size, env.rank, env.world_size)
        self.labels = labels[self.shard.start:self.shard.stop].to(env.device)
        mine = points[self.shard.start:self.shard.stop].to(env.device)  # (s, N, 3)
        self.point_all = data.point_all_for(cfg.num_points, points.shape[1])
        bs = cfg.eval_batch_size

        def fps(m: int) -> torch.Tensor:
            return torch.cat([data.fps_gather(mine[i:i + bs], m) for i in range(0, len(mine), bs)]) \
                if len(mine) else mine[:, :m]

        self.points = fps(cfg.num_points)  # (s, n, 3)
        self.pool = fps(self.point_all) if cfg.votes else None  # (s, point_all, 3)


def vote_test(model, test: "TestSet", cfg: Config) -> tuple[float | None, float | None]:
    """(vote_acc of the first run, the maximum over cfg.vote_runs runs) in %, or Nones."""
    if not cfg.votes:
        return None, None
    accs = [evaluate(model, test, dataclasses.replace(cfg, vote_seed=cfg.vote_seed + r),
                     cfg.votes)[0] for r in range(max(1, cfg.vote_runs))]
    return accs[0], max(accs)


def vote_text(cfg: Config, first: float | None, best: float | None) -> str:
    if first is None:
        return f"vote@{cfg.votes} -"
    text = f"vote@{cfg.votes} {first:.2f} % (seed {cfg.vote_seed})"
    if cfg.vote_runs > 1:
        text += f" | max over {cfg.vote_runs} vote runs {best:.2f} % (a maximum, as the reference's --test)"
    return text


@torch.no_grad()
def evaluate(model, test: TestSet, cfg: Config, votes: int = 0) -> tuple[float, int]:
    """Test accuracy in % over the WHOLE test set and the number of samples counted (summed
    over ranks: each sample exactly once). votes = 0: one plain pass; votes > 0: the vote test,
    each vote a random num_points-subset of the FPS pool shared by all samples plus the
    vote transform, with draws from `vote_seed` for the whole set (shard-independent)."""
    was_training = model.training
    model.eval()
    device = test.labels.device
    logits = torch.zeros(len(test.labels), cfg.num_classes, device=device)
    bs = cfg.eval_batch_size

    def run(points: torch.Tensor) -> torch.Tensor:
        # The last batch is padded to the full batch (with copies of its last sample, whose
        # logits are dropped): in eval mode every sample is computed on its own, and a compiled
        # model sees one batch shape, so it does not recompile for the remainder.
        n = points.shape[0]
        if n < bs:
            points = torch.cat([points, points[-1:].expand(bs - n, -1, -1)])
        with amp.autocast(device, cfg.amp):
            return model(points)[:n].float()

    if votes == 0:
        for i in range(0, len(test.labels), bs):
            logits[i:i + bs] = run(test.points[i:i + bs])
    for v in range(votes):
        g = torch.Generator().manual_seed(cfg.vote_seed * 1000 + v)
        subset = torch.randperm(test.point_all, generator=g)[:cfg.num_points].to(device)
        params = data.draw_augmentation(cfg.vote_augment, test.size, g)[test.shard.start:test.shard.stop]
        for i in range(0, len(test.labels), bs):
            pts = data.apply_augmentation(cfg.vote_augment, test.pool[i:i + bs][:, subset],
                                          params[i:i + bs])
            logits[i:i + bs] += run(pts) / votes  # average of the votes' logits
    counts = torch.stack([(logits.argmax(1) == test.labels).sum(), torch.tensor(len(test.labels),
                                                                                device=device)])
    correct, total = dist.all_reduce_sum(counts.double()).tolist()
    model.train(was_training)
    return 100.0 * correct / max(total, 1), int(total)


def build_training(cfg: Config, env: dist.Dist):
    """(model, the module to call for training (DDP wrapper or the model), optimizer), with the
    pretrained encoder of cfg.pretrained loaded when given."""
    torch.manual_seed(cfg.seed)  # model init: identical on every rank
    model = build_model(cfg).to(env.device)
    model.check_inputs = env.device.type == "cpu"  # the data were checked for NaN when loaded
    if cfg.pretrained:  # its encoder, strictly; the decoder side is dropped, and named
        print0(ckpt.loaded_note(cfg.pretrained, model.load_pretrained(cfg.pretrained)),
               rank=env.rank)
    if env.enabled and cfg.sync_bn:
        model = syncbn.convert(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, head_lr_scale=10.0),
                                  lr=base_lr(cfg), weight_decay=cfg.weight_decay,
                                  fused=cfg.fused_adamw)
    if cfg.compile:
        model.compile_fixed_shapes()
    # --cuda-graph averages the gradients inside its graph (DDP's hooks cannot be captured)
    return model, model if cfg.cuda_graph else dist.ddp(model, env), optimizer


def benchmark(cfg: Config, train_points: torch.Tensor, train_labels: torch.Tensor,
              env: dist.Dist) -> dict:
    """Time cfg.benchmark_steps training steps of this config and, in the same run, of the
    plain-PyTorch float32 path (reference kernels, no amp, no compile, for-each AdamW); then a
    breakdown of a few steps by phase. Writes nothing."""
    perm = epoch_perm(cfg.seed, 0, train_points.shape[0], env.device)
    steps_per_epoch = train_points.shape[0] // cfg.batch_size

    def make_step(v: bench.Variant):
        model, train_model, optimizer = build_training(v.cfg, env)
        train_model.train()
        step = make_train_step(v.cfg, model, train_model, optimizer, train_points, train_labels,
                               env)
        return lambda i: step(i % steps_per_epoch, perm)

    results = bench.run(bench.variants(cfg, cfg.benchmark_compare), make_step,
                        cfg.benchmark_steps, cfg.batch_size, env.device,
                        phases=cfg.benchmark_phases, rank=env.rank)
    if env.is_main:
        epochs = cfg.epochs + 1
        print(bench.report(
            results, title=f"benchmark ({cfg.head} fine-tuning, {cfg.num_points} points, "
                           f"{cfg.num_group} groups): global batch {cfg.batch_size} on "
                           f"{env.world_size} process(es), {cfg.benchmark_steps} timed steps, "
                           f"device {env.device}",
            phase_order=PHASES,
            nested={"encoder": "patch_embed"},
            projections=[(f"{epochs} epochs of this data", epochs * steps_per_epoch)]))
    dist.cleanup()
    return results


PHASES = ["data", "grouping", "patch_embed", "encoder", "head", "loss", "backward", "optimizer"]
CAPTURED = tuple(PHASES)
"""The phases --cuda-graph replays from its graph: all of them (the batch-wide subset's draw,
outside every phase, stays eager)."""
CLOUD_POINTS = {"scanobjectnn": 2048, "modelnet40": 8192}
"""Points per stored cloud of each data set (procedural: --procedural-points)."""


def cost_model_of(cfg: Config) -> costmodel.StepModel:
    """The real step closure on the meta device, for pqae.costmodel to record (a randomly
    initialised model: a checkpoint changes no cost)."""
    meta, env = torch.device("meta"), costmodel.meta_env()
    points = cfg.procedural_points if cfg.data == "procedural" else CLOUD_POINTS[cfg.data]

    def make_step(amp_on: bool):
        # (the graph path: costed from the same ops; --fused-embed: in the amp+compile path)
        c = dataclasses.replace(cfg, amp=False, compile=False, fused_adamw=False, pretrained="",
                                cuda_graph=False, fused_embed=cfg.fused_embed and amp_on)
        model = build_model(c).to(meta)
        model.check_inputs = False
        optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay, head_lr_scale=10.0),
                                      lr=base_lr(c), weight_decay=c.weight_decay, foreach=True)
        clouds = torch.empty(c.batch_size, points, 3, device=meta)
        labels = torch.empty(c.batch_size, dtype=torch.long, device=meta)
        perm = torch.empty(c.batch_size, dtype=torch.long, device=meta)
        step = make_train_step(c, model, model, optimizer, clouds, labels, env)
        return lambda: step(0, perm)

    # compile_fixed_shapes: the encoder (patch_embed, encoder) and the head
    return costmodel.StepModel(
        PHASES, ("patch_embed", "encoder", "head"), make_step, captured=CAPTURED,
        config={"batch_size": cfg.batch_size, "num_points": cfg.num_points,
                "cloud_points": points, "dim": cfg.dim, "depth": cfg.depth,
                "num_group": cfg.num_group, "group_size": cfg.group_size, "head": cfg.head,
                "fast_point_all": cfg.fast_point_all})


def plan(cfg: Config) -> dict:
    """--plan: the run's size (the train split's, from the file's header when it exists) and
    its device memory per process for each --accum-steps."""
    import h5py
    points = cfg.procedural_points if cfg.data == "procedural" else CLOUD_POINTS[cfg.data]
    shapes = cfg.procedural_train if cfg.data == "procedural" else None
    if shapes is None and cfg.data_path and Path(cfg.data_path).is_file():
        with reading(cfg.data_path, "a classification HDF5 file"), h5py.File(cfg.data_path) as f:
            shapes = len(f["train/labels"]) if "train/labels" in f else None
    return costmodel.run_plan(
        lambda b: cost_model_of(dataclasses.replace(cfg, batch_size=b)).make_step, cfg, shapes,
        points * 3 * 4 + 8, sum(t.numel() for t in build_model(cfg).parameters()),
        cfg.epochs + 1)


def make_train_step(cfg: Config, model: PointClassifier, train_model, optimizer,
                    train_points: torch.Tensor, train_labels: torch.Tensor, env: dist.Dist):
    """The optimizer step of `step` (sampling, augmentation, clip, AdamW): its batch and every
    random draw come from (seed, step, rank) only, so any step can be replayed."""
    rank, device = env.rank, env.device
    local_bs = cfg.batch_size // env.world_size
    steps_per_epoch = train_points.shape[0] // cfg.batch_size
    point_all = data.point_all_for(cfg.num_points, train_points.shape[1])
    full_fps = cfg.fast_point_all and point_all == train_points.shape[1] == cfg.num_points

    def batch(idx: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
        """The training clouds idx, sampled and augmented: (b, num_points, 3)."""
        with phase("data"):
            points = data.shuffle_points(train_points[idx])  # (b, N, 3), random FPS start
            if full_fps:  # FPS's picks from all N points, without its N sequential steps
                pick = data.full_fps_indices(points)  # (b, N)
                points = points.gather(1, pick[..., None].expand(-1, -1, 3))
            else:
                points = data.fps_gather(points, point_all)  # (b, point_all, 3)
            points = points[:, subset]  # ONE random subset for the whole batch, as the reference
            params = data.draw_augmentation(cfg.augment, len(idx), device=device)
            return data.apply_augmentation(cfg.augment, points, params)

    def update(idx: torch.Tensor, subset: torch.Tensor) -> dict:
        """--cuda-graph's step after its eager draw (the batch-wide subset): the rest of
        train_step for one micro-batch, the gradients averaged over the processes (no DDP
        wrapper)."""
        points, labels = batch(idx, subset), train_labels[idx]
        with amp.autocast(device, cfg.amp, cache=False):
            logits = model(points)
        with phase("loss"):
            loss = F.cross_entropy(logits.float(), labels)
        with phase("backward"):
            loss.backward()
            graphs.average_gradients(params)
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "hits": (logits.detach().argmax(1) == labels).sum()}

    params = [p for p in model.parameters() if p.requires_grad]
    captured = (graphs.captured_step(update, optimizer, device, cfg.accum_steps)
                if cfg.cuda_graph else None)

    def train_step(step: int, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the batch of `step`; returns (loss, correct) as tensors."""
        # Every draw is made on the device (a host draw would need a host-to-device copy, which
        # synchronises, every step). First the batch-wide subset, from a stream every rank
        # shares; then this rank's own stream: shuffles, augmentation, DropPath.
        torch.manual_seed(shared_seed(cfg.seed, step))
        subset = torch.rand(point_all, device=device).argsort()[:cfg.num_points]
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        i = step % steps_per_epoch
        idx = perm[i * cfg.batch_size + rank * local_bs:][:local_bs]
        if captured is not None:
            out = captured(idx, subset)
            return out["loss"], out["hits"]
        points = batch(idx, subset)
        labels, k, losses, hits = train_labels[idx], cfg.accum_steps, [], []
        for part, sync in micro_batches(train_model, k, local_bs):
            with sync:
                # no autocast weight cache, as --cuda-graph's capture: the same casts in both
                with amp.autocast(device, cfg.amp, cache=False):
                    logits = train_model(points[part])
                with phase("loss"):
                    loss = F.cross_entropy(logits.float(), labels[part])
                with phase("backward"):
                    (loss / k if k > 1 else loss).backward()
            losses.append(loss.detach())
            hits.append((logits.detach().argmax(1) == labels[part]).sum())
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if k == 1:
            return losses[0], hits[0]
        return torch.stack(losses).mean(), torch.stack(hits).sum()  # the batch's

    train_step.captured = captured  # --cuda-graph's CapturedStep (None without the flag)
    return train_step


def main(cfg: Config, show: bool = True) -> dict:
    """Train (or, with eval_ckpt, evaluate) one classifier. `show`: end with what the run made
    and the next command (fewshot.py's folds, which it deletes, leave that out)."""
    if cfg.cost_model:
        return costmodel.main(cost_model_of(cfg), cfg.json)
    if cfg.plan:
        planned = plan(cfg)
        if not cfg.benchmark_steps:
            return planned
    cfg = resolve(cfg, set(), run=False)  # the model of --eval-ckpt / encoder of --pretrained
    run = start(cfg, cfg.batch_size, claim=not (cfg.eval_ckpt or cfg.benchmark_steps))
    test = TestSet(cfg, *load_split(cfg, "test"), run.env)
    if cfg.eval_ckpt:
        return evaluate_checkpoint(cfg, run, test)
    train_points, train_labels = load_split(cfg, "train")
    val, val_rows = None, []
    if cfg.val_fraction > 0:
        held = val_split(train_labels, cfg.val_fraction, cfg.seed)
        val_rows = held.nonzero().flatten().tolist()
        val = TestSet(cfg, train_points[held], train_labels[held], run.env)
        train_points, train_labels = train_points[~held], train_labels[~held]
    train_points, train_labels = train_points.to(run.device), train_labels.to(run.device)
    steps_per_epoch, total_steps = run.schedule(train_points.shape[0], cfg.epochs + 1)
    lr0, local_bs = base_lr(cfg), run.local_batch
    run.print(f"data {cfg.data}: train {tuple(train_points.shape)}, test {test.size}"
              f"{f', validation {val.size} (held out of train)' if val else ''} | "
              f"{steps_per_epoch} steps/epoch x {cfg.epochs + 1} epochs | global batch "
              f"{cfg.batch_size} ({local_bs} per process) | lr {lr0:g} (x10 for cls*)")
    if cfg.benchmark_steps:
        return benchmark(cfg, train_points, train_labels, run.env)

    model, train_model, optimizer = build_training(cfg, run.env)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    run.print(f"PointClassifier ({cfg.head}): {total / 1e6:.2f} M parameters, "
              f"{trainable / 1e6:.3f} M trainable")
    state = run.resume(model, optimizer, step=0, history=[], best={"acc": -1.0, "epoch": -1},
                       pending=None, evaluation=None,
                       best_val={"val_acc": -1.0, "epoch": -1, "acc": None})
    step, history, best = state["step"], state["history"], state["best"]
    best_val = state["best_val"]  # the epoch chosen on the validation set (--val-fraction)
    evaluation = state["evaluation"]  # what the last accuracy depends on (`evaluation_record`)
    train_step = make_train_step(cfg, model, train_model, optimizer, train_points, train_labels,
                                 run.env)
    run.open_outputs()

    progress = Progress(run, total_steps, step, cfg.epochs, pending=state["pending"])
    # loss sum, correct, samples since the last line, and the same since the epoch began
    sums = progress.restore("sums", torch.zeros(3, device=run.device))
    epoch_sums = progress.restore("epoch_sums", torch.zeros(3, device=run.device))
    epoch = step // steps_per_epoch
    perm = epoch_perm(cfg.seed, epoch, train_points.shape[0], run.device)
    train_model.train()  # all protocols train in train() mode, the frozen encoder's too
    while step < total_steps:
        lr = set_epoch_lr(optimizer, epoch, lr0, cfg.epochs, cfg.warmup_epochs)
        loss, correct = train_step(step, perm)
        batch = torch.stack([loss * local_bs, correct.float(),
                             torch.full((), float(local_bs), device=run.device)])
        sums += batch
        epoch_sums += batch
        step += 1
        progress.tick()
        epoch_end = step % steps_per_epoch == 0
        if progress.due(step, epoch_end):
            sums = dist.all_reduce_sum(sums)  # the global batch; every rank decides alike
            loss_avg, acc_avg = (sums[0] / sums[2]).item(), (100 * sums[1] / sums[2]).item()
            sums.zero_()
            run.check_loss(loss_avg, step, epoch)
            progress.line(step, epoch, f"loss {loss_avg:.4f} | train acc {acc_avg:.1f} | "
                                       f"lr {lr:.3g}")
            run.log(step, {"train/loss": loss_avg, "train/acc": acc_avg, "train/lr": lr})
        if epoch_end:
            epoch_sums = dist.all_reduce_sum(epoch_sums)
            row = {"epoch": epoch, "train_loss": (epoch_sums[0] / epoch_sums[2]).item(),
                   "train_acc": (100 * epoch_sums[1] / epoch_sums[2]).item(), "acc": None}
            epoch_sums.zero_()
            if epoch != 0:  # the reference evaluates after every epoch but the first
                dist.broadcast_buffers(model)  # every rank evaluates rank 0's model
                row["acc"], n = evaluate(model, test, cfg)
                evaluation = eval_record(cfg, run, epoch, step)
                if row["acc"] > best["acc"]:  # ">" as the reference: a tie keeps the first
                    best = {"acc": row["acc"], "epoch": epoch}
                    run.save("ckpt-best", model, epoch, step,
                             {"acc": row["acc"], "evaluation": evaluation})
                val_text = ""
                if val is not None:
                    row["val_acc"], _ = evaluate(model, val, cfg)
                    if row["val_acc"] > best_val["val_acc"]:  # a tie keeps the first
                        best_val = {"val_acc": row["val_acc"], "epoch": epoch, "acc": row["acc"]}
                    val_text = (f" | val acc {row['val_acc']:.2f}, test acc at the best val "
                                f"epoch {best_val['epoch']}: {best_val['acc']:.2f}")
                    run.log(step, {"val/acc": row["val_acc"]})
                run.print(f"epoch {epoch} | test acc {row['acc']:.2f} | best {best['acc']:.2f} "
                          f"(epoch {best['epoch']}, test-set selection){val_text} | {n} samples")
                run.log(step, {"test/acc": row["acc"]})
                progress.restart_interval()
            history.append(row)
        stop = run.stopping(step)  # a preemption signal: save, then exit (every rank agrees)
        if epoch_end or step == total_steps or stop:
            # the last accuracy, which is these weights' unless saved mid-epoch (the record's step)
            run.save("ckpt-last", model, epoch, step,
                     {"acc": history[-1]["acc"] if history else None, "evaluation": evaluation},
                     optimizer, history=history, best=best, evaluation=evaluation,
                     best_val=best_val,
                     pending=progress.pending(sums=sums, epoch_sums=epoch_sums))
        if epoch_end:
            epoch += 1
            perm = epoch_perm(cfg.seed, epoch, train_points.shape[0], run.device)
        if stop:
            run.exit_preempted(step)

    dist.broadcast_buffers(model)
    vote_acc, vote_max = vote_test(model, test, cfg)
    evaluated = [h["acc"] for h in history if h["acc"] is not None]
    result = {"seed": cfg.seed, "head": cfg.head, "lr": lr0, "step": step,
              "total_steps": total_steps, "history": history, "test_samples": test.size,
              "last_acc": evaluated[-1] if evaluated else None,
              "best_acc": best["acc"] if evaluated else None,
              "best_epoch": best["epoch"] if evaluated else None,
              "best_note": "epoch selected on the TEST set (the reference's reported number)",
              "vote_acc": vote_acc, "vote_seed": cfg.vote_seed, "votes": cfg.votes,
              "vote_acc_max": vote_max, "vote_runs": cfg.vote_runs,
              # what last_acc depends on; the vote test ran on the weights of `step`
              "evaluation": evaluation}
    if val is not None:
        result.update(val_fraction=cfg.val_fraction, val_samples=val.size,
                      val_rows=val_rows,  # rows of the train split held out, in file order
                      val_selected_acc=best_val["acc"] if evaluated else None,
                      val_selected_epoch=best_val["epoch"] if evaluated else None,
                      val_note="epoch selected on the validation set held out of train")
    tiny = "--preset tiny " if cfg.data == "procedural" else ""
    best_ckpt = run.out_dir / ("ckpt-best" if evaluated else "ckpt-last")
    result = run.finish(summary(cfg, result, step), result, best_ckpt,
                        [f"python finetune_cls.py {tiny}--eval-ckpt {best_ckpt}"]
                        + ([f"python fewshot.py {tiny}--pretrained {cfg.pretrained}"]
                           if cfg.pretrained else []), show=show)
    return {**result, "model": model}


def summary(cfg: Config, result: dict, step: int) -> str:
    """The final accuracies for the `done |` line, each named for what it is."""
    if result["best_acc"] is None:
        return f"no evaluation (stopped at step {step}, before epoch 1 ended)"
    val = (f"val-selected acc {result['val_selected_acc']:.2f} % (epoch "
           f"{result['val_selected_epoch']}) | ") if result.get("val_selected_acc") is not None else ""
    return (f"last-epoch acc {result['last_acc']:.2f} % | best-epoch acc {result['best_acc']:.2f}"
            f" % (epoch {result['best_epoch']}, test-set selection) | {val}"
            f"{vote_text(cfg, result['vote_acc'], result['vote_acc_max'])}")


def eval_record(cfg: Config, run: Run, epoch: int | None, step: int | None) -> dict:
    """What the accuracies of an evaluation of the weights of `step` depend on."""
    return ckpt.evaluation_record(cfg, EVAL_FIELDS, run.device, run.env.world_size, epoch=epoch,
                                  step=step)


def recorded_figures(path: str) -> tuple[dict, dict | None, int | None]:
    """(the figures a training run recorded for the weights in checkpoint `path`, the record of
    their evaluation, the weights' step): the accuracy in its meta.json, and the vote test of
    its run's results.json when these are the run's final weights (the same step)."""
    recorded = ckpt.recorded_evaluation(path, EVAL_FIELDS)
    if recorded is None:
        return {}, None, None
    figures = {"acc": recorded["metrics"].get("acc")}
    final = ckpt.run_results(path)
    if final.get("step") is not None and final.get("step") == recorded["step"]:
        figures.update(vote_acc=final.get("vote_acc"), vote_acc_max=final.get("vote_acc_max"))
    return figures, recorded["evaluation"], recorded["step"]


def evaluate_checkpoint(cfg: Config, run: Run, test: TestSet) -> dict:
    """--eval-ckpt: the saved classifier (ours, or a reference .pth converted on the fly) on the
    test set, plain and with votes, into out_dir/eval-NAME.json, compared with the figures its
    run recorded for it."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(run.device)
    model.check_inputs = run.device.type == "cpu"  # the data were checked for NaN when loaded
    formats.load_model(model, cfg.eval_ckpt, "finetune-cls")
    if cfg.compile:
        model.compile_fixed_shapes()
    acc, n = evaluate(model, test, cfg)
    vote_acc, vote_max = vote_test(model, test, cfg)
    scores = {"acc": acc, "vote_acc": vote_acc, "vote_acc_max": vote_max,
              "vote_runs": cfg.vote_runs, "test_samples": n}
    figures, record, step = recorded_figures(cfg.eval_ckpt)
    # The plain test does not depend on the epoch: only the weights' step says whether the
    # recorded accuracy is theirs.
    check = ckpt.reproduction(scores, figures, record,
                              eval_record(cfg, run, (record or {}).get("epoch"), step),
                              rounding=("eval_batch_size",), ignore=("epoch",))
    run.print(check["note"])
    result = run.finish_eval(f"{cfg.eval_ckpt}: test acc {acc:.2f} % | "
                             f"{vote_text(cfg, vote_acc, vote_max)} | {n} samples",
                             {"seed": cfg.seed, "test": scores, "reproduction": check},
                             cfg.eval_ckpt)
    return {**result, "model": model}


@dataclass(frozen=True)
class Aggregate:
    """finetune_cls.py aggregate: mean +- sample std and max over seeds of last_acc, best_acc
    and vote_acc (in %) of many runs, grouped by (data_path, head). The max over seeds is the
    reference's "best of N seeds", printed and labelled as such."""
    results: tyro.conf.Positional[tuple[str, ...]]
    """the results.json files of finished runs, e.g. runs/scan-hardest-seed*/results.json."""


def aggregate(paths: list[str] | tuple[str, ...]) -> dict:
    """Mean +- std (sample std) and max of last_acc, best_acc and vote_acc over many runs'
    results.json, grouped by (data_path, head). "max" over seeds is the reference's "best of
    N seeds": it is printed, and labelled, as such."""
    groups: dict[tuple, list[dict]] = {}
    if not paths:
        raise BadInput("aggregate needs results.json files, e.g. runs/*/results.json")
    for p in paths:
        if not Path(p).is_file():
            raise MissingFile(f"{p}: no such file (a finished run writes results.json into its "
                              f"--out-dir)")
        r = json.loads(Path(p).read_text())
        if "best_acc" not in r:
            raise BadInput(f"{p}: not the results.json of a finetune_cls.py training run (no "
                           f"'best_acc')")
        groups.setdefault((r["config"]["data_path"], r["head"]), []).append(r)
    out = {}
    for (data_path, head), runs in sorted(groups.items()):
        stats = {}
        for key in ("last_acc", "best_acc", "vote_acc"):
            v = torch.tensor([r[key] for r in runs if r.get(key) is not None], dtype=torch.float64)
            if len(v):
                std = v.std().item() if len(v) > 1 else 0.0
                stats[key] = {"mean": v.mean().item(), "std": std, "max": v.max().item(), "n": len(v)}
        out[f"{data_path} [{head}]"] = stats
        print(f"{data_path} [{head}] | {len(runs)} runs (seeds {sorted(r['seed'] for r in runs)})")
        for key, label in (("last_acc", "last epoch"), ("best_acc", "best epoch (test-set selection)"),
                           ("vote_acc", "vote@10")):
            if key in stats:
                s = stats[key]
                print(f"  {label:34s} {s['mean']:6.2f} +- {s['std']:.2f} | max over seeds {s['max']:.2f}")
    return out


HELP = (__doc__.split("\n\n")[0] + "\n\nfinetune_cls.py aggregate RESULTS.json ...: mean +- std and"
        " max over seeds of finished runs (see `finetune_cls.py aggregate --help`)")

if __name__ == "__main__":
    if sys.argv[1:2] == ["aggregate"]:
        try:
            aggregate(tyro.cli(Aggregate, args=sys.argv[2:], prog="finetune_cls.py aggregate").results)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    else:
        cli.run(main, Config, PRESETS, doc=HELP, resolve=resolve)
