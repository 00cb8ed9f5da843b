"""--cuda-graph on CPU: the split step (views and grouping eager, the rest a CapturedStep) is
the step pretrain.py runs eagerly; the captured step's buffers, optimizer and checkpoints.
(tests/test_gpu.py checks the graph itself against the eager step on a GPU.)"""

from __future__ import annotations


import pytest
import torch

import finetune_cls
import pretrain
from conftest import ROOT, small_pretrain_config, torchrun_two
from test_finetune_cls import small_config as small_finetune_config
from pqae import checkpoint as ckpt
from pqae import graphs
from pqae.errors import BadInput
from pqae.optim import param_groups, set_epoch_lr


def test_cuda_graph_step_is_the_eager_step_and_resumes(tmp_path):
    """12 steps over 3 epochs (the lr changes each epoch) with and without --cuda-graph: the
    same losses and weights, bit for bit; and a --cuda-graph run stopped at step 5 and
    resumed ends where the uninterrupted one does."""
    eager = pretrain.main(small_pretrain_config(tmp_path / "a"))
    graph = pretrain.main(small_pretrain_config(tmp_path / "b", cuda_graph=True))
    assert graph["step"] == eager["step"] == 12
    assert graph["history"] == eager["history"]
    a, b = eager["model"].state_dict(), graph["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pretrain.main(small_pretrain_config(tmp_path / "c", cuda_graph=True, max_steps=5))
    resumed = pretrain.main(small_pretrain_config(tmp_path / "c", cuda_graph=True, resume=True))
    assert resumed["history"] == eager["history"]
    r = resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], r[k]), k


@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_step_is_the_eager_step_under_amp(tmp_path, fused):
    """Under bf16 autocast too: both paths cast each use of a weight (no autocast cache, which
    a capture cannot have), so the two views' weight gradients meet in float32 in both; and
    with --fused-embed (its ops and BatchNorm statistics in the captured part)."""
    runs = [pretrain.main(small_pretrain_config(tmp_path / str(g), amp=True, max_steps=5,
                                                warmup_epochs=0, cuda_graph=g,
                                                fused_embed=fused))
            for g in (False, True)]
    assert runs[0]["history"] == runs[1]["history"]
    for k, v in runs[0]["model"].state_dict().items():
        assert torch.equal(v, runs[1]["model"].state_dict()[k]), k


def test_cuda_graph_step_returns_what_the_loop_reads(tmp_path):
    """The captured step's outputs carry the losses and what logging and the collapse check
    read (views, patches, centres, predictions), whatever return_outputs says."""
    cfg = small_pretrain_config(tmp_path, cuda_graph=True)
    env = pretrain.dist.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    model, train_model, optimizer = pretrain.build_training(cfg, env)
    assert train_model is model  # no DDP wrapper: the gradients are averaged in the step
    clouds = pretrain.data.procedural_shapes(cfg.procedural_shapes, 512)
    perm = pretrain.epoch_perm(cfg.seed, 0, len(clouds), env.device)
    step = pretrain.make_train_step(cfg, model, train_model, optimizer, clouds, env)
    assert isinstance(step.captured, graphs.CapturedStep)  # on a CPU: run as is, no graph
    out = step(0, perm)
    assert not step.captured.captured
    for name in ("loss", "loss_view1", "loss_view2", "view1", "view2", "neighborhood1",
                 "center1", "pred1", "neighborhood2", "center2", "pred2"):
        assert name in out, name
    assert out["pred1"].shape == out["neighborhood1"].shape == (16, 16, 16, 3)
    assert torch.isfinite(out["loss"]) and out["loss"] == out["loss_view1"] + out["loss_view2"]


@pytest.mark.parametrize("amp,head", [(False, "full"), (True, "full"), (False, "linear")])
def test_finetune_cuda_graph_step_is_the_eager_step(tmp_path, amp, head):
    """finetune_cls.py --cuda-graph: the whole step but the batch-wide subset's draw is one
    CapturedStep (on a CPU, the same function run as is): the eager step's training losses,
    test accuracies and weights, bit for bit, over 3 epochs (new learning rates)."""
    runs = [finetune_cls.main(small_finetune_config(tmp_path / str(g), amp=amp, head=head,
                                                    epochs=3, cuda_graph=g))
            for g in (False, True)]
    assert [h["train_loss"] for h in runs[0]["history"]] == \
        [h["train_loss"] for h in runs[1]["history"]]
    assert runs[0]["history"] == runs[1]["history"] and runs[0]["best_acc"] == runs[1]["best_acc"]
    for k, v in runs[0]["model"].state_dict().items():
        assert torch.equal(v, runs[1]["model"].state_dict()[k]), k


