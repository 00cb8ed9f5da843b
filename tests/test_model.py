"""The PQAE model: decoupled views, VRPE, init, determinism, weights I/O, reference converter."""

from __future__ import annotations

import math

import pytest
import torch

from data_prep.convert_checkpoint import Args, main as convert
from pqae import PointPQAE
from pqae import checkpoint as ckpt
from pqae.model import crop_view, decoupled_view, vrpe


def small_model(**kw) -> PointPQAE:
    args = dict(dim=48, depth=2, heads=2, decoder_depth=1, num_group=8, group_size=8,
                embed_hidden=16)
    args.update(kw)
    return PointPQAE(**args)


def clouds(B=4, N=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 3, generator=g)
    return x / x.norm(dim=-1).amax(dim=1, keepdim=True)[..., None]


def test_crop_view_invariants():
    pts = clouds()
    torch.manual_seed(1)
    view, centre = crop_view(pts, 0.7)
    k = math.floor(256 * 0.7)
    assert view.shape == (4, k, 3) and centre.shape == (4, 3)
    # Per-axis min-max normalisation: every axis spans [-1, 1] (up to the 1e-6 guard).
    assert torch.allclose(view.amin(1), torch.full((4, 3), -1.0))
    assert torch.allclose(view.amax(1), torch.full((4, 3), 1.0), atol=1e-4)
    for b in range(4):
        # The crop is the k nearest points of the seed, which comes first; recover the cropped
        # points in the input frame and check them against a brute-force crop.
        d = (pts[b][:, None] - pts[b][None]).norm(dim=-1)  # (N, N)
        seed = None
        for s in range(256):
            chosen = d[s].topk(k, largest=False).indices
            crop = pts[b, chosen]
            lo, hi = crop.amin(0), crop.amax(0)
            if torch.allclose(2 * (pts[b, s] - lo) / (hi - lo + 1e-6) - 1, view[b, 0]) and \
                    torch.allclose((lo + hi) / 2, centre[b]):
                seed = s
                break
        assert seed is not None, "first point of the view is not a crop seed with that bbox"


def test_decoupled_view_rotates_about_y_only():
    pts = clouds()
    torch.manual_seed(3)
    cropped, c1 = crop_view(pts, 0.8)
    torch.manual_seed(3)
    view, c2 = decoupled_view(pts, 0.8)
    assert torch.equal(c1, c2)
    assert torch.allclose(view[..., 1], cropped[..., 1])  # y untouched
    assert torch.allclose(view[..., [0, 2]].norm(dim=-1), cropped[..., [0, 2]].norm(dim=-1),
                          atol=1e-5)
    assert not torch.allclose(view, cropped)


def test_no_crop_ablation_only_translates():
    pts = clouds()
    view, centre = crop_view(pts, 1.0)
    assert torch.allclose(view + centre[:, None], pts)
    assert torch.allclose(centre, (pts.amin(1) + pts.amax(1)) / 2)


def test_forward_offset_is_bbox_centre_difference(monkeypatch):
    model = small_model().eval()
    seen = {}
    monkeypatch.setattr(model, "group_views",
                        lambda v1, v2, off: seen.update(v1=v1, v2=v2, off=off) or ())
    monkeypatch.setattr(model, "forward_patches", lambda: {n: None for n in model.LOSSES})
    pts = clouds()
    torch.manual_seed(7)
    model(pts, crop_ratios=(0.6, 0.9))
    torch.manual_seed(7)
    _, c1 = decoupled_view(pts, 0.6)
    _, c2 = decoupled_view(pts, 0.9)
    assert seen["v1"].shape[1] == math.floor(256 * 0.6)
    assert seen["v2"].shape[1] == math.floor(256 * 0.9)
    assert torch.allclose(seen["off"], c2 - c1)


def test_vrpe_layout():
    center = torch.tensor([[[0.5, -0.25, 1.0]]])  # (1, 1, 3)
    offset = torch.tensor([[0.1, 0.2, -0.3]])
    e = vrpe(center, offset, 48)[0, 0]  # 4 freqs per coordinate
    omega = 1.0 / 10000 ** (torch.arange(4) / 4)
    coords = [0.5, -0.25, 1.0, 0.1, 0.2, -0.3]
    for i, u in enumerate(coords):
        assert torch.allclose(e[8 * i:8 * i + 4], torch.sin(u * omega))
        assert torch.allclose(e[8 * i + 4:8 * i + 8], torch.cos(u * omega))


