"""What every training run does around its loop, for the four training scripts. Each script
keeps its own loop, in its own file, and calls these for the rest:

    run = start(cfg, cfg.batch_size)            # process group, device, header, out_dir claimed
    steps_per_epoch, total_steps = run.schedule(len(train), epochs)
    model, train_model, optimizer = build_training(cfg, run.env)
    state = run.resume(model, optimizer, step=0, history=[])   # saved, or these defaults
    run.open_outputs()                          # TensorBoard writer, config.json
    progress = Progress(run, total_steps, state["step"], last_epoch)
    while step < total_steps:
        ...                                     # the script's step, evaluation and saving
        if progress.due(step, epoch_end):
            run.check_loss(loss, step, epoch)   # NaN or exploding: stop, name the last good one
            progress.line(step, epoch, f"loss {loss:.4f}")
        stop = run.stopping(step)                # a preemption signal: every rank agrees
        if epoch_end or stop:
            run.save("ckpt-last", model, epoch, step, metrics, optimizer, history=history,
                     pending=progress.pending(sums=sums))   # a mid-interval save keeps its sums
        if stop:
            run.exit_preempted(step)             # ranks meet, one line, exit status 75
    return run.finish(summary, result, best_checkpoint, next_commands)

`RunOptions` holds the fields every training script takes (device, speed, output, resume);
a script's `Config` adds its own in front of them (see `pretrain.Config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pqae import checkpoint as ckpt
from pqae import dist, graphs, lock, preempt
from pqae.errors import BadInput
from pqae.log import Timer, finish, format_eta, log_scalars, print0, run_header, write_json
from kernels import verify


@dataclass(frozen=True)
class RunOptions:
    """The run options of every training script: randomness, stopping, logging, device and
    speed, output and resume. A script's Config lists its own fields first:
    `class Config(RunOptions, EncoderShape, Task)` puts Task's fields, then the encoder's
    shape, ahead of these in --help."""
    seed: int = 0
    """seed of every random draw (model init, data order, sampling, augmentation, DropPath)."""
    max_steps: int = 0
    """stop after this many optimizer steps (0: the whole schedule). For debugging: a run that
    stops before its first evaluation says so and still writes results.json."""
    max_loss: float = 1000.0
    """stop when the logged training loss exceeds this (a run that explodes without NaN), as
    for a NaN loss: the last confirmed checkpoint is kept and named."""
    log_every: int = 50
    """print a progress line (and log TensorBoard scalars) every this many optimizer steps."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    amp: bool = False
    """bf16 autocast in training and evaluation. Deviation when on: the reference runs float32."""
    compile: bool = False
    """torch.compile the model's fixed-shape parts (the model's `compile_fixed_shapes`); the
    grouping stays eager."""
    fused_adamw: bool = True
    """AdamW as one fused kernel (torch's fused=True): the same update rule as the reference's
    default (for-each) AdamW, up to rounding in the last bits."""
    fused_embed: bool = False
    """the patch embedding as two ops, each its layers and its max over each patch's points
    (kernels.point_mlp_max: fc1, BatchNorm, ReLU, fc2; kernels.linear_patch_max: BatchNorm,
    ReLU, fc4), the BatchNorms in affine form: on a GPU, Triton kernels that write none of
    the per-point outputs but fc2's and fc3's, nor the maxima's gradients. The same map and
    gradients up to float rounding (fc1 and its BatchNorm in float32 under --amp; the
    reference: Conv1d and BatchNorm layers, then the max). Off until a GPU has measured it."""
    accum_steps: int = 1
    """split each process's batch into this many micro-batches and step the optimizer once per
    batch: the global batch, and so the recipe's learning rate and schedule, stay; the
    activation memory is a micro-batch's. Deviation when > 1: BatchNorm normalises each
    micro-batch (the reference: the whole batch). DDP all-reduces on the last one only."""
    plan: bool = False
    """print the run's plan and exit: parameters, steps, the estimated peak device memory per
    process for each --accum-steps (from the step's ops on the meta device, no GPU needed),
    the device's free memory when there is one and the smallest --accum-steps that fits it.
    With --benchmark-steps (pretraining, classification), the benchmark follows."""
    sync_bn: bool = True
    """BatchNorm over the global batch under multi-process DDP (pqae.syncbn: all-reduced
    statistics, no host sync), as the reference's single-GPU run sees it; off: per-process
    BatchNorm."""
    collective_timeout: float = 600.0
    """seconds a process waits for the others at a collective (torchrun) before the job stops,
    naming the ranks that did not answer (a stopped, hung or dead peer); torch's default is
    30 minutes."""
    out_dir: str = "runs/run"
    """directory of everything the run writes: config.json, checkpoints, TensorBoard logs (tb/),
    results.json, and a task's own outputs (semseg.py's test_predictions/<room>.txt)."""
    resume: bool = False
    """continue from out_dir/ckpt-last: the same learning rate, data order and random draws as
    an uninterrupted run, and the same bests so far."""
    overwrite: bool = False
    """delete out_dir first when it already holds a run (without this or --resume, such a run
    is refused and left untouched)."""
    allow_config_change: bool = False
    """let --resume continue with another recipe (batch size, schedule, learning rate, data,
    model, seed...); without it such a resume is refused. How a run is carried out (steps to
    stop at, logging, saving, device, speed flags) may always change."""


