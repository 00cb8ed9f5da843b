"""Point-PQAE pretraining: cross reconstruction between two decoupled views of every cloud.

    python pretrain.py --preset tiny                       # built-in data, ~22 s on 2 CPU cores
    python pretrain.py --data-path data/shapenet55.h5      # the reference recipe, one GPU
    torchrun --nproc_per_node=8 pretrain.py --lr 1e-3      # the reference recipe, 8 GPUs
    python pretrain.py --benchmark-steps 50                # ms/step and shapes/s, then exit

The whole data set is held in one tensor on the device and each step's batch is sampled
there (random 1024 of 8192 points, unit sphere, random rotation about y), so there is no
DataLoader. All randomness of a step is a pure function of (seed, step, rank): a resumed run
sees exactly the data, crops and DropPath draws of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pqae import checkpoint as ckpt
from pqae import amp, bench, cli, collapse, data, dist, syncbn
from pqae.errors import BadInput
from pqae.log import (Timer, finish, format_eta, log_scalars, print0, run_header,
                      run_outputs, tensorboard, write_json)
from pqae.embed import PointEmbedder
from pqae.model import TINY_ENCODER, PointPQAE
from pqae.optim import param_groups, set_epoch_lr
from pqae.profiling import phase
from pqae.seeding import epoch_perm, shared_seed, step_seed


@dataclass(frozen=True)
class Config:
    # data
    data: Literal["shapenet55", "airplanes", "procedural"] = "shapenet55"
    """shapenet55: the HDF5 from `python -m data_prep.shapenet55`; airplanes: the ModelNet40
    airplane slice (.npz) shipped for tests; procedural: built-in generated shapes, no files."""
    data_path: str = ""
    """the .h5 (shapenet55) or .npz (airplanes) file; empty: data/shapenet55.h5 or
    data/airplanes_2048.npz. Given without --data, the kind follows from the suffix (.h5:
    shapenet55, .npz: airplanes); with --data procedural it is an error."""
    split: Literal["all", "train", "test"] = "all"
    """all = test + train, as the reference (its --whole flag defaults to on)."""
    num_points: int = 1024
    """points sampled per cloud each step (random subset without replacement)."""
    procedural_shapes: int = 1024
    """number of generated shapes when data = procedural."""
    procedural_points: int = 2048
    """points per generated shape (ShapeNet-55 clouds have 8192: use that to benchmark)."""
    # model; the defaults are the reference's
    dim: int = 384
    """transformer width (channels per token), encoder and decoder."""
    depth: int = 12
    """number of transformer blocks of the encoder."""
    heads: int = 6
    """attention heads per transformer block."""
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
    embed_hidden: int = 128
    """width of the patch embedding's first layer (128 -> 256 -> 512 in the reference)."""
    # optimisation
    batch_size: int = 128
    """GLOBAL batch in shapes, split evenly over the processes."""
    lr: float = 5e-4
    """base learning rate of AdamW (peak of the per-epoch cosine schedule, after warm-up)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, 1-D parameters and tokens)."""
    epochs: int = 300
    """cosine length in epochs; the loop runs epochs 0..epochs inclusive (301), as the reference."""
    warmup_epochs: int = 10
    """epochs of linear learning-rate warm-up from 1e-6 to lr (0: none)."""
    max_loss: float = 1000.0
    """stop when the logged training loss exceeds this (a run that explodes without NaN), as
    for a NaN loss: the last confirmed checkpoint is kept and named."""
    max_steps: int = 0
    """stop after this many optimizer steps (0: the whole schedule). For debugging."""
    seed: int = 0
    """seed of every random draw (model init, data order, views, augmentation)."""
    # speed
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    amp: bool = False
    """bf16 autocast. Deviation when on: the reference trains in float32."""
    compile: bool = False
    """torch.compile the fixed-shape parts of the model: encoder, positional query, decoder,
    head (`PointPQAE.compile_fixed_shapes`). Views and grouping stay eager."""
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
    benchmark_steps: int = 0
    """if > 0: time this many steps (after 5 warm-up steps), print ms/step, and exit."""
    benchmark_compare: bool = True
    """with --benchmark-steps: also time the plain-PyTorch float32 path (reference kernels, no
    amp, no compile) in the same run, and print the ratio."""
    benchmark_phases: bool = True
    """with --benchmark-steps: also print a breakdown of the step by phase (torch.profiler)."""
    # output
    out_dir: str = "runs/pretrain"
    """directory of the run's config.json, checkpoints and TensorBoard logs."""
    resume: bool = False
    """continue from out_dir/ckpt-last (same lr, data order and random draws)."""
    overwrite: bool = False
    """delete out_dir first when it already holds a run (without this or --resume, such a run
    is refused and left untouched)."""
    save_every: int = 0
    """also write ckpt-last every this many steps (0: at the end of each epoch only)."""
    keep_every: int = 25
    """epoch interval (in epochs) of the kept ckpt-epoch-E checkpoints; see --keep-from."""
    keep_from: int = 250
    """also keep ckpt-epoch-E when E % keep_every == 0 and E >= keep_from (250, 275, 300)."""
    log_every: int = 50
    """print a progress line (and log TensorBoard scalars) every this many optimizer steps."""
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
        if "data" not in explicit and kind is not None:
            cfg = dataclasses.replace(cfg, data=kind)
        elif cfg.data == "procedural":
            raise BadInput(f"--data-path {cfg.data_path} is not read with --data procedural (the "
                           f"built-in shapes); give --data shapenet55 (.h5) or airplanes (.npz)")
    return cfg