def test_reference_init():
    torch.manual_seed(0)
    model = PointPQAE()
    w = torch.cat([model.decoder.blocks[0].mlp.fc1.weight.flatten(),
                   model.query_attn.kv.weight.flatten(), model.head.weight.flatten(),
                   model.encoder.blocks[11].attn.qkv.weight.flatten()])
    assert w.mean().item() == pytest.approx(0.02, abs=2e-4)  # N(0.02, 0.01^2), §2.8
    assert w.std().item() == pytest.approx(0.01, abs=2e-4)
    conv = model.encoder.patch_embed.fc3.weight  # a Conv1d in the reference: trunc-normal
    assert abs(conv.mean().item()) < 1e-3 and conv.std().item() == pytest.approx(0.02, abs=1e-3)
    assert model.encoder.blocks[0].attn.proj.bias.abs().sum() == 0
    assert model.encoder.cls_pos.std().item() == pytest.approx(0.02, abs=4e-3)


def test_forward_views_deterministic_in_eval_and_grads_flow():
    model = small_model()
    pts = clouds(B=3, N=128)
    torch.manual_seed(0)
    v1, c1 = decoupled_view(pts, 0.7)
    v2, c2 = decoupled_view(pts, 0.9)
    out = model.forward_views(v1, v2, c2 - c1)
    assert set(out) == {"loss_view1", "loss_view2", "loss"}
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []  # every parameter is trained (no find_unused_parameters needed)
    model.eval()
    a = model.forward_views(v1, v2, c2 - c1)
    torch.manual_seed(123)  # eval mode: no randomness left
    b = model.forward_views(v1, v2, c2 - c1)
    assert torch.equal(a["loss_view1"], b["loss_view1"]) and torch.equal(a["loss"], b["loss"])
    # Swapping the views swaps the two losses (one shared module per direction).
    c = model.forward_views(v2, v1, c1 - c2)
    assert torch.allclose(c["loss_view1"], a["loss_view2"])


def test_nan_input_is_a_clear_error():
    pts = clouds()
    pts[1, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="points"):
        small_model()(pts)


def test_safetensors_round_trip(tmp_path):
    model = small_model()
    model(clouds())["loss"].backward()  # update BatchNorm running stats
    path = ckpt.save_checkpoint(tmp_path / "ckpt", model, {"step": 3})
    state = ckpt.load_weights(path)
    assert state.keys() == model.state_dict().keys()
    other = small_model(depth=2)
    ckpt.load_strict(other, state)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    pts = clouds(seed=5)
    model.eval(), other.eval()
    torch.manual_seed(0)
    a = model(pts, crop_ratios=(0.7, 0.8))["loss"]
    torch.manual_seed(0)
    assert torch.equal(a, other(pts, crop_ratios=(0.7, 0.8))["loss"])
    with pytest.raises(KeyError, match=r"(?s)missing key\(s\): .*unexpected key\(s\): "):
        ckpt.load_strict(small_model(depth=1, decoder_depth=2), state)


def test_killed_during_swap_falls_back_to_previous(tmp_path):
    model = small_model()
    ckpt.save_checkpoint(tmp_path / "ckpt-last", model, {"step": 1})
    # A kill between the two renames leaves only the previous checkpoint, as `.old`.
    (tmp_path / "ckpt-last").rename(tmp_path / "ckpt-last.old")
    (tmp_path / "ckpt-last.tmp-1-0").mkdir()  # and a half-written new one
    found = ckpt.find_checkpoint(tmp_path / "ckpt-last")
    assert found == tmp_path / "ckpt-last.old" and ckpt.load_meta(found)["step"] == 1
    ckpt.save_checkpoint(tmp_path / "ckpt-last", model, {"step": 2})
    assert ckpt.load_meta(ckpt.find_checkpoint(tmp_path / "ckpt-last"))["step"] == 2
    assert not (tmp_path / "ckpt-last.tmp-1-0").exists()