HOW_TO_RUN = frozenset({
    "max_steps", "max_loss", "log_every", "device", "amp", "compile", "fused_adamw",
    "fused_embed", "accum_steps", "plan", "collective_timeout", "out_dir", "resume", "overwrite",
    "data_on", "data_workers", "cuda_graph",
    "allow_config_change",
    "save_every", "keep_every", "keep_from", "vis_every", "probe_every", "probe_data",
    "benchmark_steps", "benchmark_compare", "benchmark_phases", "cost_model", "json"})
"""Config fields that change how a run is carried out, not what it computes: --resume may
change them freely (the others need --allow-config-change)."""


@dataclass
class Run:
    """One run's process, outputs and checkpoints (what `start` returns); the loop is the
    script's."""
    cfg: RunOptions
    env: dist.Dist
    header: str
    batch_size: int
    """the global batch, split evenly over the processes."""
    writer: object = None
    """the TensorBoard SummaryWriter on rank 0 once `open_outputs` ran, else None."""
    claimed: bool = False
    """out_dir is this run's: locked (rank 0) and preemption signals caught."""

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.env.world_size

    def print(self, *args) -> None:
        print0(*args, rank=self.env.rank)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """TensorBoard scalars at `step` (rank 0)."""
        log_scalars(self.writer, step, scalars)

    def schedule(self, n: int, epochs: int, what: str = "shapes") -> tuple[int, int]:
        """(steps per epoch, total steps) over `n` samples for `epochs` loop epochs: full
        batches only (drop_last, as the reference), cut at --max-steps."""
        steps_per_epoch = n // self.batch_size
        if steps_per_epoch == 0:
            raise BadInput(f"{n} {what} are fewer than one batch of {self.batch_size}")
        total = epochs * steps_per_epoch
        return steps_per_epoch, min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def resume(self, model, optimizer, **defaults) -> dict:
        """With --resume: the newest complete out_dir/ckpt-last loaded into the model and the
        optimizer, and what it saved under `defaults`' keys (its resume state, else its
        meta.json: e.g. the last logged metrics; a key it lacks keeps its default). Without
        --resume: `defaults`."""
        if not self.cfg.resume:
            return defaults
        last, state, meta = ckpt.resume_from(self.out_dir, model, optimizer, self.env.rank)
        ours = json.loads(json.dumps(dataclasses.asdict(self.cfg), default=str))  # as saved
        changed = {k: (v, ours[k]) for k, v in meta.get("config", {}).items()
                   if k in ours and k not in ("resume", "overwrite") and v != ours[k]}
        recipe = {k: v for k, v in changed.items() if k not in HOW_TO_RUN}
        if recipe and not self.cfg.allow_config_change:
            listed = ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in recipe.items())
            raise BadInput(f"--resume would continue {last} (step {state['step']}) with another "
                           f"recipe: {listed}. Resume with the run's own values (its "
                           f"{self.out_dir / 'config.json'}), start a new run in another "
                           f"--out-dir, or pass --allow-config-change to go on anyway")
        self.print(f"resumed from {last} at step {state['step']}"
                   + (f"; config changed since: {changed}" if changed else ""))
        return {k: state.get(k, meta.get(k, v)) for k, v in defaults.items()}

    def open_outputs(self) -> None:
        """Rank 0: the TensorBoard writer (with the config and the header) and config.json."""
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            config = dataclasses.asdict(self.cfg)
            self.writer = SummaryWriter(str(self.out_dir / "tb"))
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
            self.writer.add_text("header", self.header)
            write_json(self.out_dir / "config.json", config)

    def check_loss(self, losses: float | list[float], step: int, epoch: int) -> None:
        """The divergence stop of a log line: a NaN, inf or above --max-loss loss stops the run,
        naming the last good checkpoint (`checkpoint.stop_if_diverged`); a finite one confirms
        the checkpoint saved before it. Every rank must pass the same (all-reduced) losses."""
        ckpt.stop_if_diverged(losses, step, epoch, self.out_dir, self.cfg.max_loss,
                              self.env.rank)

    def save(self, name: str, model, epoch: int, step: int, metrics: dict,
             optimizer: torch.optim.Optimizer | None = None, **state) -> None:
        """Rank 0: out_dir/name with the weights and meta.json (config, epoch, step, metrics,
        header). Given the optimizer, the checkpoint is resumable: resume.pt holds the
        optimizer's state, step, epoch and `state` (what the loop needs to go on)."""
        if not self.is_main:
            return
        meta = {"config": dataclasses.asdict(self.cfg), "epoch": epoch, "step": step,
                "metrics": metrics, "header": self.header}
        resume = None if optimizer is None else {
            "optimizer": graphs.portable_state(optimizer), "step": step, "epoch": epoch, **state}
        ckpt.save_checkpoint(self.out_dir / name, model, meta, resume)

    def finish(self, summary: str, result: dict, checkpoint: str | Path, next_steps: list[str],
               show: bool = True) -> dict:
        """The end of a training run: ckpt-last confirmed, results.json (the config and
        `result`), the `done |` block (the summary, the outputs, the next commands; unless not
        `show`), and the ranks meet. Returns results.json's content plus out_dir."""
        ckpt.confirm(self.out_dir / "ckpt-last", self.env.rank)  # the run ended normally
        result = {"config": dataclasses.asdict(self.cfg), **result, "kernels": verify.summary()}
        if self.is_main:
            write_json(self.out_dir / "results.json", result)
        if self.writer is not None:
            self.writer.close()
        self.release()
        if show:
            finish(summary, {"checkpoint": checkpoint, "resumable": self.out_dir / "ckpt-last",
                             "results": self.out_dir / "results.json",
                             "tensorboard": f"tensorboard --logdir {self.out_dir / 'tb'}",
                             "kernels": _fallback_note()},
                   next_steps, rank=self.env.rank)
        dist.cleanup()
        return {**result, "out_dir": str(self.out_dir)}

    def stopping(self, step: int) -> bool:
        """Whether the run stops after this step for a preemption signal (SIGTERM, SIGINT,
        SIGUSR1: `pqae.preempt`) that any rank received. Call once per step, on every rank:
        the ranks agree in one host-side all-reduce."""
        return self.claimed and dist.agree_any(preempt.received() is not None)

    def exit_preempted(self, step: int) -> None:
        """After the preempted step's ckpt-last was saved: every rank waits for it, rank 0
        writes out_dir/preempted.json (a job script's cue to requeue) and says how to resume,
        and the process exits with status 75 (`preempt.Preempted`)."""
        dist.barrier()  # rank 0's checkpoint is complete before any rank exits
        last, name = ckpt.find_checkpoint(self.out_dir / "ckpt-last"), preempt.received()
        command = resume_command()
        line = f"preempted at step {step} ({name or 'signal'}): {last} saved; resume with: {command}"
        if self.is_main:
            write_json(self.out_dir / "preempted.json",
                       {"step": step, "signal": name, "checkpoint": str(last),
                        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "resume": command})
            print(line, flush=True)
        if self.writer is not None:
            self.writer.close()
        self.release()
        preempt.consume()
        dist.cleanup()
        raise preempt.Preempted(line, name)

    def release(self) -> None:
        """The end of a claimed run, however it ends: out_dir's lock and the signals let go."""
        if self.claimed:
            self.claimed = False
            lock.release(self.out_dir)
            preempt.release()

    def finish_eval(self, summary: str, result: dict, checkpoint: str,
                    outputs: dict | None = None) -> dict:
        """The end of an --eval-ckpt run: out_dir/eval-NAME.json (the config, the checkpoint
        and `result`), the `done |` block, and the ranks meet. Returns the JSON's content."""
        result = {"config": dataclasses.asdict(self.cfg), "mode": "eval",
                  "checkpoint": checkpoint, **result, "kernels": verify.summary()}
        path = self.out_dir / f"eval-{Path(checkpoint).stem}.json"
        if self.is_main:
            write_json(path, result)
        finish(summary, {"results": path, **(outputs or {}), "kernels": _fallback_note()}, [],
               rank=self.env.rank)
        dist.cleanup()
        return result


