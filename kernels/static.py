"""The Triton kernels compiled for a GPU without a GPU: registers, spills, SASS and a cost model.

Triton's compiler runs on the CPU. Every launch the ops make is recorded with
``triton_ops.capture()`` (on ``meta`` tensors, so nothing runs), specialised exactly as Triton's
runtime would specialise it (Triton's own argument binder), compiled for ``sm_80`` / ``sm_90``,
and read back with the ``cuobjdump`` and ``nvdisasm`` that ship in the Triton wheel.

Cost model (estimates, not measurements; see the README's Performance section)
-----------------------------------------------------------------------------
* **Executed instructions.** The SASS is cut into basic blocks. A block runs once per program,
  times the trip count of every SASS loop around it (a backward branch), times the multiplier of
  every tagged ``if`` it belongs to. Each runtime loop or branch of a kernel carries a tag in
  its source (``for ...:  # cost: picks``) and the dispatch code that launches the kernel gives
  the tag's count (``Launch.trips``), so the counts follow the real workload. SASS loops are
  matched to source loops through the line table (``-lineinfo``); a runtime loop without a tag
  is an error, never a guess.
* **Issue bound.** Each of an SM's 4 schedulers issues at most one warp instruction per cycle:
  the busiest SM's warp instructions / (4 x clock).
* **Latency bound.** One warp's in-order dependency chain: each instruction issues a cycle after
  the previous one, once its source registers are ready, and its result is ready a fixed latency
  later (``LATENCY``: ~4 cycles for ALU, 24 for shuffles, 30 for shared memory, 40 for a global
  load that hits L1, 20 for a barrier). Programs resident on an SM at once (occupancy) overlap;
  further ones come in waves.
* **Estimate** = max(issue bound, latency bound): every instruction at full rate, so an
  optimistic one (by 1.25-2x, checked by hand in issue 24).
* **Calibrated estimate** = max(scheduler time, L2 time). The scheduler time replays the SASS
  on one scheduler with the warps it really holds (occupancy x warps / 4), using the control
  bits ptxas wrote beside each instruction (``control``): a warp waits its stall count before
  its next issue (2 cycles after half-rate ALU ops, more before dependent ones) and waits on
  the scoreboards of variable-latency results (loads, shuffles: ``LATENCY``), while the
  scheduler issues one instruction a cycle from any ready warp; loop bodies take their
  steady-state second pass, and the busiest SM runs its programs in whole waves of the
  occupancy. The L2 time is the bytes of every global load and store (32 lanes x width,
  assumed to miss L1) over ``L2_GBS``.
* Not modelled: launch overhead (a few µs per launch, which CUDA graphs remove), DRAM
  bandwidth, L1 hits, bank conflicts, and the clock dropping below its boost value.
"""
from __future__ import annotations

import ast
import functools
import inspect
import math
import os
import re
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DeviceModel:
    name: str
    sms: int
    clock_ghz: float
    schedulers: int = 4  # per SM, one warp instruction per cycle each
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


H100 = DeviceModel("H100 SXM (sm_90, 132 SMs, 1.755 GHz boost)", sms=132, clock_ghz=1.755)

# Cycles from issue until the result can be used (dependent-issue latency), by opcode prefix.
# Ballpark Hopper figures from public micro-benchmarks; ALU is the default.
LATENCY = {
    "SHFL": 24, "LDS": 30, "LDSM": 30, "LDG": 40, "LD": 40, "LDC": 12, "ULDC": 4, "LDL": 40,
    "ATOM": 60, "ATOMS": 40, "RED": 0, "MUFU": 18, "I2F": 6, "F2I": 6, "F2F": 6, "I2I": 6,
    "FRND": 6, "POPC": 6, "FLO": 6, "BREV": 6, "S2R": 20, "S2UR": 20, "CS2R": 4, "BAR": 20,
    "MEMBAR": 40, "DEPBAR": 0, "VOTE": 4, "MATCH": 30, "REDUX": 30, "DMUL": 8, "DADD": 8,
    "DFMA": 8, "DSETP": 8, "HMMA": 30, "IMMA": 30,
}
ALU_LATENCY = 4
_NO_DEST = ("ST", "RED", "BAR", "BRA", "BRX", "JMP", "EXIT", "RET", "BSSY", "BSYNC", "WARPSYNC",
            "NOP", "YIELD", "CCTL", "MEMBAR", "ERRBAR", "FENCE", "DEPBAR", "CALL", "KILL", "BPT",
            "ARRIVES", "SYNCS", "UCGABAR", "ACQBULK")
_BRANCH = ("BRA", "BRX", "JMP", "JMX")
_ENDS = ("EXIT", "RET", "KILL")


# ----------------------------------------------------------------------------- tools
def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found at {path} (it ships in the Triton wheel)")
    return path


