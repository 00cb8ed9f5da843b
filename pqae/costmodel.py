"""What a training step costs on a GPU, estimated without one: `python pretrain.py --cost-model`.

An estimate, not a measurement. Every assumption is a named constant of `GPU` or of this
module, and the README's Performance section sets the estimate beside the measured benchmark
where one exists.

How it is made
--------------
1. **Record.** The real step (the script's own step closure: data, views, grouping, forward,
   backward, optimizer) runs once on the `meta` device, where tensors have shapes and no
   values, under a dispatch mode that records every aten op: its phase (the `pqae.profiling`
   labels; a backward op takes the phase of the forward op whose gradient it computes), its
   FLOPs (torch.utils.flop_counter's formulas), and the tensors it reads and writes with their
   bytes. View and metadata ops launch nothing and are dropped. `--amp` is recorded with
   autocast's casts emulated at the torch-function level (meta tensors have no autocast),
   so bf16 GEMMs, the fp32 LayerNorms and the fp32 residual stream are what they would be.
2. **Cost two paths** from the records:
   * `fp32_plain`: float32, eager, every op one launch, the grouping and Chamfer loss as the
     PyTorch reference computes them, for-each AdamW;
   * `amp_compile`: bf16 autocast; the phases of the modules --compile compiles (forward
     and backward) fused by the rule below; every `kernels.*` call
     (FPS, kNN, grouping, Chamfer) in its Triton kernels, replayed at the recorded shapes by
     `kernels.static` (its calibrated estimate from the compiled SASS); fused AdamW. With
     --fused-embed, the custom ops of kernels.linear_patch_max and kernels.point_mlp_max
     (pqae::patch_max, pqae::point_mlp and their backwards) are recorded as ops of their own
     and costed as GEMMs (their FLOPs, their own bytes).
   Attention (F.scaled_dot_product_attention, which meta decomposes) counts as one fused kernel
   per call and per backward, reading q, k, v (and o, dO) and writing o (dq, dk, dv), as the
   flash / memory-efficient kernels do, in both paths. Its bytes are those of the call's own
   q, k, v and o (each distinct view counted: q, k and v are usually views of one qkv
   tensor), not of meta's decomposition.
3. **Fusion rule** (what torch.compile is assumed to do): within a compiled phase and pass,
   the non-GEMM ops between two GEMMs form one kernel; a reduction ends it, but for the
   elementwise ops over its input's size right after it, which join it when Inductor would
   not split the reduction (its Triton scheduler fuses such an epilogue into a reduction's
   kernel: a LayerNorm and its cast to bf16 are one `triton_per_fused__to_copy_..._native_
   layer_norm` kernel); a reduction alone between GEMMs whose input one earlier such
   kernel made joins that kernel (Inductor schedules by dependencies: a bias gradient is
   summed in the kernel that makes its input, `triton_red_fused_gelu_gelu_backward_sum`); a
   BatchNorm reads its input twice (statistics, then normalisation). A fused kernel reads
   the tensors it did not produce and writes the ones read outside it (later ops, the
   backward), but for a
   forward tensor that only the backward reads and that the kernel makes from its inputs by
   elementwise ops alone: Inductor's partitioner keeps those inputs (already in memory) and
   recomputes it in the backward, so it is not written. Other recomputation by Inductor is
   not modelled.
4. **Time.** A kernel takes max(FLOPs / (peak x GEMM_EFF), bytes / (HBM x MEM_EFF),
   KERNEL_MIN_US); the GPU idles GAP_US between kernels; the host spends HOST_EAGER_US per
   eager op or HOST_COMPILED_US per compiled launch. A phase takes the GPU's time or the
   host's, whichever is longer (the host runs ahead only as far as the GPU queue lets it: a
   step whose host time exceeds the GPU's is launch-bound), and says which bounds it.
5. **--cuda-graph** (`cuda_graph` in the JSON, where the script has the flag): the
   amp_compile kernels, those of the captured phases replayed from one CUDA graph: no host
   time of their own, GRAPH_GAP_US between them, and one replay's HOST_GRAPH_US.

Not modelled: cache reuse between kernels (L2 is 50 MB: small tensors are charged HBM
bytes), DDP's all-reduce (one GPU), the data loader (the data are on the GPU), the clock
dropping below boost.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from pqae import profiling

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class GPU:
    """Peak figures of the datasheet and the fractions real kernels reach (assumptions)."""
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # CUDA-core FMA peak: fp32 matmuls with TF32 off, torch's default
    hbm_gbs: float
    gemm_eff: float = 0.6  # fraction of peak FLOPs a GEMM of these shapes reaches
    mem_eff: float = 0.75  # fraction of HBM bandwidth a streaming kernel reaches
    kernel_min_us: float = 2.5  # a kernel's shortest time, launch to end, however little it does
    gap_us: float = 1.0  # GPU idle between two queued kernels
    host_eager_us: float = 7.0  # host time per eager op: Python, dispatcher, launch
    host_compiled_us: float = 3.0  # host time per launch of a compiled graph's wrapper
    graph_gap_us: float = 0.5  # GPU idle between two kernels of a replayed CUDA graph
    host_graph_us: float = 10.0  # host time of one CUDA graph replay (cudaGraphLaunch)


H100 = GPU("H100 SXM (132 SMs, 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, 3.35 TB/s)",
           bf16_tflops=989, fp32_tflops=67, hbm_gbs=3350)

# the ops that are GEMMs (FLOPs on tensor cores), reductions (end a fused kernel) and
# BatchNorms (read their input twice)
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution",
         "patch_max", "patch_max_backward",  # (kernels.linear_patch_max: GEMMs + epilogue)
         "point_mlp", "point_mlp_backward"}  # (kernels.point_mlp_max: the same)
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var_mean", "var", "std", "argmax",
           "argmin", "topk", "sort", "cumsum", "norm", "linalg_vector_norm", "_softmax",
           "_log_softmax", "native_layer_norm", "native_layer_norm_backward",
           "_softmax_backward_data"}
_LAUNCHES = {"patch_max_backward": 5, "point_mlp_backward": 4}
"""launches of an op that runs several kernels (kernels.linear_patch_max's backward, as the
patch embedding calls it: the input and weight gradients' GEMMs, the sums of the weight
gradient's split-K parts, of the BatchNorm scale's and shift's per-tile parts, and the bias's;
kernels.point_mlp_max's: the input gradient's GEMM reduced per tile, the weight gradient's
GEMM, and the sums of each one's parts)"""
_REREAD = {"patch_max_backward": lambda args: 2 if args[4] is not None else None,
           "point_mlp_backward": lambda args: 0}
"""the argument that an op's kernels read twice (its bytes charged once more), or None:
kernels.linear_patch_max's backward with the prologue reads x in both GEMMs (the input
gradient's epilogue and the weight gradient's recomputed input), kernels.point_mlp_max's reads
y's gradient in both. (A re-read of a tile by the programs of its other column blocks, which
run next to each other, is an L2 hit: not charged.)"""
_BATCHNORM = {"native_batch_norm", "_native_batch_norm_legit",
              "_native_batch_norm_legit_functional", "_batch_norm_with_update",
              "batch_norm_backward", "native_batch_norm_backward"}
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "detach", "alias",
              "_unsafe_view",
              "_record_function_enter_new", "_record_function_exit", "set_", "resize_",
              "_to_copy_meta", "is_same_size", "_has_compatible_shallow_copy_type"}


