"""CUDA paths of pretraining and fine-tuning: skipped without a GPU (CI), run them on one with
`python -m pytest -q tests/test_gpu.py`. (The Triton kernels themselves are compared with
their references on the GPU by tests/test_kernels.py when CUDA is available.)"""

from __future__ import annotations

import math

import pytest
import torch

import finetune_cls
import pretrain
from conftest import small_pretrain_config
from test_finetune_cls import small_config as small_finetune_config
from pqae import data, dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_second_step_does_not_sync(step, perm) -> None:
    """Step 0 warms up (Triton compilation, allocator); step 1 runs with CUDA's sync debug mode
    set to error, where any implicit host-device synchronisation raises."""
    step(0, perm)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1, perm)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_compiled_pretraining_on_triton_kernels(tmp_path):
    cfg = small_pretrain_config(tmp_path, device="cuda", amp=True, compile=True, max_steps=8,
                                warmup_epochs=0)
    result = pretrain.main(cfg)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert next(result["model"].parameters()).is_cuda


def test_training_step_does_not_synchronise(tmp_path):
    """The step pretrain.py runs on a GPU (NaN guard off, Triton kernels) with CUDA's sync
    debug mode set to error: any implicit host-device synchronisation raises."""
    cfg = small_pretrain_config(tmp_path, device="cuda")
    env = dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
    model, train_model, optimizer = pretrain.build_training(cfg, env)
    assert model.check_inputs is False
    clouds = data.procedural_shapes(cfg.procedural_shapes, 512).cuda()
    perm = pretrain.epoch_perm(cfg.seed, 0, len(clouds), env.device)
    step = pretrain.make_train_step(cfg, model, train_model, optimizer, clouds, env)
    assert_second_step_does_not_sync(step, perm)


def assert_same_training(runs: dict, amp: bool) -> None:
    """runs[graph] = (losses, state_dict) without and with --cuda-graph: the same, to the
    rounding of kernels that may differ between a replay and an eager launch."""
    (le, we), (lg, wg) = runs[False], runs[True]
    tol = dict(rtol=1e-4, atol=1e-5) if amp else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(lg), torch.tensor(le), **tol)
    for k in we:
        torch.testing.assert_close(wg[k].float(), we[k].float(), **tol, msg=k)


@pytest.mark.parametrize("amp,compile,fused", [(False, False, False), (True, True, False),
                                               (True, True, True)])
def test_captured_step_equals_the_eager_step(tmp_path, amp, compile, fused):
    """--cuda-graph on the GPU: 3 eager warm-up steps, the capture, then replays; 10 steps
    (a new crop ratio each) give the eager step's losses and weights, and replay from a graph;
    also with --fused-embed (its Triton kernels and BatchNorm statistics inside the graph)."""
    runs = {}
    for g in (False, True):
        cfg = small_pretrain_config(tmp_path / str(g), device="cuda", amp=amp, compile=compile,
                                    max_steps=10, warmup_epochs=0, cuda_graph=g,
                                    fused_embed=fused)
        env = dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
        model, train_model, optimizer = pretrain.build_training(cfg, env)
        clouds = data.procedural_shapes(cfg.procedural_shapes, 512).cuda()
        perm = pretrain.epoch_perm(cfg.seed, 0, len(clouds), env.device)
        step = pretrain.make_train_step(cfg, model, train_model, optimizer, clouds, env)
        losses = [step(i, perm)["loss"].item() for i in range(10)]
        assert (step.captured is not None and step.captured.captured) == g
        runs[g] = losses, model.state_dict()
    assert_same_training(runs, amp)


def test_captured_step_replays_a_graph_without_host_syncs(tmp_path):
    cfg = small_pretrain_config(tmp_path, device="cuda", cuda_graph=True)
    env = dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
    model, train_model, optimizer = pretrain.build_training(cfg, env)
    clouds = data.procedural_shapes(cfg.procedural_shapes, 512).cuda()
    perm = pretrain.epoch_perm(cfg.seed, 0, len(clouds), env.device)
    step = pretrain.make_train_step(cfg, model, train_model, optimizer, clouds, env)
    for i in range(4):  # 3 eager warm-ups, the 4th captures and replays
        step(i, perm)
    assert step.captured.captured
    assert_second_step_does_not_sync(step, perm)  # steps 0 and 1 again: replays


