"""Point-PQAE pretraining: cross reconstruction between two decoupled views of every cloud.

    python pretrain.py --preset tiny                       # built-in data, ~22 s on 2 CPU cores
    python pretrain.py --data-path data/shapenet55.h5      # the reference recipe, one GPU
    torchrun --nproc_per_node=8 pretrain.py --lr 1e-3      # the reference recipe, 8 GPUs
    python pretrain.py --benchmark-steps 50                # ms/step and shapes/s, then exit
    python pretrain.py --cost-model                        # the step's H100 cost, estimated

The whole data set is held in one tensor on the device and each step's batch is sampled
there (random 1024 of 8192 points, unit sphere, random rotation about y), so there is no
DataLoader. All randomness of a step is a pure function of (seed, step, rank): a resumed run
sees exactly the data, crops and DropPath draws of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pqae import checkpoint as ckpt
from pqae import (amp, bench, cli, collapse, costmodel, data, dist, graphs, probe, show,
                  stream, syncbn)
from pqae.embed import PointEmbedder
from pqae.errors import BadInput
from pqae.model import TINY_ENCODER, EncoderShape, PointPQAE, fuse_embed
from pqae.optim import param_groups, set_epoch_lr
from pqae.profiling import phase
from pqae.run import Progress, Run, RunOptions, micro_batches, start
from pqae.seeding import epoch_perm, shared_seed, step_seed


@dataclass(frozen=True)
class Task:
    """What pretraining reads, builds and optimises, and what it writes besides checkpoints."""
    # data
    data: Literal["shapenet55", "airplanes", "procedural"] = "shapenet55"
    """shapenet55: the HDF5 from `python -m data_prep.shapenet55`; airplanes: the ModelNet40
    airplane slice (.npz) shipped for tests; procedural: built-in generated shapes, no files."""
    data_path: str = ""
    """the .h5 (shapenet55) or .npz (airplanes) file; empty: data/shapenet55.h5 or
    data/airplanes_2048.npz. shapenet55 (any pretraining HDF5, e.g. from data_prep.folder)
    also takes a directory of shards or several paths separated by commas, concatenated.
    Given without --data, the kind follows from the suffix (.h5 or a directory: shapenet55,
    .npz: airplanes); with --data procedural it is an error."""
    data_on: Literal["auto", "device", "host"] = "auto"
    """where the pretraining HDF5 clouds live during the run. device: all of them, read once
    into device memory (the reference's way); host: left in their files, each step's clouds
    read there by background threads a few steps ahead and copied to the GPU on a side
    stream (for sets larger than device memory; the same batches and losses); auto: device
    when their float32 copy takes at most 25% of the device's memory, else host."""
    data_workers: int = 2
    """--data-on host: threads reading clouds from the files."""
    split: Literal["all", "train", "test"] = "all"
    """all = test + train, as the reference (its --whole flag defaults to on)."""
    num_points: int = 1024
    """points sampled per cloud each step (random subset without replacement)."""
    procedural_shapes: int = 1024
    """number of generated shapes when data = procedural."""
    procedural_points: int = 2048
    """points per generated shape (ShapeNet-55 clouds have 8192: use that to benchmark)."""
    # optimisation
    batch_size: int = 128
    """GLOBAL batch in shapes, split evenly over the processes."""
    lr: float = 5e-4
    """base learning rate of AdamW (peak of the per-epoch cosine schedule, after warm-up)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, 1-D parameters and tokens)."""
    epochs: int = 300
    """cosine length in epochs; the loop runs epochs 0..epochs inclusive (one more than the
    cosine length), as the reference."""
    warmup_epochs: int = 10
    """epochs of linear learning-rate warm-up from 1e-6 to lr (0: none)."""
    # what the run writes besides ckpt-last
    save_every: int = 0
    """also write ckpt-last every this many steps (0: at the end of each epoch only)."""
    keep_every: int = 25
    """epoch interval (in epochs) of the kept ckpt-epoch-E checkpoints; see --keep-from."""
    keep_from: int = 250
    """also keep ckpt-epoch-E when E % keep_every == 0 and E >= keep_from (250, 275, 300)."""
    probe_data: str = ""
    """a classification HDF5 (data_prep.modelnet40 / data_prep.scanobjectnn) or `procedural`
    (built-in classes): with --probe-every, rank 0 probes the frozen encoder on it
    (`pqae.probe`: linear and k-NN accuracy in %)."""
    probe_every: int = 0
    """probe the encoder at the end of every this many epochs (0: never); the scores go to
    TensorBoard (probe/*), the log and the checkpoint's metrics."""
    vis_every: int = 2000
    """log TensorBoard point clouds (a view, its target patches, its cross reconstruction) every
    this many optimizer steps (0: never)."""
    cuda_graph: bool = False
    """capture the part of the step whose shapes never change (encoder and decoder on both
    views' patches, loss, backward, gradient average, optimizer) in one CUDA graph and replay
    it each step (pqae/graphs.py): one launch instead of ~1,000. The views and grouping stay
    eager. On a CPU the same split step runs without a graph. Off by default until a GPU has
    measured it; needs --accum-steps 1."""
    benchmark_steps: int = 0
    """if > 0: time this many steps (after 5 warm-up steps), print ms/step, and exit."""
    benchmark_compare: bool = True
    """with --benchmark-steps: also time the plain-PyTorch float32 path (reference kernels, no
    amp, no compile) in the same run, and print the ratio."""
    benchmark_phases: bool = True
    """with --benchmark-steps: also print a breakdown of the step by phase (torch.profiler)."""
    cost_model: bool = False
    """print the step's estimated time on an H100 per phase, for the fp32 plain path and for
    --amp --compile, and exit: an estimate from the step's ops on the meta device
    (pqae/costmodel.py), no GPU and no data needed."""
    json: bool = False
    """with --cost-model: print one JSON object instead of the table."""
    # model architecture; the defaults are the reference's
    decoder_depth: int = 4
    """number of transformer blocks of the decoder."""
    num_group: int = 64
    """patches per view (FPS centres)."""
    group_size: int = 32
    """points per patch (kNN neighbours of its centre)."""
    drop_path_rate: float = 0.1
    """stochastic depth rate of the last block, increasing linearly from 0 at the first block
    (encoder and decoder each)."""
    min_crop_rate: float = 0.6
    """crop ratio (fraction of the cloud's points a view keeps), drawn per view and batch from
    U[min_crop_rate, 1); 1: no crop."""


@dataclass(frozen=True)
class Config(RunOptions, EncoderShape, Task):
    """pretrain.py's command line: Task's fields, the encoder's shape, then the run options of
    every script (--help lists them in that order)."""
    out_dir: str = "runs/pretrain"


PRESETS = {
    "reference": Config(),
    "tiny": Config(
        data="procedural", num_points=512, **TINY_ENCODER, decoder_depth=1, num_group=32,
        group_size=16, batch_size=32, lr=1e-3, epochs=3, warmup_epochs=0, log_every=8,
        vis_every=64, out_dir="runs/pretrain-tiny"),
}

DATA_PATHS = {"shapenet55": "data/shapenet55.h5", "airplanes": "data/airplanes_2048.npz"}
"""The file each --data kind reads when --data-path is not given."""


def resolve(cfg: Config, explicit: set[str]) -> Config:
    """Command-line rules that need to know which flags were typed: --data-path alone picks
    the data kind from its suffix; --data-path with --data procedural is an error."""
    if "data_path" in explicit and cfg.data_path:
        suffix = Path(cfg.data_path).suffix
        kind = {".h5": "shapenet55", ".hdf5": "shapenet55", ".npz": "airplanes"}.get(suffix)
        if "," in cfg.data_path or Path(cfg.data_path).is_dir():
            kind = "shapenet55"
        if "data" not in explicit and kind is not None:
            cfg = dataclasses.replace(cfg, data=kind)
        elif cfg.data == "procedural":
            raise BadInput(f"--data-path {cfg.data_path} is not read with --data procedural (the "
                           f"built-in shapes); give --data shapenet55 (.h5) or airplanes (.npz)")
    return cfg


def load_clouds(cfg: Config, run: Run) -> torch.Tensor | stream.HostStream:
    """The training clouds: (S, N, 3) float32 resident on the device, or a HostStream that
    reads each step's clouds from the files (--data-on)."""
    path = cfg.data_path or DATA_PATHS.get(cfg.data, "")
    if cfg.data == "shapenet55":
        blocks = data.pretrain_blocks(path, cfg.split)
        shape = (sum(b.count for b in blocks), blocks[0].points, 3)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # on this host
        fits, why = stream.fits_on_device(shape, run.device, processes)
        where = cfg.data_on if cfg.data_on != "auto" else ("device" if fits else "host")
        run.print(f"data on {where} ({'--data-on ' + cfg.data_on if cfg.data_on != 'auto' else 'auto'}"
                  f": {why})")
        if where == "host":
            host = stream.HostStream(blocks, cfg.batch_size, run.env.rank, run.env.world_size,
                                     cfg.seed, run.device, cfg.data_workers)
            host.files.check(run.print)
            return host
        return data.load_shapenet55(path, cfg.split).to(run.device)
    if cfg.data == "airplanes":
        return data.load_airplanes(path, cfg.split).to(run.device)
    return data.procedural_shapes(cfg.procedural_shapes, cfg.procedural_points,
                                  seed=cfg.seed).to(run.device)


def build_model(cfg: Config) -> PointPQAE:
    model = PointPQAE(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                      decoder_depth=cfg.decoder_depth, num_group=cfg.num_group,
                      group_size=cfg.group_size, drop_path_rate=cfg.drop_path_rate,
                      min_crop_rate=cfg.min_crop_rate, embed_hidden=cfg.embed_hidden)
    return fuse_embed(model, cfg.fused_embed)


def build_training(cfg: Config, env: dist.Dist):
    """(model, the module to call for training (DDP wrapper or the model), optimizer)."""
    torch.manual_seed(cfg.seed)  # model init: identical on every rank
    model = build_model(cfg).to(env.device)
    model.check_inputs = env.device.type == "cpu"  # the data were checked for NaN when loaded
    if env.enabled and cfg.sync_bn:
        model = syncbn.convert(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  fused=cfg.fused_adamw)
    if cfg.compile:
        model.compile_fixed_shapes()
    # --cuda-graph averages the gradients inside its graph (DDP's hooks cannot be captured)
    return model, model if cfg.cuda_graph else dist.ddp(model, env), optimizer


def make_train_step(cfg: Config, model: PointPQAE, train_model, optimizer, clouds: torch.Tensor,
                    env: dist.Dist):
    """The optimizer step of `step`: its batch and every random draw come from (seed, step,
    rank) only, so any step can be replayed, e.g. after a resume."""
    rank, device = env.rank, env.device
    local_bs = cfg.batch_size // env.world_size
    steps_per_epoch = clouds.shape[0] // cfg.batch_size
    host = isinstance(clouds, stream.HostStream)
    rows = torch.arange(local_bs, device=device)
    captured = captured_update(cfg, model, optimizer, device) if cfg.cuda_graph else None
    prepare = torch.compile(prepare_batch) if cfg.compile else prepare_batch

    def train_step(step: int, perm: torch.Tensor, return_outputs: bool = False) -> dict:
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        i = step % steps_per_epoch
        idx = perm[i * cfg.batch_size + rank * local_bs:][:local_bs]  # on the device
        with phase("data"):  # (b, n, 3) unit sphere, rotated; the draws eager, in this order
            source, rows_of = (clouds.batch(step), rows) if host else (clouds, idx)
            pick = data.draw_subsets(local_bs, source.shape[1], cfg.num_points, device)
            angles = torch.rand(local_bs, device=device) * 2 * math.pi
            points = prepare(source, rows_of, pick, angles)
        crop_ratios = model.draw_crop_ratios(random.Random(shared_seed(cfg.seed, step)))  # all ranks
        if captured is not None:  # views and grouping eager, the rest replayed
            with amp.autocast(device, cfg.amp, cache=False):
                patches, views = model.patches(points, crop_ratios)
            return {**captured(*patches), **views}
        k, losses = cfg.accum_steps, []
        for part, sync in micro_batches(train_model, k, local_bs):
            with sync:
                # no weight cache, as --cuda-graph's capture needs: each use of a weight has its
                # own bf16 cast, so the two views' gradients meet in float32, in both paths
                with amp.autocast(device, cfg.amp, cache=False):
                    out = train_model(points[part], crop_ratios, return_outputs)
                with phase("backward"):
                    (out["loss"] / k if k > 1 else out["loss"]).backward()
            if k > 1:
                losses.append(torch.stack([out[n] for n in LOSSES]).detach())
        if k > 1:  # the batch's losses: the mean over its micro-batches (outputs: the last's)
            out.update(zip(LOSSES, torch.stack(losses).mean(0)))
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return out

    train_step.captured = captured  # --cuda-graph's CapturedStep (None without the flag)
    return train_step


def prepare_batch(clouds: torch.Tensor, idx: torch.Tensor, pick: torch.Tensor,
                  angles: torch.Tensor) -> torch.Tensor:
    """A step's batch given its draws: the clouds idx, their points pick, unit-sphere
    normalised and rotated about y by angles (fixed shapes: --compile fuses it)."""
    return data.rotate_y(data.gather_unit_sphere(clouds, idx, pick), angles)


def captured_update(cfg: Config, model: PointPQAE, optimizer, device: torch.device
                    ) -> graphs.CapturedStep:
    """--cuda-graph: the fixed-shape rest of a step after the grouping (forward from the
    patches, backward, gradient average over the processes, optimizer step) as one
    CapturedStep, replayed from a CUDA graph on a GPU and run as is on a CPU."""
    params = [p for p in model.parameters() if p.requires_grad]

    def update(*patches: torch.Tensor) -> dict:
        with amp.autocast(device, cfg.amp, cache=False):
            out = model.forward_patches(*patches)
        with phase("backward"):
            out["loss"].backward()
            graphs.average_gradients(params)
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return out

    return graphs.captured_step(update, optimizer, device, cfg.accum_steps)


def main(cfg: Config) -> dict:
    if cfg.cost_model:
        return costmodel.main(cost_model_of(cfg), cfg.json)
    if cfg.plan:
        planned = plan(cfg)
        if not cfg.benchmark_steps:
            return planned
    run = start(cfg, cfg.batch_size, claim=not cfg.benchmark_steps)
    clouds = load_clouds(cfg, run)  # (S, N, 3) on the device, or read from the files per step
    if cfg.num_points > clouds.shape[1]:
        raise BadInput(f"num_points {cfg.num_points} > {clouds.shape[1]} points per cloud")
    steps_per_epoch, total_steps = run.schedule(clouds.shape[0], cfg.epochs + 1)
    run.print(f"data {cfg.data}: {tuple(clouds.shape)} | {steps_per_epoch} steps/epoch x "
              f"{cfg.epochs + 1} epochs | global batch {cfg.batch_size} ({run.local_batch} per "
              f"process)")
    if cfg.benchmark_steps:
        return benchmark(cfg, clouds, run.env)

    model, train_model, optimizer = build_training(cfg, run.env)
    run.print(f"PointPQAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    state = run.resume(model, optimizer, step=0, history=[], metrics={}, pending=None)
    step, history, metrics = state["step"], state["history"], state["metrics"]
    train_step = make_train_step(cfg, model, train_model, optimizer, clouds, run.env)
    probe_data, probe_scores = load_probe_data(cfg, run), {}
    run.open_outputs()

    progress = Progress(run, total_steps, step, cfg.epochs, pending=state["pending"])
    loss_sum = progress.restore("loss_sum", torch.zeros(3, device=run.device))  # total, view 1,
    # view 2 since the last line
    epoch, warned_epoch, t_epoch = step // steps_per_epoch, -1, time.perf_counter()
    perm = epoch_perm(cfg.seed, epoch, clouds.shape[0], run.device)
    train_model.train()
    while step < total_steps:
        lr = set_epoch_lr(optimizer, epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        vis = run.writer is not None and cfg.vis_every and step % cfg.vis_every == 0
        log_now = progress.due(step + 1, (step + 1) % steps_per_epoch == 0)
        out = train_step(step, perm, return_outputs=vis or (log_now and run.is_main))
        loss_sum += torch.stack([out[n] for n in LOSSES]).detach()
        step += 1
        progress.tick()
        if vis:
            log_clouds(run.writer, out, step)
        epoch_end = step % steps_per_epoch == 0
        if log_now:
            # One host sync per log line: losses, NaN check and timing. Averaged over ranks:
            # the line shows the global batch, and every rank takes the same stop decision.
            total = progress.steps * run.env.world_size  # summed over steps and ranks
            losses = (dist.all_reduce_sum(loss_sum) / total).tolist()
            loss_sum.zero_()
            run.check_loss(losses, step, epoch)
            metrics = {"loss": losses[0], "loss_view1": losses[1], "loss_view2": losses[2]}
            const = collapse.stats(out) if run.is_main else {}  # rank 0's batch of this step
            metrics.update({k: const[k] for k in ("constant_loss", "spread_ratio") if const})
            progress.line(step, epoch, f"loss {losses[0]:.4f} (view1 {losses[1]:.4f} view2 "
                          f"{losses[2]:.4f}){collapse_text(const)} | lr {lr:.3g}")
            run.log(step, {**{f"train/{k}": v for k, v in metrics.items()}, "train/lr": lr})
            history.append({"step": step, "epoch": epoch, **metrics})
            if const and epoch >= max(1, cfg.warmup_epochs) and collapse.collapsed(const) \
                    and warned_epoch != epoch:
                warned_epoch = epoch
                run.print(collapse.warning(const))
        if epoch_end and probe_data is not None and epoch % cfg.probe_every == 0:
            probe_scores = evaluate(cfg, model, probe_data, run.device)
            report_probe(run, probe_scores, step, epoch, time.perf_counter() - t_epoch)
            history.append({"step": step, "epoch": epoch, **probe_scores})
            progress.restart_interval()
        stop = run.stopping(step)  # a preemption signal: save, then exit (every rank agrees)
        if epoch_end or step == total_steps or stop or (cfg.save_every and step % cfg.save_every == 0):
            run.save("ckpt-last", model, epoch, step, {**metrics, **probe_scores}, optimizer,
                     history=history, pending=progress.pending(loss_sum=loss_sum))
            if epoch_end and epoch % cfg.keep_every == 0 and epoch >= cfg.keep_from:
                run.save(f"ckpt-epoch-{epoch}", model, epoch, step, {**metrics, **probe_scores})
        if epoch_end:
            epoch, t_epoch = epoch + 1, time.perf_counter()
            perm = epoch_perm(cfg.seed, epoch, clouds.shape[0], run.device)
        if stop:
            run.exit_preempted(step)

    # The weights at the end of the schedule under one name, whatever its length: the
    # checkpoint the downstream scripts are given (ckpt-last is the same, plus the optimizer).
    metrics = {**metrics, **probe_scores}
    if isinstance(clouds, stream.HostStream):
        clouds.close()
    run.save("ckpt-final", model, epoch, step, metrics)
    final = run.out_dir / "ckpt-final"
    tiny = "--preset tiny " if cfg.data == "procedural" else (
        "--preset scan-hardest --data-path data/scanobjectnn_hardest.h5 ")
    result = run.finish(
        f"{summary(metrics)} after step {step}/{total_steps}",
        {"step": step, "total_steps": total_steps, "metrics": metrics, "history": history,
         "checkpoint": str(final)},
        final, [f"python finetune_cls.py {tiny}--pretrained {final}"])
    return {**result, "model": model}


def cost_model_of(cfg: Config) -> costmodel.StepModel:
    """The real step closure on the meta device, for pqae.costmodel to record, at
    the mean crop ratio and ShapeNet-55's 8192 points per cloud (procedural_points with
    --data procedural)."""
    meta, env = torch.device("meta"), costmodel.meta_env()
    ratio = (1.0 + cfg.min_crop_rate) / 2 if cfg.min_crop_rate < 1 else 1.0
    points = cfg.procedural_points if cfg.data == "procedural" else 8192

    def make_step(amp_on: bool):
        # (the graph path: costed from the same ops; --fused-embed: in the amp+compile path)
        c = dataclasses.replace(cfg, amp=False, compile=False, fused_adamw=False,
                                cuda_graph=False, fused_embed=cfg.fused_embed and amp_on)
        model = build_model(c).to(meta)
        model.check_inputs = False
        model.draw_crop_ratios = lambda rng=None: (ratio, ratio)
        optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.lr, foreach=True)
        clouds = torch.empty(c.batch_size, points, 3, device=meta)
        perm = torch.empty(c.batch_size, dtype=torch.long, device=meta)
        step = make_train_step(c, model, model, optimizer, clouds, env)
        return lambda: step(0, perm)

    # --compile: the batch's preparation (data), the views' crops and rotations (views) and,
    # compile_fixed_shapes, the encoder (patch_embed, encoder), query, decoder and head
    # (decoder); the data's and views' random draws stay eager
    return costmodel.StepModel(
        PHASES, ("data", "views", "patch_embed", "encoder", "decoder"), make_step,
        captured=CAPTURED, eager_draws=("data", "views"),
        config={"batch_size": cfg.batch_size, "num_points": cfg.num_points,
                "cloud_points": points, "crop_ratio": ratio, "dim": cfg.dim,
                "depth": cfg.depth, "num_group": cfg.num_group, "group_size": cfg.group_size})


def plan(cfg: Config) -> dict:
    """--plan: the run's size and its device memory per process for each --accum-steps (the
    data are not read: their size is the data kind's)."""
    shapes, points = {"shapenet55": (data.SHAPENET55_SHAPES, data.SHAPENET55_POINTS),
                      "airplanes": (717, data.AIRPLANES_POINTS)}.get(
        cfg.data, (cfg.procedural_shapes, cfg.procedural_points))
    on_device = cfg.data_on != "host"
    if cfg.data == "shapenet55":  # the files' own size when they are there
        try:
            blocks = data.pretrain_blocks(cfg.data_path or DATA_PATHS["shapenet55"], cfg.split)
            shapes, points = sum(b.count for b in blocks), blocks[0].points
        except FileNotFoundError:
            pass
        if cfg.data_on == "auto":
            device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available()
                                  else "cpu")
            on_device = stream.fits_on_device((shapes, points, 3), device)[0]
    return costmodel.run_plan(
        lambda b: cost_model_of(dataclasses.replace(cfg, batch_size=b)).make_step, cfg, shapes,
        points * 3 * 4 if on_device else 0,
        sum(t.numel() for t in build_model(cfg).parameters()), cfg.epochs + 1)


def collapse_text(const: dict) -> str:
    """The progress line's view of `collapse.stats` (rank 0): is the decoder at the constant
    solution?"""
    if not const:
        return ""
    return (f" | const {const['constant_loss']:.4f} (model {const['loss_sample']:.4f}) | "
            f"spread {const['spread_ratio']:.2g}")


def summary(metrics: dict) -> str:
    """The final losses (and probe scores) for the `done |` line."""
    if "loss" not in metrics:
        return "no steps run"
    text = (f"loss {metrics['loss']:.4f} (view1 {metrics['loss_view1']:.4f} view2 "
            f"{metrics['loss_view2']:.4f})")
    if "probe_linear_acc" in metrics:
        text += (f" | probe: linear {metrics['probe_linear_acc']:.2f} %, k-NN "
                 f"{metrics['probe_knn_acc']:.2f} %")
    return text


def load_probe_data(cfg: Config, run: Run):
    """With --probe-every, rank 0's probe data set (`pqae.probe.load_data`); else None."""
    if not (cfg.probe_every and run.is_main):
        return None
    if not cfg.probe_data:
        raise BadInput("--probe-every needs --probe-data (a classification .h5, or procedural)")
    probe_data = probe.load_data("procedural" if cfg.probe_data == "procedural" else "auto",
                                 cfg.probe_data, seed=cfg.seed)
    run.print(f"probe every {cfg.probe_every} epoch(s) on {probe_data.name}: train "
              f"{len(probe_data.train_labels)}, test {len(probe_data.test_labels)}")
    return probe_data


def evaluate(cfg: Config, model: PointPQAE, probe_data, device: torch.device) -> dict:
    """Pretraining's evaluation: linear and k-NN probe (in %) of a frozen copy of the encoder as
    it is now, in eval mode, with this run's grouping and point count (`pqae.probe`)."""
    embedder = PointEmbedder(cfg.dim, cfg.depth, cfg.heads, cfg.embed_hidden, cfg.num_group,
                             cfg.group_size, cfg.num_points).to(device)
    embedder.encoder.load_state_dict(ckpt.unwrap(model).encoder.state_dict())
    result = probe.probe(embedder.eval(), probe_data, seed=cfg.seed)
    knn = max(k for k in result if k.startswith("knn"))  # the largest k
    return {"probe_linear_acc": result["linear_acc"], "probe_knn_acc": result[knn],
            "probe_knn1_acc": result.get("knn1_acc"), "probe_s": result["embed_s"] + result["probe_s"]}


def report_probe(run: Run, scores: dict, step: int, epoch: int, epoch_s: float) -> None:
    """The probe's line (with its cost against the epoch's training time) and TensorBoard."""
    run.print(f"probe epoch {epoch} | linear {scores['probe_linear_acc']:.2f} % | k-NN "
              f"{scores['probe_knn_acc']:.2f} % | {scores['probe_s']:.1f} s "
              f"({100 * scores['probe_s'] / max(epoch_s, 1e-9):.0f} % of the epoch's "
              f"{epoch_s:.1f} s)")
    run.log(step, {"probe/linear_acc": scores["probe_linear_acc"],
                   "probe/knn_acc": scores["probe_knn_acc"], "probe/seconds": scores["probe_s"]})


def log_clouds(writer, out: dict, step: int) -> None:
    """Sample 0 of view 1: the view, its target patches and their cross reconstruction."""
    def cloud(x, rgb):
        x = x.detach().float().reshape(1, -1, 3).cpu()
        return x, torch.tensor(rgb, dtype=torch.uint8).expand(1, x.shape[1], 3)

    centre = out["center1"][0, :, None]  # (G, 1, 3)
    for tag, pts, rgb in (("view1", out["view1"][0], (90, 90, 90)),
                          ("view1_target", out["neighborhood1"][0] + centre, (40, 120, 220)),
                          ("view1_reconstruction", out["pred1"][0] + centre, (230, 90, 40))):
        vertices, colors = cloud(pts, rgb)
        writer.add_mesh(f"clouds/{tag}", vertices=vertices, colors=colors, global_step=step)
    # the same three clouds as a picture (pqae.show's three views), when matplotlib is there
    image = show.rendering(f"step {step}: sample 0", show.reconstruction_rows(out, 0))
    if image is not None:
        writer.add_image("clouds/view1_reconstruction", image, step, dataformats="HWC")


def benchmark(cfg: Config, clouds: torch.Tensor, env: dist.Dist) -> dict:
    """Time cfg.benchmark_steps optimizer steps of this config and, in the same run, of the
    plain-PyTorch float32 path (reference kernels, no amp, no compile, for-each AdamW); then a
    breakdown of a few steps by phase. Writes nothing."""
    perm = epoch_perm(cfg.seed, 0, clouds.shape[0], env.device)
    steps_per_epoch = clouds.shape[0] // cfg.batch_size

    def make_step(v: bench.Variant):
        step = make_train_step(v.cfg, *build_training(v.cfg, env), clouds, env)
        return lambda i: step(i % steps_per_epoch, perm)

    results = bench.run(bench.variants(cfg, cfg.benchmark_compare), make_step,
                        cfg.benchmark_steps, cfg.batch_size, env.device,
                        phases=cfg.benchmark_phases, rank=env.rank)
    if env.is_main:
        epochs = cfg.epochs + 1
        print(bench.report(
            results, title=f"benchmark: global batch {cfg.batch_size} on {env.world_size} "
                           f"process(es), {cfg.benchmark_steps} timed steps, device {env.device}",
            phase_order=PHASES, nested={"encoder": "patch_embed"},
            projections=[(f"{epochs} epochs of this data", epochs * steps_per_epoch),
                         (f"{epochs} epochs of ShapeNet-55 ({data.SHAPENET55_SHAPES} shapes)",
                          epochs * (data.SHAPENET55_SHAPES // cfg.batch_size))]))
    dist.cleanup()
    return results


LOSSES = ("loss", "loss_view1", "loss_view2")

PHASES = ["data", "views", "grouping", "patch_embed", "encoder", "decoder", "loss", "backward",
          "optimizer"]
CAPTURED = ("patch_embed", "encoder", "decoder", "loss", "backward", "optimizer")
"""The phases --cuda-graph replays from its graph (captured_update): all after the grouping."""


if __name__ == "__main__":
    cli.run(main, Config, PRESETS, doc=__doc__.split("\n\n")[0], resolve=resolve)