@dataclass
class Op:
    name: str
    phase: str
    pass_: str  # "fwd", "bwd" or "opt"
    kind: str  # "gemm", "attn", "reduce", "batchnorm" or "other"
    flops: float
    reads: dict  # tensor key -> bytes
    writes: dict
    attn_call: int = -1  # which attention call (fwd) or backward of one (bwd) it belongs to
    low: bool = False  # reads bf16/fp16 tensors (a GEMM: on bf16 tensor cores)
    launches: int = 1  # a for-each op launches one kernel per chunk of tensors
    kernel_call: int = -1  # the kernels.* call (Recording.calls) it belongs to, if any
    in_numel: int = 0  # elements of its largest input
    out_numel: int = 0  # elements of its largest output


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


_AUTOCAST_LOW = {F.linear, torch.matmul, torch.bmm, torch.mm, torch.addmm, torch.baddbmm,
                 F.scaled_dot_product_attention, torch.Tensor.matmul, torch.Tensor.__matmul__}
_AUTOCAST_FP32 = {F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
                  F.group_norm, torch.cdist, torch.exp, torch.log, torch.pow, torch.rsqrt,
                  torch.sum, torch.Tensor.sum, torch.norm, torch.cumsum}


def _autocast(func, args, kwargs):
    """bf16 autocast emulated on meta tensors (autocast itself does nothing there), outside
    the data phase: (args, kwargs) cast as autocast would for `func`."""
    if profiling.current() in ("data", None):
        return args, kwargs
    cast = (torch.bfloat16 if func in _AUTOCAST_LOW else
            torch.float32 if func in _AUTOCAST_FP32 else None)
    if cast is None:
        return args, kwargs
    return torch.utils._pytree.tree_map(
        lambda t: t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point()
        and t.dtype != cast else t, (args, kwargs))


