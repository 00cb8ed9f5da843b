"""kernels.static: every Triton kernel compiled for sm_80 and sm_90 without a GPU (no spills),
the SASS reader behind the cost model, and `python -m kernels.bench --static`.

Compiled Triton cannot be imported in this process (the kernel tests run the interpreter,
which Triton picks at import time), so the compiling checks run in a subprocess without
TRITON_INTERPRET."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernels import static as S

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def _python(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _snippet(code: str):
    out = _python("-c", textwrap.dedent(code))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def check():
    out = _python("-m", "kernels.static", "--json", "--jobs", "2")
    assert out.stdout, out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)


@pytest.fixture(scope="module")
def report():
    out = _python("-m", "kernels.bench", "--static", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_launch_compiles_for_sm80_and_sm90_without_spills(check):
    rc, d = check
    rows = d["rows"]
    assert rc == 0, [r for r in rows if r["error"]]
    assert all(r["error"] is None and r["spills"] == 0 and r["stack_bytes"] == 0 for r in rows)
    for arch in (80, 90):
        kernels = {r["kernel"] for r in rows if r["arch"] == arch}
        assert kernels == {"_fps_kernel", "_knn_kernel", "_cd_loss_kernel", "_nn_fwd_pair_kernel",
                           "_nn_fwd_kernel", "_nn_bwd_kernel", "_patch_max_fwd_kernel",
                           "_patch_max_dx_kernel", "_patch_max_dw_kernel", "_sum_parts_kernel",
                           "_mlp_fwd_kernel", "_mlp_dh_kernel", "_mlp_dw_kernel"}
    names = {r["workload"] for r in rows}
    assert {"group_pretrain_both_views", "chamfer_pretrain_both_views_fwd_bwd",
            "chamfer_pretrain_both_views_fwd_bwd_bf16", "fps_finetune_2048",
            "group_finetune_2048", "group_modelnet8k", "knn_partseg_propagate",
            "patch_max_bf16", "patch_max_fp32", "patch_max_bf16_plain", "point_mlp_bf16",
            "point_mlp_fp32"} <= names
    # FPS up to FPS_MAX_N, in both variants (coordinates carried / reloaded)
    fps = [r["meta"] for r in rows if r["kernel"] == "_fps_kernel"]
    assert max(m["BLOCK"] for m in fps) == 8192
    assert {m["CARRY"] for m in fps} == {True, False}
    knn = [r["meta"] for r in rows if r["kernel"] == "_knn_kernel"]
    assert {m["CHUNKED"] for m in knn} == {True, False}
    assert {m["K"] for m in knn} >= {1, 3, 32, 64}
    assert d["versions"]["triton"]


def test_check_reports_spills_and_compile_errors():
    """Negative controls: FPS at 16384 points (twice FPS_MAX_N) spills, and a kernel that does
    not compile is a row with its error, not a crash."""
    rows = _snippet("""
        import json
        from kernels import static as S, triton_ops as T
        T.FPS_MAX_N = 16384
        big = S.Workload("big", "", lambda: T.fps(S._meta(1, 16384, 3), 2))
        bad = S.Workload("bad", "", lambda: T._launch(T._fps_kernel, (1,), *([S._meta(1, 8, 3)] * 5),
                         1, 8, 8, 2, BLOCK=12, CARRY=True, WRITE_CENTER=False, WRITE_SOA=False))
        print(json.dumps(S.check((90,), 1, [big, bad])))
    """)
    assert "spills" in rows[0]["error"] and rows[0]["spills"] > 0
    assert rows[1]["error"] and "spill" not in rows[1]["error"]


def test_cost_model_counts_loop_trips_and_branches():
    """Instructions grow exactly linearly with FPS's picks (its loop runs M - 1 times); the
    kNN's overflow branch costs nothing at multiplier 0 and its K extract-min passes at 1; a
    loop without a trip count is an error."""
    d = _snippet("""
        import json
        from kernels import static as S, triton_ops as T
        def est(run, **trips):
            w = S.Workload("w", "", run)
            L = S.capture(w)[0]
            L = L._replace(trips={**L.trips, **trips})
            return S.estimate(S.compile_cached(L, 90), L, "w")
        fps = [est(lambda m=m: T.fps(S._meta(128, 1023, 3), m)).instructions_per_warp
               for m in (9, 17, 33)]
        knn = lambda: T.knn(S._meta(4, 64, 3), S._meta(4, 1000, 3), 32)
        base, over = est(knn), est(knn, overflow=1)
        err = None
        w = S.Workload("w", "", lambda: T.fps(S._meta(2, 100, 3), 9))
        L = S.capture(w)[0]
        try:
            S.estimate(S.compile_cached(L, 90), L._replace(trips={}), "w")
        except S.CostModelError as e:
            err = str(e)
        print(json.dumps(dict(fps=fps, base=base.instructions, over=over.instructions, err=err,
                              base_lat=base.latency_us, base_issue=base.issue_us)))
    """)
    a, b, c = d["fps"]
    assert b - a > 8 * 50 and c - b == 2 * (b - a)  # > 50 instructions per pick and warp
    assert d["over"] > d["base"] + 32 * 100  # K passes of at least 100 instructions
    assert "picks" in d["err"]
    assert d["base_issue"] > 0 and d["base_lat"] > 0


def test_view_sizes_share_one_compiled_variant():
    """A pretraining view has 614..1023 points, a new size every step. Triton would compile a
    second variant of a kernel the first time a size is a multiple of 16; the point counts are
    not specialised, so every view size runs the variant compiled at the first step."""
    d = _snippet("""
        import json
        from kernels import static as S, triton_ops as T
        def specs(n1, n2):
            w = S.Workload("w", "", lambda: T.group_views([S._meta(128, n1, 3), S._meta(128, n2, 3)], 64, 32))
            return [repr(S.specialization(L)) for L in S.capture(w)]
        print(json.dumps([specs(*n) for n in ((801, 777), (800, 816), (1023, 614), (1024, 1008))]))
    """)
    assert all(s == d[0] for s in d[1:])


def test_static_report(report):
    """`python -m kernels.bench --static --json`: the rows the issue names, each with the
    compiled resources and an estimate, within its target where it has one."""
    assert "H100" in report["device_model"]
    rows = report["rows"]
    for name in ("fps_pretrain_view", "knn_pretrain_view", "chamfer_pretrain_both_views_fwd_bwd",
                 "fps_finetune_2048", "group_modelnet8k"):
        assert any(r["workload"] == name for r in rows), name
    for r in rows:
        assert {"kernel", "workload", "regs", "spills", "instructions", "estimate_us"} <= set(r)
        assert r["regs"] > 0 and r["spills"] == 0 and r["instructions"] > 0
        assert r["estimate_us"] == max(r["issue_us"], r["latency_us"]) or r["kernel"] == "total"
        if r["target_us"]:
            assert r["estimate_us"] <= r["target_us"], r
    for r in rows:  # the calibrated estimate: control bits, occupancy, waves and L2 bytes
        assert r["calibrated_us"] == pytest.approx(max(r["schedule_us"], r["l2_us"]), abs=0.02) \
            or r["kernel"] == "total"
        assert r["schedule_us"] >= 0.9 * r["issue_us"] and r["l2_us"] > 0, r
    by = {(r["workload"], r["kernel"]): r for r in rows}
    # kNN reads its whole cloud per query from L2; FPS's picks are a dependency chain
    assert by["knn_pretrain_view", "_knn_kernel"]["bound"] == "L2 bytes"
    assert by["fps_finetune_2048", "_fps_kernel"]["bound"] == "issue + latency"
    # the pretraining grouping: one FPS and one kNN launch for both views
    assert [r["kernel"] for r in rows if r["workload"] == "group_pretrain_both_views"] == [
        "_fps_kernel", "_knn_kernel", "total"]
    assert by["chamfer_pretrain_both_views_fwd_bwd", "_cd_loss_kernel"]["launches"] == 1


# ------------------------------------------------------------------ the SASS reader (no compile)
SASS = """
        .text._k:
	//## File "/src/k.py", line 10
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0020*/               @P0 EXIT ;
	//## File "/lib/std.py", line 5 inlined at "/src/k.py", line 12
	//## File "/src/k.py", line 12