def reference_layout(model: PointPQAE) -> dict[str, torch.Tensor]:
    """Our weights written out in the reference's layout (§2.12), key by key, independently of
    the converter's table: `module.` prefixes, Conv1d weights (out, in, 1), `blocks.blocks`,
    and the unused decoder_pos_embed."""
    s = model.state_dict()
    ref = {}
    convs = {"first_conv.0": "fc1", "first_conv.1": "bn1", "first_conv.3": "fc2",
             "second_conv.0": "fc3", "second_conv.1": "bn2", "second_conv.3": "fc4"}
    for theirs, ours in convs.items():
        for k, v in s.items():
            if k.startswith(f"encoder.patch_embed.{ours}."):
                leaf = k.split(".")[-1]
                ref[f"module.PQAE_encoder.encoder.{theirs}.{leaf}"] = \
                    v[..., None] if ours.startswith("fc") and leaf == "weight" else v
    for k, v in s.items():
        if k.startswith("encoder.pos_embed."):
            ref["module.PQAE_encoder.pos_embed." + {"fc1": "0", "fc2": "2"}[k.split(".")[2]]
                + "." + k.split(".")[-1]] = v
        elif k.startswith("encoder.blocks."):
            ref["module.PQAE_encoder.blocks." + k[len("encoder."):]] = v
        elif k.startswith(("encoder.norm.", "encoder.cls_")):
            ref["module.PQAE_encoder." + k[len("encoder."):]] = v
        elif k.startswith("decoder."):
            ref["module.PQ_decoder." + k[len("decoder."):]] = v
        elif k.startswith("query_attn."):
            ref["module.PQattn_contrast." + k[len("query_attn."):]] = v
        elif k.startswith("head."):
            ref["module.PQ_linear." + k[len("head."):]] = v
    ref["module.decoder_pos_embed.0.weight"] = torch.randn(128, 3)
    ref["module.decoder_pos_embed.2.weight"] = torch.randn(384, 128)
    return ref


def test_convert_reference_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    original = PointPQAE()
    ref = reference_layout(original)
    assert len(ref) == len(original.state_dict()) + 2
    src = tmp_path / "ckpt-epoch-300.pth"
    torch.save({"base_model": ref, "optimizer": {}, "epoch": 300,
                "metrics": {"acc": 0.0}, "best_metrics": {"acc": 0.0}}, src)
    convert(Args(str(src), str(tmp_path / "out.safetensors")))
    assert "dropped 2 unused reference keys" in capsys.readouterr().out
    state = ckpt.load_weights(tmp_path / "out.safetensors")
    fresh = PointPQAE()
    ckpt.load_strict(fresh, state)  # strict: no missing, no unexpected keys
    for k, v in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # An unknown key is an error that names it.
    ref["module.PQAE_encoder.mystery.weight"] = torch.zeros(1)
    torch.save({"base_model": ref}, src)
    with pytest.raises(KeyError, match="mystery"):
        convert(Args(str(src), str(tmp_path / "out2.safetensors")))


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    model = small_model()
    ckpt.save_checkpoint(tmp_path / "ckpt-last", model, {"step": 1})
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"head\.weight.*last good checkpoint"):
        ckpt.save_checkpoint(tmp_path / "ckpt-last", model, {"step": 2})
    assert ckpt.load_meta(tmp_path / "ckpt-last")["step"] == 1  # the good one is untouched
    assert torch.isfinite(ckpt.load_weights(tmp_path / "ckpt-last")["head.weight"]).all()