def _fallback_note() -> str | None:
    """What the `done |` block says when a Triton kernel failed its check in this run."""
    fell = verify.summary()["fallback"]
    return (f"{', '.join(fell)} ran on the PyTorch reference: its Triton kernel failed its check "
            "here (see the warning; python -m pqae.doctor)") if fell else None


def start(cfg: RunOptions, batch_size: int, claim: bool = True, min_local_batch: int = 1) -> Run:
    """The start of every run: the process group and device (torchrun or a single process),
    the global batch split over the processes, the run header (versions, device) on rank 0,
    and, when `claim` (a training run), out_dir claimed on every rank before anything is read
    or written (a directory holding another run is refused unless --resume or --overwrite)."""
    env = dist.setup(cfg.device, cfg.collective_timeout)
    k = cfg.accum_steps
    if k < 1:
        raise BadInput(f"--accum-steps {k}: give 1 or more micro-batches per step")
    if batch_size % (env.world_size * k):
        raise BadInput(f"batch_size {batch_size} is not divisible by {env.world_size} "
                       f"process(es) x {k} micro-batch(es) (--accum-steps)")
    if batch_size // (env.world_size * k) < min_local_batch:
        raise BadInput(f"{batch_size // (env.world_size * k)} sample(s) per micro-batch: "
                       f"BatchNorm needs at least {min_local_batch}"
                       + (" (lower --accum-steps)" if k > 1 else ""))
    header = f"{run_header(env.device, env.world_size)}\n{verify.header(env.device)}"
    run = Run(cfg, env, header, batch_size)
    run.print(run.header)
    global _active
    if _active is not None:  # a run of this process that ended by an exception (in process)
        _active.release()
    if claim:
        ckpt.claim_out_dir(run.out_dir, cfg.resume, cfg.overwrite, env.rank)
        run.claimed, _active = True, run
        preempt.hold(verbose=env.is_main)
        if env.is_main:
            (run.out_dir / "preempted.json").unlink(missing_ok=True)  # this run goes on
        dist.barrier()
    return run