def load_clouds(cfg: Config) -> torch.Tensor:
    path = cfg.data_path or DATA_PATHS.get(cfg.data, "")
    if cfg.data == "shapenet55":
        return data.load_shapenet55(path, cfg.split)
    if cfg.data == "airplanes":
        return data.load_airplanes(path, cfg.split)
    return data.procedural_shapes(cfg.procedural_shapes, cfg.procedural_points, seed=cfg.seed)


def build_model(cfg: Config) -> PointPQAE:
    return PointPQAE(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                     decoder_depth=cfg.decoder_depth, num_group=cfg.num_group,
                     group_size=cfg.group_size, drop_path_rate=cfg.drop_path_rate,
                     min_crop_rate=cfg.min_crop_rate, embed_hidden=cfg.embed_hidden)


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
    train_model = model
    if env.enabled:
        train_model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model, train_model, optimizer


def make_train_step(cfg: Config, model: PointPQAE, train_model, optimizer, clouds: torch.Tensor,
                    env: dist.Dist):
    """The optimizer step of `step`: its batch and every random draw come from (seed, step,
    rank) only, so any step can be replayed, e.g. after a resume."""
    rank, device = env.rank, env.device
    local_bs = cfg.batch_size // env.world_size
    steps_per_epoch = clouds.shape[0] // cfg.batch_size

    def train_step(step: int, perm: torch.Tensor, return_outputs: bool = False) -> dict:
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        i = step % steps_per_epoch
        idx = perm[i * cfg.batch_size + rank * local_bs:][:local_bs]  # on the device
        with phase("data"):
            points = data.sample_points(clouds, idx, cfg.num_points)  # (b, n, 3) unit sphere
            points = data.rotate_y(points, torch.rand(local_bs, device=device) * 2 * math.pi)
        crop_ratios = model.draw_crop_ratios(random.Random(shared_seed(cfg.seed, step)))  # all ranks
        with amp.autocast(device, cfg.amp):
            out = train_model(points, crop_ratios, return_outputs)
        with phase("backward"):
            out["loss"].backward()
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return out

    return train_step