def _run_tool(tool: str, *args: str) -> str:
    out = subprocess.run([_nvidia_bin(tool), *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


# ----------------------------------------------------------------------------- compile
@dataclass
class Compiled:
    name: str
    arch: int
    num_warps: int
    regs: int
    stack_bytes: int  # per-thread stack frame (local memory)
    shared_bytes: int  # dynamic shared memory per program
    sass: str  # nvdisasm -c -gi -hex
    kernel_file: str
    kernel_lines: tuple  # (first, last) line of the kernel function in kernel_file
    regions: list  # tagged source regions (Region)
    helpers: list  # helper_sites of the kernel

    @functools.cached_property
    def instrs(self) -> list["Instr"]:
        return parse_sass(self.sass)

    @property
    def spill_instructions(self) -> int:
        """LDL/STL in the SASS: register spills (or a local array) going through local memory."""
        return sum(1 for i in self.instrs if i.base in ("LDL", "STL"))


def _bind(launch, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError("kernels.static needs compiled Triton: unset TRITON_INTERPRET "
                           f"(got {type(fn).__name__} for {getattr(fn, '__name__', fn)})")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    return fn, target, backend, binder(*launch.args, **launch.meta)


def specialization(launch, arch: int = 90) -> list:
    """What Triton's runtime keys its compiled variants on for this launch (argument types,
    divisibility by 16, constants): two launches with equal lists share one compiled kernel."""
    return list(_bind(launch, arch)[3][1])


def compile_launch(launch, arch: int = 90) -> Compiled:
    """Compile one captured launch for sm_<arch> with Triton's own specialisation of its
    arguments (the runtime's binder: divisibility by 16, constants of value 1, dtypes)."""
    import triton
    from triton.compiler import ASTSource

    fn, target, backend, (bound, spec, opts) = _bind(launch, arch)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.meta, bound, spec, opts)
    ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                        options=options.__dict__)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        usage = _run_tool("cuobjdump", "--dump-resource-usage", path)
        sass = _run_tool("nvdisasm", "-c", "-gi", "-hex", path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
    if not m:
        raise RuntimeError(f"cannot read the resource usage of {fn.__name__}: {usage!r}")
    src = inspect.getsourcefile(fn.fn)
    lines, first = inspect.getsourcelines(fn.fn)
    return Compiled(name=fn.__name__, arch=arch, num_warps=options.num_warps,
                    regs=int(m.group(1)), stack_bytes=int(m.group(2)),
                    shared_bytes=int(ck.metadata.shared), sass=sass,
                    kernel_file=os.path.realpath(src),
                    kernel_lines=(first, first + len(lines) - 1), regions=source_regions(fn.fn),
                    helpers=helper_sites(fn.fn))


# ----------------------------------------------------------------------------- SASS
@dataclass
class Instr:
    addr: int
    op: str  # full opcode with modifiers, e.g. "SHFL.BFLY"
    pred: str  # guard predicate ("@P0", "@!P1") or ""
    operands: str
    file: str | None  # innermost source location
    line: int | None
    at_file: str | None  # the call site it was inlined at, if any
    at_line: int | None
    target: int | None = None  # branch target address
    ctrl: int | None = None  # the scheduling control bits ptxas wrote (see `control`)

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_HEX_HI = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")  # -hex: the word after an instruction
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> list[Instr]:
    """nvdisasm -c -gi [-hex] output -> instructions with their source lines, branch targets
    and (with -hex) control bits."""
    instrs, labels, pending, loc = [], {}, [], (None, None, None, None)
    for raw in text.splitlines():
        m = _HEX_HI.match(raw)
        if m and instrs and instrs[-1].ctrl is None:
            instrs[-1].ctrl = int(m.group(1), 16) >> 41
            continue
        m = _LINE.search(raw)
        if m:
            f, ln, af, al = m.groups()
            loc = (os.path.realpath(f), int(ln), af and os.path.realpath(af), al and int(al))
            continue
        m = _LABEL.match(raw)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(raw)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        ops = m.group(4)
        ins = Instr(addr, m.group(3), (m.group(2) or "").strip(), ops, *loc)
        t = _TARGET.search(ops)
        if t and ins.base in _BRANCH + ("BSSY", "CALL"):
            ins.target = t.group(1)  # resolved below
        instrs.append(ins)
    for ins in instrs:
        if isinstance(ins.target, str):
            ins.target = labels.get(ins.target)
    return instrs


@dataclass
class Block:
    start: int  # index of the first instruction
    end: int  # index past the last
    succ: list = field(default_factory=list)  # block indices


def basic_blocks(instrs: list[Instr]) -> list[Block]:
    by_addr = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.base in _BRANCH + _ENDS:
            if ins.target is not None and ins.base in _BRANCH:
                leaders.add(by_addr[ins.target])
            leaders.add(i + 1)
    starts = sorted(s for s in leaders if s < len(instrs))
    blocks = [Block(s, e) for s, e in zip(starts, starts[1:] + [len(instrs)])]
    first = {b.start: k for k, b in enumerate(blocks)}
    for k, b in enumerate(blocks):
        last = instrs[b.end - 1]
        conditional = bool(last.pred) and last.pred != "@PT"
        if last.base in _BRANCH:
            if last.target is not None:
                b.succ.append(first[by_addr[last.target]])
            if conditional and k + 1 < len(blocks):
                b.succ.append(k + 1)
        elif last.base in _ENDS:
            if conditional and k + 1 < len(blocks):
                b.succ.append(k + 1)
        elif k + 1 < len(blocks):
            b.succ.append(k + 1)
    return blocks


def _reachable(blocks: list[Block]) -> set[int]:
    seen, todo = {0}, [0]
    while todo:
        for s in blocks[todo.pop()].succ:
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


@dataclass
class Loop:
    head: int  # first block index
    tail: int  # last block index (holds the backward branch)

    def contains(self, k: int) -> bool:
        return self.head <= k <= self.tail


def find_loops(blocks: list[Block], live: set[int]) -> list[Loop]:
    """Natural loops from backward branches (a loop's blocks are contiguous in SASS)."""
    tails = {}
    for k in live:
        for s in blocks[k].succ:
            if s <= k:
                tails[s] = max(tails.get(s, s), k)
    return [Loop(h, t) for h, t in sorted(tails.items())]


# ----------------------------------------------------------------------------- source regions
@dataclass
class Region:
    tag: str
    kind: str  # "loop" or "if"
    first: int  # absolute line of the statement
    last: int  # last line of its body


_TAG = re.compile(r"#\s*cost:\s*(\w+)")


def source_regions(pyfn) -> list[Region]:
    """The `# cost: tag` loops and ifs of a kernel's source, with absolute line numbers."""
    lines, start = inspect.getsourcelines(pyfn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.While, ast.If)):
            m = _TAG.search(lines[node.lineno - 1])
            if m:
                last = (node.body[-1].end_lineno if isinstance(node, ast.If) else node.end_lineno)
                out.append(Region(m.group(1), "if" if isinstance(node, ast.If) else "loop",
                                  start + node.lineno - 1, start + last - 1))
    return out


def helper_sites(pyfn) -> list[tuple[str, int, int, frozenset]]:
    """The @triton.jit helpers a kernel uses (directly or through other helpers, called or passed
    as a combine function): (file, first line, last line, the kernel lines that use them).
    Where the line table names a helper's line without the kernel line it was inlined at (older
    Triton), the instruction can come from any of those kernel lines."""
    from triton.runtime.jit import JITFunction

    def refs(fn):
        lines, start = inspect.getsourcelines(fn)
        for node in ast.walk(ast.parse(textwrap.dedent("".join(lines)))):
            if isinstance(node, ast.Name):
                g = fn.__globals__.get(node.id)
                if isinstance(g, JITFunction) and g.fn is not fn:
                    yield g, start + node.lineno - 1

    sites: dict = {}
    for h, line in refs(pyfn):
        sites.setdefault(h, set()).add(line)
    todo = list(sites)
    while todo:
        h = todo.pop()
        for g, _ in refs(h.fn):
            if not sites[h] <= sites.setdefault(g, set()):
                sites[g] |= sites[h]
                todo.append(g)
    out = []
    for h, lines in sites.items():
        src, first = inspect.getsourcelines(h.fn)
        out.append((os.path.realpath(inspect.getsourcefile(h.fn)), first, first + len(src) - 1,
                    frozenset(lines)))
    return out


def _same_file(sass_path: str | None, source_path: str) -> bool:
    """The line table names the file where the kernel was first compiled; Triton's cache
    serves that cubin to any checkout of the same source, so compare package-relative paths
    (kernels/triton_ops.py), not absolute ones."""
    return sass_path is not None and (sass_path == source_path or Path(sass_path).parts[-2:]
                                      == Path(source_path).parts[-2:])


def _kernel_lines(ins: Instr, c: Compiled) -> frozenset | None:
    """The lines of the kernel's own body an instruction can come from: its line, or the call
    site it was inlined at, or (a helper's line without one) every line using that helper."""
    lo, hi = c.kernel_lines
    if _same_file(ins.file, c.kernel_file) and lo <= ins.line <= hi:
        return frozenset((ins.line,))
    if _same_file(ins.at_file, c.kernel_file) and lo <= ins.at_line <= hi:
        return frozenset((ins.at_line,))
    for f, a, b, sites in c.helpers:
        if _same_file(ins.file, f) and a <= ins.line <= b:
            return sites
    return None


def _majority_region(positions: list[frozenset], regions: list[Region]) -> Region | None:
    """The region the attributed instructions come from: each instruction splits its vote over
    the kernel lines it can come from; the region with the largest share wins (the innermost of
    those within 10 % of it: an outer loop shares every line of its inner one), provided it
    holds at least 30 % of the votes."""
    if not positions:
        return None
    share = {}
    for r in regions:
        share[id(r)] = sum(sum(r.first <= ln <= r.last for ln in p) / len(p) for p in positions)
    top = max(share.values(), default=0.0)
    if top < 0.3 * len(positions):
        return None
    close = [r for r in regions if share[id(r)] >= 0.9 * top]
    return min(close, key=lambda r: r.last - r.first)


class CostModelError(RuntimeError):
    pass


def _trip(trips: dict, c: Compiled, tag: str) -> float:
    if tag not in trips:
        raise CostModelError(f"{c.name}: the launch gives no count for `# cost: {tag}`")
    return trips[tag]


def block_counts(c: Compiled, trips: dict) -> tuple[list[Block], list[Loop], list[float]]:
    """Executions per program of every basic block (0 for unreachable ones)."""
    instrs = c.instrs
    blocks = basic_blocks(instrs)
    live = _reachable(blocks)
    loops = find_loops(blocks, live)
    loop_regions = [r for r in c.regions if r.kind == "loop"]
    if_regions = [r for r in c.regions if r.kind == "if"]

    def lines_of(ks):
        return [ln for k in ks for ins in instrs[blocks[k].start:blocks[k].end]
                if (ln := _kernel_lines(ins, c)) is not None]

    def if_mult(reg: Region) -> float:  # the multipliers of the tagged ifs around a region
        return math.prod(_trip(trips, c, i.tag) for i in if_regions
                         if i.first <= reg.first and reg.last <= i.last)

    mult = [1.0 if k in live else 0.0 for k in range(len(blocks))]
    # if-multipliers of blocks inside a SASS loop come from the ifs around its source loop
    # (a loop body's blocks may carry hoisted or sunk instructions with other lines)
    covered: list[float | None] = [None] * len(blocks)
    used = {}
    for lp in sorted(loops, key=lambda lp: lp.head - lp.tail):  # outermost first
        inner = [o for o in loops if o is not lp and lp.head <= o.head and o.tail <= lp.tail]
        own = [k for k in range(lp.head, lp.tail + 1) if not any(o.contains(k) for o in inner)]
        reg = _majority_region(lines_of(own), loop_regions)
        if reg is None:
            raise CostModelError(
                f"{c.name} (sm_{c.arch}): a SASS loop at 0x{instrs[blocks[lp.head].start].addr:x}"
                " matches no `# cost:` loop of the source; tag the loop and give its trip count")
        if reg.first in used:
            raise CostModelError(
                f"{c.name} (sm_{c.arch}): loop `{reg.tag}` (line {reg.first}) appears as two SASS "
                "loops (unrolled or pipelined copies): the model cannot count it")
        used[reg.first] = lp
        n, f = _trip(trips, c, reg.tag), if_mult(reg)
        for k in range(lp.head, lp.tail + 1):
            mult[k] *= n
            covered[k] = f
    prev = None
    for k in range(len(blocks)):
        if covered[k] is not None:
            mult[k] *= covered[k]
            continue
        ls = lines_of([k])
        reg = _majority_region(ls, if_regions) if ls else prev
        prev = reg
        if reg is not None:
            mult[k] *= if_mult(reg)
    return blocks, loops, mult


# ----------------------------------------------------------------------------- latency
_REG = re.compile(r"\b(U?R\d+|U?P\d+)\b")


def _latency(ins: Instr) -> int:
    op = ins.op
    for prefix, lat in LATENCY.items():
        if op == prefix or op.startswith(prefix + "."):
            return lat
    return ALU_LATENCY


def _dests_and_sources(ins: Instr) -> tuple[list[str], list[str]]:
    parts = [p.strip() for p in ins.operands.split(",")] if ins.operands else []
    regs = [_REG.findall(p) for p in parts]
    if ins.base.startswith(_NO_DEST) or not parts:
        return [], [r for rs in regs for r in rs] + _REG.findall(ins.pred)
    dests = list(regs[0]) if not parts[0].startswith("[") else []
    i = 1
    while i < len(parts) and re.fullmatch(r"!?U?P(\d+|T)", parts[i]) and i < len(parts) - 1:
        dests += regs[i]  # predicate outputs after the first (ISETP P0, P1 / IADD3 R, P0, ...)
        i += 1
    width = 4 if ".128" in ins.op else 2 if (".64" in ins.op or ".WIDE" in ins.op) else 1
    if width > 1 and dests and dests[0].startswith("R"):
        n = int(dests[0][1:])
        dests += [f"R{n + j}" for j in range(1, width)]
    srcs = [r for rs in regs[i:] for r in rs] + _REG.findall(ins.pred)
    return dests, srcs


class _Chain:
    """One warp issuing in order: an instruction issues a cycle after the previous one, once its
    source registers are ready (and after any barrier has released); its destinations are ready
    its latency later."""

    def __init__(self):
        self.ready: dict[str, float] = {}
        self.t = 0.0
        self.barrier = 0.0

    def run(self, instrs) -> float:
        t0 = self.t
        for ins in instrs:
            dests, srcs = _dests_and_sources(ins)
            issue = max([self.t + 1, self.barrier] + [self.ready.get(r, 0.0) for r in srcs])
            lat = _latency(ins)
            if ins.base == "BAR":
                self.barrier = issue + lat
            for r in dests:
                if r not in ("RZ", "PT", "URZ", "UPT"):
                    self.ready[r] = issue + lat
            self.t = issue
        return self.t - t0


def block_cycles(instrs: list[Instr], blocks: list[Block], loops: list[Loop]) -> list[float]:
    """Cycles of one warp's chain through each block: one pass in address order, then each loop
    region (outer to inner) run twice more, its blocks taking the steady-state second pass."""
    ch = _Chain()
    cyc = [ch.run(instrs[b.start:b.end]) for b in blocks]
    for lp in sorted(loops, key=lambda lp: lp.head - lp.tail):  # outermost (longest) first
        ch = _Chain()
        for rep in range(2):
            for k in range(lp.head, lp.tail + 1):
                c = ch.run(instrs[blocks[k].start:blocks[k].end])
                if rep:
                    cyc[k] = c
    return cyc


# ----------------------------------------------------------------------------- calibrated
L2_GBS = 5500.0
"""L2 bandwidth of an H100 SXM for loads that miss L1 (public micro-benchmarks: ~5.5 TB/s)."""
READ_BARRIER_CYCLES = 2
"""Cycles until a read scoreboard releases (the source registers of a store or shuffle read)."""


def control(ins: Instr) -> tuple[int, int, int, int]:
    """(stall, write scoreboard, read scoreboard, wait mask) from the control bits ptxas
    writes beside every sm_70+ instruction: the cycles before the warp's next instruction may
    issue (ptxas sets 2 after a half-rate ALU op, more before a dependent fixed-latency one),
    the scoreboard a variable-latency result releases, the one released when the sources have
    been read (7: none), and the scoreboards this instruction waits for. Without control bits
    (SASS read without -hex): one cycle, no scoreboards."""
    c = ins.ctrl
    if c is None:
        return 1, 7, 7, 0
    return c & 0xF, (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 0x3F


def schedule(instrs: list[Instr], block_of: list[int], warps: int, passes: int = 1,
             n_blocks: int = 0) -> list[float]:
    """One scheduler running `warps` warps through `instrs` (in order, `passes` times), each
    warp issuing when its stall count and the scoreboards it waits for allow, the scheduler
    issuing at most one instruction a cycle, to the warp ready first. Returns the scheduler
    cycles of the last pass attributed to each block: each issue is charged the cycles since
    the scheduler's previous issue."""
    ctrl = [control(i) for i in instrs]
    lat = [_latency(i) for i in instrs]
    n = len(instrs)
    ready, bars = [0.0] * warps, [[0.0] * 6 for _ in range(warps)]
    pos = [0] * warps
    cyc = [0.0] * max(n_blocks, max(block_of, default=-1) + 1)
    t, last = 0.0, 0.0
    total = n * passes
    active = list(range(warps))
    while active:
        best, when = -1, math.inf
        for w in active:
            _, _, _, wait = ctrl[pos[w] % n]
            e = ready[w]
            if wait:
                e = max(e, max(bars[w][b] for b in range(6) if wait >> b & 1))
            if e < when:
                best, when = w, e
        w, k = best, pos[best] % n
        issue = max(t, when)
        if pos[w] >= total - n:  # the last pass: charge this issue's cycles to its block
            cyc[block_of[k]] += issue + 1 - last
        last, t = issue + 1, issue + 1
        stall, wr, rd, _ = ctrl[k]
        ready[w] = issue + max(stall, 1)
        if wr < 6:
            bars[w][wr] = issue + lat[k]
        if rd < 6:
            bars[w][rd] = issue + READ_BARRIER_CYCLES
        pos[w] += 1
        if pos[w] == total:
            active.remove(w)
    return cyc


def _access_bytes(ins: Instr) -> int:
    """Bytes a warp moves through L2 with one global load, store or atomic (32 lanes)."""
    if ins.base not in ("LDG", "STG", "RED", "ATOMG"):
        return 0
    op = ins.op
    width = 16 if ".128" in op else 8 if ".64" in op else 2 if (".U16" in op or ".S16" in op) \
        else 1 if (".U8" in op or ".S8" in op) else 4
    return 32 * width


def calibrated(c: Compiled, blocks: list[Block], loops: list[Loop], mult: list[float],
               programs: int, occ: int, dev: DeviceModel) -> tuple[float, float, str]:
    """(scheduler µs, L2 µs, what bounds the kernel) from the control bits, at the occupancy
    the kernel really has, wave by wave, and from the bytes its global accesses move."""
    instrs = c.instrs
    block_of = [0] * len(instrs)
    for k, b in enumerate(blocks):
        for i in range(b.start, b.end):
            block_of[i] = k
    per_sm = math.ceil(programs / dev.sms)  # the busiest SM's programs
    rounds = math.ceil(per_sm / occ)
    last = per_sm - (rounds - 1) * occ

    @functools.lru_cache(maxsize=None)  # the full waves and the last one often hold as many
    def cycles(resident: int) -> float:
        w = max(1, math.ceil(resident * c.num_warps / dev.schedulers))
        cyc = schedule(instrs, block_of, w, n_blocks=len(blocks))
        for lp in sorted(loops, key=lambda lp: lp.head - lp.tail):  # outer first, then inner
            idx = [i for i in range(len(instrs)) if lp.head <= block_of[i] <= lp.tail]
            steady = schedule([instrs[i] for i in idx], [block_of[i] for i in idx], w,
                              passes=2, n_blocks=len(blocks))
            for k in range(lp.head, lp.tail + 1):
                cyc[k] = steady[k]
        return sum(m * t for m, t in zip(mult, cyc))

    sched = (rounds - 1) * (cycles(occ) if rounds > 1 else 0.0) + cycles(last)
    sched_us = sched / (dev.clock_ghz * 1e3)
    per_program = c.num_warps * sum(m * sum(_access_bytes(i) for i in instrs[b.start:b.end])
                                    for b, m in zip(blocks, mult))
    l2_us = programs * per_program / (L2_GBS * 1e3)
    bound = "L2 bytes" if l2_us > sched_us else "issue + latency"
    return sched_us, l2_us, bound


# ----------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    kernel: str
    workload: str
    arch: int
    regs: int
    spills: int
    stack_bytes: int
    shared_bytes: int
    num_warps: int
    programs: int
    blocks_per_sm: int
    instructions_per_warp: float  # executed by one warp of one program
    instructions: float  # warp instructions per program (all its warps)
    issue_us: float
    latency_us: float
    estimate_us: float
    schedule_us: float = 0.0  # calibrated: control bits, real occupancy, waves
    l2_us: float = 0.0  # calibrated: bytes of global accesses over L2 bandwidth
    calibrated_us: float = 0.0  # the larger of the two
    bound: str = ""


def occupancy(c: Compiled, dev: DeviceModel = H100) -> int:
    """Programs resident per SM, from warps, registers and shared memory."""
    w = c.num_warps
    regs_per_warp = math.ceil(max(c.regs, 1) * 32 / 256) * 256
    by_regs = (dev.regs_per_sm // regs_per_warp) // w
    by_smem = dev.smem_per_sm // (c.shared_bytes + 1024)  # 1 KB per block reserved
    return max(0, min(dev.max_blocks_per_sm, dev.max_warps_per_sm // w, by_regs, by_smem))


def estimate(c: Compiled, launch, workload: str, dev: DeviceModel = H100) -> Estimate:
    blocks, loops, mult = block_counts(c, launch.trips)
    instrs = c.instrs
    per_warp = sum(m * (b.end - b.start) for b, m in zip(blocks, mult))
    programs = math.prod(launch.grid)
    occ = occupancy(c, dev)
    if occ == 0:
        raise CostModelError(f"{c.name}: does not fit on one SM ({c.regs} regs x "
                             f"{c.num_warps} warps, {c.shared_bytes} B shared)")
    per_sm = math.ceil(programs / dev.sms)
    issue_cycles = per_sm * per_warp * c.num_warps / dev.schedulers
    # latency: one warp's chain through every executed block; resident programs overlap
    cyc = block_cycles(instrs, blocks, loops)
    chain = sum(m * t for m, t in zip(mult, cyc))
    waves = math.ceil(programs / (dev.sms * occ))
    lat_cycles = waves * chain
    issue_us = issue_cycles / (dev.clock_ghz * 1e3)
    lat_us = lat_cycles / (dev.clock_ghz * 1e3)
    sched_us, l2_us, bound = calibrated(c, blocks, loops, mult, programs, occ, dev)
    return Estimate(kernel=c.name, workload=workload, arch=c.arch, regs=c.regs,
                    spills=c.spill_instructions, stack_bytes=c.stack_bytes,
                    shared_bytes=c.shared_bytes, num_warps=c.num_warps, programs=programs,
                    blocks_per_sm=occ, instructions_per_warp=per_warp,
                    instructions=per_warp * c.num_warps, issue_us=issue_us, latency_us=lat_us,
                    estimate_us=max(issue_us, lat_us), schedule_us=sched_us, l2_us=l2_us,
                    calibrated_us=max(sched_us, l2_us), bound=bound)


# ----------------------------------------------------------------------------- workloads
def _meta(*shape, dtype=None):
    import torch

    return torch.empty(*shape, dtype=dtype or torch.float32, device="meta")


def _bf16():
    import torch

    return torch.bfloat16


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    run: object  # () -> None: calls the ops on meta tensors
    target_us: float | None = None


def _chamfer_both_views(dtype=None):
    from . import triton_ops as T

    # as PointPQAE.forward_views calls it: both views at once, the targets carry no gradient
    preds = [_meta(128 * 64, 32, 3, dtype=dtype).requires_grad_(True) for _ in range(2)]
    loss1, loss2 = T.chamfer_l2_loss(preds, [_meta(128 * 64, 32, 3) for _ in range(2)])
    (loss1 + loss2).backward()


def workloads() -> list[Workload]:
    """The launches of training, at the reference sizes (views of 614..1023 points: the crop
    ratios of pretraining are U[0.6, 1))."""
    from . import triton_ops as T

    def fps(B, N, m):
        return lambda: T.fps(_meta(B, N, 3), m)

    def knn(B, S, N, k):
        return lambda: T.knn(_meta(B, S, 3), _meta(B, N, 3), k)

    def group(B, N, G, M, views=1):
        return lambda: T.group_views([_meta(B, N - v, 3) for v in range(views)], G, M)

    return [
        Workload("fps_pretrain_view", "FPS 128 x 1023 -> 64 (one view)", fps(128, 1023, 64)),
        Workload("fps_pretrain_both_views", "FPS of both views (1023 and 1022 points) -> 64",
                 lambda: T._fps_views([_meta(128, 1023, 3), _meta(128, 1022, 3)], 64, True), 40.0),
        Workload("knn_128x64x1024_k32", "kNN 128 x 64 queries x 1024 points, k=32",
                 knn(128, 64, 1024, 32), 15.0),
        Workload("knn_pretrain_view", "kNN of one view: 128 x 64 centres x 1023 points, k=32",
                 knn(128, 64, 1023, 32), 20.0),
        Workload("knn_pretrain_view_614", "the same for the smallest view (614 points)",
                 knn(128, 64, 614, 32), 20.0),
        Workload("group_pretrain_both_views", "FPS + kNN grouping of both views (1023, 1022 "
                 "points), as a pretraining step runs it", group(128, 1023, 64, 32, views=2)),
        Workload("chamfer_pretrain_both_views_fwd_bwd",
                 "Chamfer-L2 loss of both views, 2 x 8192 pairs of 32 vs 32, forward + backward",
                 _chamfer_both_views, 25.0),
        Workload("chamfer_pretrain_both_views_fwd_bwd_bf16", "the same under --amp (bf16 predictions)",
                 lambda: _chamfer_both_views(_bf16()), 25.0),
        Workload("fps_finetune_2048", "FPS 32 x 2048 -> 2048 (fine-tuning's point_all)",
                 fps(32, 2048, 2048)),
        Workload("group_finetune_2048", "grouping 32 x 2048 -> 128 x 32", group(32, 2048, 128, 32)),
        Workload("group_modelnet8k", "grouping 32 x 8192 -> 512 x 32", group(32, 8192, 512, 32)),
        Workload("knn_partseg_propagate", "feature propagation: 16 x 2048 points, 128 centres, k=3",
                 knn(16, 2048, 128, 3)),
    ]


def sweep() -> list[Workload]:
    """Every specialisation the dispatch can launch beyond the workloads, for the compile and
    spill check: FPS and grouping at every block size up to FPS_MAX_N (which covers the kNN's
    tile sizes and its chunked path), kNN at the largest k, and the Chamfer kernels at their
    largest fused size, in float32 and bfloat16, with and without target gradients."""
    from . import triton_ops as T

    out = []
    # the smallest block, and every block size where the points per thread (FPS) or per lane
    # (kNN tile) peak or the kernel changes shape (warps, carry, chunks): 32 .. FPS_MAX_N
    for n in sorted({32, 1024, 2048, 4096, T.FPS_MAX_N}):
        out.append(Workload(f"fps_n{n}", f"FPS 2 x {n} -> 2", lambda n=n: T.fps(_meta(2, n, 3), 2)))
        out.append(Workload(f"group_n{n}", f"grouping 2 x {n} -> 2 x 1",
                            lambda n=n: T.group_views([_meta(2, n, 3)], 2, 1)))
    for N in (2048, 4096):
        out.append(Workload(f"knn_k{T.KNN_MAX_K}_n{N}", f"kNN 2 x 8 queries x {N}, k={T.KNN_MAX_K}",
                            lambda N=N: T.knn(_meta(2, 8, 3), _meta(2, N, 3), T.KNN_MAX_K)))

    def cd(n, m, dtype=None, target_grad=False, views=2):
        def run():
            preds = [_meta(4, n, 3, dtype=dtype).requires_grad_(True) for _ in range(views)]
            tgts = [_meta(4, m, 3).requires_grad_(target_grad) for _ in range(views)]
            sum(T.chamfer_l2_loss(preds, tgts)).backward()
        return run

    m = T.CD_LOSS_MAX
    out += [Workload(f"chamfer_loss_{m}", "fused Chamfer loss, largest sets", cd(m, m)),
            Workload("chamfer_loss_bf16_tgrad", "bf16 predictions, target gradients",
                     cd(32, 32, _bf16(), True)),
            Workload("chamfer_loss_one_view", "one view", cd(20, 7, views=1)),
            Workload("chamfer_general_pair", "per-point Chamfer of <= 64 points, fwd + bwd",
                     cd(40, 50)),
            Workload("chamfer_general", "per-point Chamfer, tiled (> 64 points), fwd + bwd",
                     cd(100, 70))]

    def patch_max(dtype, bn_relu=True):  # --fused-embed at the reference size: one view
        def run():
            x, w, b, add = (_meta(*shape, dtype=dtype)
                            for shape in ((8192 * 32, 512), (384, 512), (384,), (8192, 512)))
            bn = (add, _meta(512), _meta(512)) if bn_relu else None
            idx = T.patch_max_fwd(x, w, b, 32, bn)[1]
            T.patch_max_bwd(_meta(8192, 384, dtype=dtype), idx, x, w, 32, (True, True, True), bn)
        return run

    # (compile and spill check only: the cost report has no tensor-core model)
    out += [Workload("patch_max_bf16", "BatchNorm + ReLU + fc4 + patch max, fwd + bwd, bf16",
                     patch_max(_bf16())),
            Workload("patch_max_fp32", "the same in float32", patch_max(None)),
            Workload("patch_max_bf16_plain", "fc4 + patch max (no prologue), bf16",
                     patch_max(_bf16(), False))]

    def point_mlp(dtype):  # --fused-embed's first half at the reference size: one view
        def run():
            x, w1, b1, scale, shift = (_meta(*shape) for shape in
                                       ((8192 * 32, 3), (128, 3), (128,), (128,), (128,)))
            w2, b2 = _meta(256, 128, dtype=dtype), _meta(256, dtype=dtype)
            idx = T.point_mlp_fwd(x, w1, b1, scale, shift, w2, b2, 32)[2]
            T.point_mlp_bwd(_meta(8192 * 32, 256, dtype=dtype), _meta(8192, 256, dtype=dtype),
                            idx, x, w1, b1, scale, shift, w2, 32)
        return run

    out += [Workload("point_mlp_bf16", "fc1 + BatchNorm + ReLU + fc2 + patch max, fwd + bwd, "
                     "bf16", point_mlp(_bf16())),
            Workload("point_mlp_fp32", "the same in float32", point_mlp(None))]
    return out


def capture(w: Workload) -> list:
    from . import triton_ops as T

    with T.capture() as launches:
        w.run()
    return launches


_CACHE: dict = {}


def _spec_key(launch, arch: int) -> tuple:
    """Triton's own key for the compiled variant of a launch: its specialisation of the
    arguments and its launch options."""
    _, _, _, (_, spec, opts) = _bind(launch, arch)
    return launch.kernel.__name__, arch, repr(spec), repr(sorted(opts.items()))


def compile_cached(launch, arch: int) -> Compiled:
    key = _spec_key(launch, arch)
    if key not in _CACHE:
        _CACHE[key] = compile_launch(launch, arch)
    return _CACHE[key]


def report(ws: list[Workload] | None = None, arch: int = 90, dev: DeviceModel = H100) -> list[dict]:
    """One row per launch of every workload (plus a `total` row for workloads of several
    launches): the compiled resources and the estimate."""
    rows = []
    for w in ws or workloads():
        launches = capture(w)
        ests = [estimate(compile_cached(L, arch), L, w.name, dev) for L in launches]
        for e in ests:
            rows.append(dict(kernel=e.kernel, workload=w.name, arch=arch, regs=e.regs,
                             spills=e.spills, stack_bytes=e.stack_bytes,
                             shared_bytes=e.shared_bytes, num_warps=e.num_warps,
                             programs=e.programs, blocks_per_sm=e.blocks_per_sm,
                             instructions=round(e.instructions),
                             instructions_per_warp=round(e.instructions_per_warp),
                             issue_us=round(e.issue_us, 2), latency_us=round(e.latency_us, 2),
                             estimate_us=round(e.estimate_us, 2),
                             schedule_us=round(e.schedule_us, 2), l2_us=round(e.l2_us, 2),
                             calibrated_us=round(e.calibrated_us, 2), bound=e.bound,
                             target_us=w.target_us if len(ests) == 1 else None,
                             launches=1, what=w.what))
        if len(ests) > 1:
            rows.append(dict(kernel="total", workload=w.name, arch=arch,
                             regs=max(e.regs for e in ests), spills=sum(e.spills for e in ests),
                             stack_bytes=max(e.stack_bytes for e in ests),
                             shared_bytes=max(e.shared_bytes for e in ests), num_warps=None,
                             programs=sum(e.programs for e in ests), blocks_per_sm=None,
                             instructions=round(sum(e.instructions * e.programs for e in ests)),
                             instructions_per_warp=None,
                             issue_us=round(sum(e.issue_us for e in ests), 2),
                             latency_us=round(sum(e.latency_us for e in ests), 2),
                             estimate_us=round(sum(e.estimate_us for e in ests), 2),
                             schedule_us=round(sum(e.schedule_us for e in ests), 2),
                             l2_us=round(sum(e.l2_us for e in ests), 2),
                             calibrated_us=round(sum(e.calibrated_us for e in ests), 2),
                             bound=", ".join(dict.fromkeys(e.bound for e in ests)),
                             target_us=w.target_us, launches=len(ests), what=w.what))
    return rows


def format_table(rows: list[dict], dev: DeviceModel = H100) -> str:
    lines = [f"static estimate on {dev.name}, from the compiled SASS (an estimate, not a "
             "measurement); instructions: warp instructions per program (total row: all "
             "programs); est: full-rate issue vs latency; cal: calibrated (control bits, "
             "occupancy, waves; L2 bytes)",
             f"{'workload':<40} {'kernel':<22} {'regs':>4} {'spill':>5} {'warps':>5} "
             f"{'progs':>6} {'occ':>3} {'instr':>9} {'issue µs':>8} {'lat µs':>8} "
             f"{'est µs':>8} {'sched µs':>8} {'L2 µs':>7} {'cal µs':>8} {'target':>7} bound"]
    for r in rows:
        tgt = f"{r['target_us']:.0f}" if r.get("target_us") else "-"
        flag = "  OVER" if r.get("target_us") and r["estimate_us"] > r["target_us"] else ""
        lines.append(
            f"{r['workload']:<40} {r['kernel']:<22} {r['regs']:>4} {r['spills']:>5} "
            f"{r['num_warps'] or '-':>5} {r['programs']:>6} {r['blocks_per_sm'] or '-':>3} "
            f"{r['instructions']:>9} {r['issue_us']:>8.2f} {r['latency_us']:>8.2f} "
            f"{r['estimate_us']:>8.2f} {r['schedule_us']:>8.2f} {r['l2_us']:>7.2f} "
            f"{r['calibrated_us']:>8.2f} {tgt:>7} {r['bound']}{flag}")
    return "\n".join(lines)


def _check_rows(archs, part: int = 0, parts: int = 1, ws=None) -> list[dict]:
    rows, seen, k = [], set(), 0
    for w in ws or workloads() + sweep():
        for L in capture(w):
            for arch in archs:
                key = _spec_key(L, arch)
                if key in seen:
                    continue
                seen.add(key)
                k += 1
                if (k - 1) % parts != part:
                    continue
                row = dict(kernel=L.kernel.__name__, workload=w.name, arch=arch,
                           meta={k: v for k, v in L.meta.items() if k != "enable_fp_fusion"})
                try:
                    c = compile_cached(L, arch)
                    row.update(regs=c.regs, spills=c.spill_instructions, stack_bytes=c.stack_bytes,
                               shared_bytes=c.shared_bytes, error=None)
                    if c.spill_instructions or c.stack_bytes:
                        row["error"] = (f"spills: {c.spill_instructions} local-memory "
                                        f"instructions, {c.stack_bytes} B stack frame")
                except Exception as e:  # reported, not raised: every launch gets its row
                    row.update(regs=None, spills=None, stack_bytes=None, shared_bytes=None,
                               error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}")
                rows.append((k, row))
    return rows


def check(archs=(80, 90), jobs: int = 1, ws: list[Workload] | None = None) -> list[dict]:
    """Compile every distinct launch of the workloads and the sweep (or of `ws`) for every
    arch, in `jobs` processes: one row per (launch, arch) with its resources and `error` (a
    compile failure, or a register spill)."""
    if jobs <= 1 or ws is not None:
        parts = [_check_rows(archs, ws=ws)]
    else:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            parts = list(ex.map(_check_rows, [archs] * jobs, range(jobs), [jobs] * jobs))
    return [row for _, row in sorted((r for p in parts for r in p), key=lambda kr: kr[0])]


def versions(arch: int = 90) -> dict:
    """Triton, torch, and the ptxas Triton uses for sm_<arch> (its name and CUDA version)."""
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    return {"triton": triton.__version__, "torch": torch.__version__,
            "ptxas": f"{os.path.basename(tool.path)} {tool.version}"}


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m kernels.static",
        description="Compile every kernel launch for sm_80 and sm_90 without a GPU; exit 1 on a "
                    "compile error or a register spill. (The cost report is "
                    "`python -m kernels.bench --static`.)")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="compile in this many processes")
    args = ap.parse_args(argv)
    rows = check(tuple(args.arch), args.jobs)
    bad = [r for r in rows if r["error"]]
    if args.json:
        print(json.dumps({"versions": versions(), "rows": rows}))
    else:
        v = versions()
        print(f"compiled {len(rows)} launches for sm_{', sm_'.join(map(str, args.arch))} "
              f"(Triton {v['triton']}, {v['ptxas']})")
        for r in rows:
            status = r["error"] or f"{r['regs']} regs, no spill"
            print(f"  sm_{r['arch']} {r['kernel']:<22} {r['workload']:<40} {status}")
        print(f"{len(bad)} failed" if bad else "all compiled, no spills")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
