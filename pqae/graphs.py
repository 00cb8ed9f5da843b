"""`--cuda-graph`: the fixed-shape part of a training step replayed from one CUDA graph.

A pretraining step has two parts. The views and their grouping follow the step's crop ratios,
so their shapes change from step to step; they run eagerly (a few dozen launches, FPS and kNN
among them). Everything after the grouping has fixed shapes: the encoder on both views' patches,
the decoder, the Chamfer loss, the backward, the gradient average over the processes and the
optimizer step. `CapturedStep` captures that part once and replays it: one launch from the
host instead of about a thousand, and none of Python's time per op. A fine-tuning step
(finetune_cls.py) has fixed shapes throughout: all of it but the batch-wide subset's draw is
captured.

    update = CapturedStep(fn, device)   # fn(*tensors) -> dict of tensors: one fixed-shape step
    out = update(*tensors)              # copies the tensors in, replays, returns static outputs

The captured function is the same `fn` that runs eagerly: on a CPU (where there is no graph),
and in the first `warmup` calls on a GPU (which also compile and allocate what the capture
needs), `fn` runs on the same static input buffers. What a graph needs from the step:
  * the optimizer is capturable (its step count on the device) and its learning rates are
    device tensors, set in place between replays (`prepare_optimizer`, `optim.set_epoch_lr`);
    checkpoints store them as plain floats (`portable_state`);
  * autocast runs without its weight cache (`amp.autocast(..., cache=False)`);
  * random draws come from the default CUDA generator, whose seed and offset each replay reads
    (a step reseeds it before its eager part, so a replay draws what an eager step would);
  * nothing in it reads a value on the host; the outputs are the graph's static tensors, valid
    until the next call (the loop reads them before it);
  * with several processes, the gradients are averaged by all-reduces inside the graph (NCCL
    collectives are capturable) instead of DDP's hooks, and GlobalBatchNorm's collectives
    are captured likewise.
Off by default (--cuda-graph): only a GPU can say whether it is faster; `.ci/gpu` measures it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from pqae.errors import BadInput


class CapturedStep:
    """fn(*inputs) -> dict of tensors, with static input buffers; on CUDA, replayed from a
    CUDA graph after `warmup` eager calls. The inputs' shapes and dtypes must not change."""

    def __init__(self, fn: Callable[..., dict], device: torch.device, warmup: int = 3):
        self.fn, self.device, self.warmup = fn, device, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] | None = None
        self.static_out: dict | None = None
        self.calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _load(self, inputs: tuple[torch.Tensor, ...]) -> None:
        if self.static_in is None:
            self.static_in = [torch.empty_like(x, device=self.device) for x in inputs]
        got = [(tuple(x.shape), x.dtype) for x in inputs]
        want = [(tuple(x.shape), x.dtype) for x in self.static_in]
        if got != want:
            raise ValueError(f"a captured step's inputs must keep their shapes and dtypes: "
                             f"it was built for {want}, got {got}")
        for s, x in zip(self.static_in, inputs):
            s.copy_(x, non_blocking=True)

    def __call__(self, *inputs: torch.Tensor) -> dict:
        self._load(inputs)
        self.calls += 1
        if self.device.type != "cuda":  # no graph: the same function on the same buffers
            return self.fn(*self.static_in)
        if self.graph is None and self.calls <= self.warmup:
            # eager on a side stream, as a capture needs (compiles, allocates the optimizer's
            # state and the gradients' first buffers)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.fn(*self.static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self.graph is None:
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_out = self.fn(*self.static_in)
            self.graph = graph  # the capture ran nothing: this call's step is the first replay
        self.graph.replay()
        return self.static_out


def captured_step(fn: Callable[..., dict], optimizer: torch.optim.Optimizer,
                  device: torch.device, accum_steps: int) -> CapturedStep:
    """--cuda-graph of a training script: fn (one fixed-shape update, optimizer step included)
    as a CapturedStep, the optimizer made capturable. One micro-batch per step only."""
    if accum_steps != 1:
        raise BadInput(f"--cuda-graph captures one forward and backward per step: give "
                       f"--accum-steps 1 (got {accum_steps}), or leave --cuda-graph off")
    prepare_optimizer(optimizer, device)
    return CapturedStep(fn, device)


def prepare_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make a (loaded) AdamW capturable on `device`: its step counts on the device and its
    learning rates device tensors (set in place by `optim.set_epoch_lr`). On a CPU nothing
    changes (no graph)."""
    if device.type != "cuda":
        return
    for g in optimizer.param_groups:
        g["capturable"] = True
        if not isinstance(g["lr"], torch.Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)
    for st in optimizer.state.values():
        if "step" in st:
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(device)


def portable_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with what only a captured step needs undone: plain float
    learning rates and capturable off, so any run (CPU, eager) can resume from it."""
    state = optimizer.state_dict()
    groups = []
    for g in state["param_groups"]:
        g = dict(g)
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = float(g["lr"])
        if g.get("capturable"):
            g["capturable"] = False
        groups.append(g)
    return {**state, "param_groups": groups}


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients over the processes, as DDP does, in one all-reduce of a flat
    copy (capturable: no host reads). A no-op in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in
                                 zip(flat.split([g.numel() for g in grads]), grads)])