def test_train_mode_batchnorm_over_flattened_points_differs_by_rounding_only():
    """Our patch embedding normalises (P*M, C) rows; the reference normalises (P, C, M). Same
    statistic: in float64 the two agree to 1e-12. In float32 on the CPU, the reduction order
    makes ours ~6e-6 relative from the exact value (the reference's layout ~5e-7): rounding,
    bounded here at 2e-5, and it shrinks with float64."""
    import torch.nn.functional as F
    from pqae.model import PatchEmbed

    def reference_layout(mod, x):
        P, M, _ = x.shape

        def bn(bn_mod, h):  # BatchNorm1d over (P, C, M), as the reference's Conv1d layout
            t = h.reshape(P, M, -1).transpose(1, 2)
            t = F.batch_norm(t, None, None, bn_mod.weight, bn_mod.bias, True, 0.0, bn_mod.eps)
            return t.transpose(1, 2).reshape(P * M, -1)
        h = mod.fc2(F.relu(bn(mod.bn1, mod.fc1(x.reshape(P * M, 3))))).reshape(P, M, -1)
        h = torch.cat([h.amax(1, keepdim=True).expand(-1, M, -1), h], -1).reshape(P * M, -1)
        return mod.fc4(F.relu(bn(mod.bn2, mod.fc3(h)))).reshape(P, M, -1).amax(1)

    torch.manual_seed(0)
    m32 = PatchEmbed(96, 32).train()
    m64 = PatchEmbed(96, 32)
    m64.load_state_dict(m32.state_dict())
    m64 = m64.double().train()
    x = torch.randn(1024, 32, 3) * 0.2
    with torch.no_grad():
        exact = m64._forward(x.double())
        rel = lambda a: ((a.double() - exact).norm() / exact.norm()).item()  # noqa: E731
        assert rel(reference_layout(m64, x.double())) < 1e-12  # the same statistic
        ours, theirs = rel(m32._forward(x)), rel(reference_layout(m32, x))
    assert ours < 2e-5 and theirs < 2e-5, (ours, theirs)


def _concat_patch_embed(mod, x):
    """The reference's patch embedding as written: fc3 on concat(patch max, point feature),
    the maxima by torch.max (whose gradient goes to one of tied points, not split)."""
    import torch.nn.functional as F
    P, M, _ = x.shape
    h = mod.fc2(F.relu(mod.bn1(mod.fc1(x.reshape(P * M, 3))))).reshape(P, M, -1)
    h = torch.cat([torch.max(h, 1, keepdim=True)[0].expand(-1, M, -1), h], -1)
    return torch.max(mod.fc4(F.relu(mod.bn2(mod.fc3(h.reshape(P * M, -1))))).reshape(P, M, -1),
                     1)[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_split_fc3_equals_the_concatenation(dtype, tol):
    """fc3 applied to the two halves (the max's once per patch) is the reference's fc3 on the
    512-channel concatenation: train-mode output, every gradient (parameters and points) and
    the BatchNorm running statistics agree to rounding; eval mode too. Every patch holds a
    duplicated point (as resampled clouds do), so its maxima tie: their gradient goes to one
    point, as torch.max's in the reference (amax would split it)."""
    from pqae.model import PatchEmbed

    torch.manual_seed(0)
    ours = PatchEmbed(32, 16).to(dtype).train()
    ref = PatchEmbed(32, 16).to(dtype).train()
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(24, 16, 3) * 0.3).to(dtype)
    x[:, 5] = x[:, 2]
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = torch.randn(24, 32, dtype=dtype)
    a, b = ours._forward(xa), _concat_patch_embed(ref, xb)
    (a * w).sum().backward()
    (b * w).sum().backward()

    def close(u, v):
        return ((u - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() < tol

    assert close(a, b) and close(xa.grad, xb.grad)
    # gradients against the largest one: the biases before a BatchNorm (and fc2's, whose
    # shift passes the max and fc3 into bn2) have gradients that are zero up to rounding
    gmax = max(q.grad.abs().max() for q in ref.parameters())
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).abs().max() < tol * gmax, name
    for (name, s), t in zip(ours.named_buffers(), ref.buffers()):
        assert torch.equal(s, t) if s.dtype == torch.long else close(s, t), name
    with torch.no_grad():
        assert close(ours.eval()._forward(x), _concat_patch_embed(ref.eval(), x))
        # the halves the other way round give another map: the test would see a swap
        h2 = ours.fc3.weight.shape[1] // 2
        ours.fc3.weight.copy_(torch.cat([ours.fc3.weight[:, h2:], ours.fc3.weight[:, :h2]], 1))
        assert not close(ours._forward(x), _concat_patch_embed(ref, x))