.L_x_0:
        /*0030*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0040*/                   FADD R3, R2, R2 ;
        /*0050*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0060*/                   ISETP.NE.AND P1, PT, R0, 0x20, PT ;
        /*0070*/               @P1 BRA `(.L_x_0) ;
	//## File "/src/k.py", line 14
        /*0080*/                   STG.E desc[UR4][R4.64], R3 ;
        /*0090*/                   EXIT ;
.L_x_1:
        /*00a0*/                   BRA `(.L_x_1);
"""


def test_sass_reader_blocks_loops_and_lines():
    ins = S.parse_sass(SASS)
    assert [i.base for i in ins] == ["S2R", "ISETP", "EXIT", "LDG", "FADD", "IADD3", "ISETP",
                                     "BRA", "STG", "EXIT", "BRA"]
    assert ins[7].target == 0x30 and ins[7].pred == "@P1"
    assert (ins[3].file, ins[3].line, ins[3].at_file) == ("/src/k.py", 12, None)  # outermost
    blocks = S.basic_blocks(ins)
    assert [(b.start, b.end) for b in blocks] == [(0, 3), (3, 8), (8, 10), (10, 11)]
    assert blocks[0].succ == [1] and sorted(blocks[1].succ) == [1, 2]
    live = S._reachable(blocks)
    assert live == {0, 1, 2}  # the padding loop after EXIT is dead
    assert [(lp.head, lp.tail) for lp in S.find_loops(blocks, live)] == [(1, 1)]
    d, s = S._dests_and_sources(ins[6])
    assert d == ["P1"] and s == ["R0"]  # (PT, the second predicate output, is discarded)
    d, s = S._dests_and_sources(ins[8])
    assert d == [] and set(s) == {"R4", "R3", "UR4"}


def test_chain_waits_for_loads_and_issues_independent_work():
    ins = S.parse_sass(SASS)
    dependent = S._Chain().run(ins[3:5])  # FADD waits for the LDG (40 cycles)
    independent = S._Chain().run([ins[3], ins[5]])  # IADD3 does not
    assert dependent == 1 + S.LATENCY["LDG"] and independent == 2  # one issue cycle each


# sm_90 SASS as `nvdisasm -hex` prints it: the second 64-bit word of each instruction holds
# its control bits (ptxas's, from a compiled kNN kernel)
SASS_HEX = """
        /*0000*/                   UMOV UR5, URZ ;                 /* 0x0000003f00057c82 */
                                                                   /* 0x000fe20008000000 */
        /*0010*/                   S2UR UR4, SR_CTAID.X ;          /* 0x00000000000479c3 */
                                                                   /* 0x000e620000002500 */
        /*0020*/                   LDG.E R2, desc[UR14][R6.64] ;   /* 0x0000000e06027981 */
                                                                   /* 0x000ee2000c1e1900 */
        /*0030*/                   ULDC.64 UR14, c[0x0][0x208] ;   /* 0x00008200000e7ab9 */
                                                                   /* 0x000fc80000000a00 */