@pytest.mark.parametrize("amp,compile", [(False, False), (True, True)])
def test_fused_embed_step_matches_the_plain_step(tmp_path, amp, compile):
    """--fused-embed on the GPU: its Triton kernels pass their check at first use, and 10
    steps give the plain patch embedding's losses (float32: to rounding; bf16: as two bf16
    paths agree, points tying once rounded may pass the max's gradient to another)."""
    from kernels import verify

    runs = {}
    for fused in (False, True):
        cfg = small_pretrain_config(tmp_path / str(fused), device="cuda", amp=amp,
                                    compile=compile, max_steps=10, warmup_epochs=0,
                                    fused_embed=fused)
        env = dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
        model, train_model, optimizer = pretrain.build_training(cfg, env)
        clouds = data.procedural_shapes(cfg.procedural_shapes, 512).cuda()
        perm = pretrain.epoch_perm(cfg.seed, 0, len(clouds), env.device)
        step = pretrain.make_train_step(cfg, model, train_model, optimizer, clouds, env)
        runs[fused] = torch.tensor([step(i, perm)["loss"].item() for i in range(10)])
    for op in ("patch_max", "point_mlp"):
        assert op not in verify.summary()["fallback"]
        assert any(op in k for k in verify.summary()["variants"])
    tol = dict(rtol=2e-2, atol=1e-3) if amp else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(runs[True], runs[False], **tol)


@pytest.mark.parametrize("amp,compile", [(False, False), (True, True)])
def test_captured_finetuning_step_equals_the_eager_step(tmp_path, amp, compile):
    """finetune_cls.py --cuda-graph on the GPU: 10 steps (3 eager warm-ups, the capture,
    replays) give the eager step's losses and weights."""
    runs = {}
    for g in (False, True):
        cfg = small_finetune_config(tmp_path / str(g), device="cuda", amp=amp, compile=compile,
                                    cuda_graph=g)
        env = dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
        model, train_model, optimizer = finetune_cls.build_training(cfg, env)
        points, labels = data.procedural_classes(64, cfg.procedural_points, num_classes=3)
        points, labels = points.cuda(), labels.cuda()
        perm = finetune_cls.epoch_perm(cfg.seed, 0, len(points), env.device)
        step = finetune_cls.make_train_step(cfg, model, train_model, optimizer, points, labels,
                                            env)
        losses = [step(i, perm)[0].item() for i in range(10)]
        assert (step.captured is not None and step.captured.captured) == g
        runs[g] = losses, model.state_dict()
    assert_same_training(runs, amp)


def test_benchmark_mode_on_gpu(tmp_path):
    results = pretrain.main(small_pretrain_config(tmp_path, device="cuda", amp=True,
                                                  benchmark_steps=3))
    fast, plain = results["this config"], results["plain PyTorch fp32"]
    assert fast["backend"] == "auto" and plain["backend"] == "reference"
    assert fast["peak_gib"] > 0 and fast["phases_ms"]["grouping"] > 0
    assert fast["phases_time"] == "GPU kernel time"
    # new view sizes every step compile no new Triton variant inside the timed steps
    assert fast["compiled_in_timed_steps"] == [] and plain["compiled_in_timed_steps"] == []


def test_bf16_compiled_finetuning_on_triton_kernels(tmp_path):
    cfg = small_finetune_config(tmp_path, device="cuda", amp=True, compile=True)
    result = finetune_cls.main(cfg)
    assert result["best_acc"] >= 55 and next(result["model"].parameters()).is_cuda


@pytest.mark.parametrize("overrides", [{}, {"fast_point_all": True, "num_points": 256}])
def test_finetuning_step_does_not_synchronise(tmp_path, overrides):
    cfg = small_finetune_config(tmp_path, device="cuda", amp=True, **overrides)
    env = dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
    model, train_model, optimizer = finetune_cls.build_training(cfg, env)
    assert model.check_inputs is False and optimizer.defaults["fused"] is True
    points, labels = data.procedural_classes(64, cfg.procedural_points, num_classes=3)
    points, labels = points.cuda(), labels.cuda()
    perm = finetune_cls.epoch_perm(cfg.seed, 0, len(points), env.device)
    step = finetune_cls.make_train_step(cfg, model, train_model, optimizer, points, labels, env)
    assert_second_step_does_not_sync(step, perm)


def test_finetune_benchmark_mode_on_gpu(tmp_path):
    results = finetune_cls.main(small_finetune_config(tmp_path, device="cuda", amp=True,
                                                      benchmark_steps=3))
    fast = results["this config"]
    assert fast["backend"] == "auto" and fast["peak_gib"] > 0 and fast["phases_ms"]["grouping"] > 0
    assert fast["compiled_in_timed_steps"] == []