class _Autocast(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = _autocast(func, args, kwargs or {})
        return func(*args, **kwargs)


class _LiveBytes(TorchDispatchMode):
    """The bytes of meta storages alive, and their peak: each output storage counts from the
    op that made it until its last reference (a view, the autograd graph's saved tensors, the
    optimizer's state) is gone."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                st = t.untyped_storage()
                if st._cdata not in self.refs:
                    n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    self.refs[st._cdata] = weakref.ref(st, functools.partial(self._free, st._cdata, n))
        return out

    def _free(self, key: int, n: int, _ref) -> None:
        if self.refs.pop(key, None) is not None:
            self.live -= n


def memory(make_step, amp: bool) -> dict:
    """Device memory of one process's training step, from its real ops on the meta device:
    `static` (alive between steps: weights, optimizer state, the batch's inputs) and `peak`
    (the most alive at once during a steady-state step), in bytes. make_step(amp) builds the
    model, optimizer and step closure; everything it puts on the meta device counts. Not
    counted: the caching allocator's rounding and fragmentation, CUDA's context, workspaces
    (cuBLAS, compiled kernels) and the data set kept on the device."""
    live = _LiveBytes()
    profiling.tracking(True)
    try:
        with live, (_Autocast() if amp else contextlib.nullcontext()):
            step = make_step(amp)
            step()  # the optimizer's state is created here
            static = live.live
            live.peak = live.live
            step()
    finally:
        profiling.tracking(False)
    return {"static": static, "peak": live.peak}


GIB = 2 ** 30
ALLOCATOR_MARGIN = 1.2
"""The caching allocator's rounding and fragmentation, CUDA's context and workspaces, on top
of the tensors' bytes: what `plan` adds before comparing with a device's free memory."""


def run_plan(make_step_at, cfg, shapes: int | None, bytes_per_shape: int, params: int,
             epochs: int, benchmark: bool = True) -> dict:
    """--plan of a training script: `plan` at this process count (torchrun's WORLD_SIZE, else
    1) and the config's device, printed on rank 0. make_step_at(b) is the script's step
    builder on the meta device at a per-process batch of b (make_step(amp) -> step());
    `shapes` is the training set's size (None: unknown), each `bytes_per_shape` on the
    device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    p = plan(make_step_at, cfg.amp, cfg.batch_size // world, world,
             shapes * bytes_per_shape if shapes else None, device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_plan(p, params, shapes // cfg.batch_size if shapes else None, epochs,
                          benchmark), flush=True)
    return {**p, "params": params}


def plan(make_step_at, amp: bool, local_batch: int, world: int, data_bytes: int | None,
         device: torch.device) -> dict:
    """--plan's memory part. make_step_at(b) builds the script's step on the meta device at a
    per-process batch of b; the step's memory is measured at b = local_batch and local_batch / 2 and is
    linear in b in between (activations), which gives each --accum-steps K its micro-batch's
    peak. Returns the per-K estimates, the device's free memory (when it is a GPU) and the
    smallest K that fits it with ALLOCATOR_MARGIN."""
    sizes = sorted({local_batch, max(1, local_batch // 2)})
    mem = {b: memory(make_step_at(b), amp) for b in sizes}
    hi, lo = sizes[-1], sizes[0]
    per_sample = (mem[hi]["peak"] - mem[lo]["peak"]) / (hi - lo) if hi > lo else 0.0
    fixed = mem[hi]["peak"] - per_sample * hi
    rows = []
    for k in [k for k in range(1, local_batch + 1) if local_batch % k == 0][:8]:
        micro = local_batch // k
        peak = fixed + per_sample * micro + (data_bytes or 0)
        rows.append({"accum_steps": k, "micro_batch": micro, "peak_bytes": int(peak),
                     "with_margin_bytes": int(peak * ALLOCATOR_MARGIN)})
    free = None
    if device.type == "cuda" and torch.cuda.is_available():
        free = torch.cuda.mem_get_info(device)[0]
    budgets = {"this device": free} if free is not None else \
        {f"{g} GiB": g * GIB for g in (24, 40, 80)}
    fits = {name: next((r["accum_steps"] for r in rows if r["with_margin_bytes"] <= b), None)
            for name, b in budgets.items()}
    return {"world_size": world, "local_batch": local_batch, "data_bytes": data_bytes,
            "static_bytes": mem[hi]["static"], "per_sample_bytes": int(per_sample),
            "rows": rows, "free_bytes": free, "smallest_accum_steps": fits}


def format_plan(p: dict, params: int, steps_per_epoch: int | None, epochs: int,
                benchmark: bool = True) -> str:
    g = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 2 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    steps = (f"{epochs} epochs x {steps_per_epoch} steps = {epochs * steps_per_epoch} optimizer "
             f"steps" if steps_per_epoch is not None else
             f"{epochs} epochs of a data set whose size is read when it exists")
    lines = [f"plan | {params / 1e6:.2f} M parameters | {p['world_size']} process(es) x "
             f"{p['local_batch']} samples | {steps}",
             f"device memory per process, estimated from the step's ops on the meta device "
             f"(no GPU used): weights, optimizer state and inputs {g(p['static_bytes'])}, "
             f"{g(p['per_sample_bytes'])} per sample of a micro-batch, data set on the device "
             + (g(p["data_bytes"]) if p["data_bytes"] else
                "none (read from the files on the host, --data-on host)" if p["data_bytes"] == 0
                else "unknown (its file is not there; add its size)"),
             f"  --accum-steps  micro-batch  peak        x{ALLOCATOR_MARGIN:g} (allocator, CUDA "
             f"context)"]
    for r in p["rows"]:
        lines.append(f"  {r['accum_steps']:>13}  {r['micro_batch']:>11}  "
                     f"{g(r['peak_bytes']):>10}  {g(r['with_margin_bytes']):>10}")
    for name, k in p["smallest_accum_steps"].items():
        free = f" ({g(p['free_bytes'])} free)" if name == "this device" else ""
        lines.append(f"fits {name}{free}: " + (f"--accum-steps {k}" if k is not None else
                                                "no --accum-steps listed fits; lower the batch "
                                                "or the points, or add processes"))
    lines.append("time: add --benchmark-steps 20 to measure ms/step here and project the run"
                 if benchmark else "time: this script has no benchmark mode; a run's progress "
                 "lines show ms/step and the ETA")
    return "\n".join(lines)


class _Record(TorchFunctionMode):
    """Above autograd: emulates bf16 autocast (when `amp`, outside the data phase), maps each
    forward autograd node to its phase, and marks attention calls."""

    def __init__(self, rec: "_Recorder", amp: bool):
        super().__init__()
        self.rec, self.amp = rec, amp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.amp:
            args, kwargs = _autocast(func, args, kwargs)
        attn = func is F.scaled_dot_product_attention
        inputs = {t.grad_fn for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        if attn:
            self.rec.attn_call = self.rec.next_attn = self.rec.next_attn + 1
        out = func(*args, **kwargs)
        if attn:
            self.rec.attn_call = -1
            self.rec.attn_bytes[self.rec.next_attn] = _attention_bytes(args, kwargs, out)
            _mark(out, inputs, self.rec.node_attn, self.rec.next_attn)
        _mark(out, inputs, self.rec.node_phase, profiling.current() or "other")
        return out


def _attention_bytes(args, kwargs, out) -> dict:
    """HBM bytes of a fused attention call: forward reads q, k, v and writes o; backward reads
    q, k, v, o and dO and writes dq, dk, dv. Each distinct view is counted once (q, k and v are
    slices of one qkv tensor, a different part each; q = k = v is one tensor)."""
    names = ("query", "key", "value")
    qkv = [args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names)]
    views = {(_key(t), t.storage_offset(), tuple(t.shape), t.stride()): t.numel() * t.element_size()
             for t in qkv}
    inputs, o = sum(views.values()), out.numel() * out.element_size()
    return {"fwd": inputs + o, "bwd": 2 * inputs + 2 * o}


def _mark(out, stop: set, marks: dict, value: int) -> None:
    """Mark the autograd nodes one call made (from its outputs' nodes back to its inputs'),
    so that its backward ops are known as its own: attention's backward is one kernel, a
    kernels.* op's backward is its Triton backward."""
    todo = [t.grad_fn for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    while todo:
        n = todo.pop()
        if n is None or n in stop or n in marks:
            continue
        marks[n] = value
        todo += [m for m, _ in n.next_functions]


KERNEL_OPS = ("fps", "knn", "group", "group_views", "chamfer_l2", "chamfer_l2_loss")
"""The public ops of the kernels package: on a GPU, Triton kernels (costed from kernels.static);
on meta, the PyTorch reference (recorded, and costed so in the fp32 plain path)."""


def _describe(x):
    """A kernels.* argument as JSON: tensors by shape, dtype and requires_grad."""
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
                "grad": x.requires_grad}
    if isinstance(x, (list, tuple)):
        return [_describe(v) for v in x]
    return x


@contextlib.contextmanager
def _tag_kernel_calls(rec: "_Recorder", amp: bool):
    """While recording: every kernels.* call is noted (op, arguments, phase) and the aten ops
    it runs, forward and backward, carry its index; with `amp`, kernels.linear_patch_max's
    inputs are cast as autocast casts F.linear's."""
    import kernels

    saved = {name: getattr(kernels, name) for name in KERNEL_OPS}

    def wrap(name, fn):
        def call(*args, **kwargs):
            if rec.kernel_call >= 0:  # group_views -> group: the outer call is the launch
                return fn(*args, **kwargs)
            rec.calls.append({"op": name, "args": _describe(args), "phase": profiling.current()
                              or "other", "kwargs": {k: v for k, v in kwargs.items()
                                                     if k != "check"}})
            rec.kernel_call = len(rec.calls) - 1
            inputs = {t.grad_fn for t in torch.utils._pytree.tree_leaves(args)
                      if isinstance(t, torch.Tensor)}
            try:
                out = fn(*args, **kwargs)
            finally:
                rec.kernel_call = -1
            _mark(out, inputs, rec.node_kernel, len(rec.calls) - 1)
            return out
        return call

    for name, fn in saved.items():
        setattr(kernels, name, wrap(name, fn))
    lpm, pmm = kernels.linear_patch_max, kernels.point_mlp_max

    def linear_patch_max(*args, **kwargs):  # autocast (a no-op on meta) casts as for F.linear
        args, kwargs = _autocast(F.linear, args, kwargs)
        return lpm(*args, **kwargs)

    def point_mlp_max(x, w1, b1, w2, b2, **kwargs):  # fc2 in bf16, the first layer in float32
        (w2, b2), _ = _autocast(F.linear, (w2, b2), {})
        return pmm(x, w1, b1, w2, b2, **kwargs)

    if amp:
        kernels.linear_patch_max, kernels.point_mlp_max = linear_patch_max, point_mlp_max
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)
        kernels.linear_patch_max, kernels.point_mlp_max = lpm, pmm


class _Recorder(TorchDispatchMode):
    """Below autograd: one Op per aten op that launches a kernel."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.keep: list = []  # every tensor seen stays alive: its storage key stays unique
        self.node_phase: dict = {}
        self.node_attn: dict = {}
        self.attn_bytes: dict = {}  # attention call -> {"fwd": bytes, "bwd": bytes}
        self.attn_call, self.next_attn = -1, -1
        self.calls: list[dict] = []
        self.kernel_call = -1
        self.node_kernel: dict = {}
        self._bwd_phase = "backward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_KERNEL:
            return out
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor)]
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.keep += ins + outs
        node = torch._C._current_autograd_node()
        attn, call = self.attn_call, self.kernel_call
        if profiling.current() == "optimizer":
            phase, pass_ = "optimizer", "opt"
        elif node is not None:  # backward: the phase of the forward call that made the node
            phase = self.node_phase.get(node)
            if phase is not None:
                self._bwd_phase = phase
            phase, pass_ = self._bwd_phase, "bwd"  # (a node made outside: the last one's)
            attn = self.node_attn.get(node, -1)
            call = self.node_kernel.get(node, -1)
        else:
            phase, pass_ = profiling.current() or "other", "fwd"
        flops = 0.0
        if func.overloadpacket in flop_registry:
            flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        kind = ("attn" if attn >= 0 else "gemm" if name in _GEMM else
                "batchnorm" if name in _BATCHNORM else "reduce" if name in _REDUCE else "other")
        reads = {_key(t): _nbytes(t) for t in ins}
        again = _REREAD[name](args) if name in _REREAD else None
        if again is not None:
            reads[("again", _key(args[again]))] = _nbytes(args[again])
        writes = {_key(t): _nbytes(t) for t in outs}
        first = args[0] if args else None
        launches = _LAUNCHES.get(name, 1)
        if name.startswith("_foreach_") and isinstance(first, (list, tuple)):
            launches = max(1, math.ceil(len(first) / TENSORS_PER_LAUNCH))
            if name.endswith("_"):  # in place: the first list is written
                writes = {_key(t): _nbytes(t) for t in first}
        elif name.endswith("_") and not outs and isinstance(first, torch.Tensor):
            writes = {_key(first): _nbytes(first)}
        low = any(t.dtype in (torch.bfloat16, torch.float16) for t in ins)
        self.ops.append(Op(name, phase, pass_, kind, flops, reads, writes, attn, low, launches,
                           call, max((t.numel() for t in ins), default=0),
                           max((t.numel() for t in outs), default=0)))
        return out


@dataclass
class Recording:
    ops: list[Op]
    calls: list[dict]  # the kernels.* calls: op, arguments, phase
    attn_bytes: dict = field(default_factory=dict)  # call -> {"fwd", "bwd"}: its HBM bytes


def record(step, amp: bool) -> Recording:
    """Run step() (on meta tensors) twice and return the second run's ops: a steady-state
    step, without the optimizer's first-step state allocation."""
    rec = _Recorder()
    profiling.tracking(True)
    try:
        with _tag_kernel_calls(rec, amp), _Record(rec, amp), rec:
            step()
            for x in (rec.ops, rec.node_phase, rec.node_attn, rec.calls,
                      rec.node_kernel):
                x.clear()
            step()
    finally:
        profiling.tracking(False)
    return Recording(rec.ops, rec.calls, rec.attn_bytes)


# ----------------------------------------------------------------------------- kernels
@dataclass
class Kernel:
    """One launch of the modelled path."""
    phase: str
    flops: float
    bytes: float
    dtype_low: bool  # bf16 tensor-core GEMM
    eager: bool  # launched from Python op by op (else from a compiled graph or a Triton op)
    pass_: str = "fwd"
    us: float | None = None  # a given time (Triton kernels)
    gemm: bool = False
    ops: tuple = ()  # the recorded ops it stands for (name, pass)
    graph: bool = False  # replayed from a CUDA graph (--cuda-graph): no host time of its own


_FALLBACK = {"sort", "topk"}
"""ops torch.compile leaves to their ATen kernels: one launch each, inside a compiled phase."""
_DRAW = {"rand", "randint", "randn", "uniform", "random", "normal"}
"""random draws: in a phase of StepModel.eager_draws, made eagerly outside the compiled
function (so that they equal the eager path's), one eager launch each."""


_SPLIT_OVER = 8192
"""Inductor splits a reduction (two kernels: partial sums, then their sum) only when it
reduces more than this many elements per output and has few outputs (below)
(torch/_inductor/choices.py, reduction_split_factor: on sm_80/sm_90)"""
_SPLIT_ROWS = 2 * 32 * 132
"""...fewer than 2 x 32 outputs per SM (torch/_inductor/ir.py, Reduction.num_splits)"""


def _one_pass(op: Op) -> bool:
    """Whether Inductor would compute reduction `op` in one kernel (not split), so that
    elementwise ops over its input's size can join that kernel after it."""
    rows = max(op.out_numel, 1)
    return op.in_numel // rows <= _SPLIT_OVER or rows >= _SPLIT_ROWS


def _groups(ops: list[Op], fused: bool, eager_draws: tuple = ()) -> list[list[Op]]:
    """Ops -> kernels: attention calls as one; with `fused`, the fusion rule above (sort,
    top-k and, in eager_draws phases, random draws are kernels of their own)."""
    out, cur, span = [], [], 0
    for op in ops:
        if op.kind == "attn":
            if cur and not (cur[-1].kind == "attn" and cur[-1].attn_call == op.attn_call
                            and cur[-1].pass_ == op.pass_):
                out.append(cur)
                cur = []
            cur.append(op)
            span = 0
            continue
        if cur and cur[-1].kind == "attn":
            out.append(cur)
            cur = []
        alone = op.name in _FALLBACK or (op.name in _DRAW and op.phase in eager_draws)
        if not fused or op.kind == "gemm" or alone:
            if cur:
                out.append(cur)
            out.append([op])
            cur, span = [], 0
            continue
        if span:  # after a reduction: its epilogue, elementwise ops over its input's size
            if op.kind == "other" and op.name not in _DRAW and op.out_numel == span:
                cur.append(op)
                continue
            out.append(cur)
            cur, span = [], 0
        cur.append(op)
        if op.kind == "reduce":
            if _one_pass(op):
                span = op.in_numel
            else:  # (split: what follows reads its result from a second kernel)
                out.append(cur)
                cur = []
    if cur:
        out.append(cur)
    return out


def _traffic(group: list[Op], readers: dict, index: dict) -> float:
    """Bytes a kernel made of `group` moves: what it reads that it did not write, and what it
    writes that an op outside it reads later (a lone op: all its reads and writes). A forward
    tensor that only the backward reads and that the group makes from its inputs by
    elementwise ops alone is not written: Inductor's partitioner keeps those inputs, already in
    memory, and recomputes it (the patch embedding's fc3 sum y = mm + g; tests/test_costmodel).
    (Attention kernels are charged their call's own bytes instead: Recording.attn_bytes.)
    `readers`: tensor key -> [(index of an op reading it, its pass)]."""
    if len(group) == 1 and group[0].kind != "batchnorm":
        return sum(group[0].reads.values()) + sum(group[0].writes.values())
    written, read, elementwise = {}, {}, {}
    for op in group:
        for k, b in op.reads.items():
            if k not in written:
                read[k] = max(read.get(k, 0), b)
        plain = op.kind == "other" and op.name not in _DRAW \
            and all(elementwise.get(k, True) for k in op.reads)  # (a draw cannot be redone)
        for k in op.writes:
            elementwise[k] = plain
        written.update(op.writes)
    inside = {index[id(op)] for op in group}
    first = min(inside)
    forward = group[0].pass_ == "fwd"
    out = {}
    for k, b in written.items():
        later = [p for i, p in readers.get(k, ()) if i > first and i not in inside]
        if later and not (forward and elementwise[k] and all(p == "bwd" for p in later)):
            out[k] = b
    extra = sum(op.reads and max(op.reads.values()) for op in group if op.kind == "batchnorm")
    return sum(read.values()) + sum(out.values()) + extra


def _into_producers(groups: list[list[Op]]) -> list[list[Op]]:
    """A lone reduction whose input one earlier fused kernel (not a GEMM's) made joins that
    kernel, though GEMMs ran between them in the recorded order: Inductor schedules by
    dependencies, not by that order (a linear's bias gradient, the sum of the gradient the
    GELU's backward makes, is in the GELU backward's kernel:
    triton_red_fused_gelu_gelu_backward_sum in GPU traces)."""
    out: list[list[Op]] = []
    made: dict = {}  # tensor key -> index in `out` of the kernel that wrote it
    for g in groups:
        if len(g) == 1 and g[0].kind == "reduce":
            by = {made[k] for k in g[0].reads if k in made}
            if len(by) == 1:
                i = by.pop()
                if not any(op.kind in ("gemm", "attn") for op in out[i]):
                    out[i] = out[i] + g
                    made.update({k: i for k in g[0].writes})
                    continue
        out.append(g)
        made.update({k: len(out) - 1 for op in g for k in op.writes})
    return out


def kernels_of(rec: Recording, path: str, triton_us: dict,
               compiled_phases: tuple = (), eager_draws: tuple = ()) -> list[Kernel]:
    """The launches of `path` ("fp32_plain" or "amp_compile") from a step's recording; with
    amp_compile, the ops of `compiled_phases` (what --compile compiles) are fused, but for
    the random draws of the `eager_draws` phases."""
    ops = rec.ops
    index = {id(op): i for i, op in enumerate(ops)}
    readers: dict = {}
    for i, op in enumerate(ops):
        for k in op.reads:
            readers.setdefault(k, []).append((i, op.pass_))
    compiled = path == "amp_compile"
    out: list[Kernel] = []
    segments: list[tuple[bool, list[Op]]] = []
    for op in ops:
        if compiled and op.kernel_call in triton_us:
            continue  # replaced by its Triton kernels below
        if compiled and op.pass_ == "opt":
            continue  # fused AdamW below
        fuse = compiled and op.phase in compiled_phases
        if segments and segments[-1][0] == fuse and segments[-1][1][-1].phase == op.phase \
                and segments[-1][1][-1].pass_ == op.pass_:
            segments[-1][1].append(op)
        else:
            segments.append((fuse, [op]))
    for fuse, seg in segments:
        groups = _groups(seg, fuse, eager_draws)
        for g in _into_producers(groups) if fuse else groups:
            flops = sum(op.flops for op in g)
            gemm = [op for op in g if op.kind in ("gemm", "attn")]
            n = g[0].launches if len(g) == 1 else 1
            eager = not fuse or (len(g) == 1 and g[0].name in _DRAW and g[0].phase in eager_draws)
            # attention: its call's own q, k, v, o (meta's decomposition is not what runs)
            traffic = rec.attn_bytes[g[0].attn_call][g[0].pass_] if g[0].kind == "attn" \
                else _traffic(g, readers, index)
            k = Kernel(g[0].phase, flops / n, traffic / n,
                       dtype_low=any(op.low for op in gemm), eager=eager, pass_=g[0].pass_,
                       gemm=bool(gemm), ops=tuple((op.name, op.pass_) for op in g))
            out += [dataclasses.replace(k) for _ in range(n)]
    if compiled:
        for i, (us, launches) in triton_us.items():
            for _ in range(launches):
                # launched from Python by Triton's launcher: an eager op's host time
                out.append(Kernel(rec.calls[i]["phase"], 0.0, 0.0, True, eager=True,
                                  us=us / launches,
                                  ops=((rec.calls[i]["op"], "triton"),)))
        params = [op for op in ops if op.pass_ == "opt"]
        out += _fused_adamw(params)
    return out


def _fused_adamw(opt_ops: list[Op]) -> list[Kernel]:
    """Fused AdamW from the for-each AdamW's record: the same parameters, one pass reading
    param, grad, exp_avg, exp_avg_sq and writing three of them, launched per chunk of
    TENSORS_PER_LAUNCH tensors."""
    out = []
    for lerp in (op for op in opt_ops if op.name == "_foreach_lerp_"):  # one per param group
        param_bytes = sum(lerp.writes.values())  # exp_avg: one float32 per parameter
        out += [Kernel("optimizer", 0.0, 7 * param_bytes / lerp.launches, False, eager=True,
                       pass_="opt") for _ in range(lerp.launches)]
    return out


TENSORS_PER_LAUNCH = 36
"""multi_tensor_apply's tensors per launch for four tensor lists (PyTorch's for-each and fused
optimizers; fewer when tensors are large)."""


def kernel_us(k: Kernel, gpu: GPU) -> tuple[float, str]:
    """A kernel's time and what bounds it."""
    if k.us is not None:
        return max(k.us, gpu.kernel_min_us), "Triton kernel (calibrated static estimate)"
    peak = (gpu.bf16_tflops if k.dtype_low else gpu.fp32_tflops) * 1e12 * gpu.gemm_eff
    t_flop = k.flops / peak * 1e6 if k.gemm else 0.0
    t_mem = k.bytes / (gpu.hbm_gbs * 1e9 * gpu.mem_eff) * 1e6
    t = max(t_flop, t_mem, gpu.kernel_min_us)
    bound = "FLOPs" if t == t_flop else "HBM bytes" if t == t_mem else "launch (tiny kernel)"
    return t, bound


def cost(kernels: list[Kernel], gpu: GPU, phases: list[str]) -> dict:
    """Per phase (its backward included; gpu_bwd_ms: that part): GPU time (kernels + gaps),
    host time, launches, GFLOP, HBM MB, what bounds it; and the step."""
    out = {}
    for ph in dict.fromkeys([*phases, *(k.phase for k in kernels)]):  # unlabelled: "other"
        ks = [k for k in kernels if k.phase == ph]
        if not ks:
            continue
        times = [kernel_us(k, gpu) for k in ks]
        gaps = [gpu.graph_gap_us if k.graph else gpu.gap_us for k in ks]
        gpu_us = sum(t for t, _ in times) + sum(gaps)
        host_us = sum(0.0 if k.graph else gpu.host_eager_us if k.eager else gpu.host_compiled_us
                      for k in ks)
        by: dict = {}
        for t, b in times:
            by[b] = by.get(b, 0.0) + t
        bound = "host launches" if host_us > gpu_us else max(by, key=by.get)
        bwd_us = sum(t + gap for (t, _), gap, k in zip(times, gaps, ks) if k.pass_ == "bwd")
        out[ph] = {"ms": round(max(gpu_us, host_us) / 1e3, 3), "gpu_ms": round(gpu_us / 1e3, 3),
                   "gpu_bwd_ms": round(bwd_us / 1e3, 3),
                   "host_ms": round(host_us / 1e3, 3), "launches": len(ks),
                   "gflop": round(sum(k.flops for k in ks) / 1e9, 1),
                   "hbm_mb": round(sum(k.bytes for k in ks) / 1e6, 1), "bound": bound}
    if any(k.graph for k in kernels):  # the replay's own launch: host time only
        out["graph_launch"] = {"ms": gpu.host_graph_us / 1e3, "gpu_ms": 0.0, "gpu_bwd_ms": 0.0,
                               "host_ms": gpu.host_graph_us / 1e3, "launches": 1, "gflop": 0.0,
                               "hbm_mb": 0.0, "bound": "host launches"}
    gpu_ms = sum(p["gpu_ms"] for p in out.values())
    host_ms = sum(p["host_ms"] for p in out.values())
    return {"step_ms": round(sum(p["ms"] for p in out.values()), 2),
            "gpu_ms": round(gpu_ms, 2), "host_ms": round(host_ms, 2),
            "launches": sum(p["launches"] for p in out.values()),
            "launches_outside_graph": sum(not k.graph for k in kernels) + ("graph_launch" in out),
            "bound": "host launches" if host_ms > gpu_ms else "GPU", "phases": out}


# ----------------------------------------------------------------------------- Triton estimates
_STATIC = """
import json, sys, torch
from kernels import static as S, triton_ops as T

def build(x):
    if isinstance(x, dict):
        return S._meta(*x["shape"], dtype=getattr(torch, x["dtype"])).requires_grad_(x["grad"])
    return [build(v) for v in x] if isinstance(x, list) else x

out = []
for call in json.loads(sys.stdin.read()):
    def run(call=call):
        res = getattr(T, call["op"])(*build(call["args"]), **call["kwargs"])
        leaves = [t for t in torch.utils._pytree.tree_leaves(res) if t.requires_grad]
        if leaves:  # its backward, as the step runs it
            sum(t.float().sum() for t in leaves).backward()
    rows = [r for r in S.report([S.Workload(call["op"], "", run)]) if r["kernel"] != "total"]
    out.append([sum(r["calibrated_us"] for r in rows), len(rows)])
print(json.dumps(out))
"""


def triton_estimates(calls: list[dict]) -> dict[int, tuple[float, int]]:
    """{index of the call: (µs, launches)} of the Triton kernels of each kernels.* call of a
    recording that launches any, from kernels.static: compiled for sm_90 in a subprocess
    (compiling Triton needs a process without TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", _STATIC], input=json.dumps(calls), cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"kernels.static failed: {r.stderr.strip()[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {i: (us, n) for i, (us, n) in enumerate(res) if n}


# ----------------------------------------------------------------------------- the report
@dataclass
class StepModel:
    """What a script gives: its phases in order, the phases --compile compiles, its step on
    meta tensors, what to print of its config."""
    phases: list[str]
    compiled: tuple
    make_step: object  # (amp: bool) -> step(), on meta tensors
    config: dict = field(default_factory=dict)
    captured: tuple = ()  # the phases --cuda-graph replays from a CUDA graph (none: no flag)
    eager_draws: tuple = ()  # compiled phases whose random draws are made outside the compile


def meta_env():
    """A one-process Dist on the meta device, for a script's step closure."""
    from pqae import dist

    return dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("meta"))


def main(model: StepModel, as_json: bool) -> dict:
    """--cost-model: estimate, print (a table, or one JSON object) and return the estimate."""
    r = estimate(model)
    print(json.dumps(r) if as_json else format_report(r), flush=True)
    return r


def estimate(model: StepModel, gpu: GPU = H100) -> dict:
    """The JSON object of --cost-model --json."""
    paths, notes, graph = {}, [], None
    gemm_tflop = None
    for path, amp in (("fp32_plain", False), ("amp_compile", True)):
        rec = record(model.make_step(amp), amp)
        if gemm_tflop is None:
            gemm_tflop = sum(op.flops for op in rec.ops) / 1e12
        tri = {}
        if path == "amp_compile":
            try:
                tri = triton_estimates(rec.calls)
            except Exception as e:  # noqa: BLE001  (said in the report)
                notes.append(f"no Triton estimate ({type(e).__name__}: {str(e)[-300:]}): the "
                             "kernels.* ops of amp_compile are costed as the reference ops")
        ks = kernels_of(rec, path, tri, model.compiled, model.eager_draws)
        paths[path] = cost(ks, gpu, model.phases)
        paths[path]["fwd_gflop"] = round(sum(op.flops for op in rec.ops
                                             if op.pass_ == "fwd") / 1e9, 3)
        if path == "amp_compile" and model.captured:  # the same kernels, the rest replayed
            graph = cost([dataclasses.replace(k, graph=k.phase in model.captured) for k in ks],
                         gpu, model.phases)
    speedup = paths["fp32_plain"]["step_ms"] / paths["amp_compile"]["step_ms"]
    out = {"device_model": dataclasses.asdict(gpu),
           "gemm_tflop": round(gemm_tflop, 4), "config": model.config, "paths": paths,
           "speedup": round(speedup, 2), "notes": notes}
    if graph is not None:  # --amp --compile --cuda-graph: beside the two paths
        out["cuda_graph"] = {**graph, "captured": list(model.captured),
                             "speedup": round(paths["fp32_plain"]["step_ms"] / graph["step_ms"], 2)}
    return out


def format_report(r: dict) -> str:
    p = r["paths"]
    lines = [f"cost model (an estimate, not a measurement) on {r['device_model']['name']}: "
             f"{r['gemm_tflop']:.3f} TFLOP of GEMMs per step (fp32 record)",
             "each phase with its backward; ms = max(GPU, host); HBM MB and bound of the "
             "amp+compile path",
             f"{'phase':<13} {'fp32 plain ms':>13} {'launches':>8} {'bound':<22} "
             f"{'amp+compile ms':>14} {'(bwd)':>7} {'launches':>8} {'GFLOP':>8} {'HBM MB':>8} "
             "bound"]
    names = list(dict.fromkeys([*p["fp32_plain"]["phases"], *p["amp_compile"]["phases"]]))
    for ph in names:
        a = p["fp32_plain"]["phases"].get(ph, {})
        b = p["amp_compile"]["phases"].get(ph, {})
        lines.append(f"{ph:<13} {a.get('ms', 0):>13.3f} {a.get('launches', 0):>8} "
                     f"{a.get('bound', '-'):<22} {b.get('ms', 0):>14.3f} "
                     f"{b.get('gpu_bwd_ms', 0):>7.2f} "
                     f"{b.get('launches', 0):>8} {b.get('gflop', 0):>8.1f} "
                     f"{b.get('hbm_mb', 0):>8.1f} {b.get('bound', '-')}")
    for name in ("fp32_plain", "amp_compile"):
        x = p[name]
        lines.append(f"{name:<13} step {x['step_ms']:.2f} ms (GPU {x['gpu_ms']:.2f}, host "
                     f"{x['host_ms']:.2f}; {x['launches']} launches; bound: {x['bound']})")
    lines.append(f"amp_compile is {r['speedup']:.1f}x the fp32 plain path (estimated)")
    g = r.get("cuda_graph")
    if g:
        eager = {ph: v["ms"] for ph, v in p["amp_compile"]["phases"].items()}
        lines.append(f"with --cuda-graph ({', '.join(g['captured'])} replayed from one graph): "
                     f"step {g['step_ms']:.2f} ms (GPU {g['gpu_ms']:.2f}, host {g['host_ms']:.2f}; "
                     f"{g['launches_outside_graph']} launches outside the graph), "
                     f"{g['speedup']:.1f}x the fp32 plain path (estimated)")
        lines.append("  " + ", ".join(f"{ph} {eager.get(ph, 0):.3f} -> {v['ms']:.3f} ms"
                                      for ph, v in g["phases"].items()))
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