def test_cuda_graph_needs_one_micro_batch(tmp_path):
    with pytest.raises(BadInput, match="--accum-steps 1"):
        pretrain.main(small_pretrain_config(tmp_path, cuda_graph=True, accum_steps=2))
    with pytest.raises(BadInput, match="--accum-steps 1"):
        finetune_cls.main(small_finetune_config(tmp_path / "ft", cuda_graph=True,
                                                accum_steps=2))


def test_captured_step_copies_inputs_into_fixed_buffers():
    seen = []

    def fn(x, y):
        seen.append((x.data_ptr(), y.data_ptr()))
        return {"s": x.sum() + y.sum()}

    step = graphs.CapturedStep(fn, torch.device("cpu"))
    x, y = torch.ones(4, 3), torch.zeros(2)
    assert step(x, y)["s"].item() == 12
    x.fill_(2)  # the caller's tensors are copied, not kept
    assert step(torch.full((4, 3), 3.0), torch.ones(2))["s"].item() == 38
    assert seen[0] == seen[1]  # the same buffers on every call, as a graph's
    assert seen[0][0] != x.data_ptr()
    with pytest.raises(ValueError, match="keep their shapes and dtypes"):
        step(torch.ones(5, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="keep their shapes and dtypes"):
        step(torch.ones(4, 3, dtype=torch.float64), torch.zeros(2))


def test_graph_learning_rates_are_set_in_place_and_saved_as_floats(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    for g in opt.param_groups:  # as prepare_optimizer leaves them on a GPU
        g["lr"], g["capturable"] = torch.tensor(float(g["lr"])), True
    tensors = [g["lr"] for g in opt.param_groups]
    lr = set_epoch_lr(opt, 3, 1e-3, 10, 2)
    assert [g["lr"] for g in opt.param_groups] == tensors  # the same tensors, a graph reads
    assert all(t.item() == pytest.approx(lr) for t in tensors)
    state = graphs.portable_state(opt)
    assert all(type(g["lr"]) is float and g["capturable"] is False
               for g in state["param_groups"])
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)  # untouched
    fresh = torch.optim.AdamW(param_groups(model, 0.05), lr=5.0)
    ckpt.load_optimizer(fresh, state, "test")
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([t.item() for t in tensors])
    graphs.prepare_optimizer(fresh, torch.device("cpu"))  # nothing to do without a GPU
    assert type(fresh.param_groups[0]["lr"]) is float


def test_two_process_cuda_graph_run_averages_gradients_as_ddp(tmp_path):
    """Under torchrun, --cuda-graph averages the gradients itself (one all-reduce of a flat
    copy, capturable) instead of DDP's hooks: the same weights on both ranks, and the DDP
    run's weights to float32 rounding."""
    script = tmp_path / "graph_ddp.py"
    script.write_text(
        "import sys, os\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import pretrain\n"
        "from pathlib import Path\n"
        "from conftest import small_pretrain_config\n"
        "from pqae.checkpoint import save_weights\n"
        "rank = int(os.environ['RANK'])\n"
        f"root = Path({str(tmp_path)!r})\n"
        "for g in (False, True):\n"
        "    cfg = small_pretrain_config(root / str(g), max_steps=4, cuda_graph=g)\n"
        "    model = pretrain.main(cfg)['model']\n"
        "    save_weights(root / f'{g}-rank{rank}.safetensors',\n"
        "                 {k: p.detach() for k, p in model.named_parameters()})\n")
    torchrun_two(script)
    w = {(g, r): ckpt.load_weights(tmp_path / f"{g}-rank{r}.safetensors")
         for g in (False, True) for r in (0, 1)}
    for k in w[True, 0]:
        assert torch.equal(w[True, 0][k], w[True, 1][k]), k
        torch.testing.assert_close(w[True, 0][k], w[False, 0][k], rtol=1e-5, atol=1e-6)