"""


def test_control_bits_are_read_from_the_hex_words():
    ins = S.parse_sass(SASS_HEX)
    assert [i.base for i in ins] == ["UMOV", "S2UR", "LDG", "ULDC"]
    # (stall, write scoreboard, read scoreboard, wait mask): UMOV 1 cycle; S2UR and the load
    # release scoreboards 1 and 3 when their results arrive; ULDC stalls 4 cycles
    assert [S.control(i) for i in ins] == [(1, 7, 7, 0), (1, 1, 7, 0), (1, 3, 7, 0),
                                           (4, 7, 7, 0)]
    assert S.control(S.parse_sass(SASS)[0]) == (1, 7, 7, 0)  # no -hex: one cycle each


def _instr(op: str, stall: int, wr: int = 7, wait: int = 0) -> S.Instr:
    i = S.Instr(0, op, "", "", None, None, None, None)
    i.ctrl = stall | wr << 5 | 7 << 8 | wait << 11
    return i


def test_scheduler_interleaves_warps_within_stalls_and_scoreboards():
    """Stall counts limit one warp (2 cycles per half-rate op), other warps fill the gaps, a
    scoreboard wait costs the producer's latency once per warp and overlaps across warps."""
    half = [_instr("FSEL", 2) for _ in range(10)]
    one = sum(S.schedule(half, [0] * 10, warps=1))
    two = sum(S.schedule(half, [0] * 10, warps=2))
    assert one == 19 and two == 20  # 2 warps fill each other's stall cycles
    load = [_instr("LDG.E", 1, wr=0), _instr("FADD", 1, wait=1)]
    assert sum(S.schedule(load, [0, 0], warps=1)) == 1 + S.LATENCY["LDG"]
    assert sum(S.schedule(load, [0, 0], warps=4)) == 4 + S.LATENCY["LDG"]  # overlapped
    # a loop body's steady state: the second pass is charged, per block
    cyc = S.schedule(load, [0, 1], warps=1, passes=2)
    assert cyc == [1.0, S.LATENCY["LDG"]]


def test_line_table_of_a_cached_cubin_from_another_checkout_still_maps():
    """Triton's cache serves a cubin compiled in one checkout to another with the same source:
    its line table names the first checkout's path, which must still count as the kernel's."""
    assert S._same_file("/elsewhere/repo/kernels/triton_ops.py", "/work/main/kernels/triton_ops.py")
    assert not S._same_file("/x/triton/language/standard.py", "/work/main/kernels/triton_ops.py")
    assert not S._same_file(None, "/work/main/kernels/triton_ops.py")