_active: Run | None = None
"""The claimed run of this process, if any."""


def micro_batches(train_model, k: int, n: int):
    """The `k` micro-batches of a process's batch of `n` samples, as (slice, context) pairs:
    run each one's forward and backward inside its context, which holds DDP's gradient
    all-reduce back until the last one (no_sync). k = 1: the whole batch, synchronised."""
    size = n // k
    for j in range(k):
        last = j == k - 1
        sync = train_model.no_sync() if not last and hasattr(train_model, "no_sync") else \
            contextlib.nullcontext()
        yield slice(j * size, (j + 1) * size), sync


def resume_command() -> str:
    """This process's command line with --resume (and without --overwrite): under torchrun,
    the torchrun command with this host's process count."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    script = " ".join(shlex.quote(a) for a in [sys.argv[0], *args, "--resume"])
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        extra = " (with the same rendezvous flags on every node)" if nodes > 1 else ""
        return f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')} {script}{extra}"
    return f"python {script}"


class Progress:
    """The progress lines of a training loop: which steps print one, ms/step since the last
    line, samples/s, and the ETA from the average step since the start (evaluations included).
    Rank 0 prints; every rank must call `line` at the same steps."""

    def __init__(self, run: Run, total_steps: int, start_step: int, last_epoch: int,
                 unit: str = "shapes", pending: dict | None = None):
        self.run, self.total, self.start_step = run, total_steps, start_step
        self.last_epoch, self.unit = last_epoch, unit
        self.timer = Timer(run.device)
        self.t0 = time.perf_counter()
        self.saved = pending or {}  # what a checkpoint saved between two lines (`pending`)
        self.carried = int(self.saved.get("steps", 0))

    @property
    def steps(self) -> int:
        """steps since the last line (those before a resume included)."""
        return self.timer.steps + self.carried

    def pending(self, **sums: torch.Tensor) -> dict:
        """What a checkpoint saved between two lines must keep for the next line to be the
        uninterrupted run's: the steps since the last line and the loop's running sums."""
        return {"steps": self.steps, **{k: v.tolist() for k, v in sums.items()}}

    def restore(self, name: str, sums: torch.Tensor) -> torch.Tensor:
        """`sums` (the loop's zeroed running sums), holding what the checkpoint resumed from
        saved under `name`."""
        if name in self.saved:
            sums.copy_(torch.tensor(self.saved[name], dtype=sums.dtype))
        return sums

    def tick(self) -> None:
        """One optimizer step done."""
        self.timer.steps += 1

    def due(self, step: int, epoch_end: bool) -> bool:
        """Whether the step that just made `step` steps prints a line: every --log-every
        steps, at the end of each epoch and at the last step."""
        return step % self.run.cfg.log_every == 0 or epoch_end or step == self.total

    def line(self, step: int, epoch: int, text: str) -> float:
        """Print `epoch E/LAST | step S/TOTAL | text | ms/step | samples/s | ETA`, log the speed to
        TensorBoard, start the next interval, and return its ms/step."""
        ms = self.timer.ms_per_step()
        eta = (time.perf_counter() - self.t0) / max(1, step - self.start_step) * (self.total - step)
        rate = self.run.batch_size * 1000 / ms
        self.run.print(f"epoch {epoch}/{self.last_epoch} | step {step}/{self.total} | {text} | "
                       f"{ms:.0f} ms/step | {rate:.0f} {self.unit}/s | ETA {format_eta(eta)}")
        self.run.log(step, {"perf/ms_per_step": ms, f"perf/{self.unit}_per_s": rate})
        self.timer.reset()
        self.carried = 0
        return ms

    def restart_interval(self) -> None:
        """After an evaluation: the next line times training steps only."""
        self.timer.reset()