def main(cfg: Config) -> dict:
    env = dist.setup(cfg.device, cfg.collective_timeout)
    rank, world, device = env.rank, env.world_size, env.device
    if cfg.batch_size % world:
        raise BadInput(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    local_bs = cfg.batch_size // world
    out_dir = Path(cfg.out_dir)
    header = run_header(device, world)
    print0(header, rank=rank)
    if not cfg.benchmark_steps:  # before anything is read or written
        ckpt.claim_out_dir(out_dir, cfg.resume, cfg.overwrite, rank)
        dist.barrier()

    clouds = load_clouds(cfg).to(device)  # (S, N, 3), resident on the device
    if cfg.num_points > clouds.shape[1]:
        raise BadInput(f"num_points {cfg.num_points} > {clouds.shape[1]} points per cloud")
    steps_per_epoch = clouds.shape[0] // cfg.batch_size  # drop_last, as the reference
    if steps_per_epoch == 0:
        raise BadInput(f"{clouds.shape[0]} shapes are fewer than one batch of {cfg.batch_size}")
    total_steps = (cfg.epochs + 1) * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    print0(f"data {cfg.data}: {tuple(clouds.shape)} | {steps_per_epoch} steps/epoch x "
           f"{cfg.epochs + 1} epochs | global batch {cfg.batch_size} ({local_bs} per process)",
           rank=rank)

    if cfg.benchmark_steps:
        return benchmark(cfg, clouds, env)

    model, train_model, optimizer = build_training(cfg, env)
    print0(f"PointPQAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters",
           rank=rank)
    step, metrics, history = 0, {}, []
    if cfg.resume:
        last, state, meta = ckpt.resume_from(out_dir, model, optimizer, rank)
        step, metrics = state["step"], meta.get("metrics", {})
        history = state.get("history", [])
        changed = {k: (v, getattr(cfg, k)) for k, v in state["config"].items()
                   if k in {f.name for f in dataclasses.fields(cfg)} and v != getattr(cfg, k)}
        print0(f"resumed from {last} at step {step}"
               + (f"; config changed since: {changed}" if changed else ""), rank=rank)
    train_step = make_train_step(cfg, model, train_model, optimizer, clouds, env)
    probe_data, probe_scores = None, {}
    if cfg.probe_every and rank == 0:
        from pqae import probe
        if not cfg.probe_data:
            raise BadInput("--probe-every needs --probe-data (a classification .h5, or procedural)")
        probe_data = probe.load_data("procedural" if cfg.probe_data == "procedural" else "auto",
                                     cfg.probe_data, seed=cfg.seed)
        print0(f"probe every {cfg.probe_every} epoch(s) on {probe_data.name}: train "
               f"{len(probe_data.train_labels)}, test {len(probe_data.test_labels)}", rank=rank)

    writer = tensorboard(out_dir, cfg, header) if rank == 0 else None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def save(epoch: int, step: int) -> None:
        """ckpt-last (resumable) and, at the reference's epochs, ckpt-epoch-E (weights only)."""
        if rank != 0:
            return
        meta = {"config": dataclasses.asdict(cfg), "epoch": epoch, "step": step,
                "metrics": {**metrics, **probe_scores}, "header": header}
        resume = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                  "config": dataclasses.asdict(cfg), "history": history}
        ckpt.save_checkpoint(out_dir / "ckpt-last", model, meta, resume)
        epoch_done = step % steps_per_epoch == 0
        if epoch_done and epoch % cfg.keep_every == 0 and epoch >= cfg.keep_from:
            ckpt.save_checkpoint(out_dir / f"ckpt-epoch-{epoch}", model, meta)

    timer = Timer(device)
    loss_sum = torch.zeros(3, device=device)  # total, view 1, view 2 since the last log line
    t_start, start_step = time.perf_counter(), step
    t_epoch_start, warned_epoch = t_start, -1
    epoch = step // steps_per_epoch
    perm = epoch_perm(cfg.seed, epoch, clouds.shape[0], device)
    train_model.train()
    while step < total_steps:
        lr = set_epoch_lr(optimizer, epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        vis = writer is not None and cfg.vis_every and step % cfg.vis_every == 0
        log_now = ((step + 1) % cfg.log_every == 0 or (step + 1) % steps_per_epoch == 0
                   or step + 1 == total_steps)
        out = train_step(step, perm, return_outputs=vis or (log_now and rank == 0))
        loss_sum += torch.stack([out["loss"], out["loss_view1"], out["loss_view2"]]).detach()
        step += 1
        timer.steps += 1
        if vis:
            log_clouds(writer, out, step)
        epoch_end = step % steps_per_epoch == 0
        if log_now:
            # One host sync per log line: losses, NaN check and timing.
            # Averaged over ranks: the line shows the global batch, and every rank takes the
            # same stop decision below.
            losses = (dist.all_reduce_sum(loss_sum) / (timer.steps * world)).tolist()
            ckpt.stop_if_diverged(losses, step, epoch, out_dir, cfg.max_loss, rank)
            ms = timer.ms_per_step()
            eta = (time.perf_counter() - t_start) / (step - start_step) * (total_steps - step)
            metrics = {"loss": losses[0], "loss_view1": losses[1], "loss_view2": losses[2]}
            stuck = ""
            if rank == 0:  # this step's batch on rank 0: is the decoder at the constant solution?
                c = collapse.stats(out)
                metrics.update(constant_loss=c["constant_loss"], spread_ratio=c["spread_ratio"])
                stuck = (f" | const {c['constant_loss']:.4f} (model {c['loss_sample']:.4f}) | "
                         f"spread {c['spread_ratio']:.2g}")
            history.append({"step": step, "epoch": epoch, **metrics})
            print0(f"epoch {epoch}/{cfg.epochs} | step {step}/{total_steps} | loss {losses[0]:.4f}"
                   f" (view1 {losses[1]:.4f} view2 {losses[2]:.4f}){stuck} | lr {lr:.3g} | "
                   f"{ms:.0f} ms/step | {cfg.batch_size * 1000 / ms:.0f} shapes/s | "
                   f"ETA {format_eta(eta)}", rank=rank)
            if rank == 0 and epoch >= max(1, cfg.warmup_epochs) and collapse.collapsed(c) \
                    and warned_epoch != epoch:
                warned_epoch = epoch
                print0(f"warning: the decoder predicts one patch everywhere (its spread across "
                       f"patches is {c['spread_ratio']:.2g} of the targets') and its loss "
                       f"{c['loss_sample']:.4f} is no better than the best constant patch's "
                       f"{c['constant_loss']:.4f}: the run sits at the constant solution (see "
                       f"pqae/collapse.py)", rank=rank)
            log_scalars(writer, step, {**{f"train/{k}": v for k, v in metrics.items()},
                                       "train/lr": lr, "perf/ms_per_step": ms,
                                       "perf/shapes_per_s": cfg.batch_size * 1000 / ms})
            loss_sum.zero_()
            timer.reset()
        if epoch_end and probe_data is not None and epoch % cfg.probe_every == 0:
            t_epoch = time.perf_counter() - t_epoch_start
            probe_scores = probe_encoder(cfg, model, probe_data, device)
            history.append({"step": step, "epoch": epoch, **probe_scores})
            print0(f"probe epoch {epoch} | linear {probe_scores['probe_linear_acc']:.2f} % | "
                   f"k-NN {probe_scores['probe_knn_acc']:.2f} % | {probe_scores['probe_s']:.1f} s "
                   f"({100 * probe_scores['probe_s'] / max(t_epoch, 1e-9):.0f} % of the epoch's "
                   f"{t_epoch:.1f} s)", rank=rank)
            log_scalars(writer, step, {"probe/linear_acc": probe_scores["probe_linear_acc"],
                                       "probe/knn_acc": probe_scores["probe_knn_acc"],
                                       "probe/seconds": probe_scores["probe_s"]})
            timer.reset()  # the next progress line times training steps, not the probe
        if epoch_end:
            t_epoch_start = time.perf_counter()
        if epoch_end or step == total_steps or (cfg.save_every and step % cfg.save_every == 0):
            save(epoch, step)
        if epoch_end:
            epoch += 1
            perm = epoch_perm(cfg.seed, epoch, clouds.shape[0], device)

    ckpt.confirm(out_dir / "ckpt-last", rank)  # the run ended normally
    # The weights at the end of the schedule under one name, whatever its length: the
    # checkpoint the downstream scripts are given (ckpt-last is the same, plus the optimizer).
    final = out_dir / "ckpt-final"
    result = {"config": dataclasses.asdict(cfg), "step": step, "total_steps": total_steps,
              "metrics": {**metrics, **probe_scores}, "history": history, "checkpoint": str(final)}
    if rank == 0:
        ckpt.save_checkpoint(final, model, {"config": dataclasses.asdict(cfg), "epoch": epoch,
                                            "step": step, "metrics": result["metrics"],
                                            "header": header})
        write_json(out_dir / "results.json", result)
    if writer is not None:
        writer.close()
    loss = (f"loss {metrics['loss']:.4f} (view1 {metrics['loss_view1']:.4f} view2 "
            f"{metrics['loss_view2']:.4f})" if metrics else "no steps run")
    if probe_scores:
        loss += (f" | probe: linear {probe_scores['probe_linear_acc']:.2f} %, k-NN "
                 f"{probe_scores['probe_knn_acc']:.2f} %")
    tiny = "--preset tiny " if cfg.data == "procedural" else (
        "--preset scan-hardest --data-path data/scanobjectnn_hardest.h5 ")
    finish(f"{loss} after step {step}/{total_steps}",
           run_outputs(out_dir, final),
           [f"python finetune_cls.py {tiny}--pretrained {final}"], rank=rank)
    dist.cleanup()
    return {**result, "out_dir": str(out_dir), "model": model}


def probe_encoder(cfg: Config, model: PointPQAE, probe_data, device: torch.device) -> dict:
    """Linear and k-NN probe (in %) of a frozen copy of the encoder as it is now, in eval mode,
    with this run's grouping and point count (`pqae.probe`)."""
    from pqae import probe
    embedder = PointEmbedder(cfg.dim, cfg.depth, cfg.heads, cfg.embed_hidden, cfg.num_group,
                             cfg.group_size, cfg.num_points).to(device)
    embedder.encoder.load_state_dict(ckpt.unwrap(model).encoder.state_dict())
    result = probe.probe(embedder.eval(), probe_data, seed=cfg.seed)
    knn = max(k for k in result if k.startswith("knn"))  # the largest k
    return {"probe_linear_acc": result["linear_acc"], "probe_knn_acc": result[knn],
            "probe_knn1_acc": result.get("knn1_acc"), "probe_s": result["embed_s"] + result["probe_s"]}


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
    if env.rank == 0:
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


PHASES = ["data", "views", "grouping", "patch_embed", "encoder", "decoder", "loss", "backward",
          "optimizer"]


if __name__ == "__main__":
    cli.run(main, Config, PRESETS, doc=__doc__.split("\n\n")[0], resolve=resolve)
