"""The five scripts' command lines: documented fields, saved configs, checkpoints that carry
their architecture, flags that mean what they say, errors without tracebacks."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fewshot
import finetune_cls
import partseg
import pretrain
import semseg
from conftest import ROOT
from pqae import checkpoint as ckpt
from pqae import lock
from pqae.cli import explicit_fields, parse
from pqae.errors import BadInput, UserError
from pqae.model import EncoderShape, PointPQAE
from pqae.run import RunOptions

SCRIPTS = {"pretrain.py": pretrain, "finetune_cls.py": finetune_cls, "fewshot.py": fewshot,
           "partseg.py": partseg, "semseg.py": semseg}


def class_docstrings(cls: type) -> dict[str, str | None]:
    """Each field annotated in `cls`'s own body and the string literal right after it (or None)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    out, body = {}, tree.body[0].body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            nxt = body[i + 1] if i + 1 < len(body) else None
            doc = (nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                   and isinstance(nxt.value.value, str) else None)
            out[node.target.id] = doc
    return out


def field_docstrings(cls: type) -> dict[str, str | None]:
    """Each field of a Config and its docstring as --help shows it: that of the first class in
    the method resolution order that documents it (a Config may redeclare an inherited field
    to change its default only)."""
    found: dict[str, str | None] = {}
    for klass in cls.__mro__[:-1]:
        for name, doc in class_docstrings(klass).items():
            if found.get(name) is None:
                found[name] = doc
    return found


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_field_is_documented_without_outside_citations(script):
    config = SCRIPTS[script].Config
    docs = field_docstrings(config)
    assert set(docs) == {f.name for f in dataclasses.fields(config)}
    missing = [name for name, doc in docs.items() if not doc]
    assert not missing, f"{script}: fields without a docstring: {missing}"
    first_line = SCRIPTS[script].__doc__.splitlines()[0]
    for text in [first_line, *docs.values()]:
        assert "§" not in text and "SPEC" not in text, text


@pytest.mark.parametrize("script", ["pretrain.py", "finetune_cls.py", "partseg.py", "semseg.py"])
def test_training_scripts_share_the_run_options(script):
    """The run options are one set of fields with one docstring each, listed after the
    script's own fields, so that --help shows first what a user of this task sets."""
    config = SCRIPTS[script].Config
    assert issubclass(config, RunOptions)
    names = [f.name for f in dataclasses.fields(config)]
    shared = [f.name for f in dataclasses.fields(RunOptions)]
    assert names[-len(shared):] == shared, names
    own = class_docstrings(config)
    assert all(doc is None for name, doc in own.items() if name in shared), own
    help_text = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT,
                               capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    options = help_text[help_text.index("-h, --help"):]  # the description names --seed too
    assert options.index("--data ") < options.index("--seed ") < options.index("--device ")
    # The encoder's shape: the fields a checkpoint carries, alike in every script.
    assert issubclass(config, EncoderShape)
    assert tuple(f.name for f in dataclasses.fields(EncoderShape)) == ckpt.ENCODER_FIELDS
    assert names[-len(shared) - len(ckpt.ENCODER_FIELDS):-len(shared)] == list(ckpt.ENCODER_FIELDS)


def test_explicit_fields_reads_the_command_line():
    assert explicit_fields(["--dim", "4", "--no-amp", "--finetune.head=linear", "x"]) == {
        "dim", "amp", "no_amp", "finetune.head"}


def test_a_saved_config_is_reloaded_and_flags_override_it(tmp_path):
    for script, module in SCRIPTS.items():
        preset = list(module.PRESETS)[-1]
        cfg = parse(module.Config, module.PRESETS, ["--preset", preset])
        saved = tmp_path / f"{script}.json"
        saved.write_text(json.dumps(dataclasses.asdict(cfg)))  # as a run's config.json
        again = parse(module.Config, module.PRESETS, ["--config", str(saved)])
        assert again == cfg, script
        changed = parse(module.Config, module.PRESETS, ["--config", str(saved), "--out-dir", "x"])
        assert changed == dataclasses.replace(cfg, out_dir="x"), script
    nested = parse(fewshot.Config, fewshot.PRESETS, ["--config", str(tmp_path / "fewshot.py.json"),
                                                     "--finetune.lr", "0.1"])
    assert nested.finetune.lr == 0.1 and nested.finetune.dim == fewshot.PRESETS["tiny"].finetune.dim
    (tmp_path / "other.json").write_text(json.dumps({"lr": 1.0, "no_such_field": 2}))
    with pytest.raises(BadInput, match=r"\['no_such_field'\]"):
        parse(pretrain.Config, pretrain.PRESETS, ["--config", str(tmp_path / "other.json")])
    # A value no longer among a field's choices (partseg's built-in data was `synthetic`).
    (tmp_path / "old.json").write_text(json.dumps({"data": "synthetic"}))
    with pytest.raises(BadInput, match="data = 'synthetic' is not one of 'shapenetpart', "
                                       "'procedural'"):
        parse(partseg.Config, partseg.PRESETS, ["--config", str(tmp_path / "old.json")])


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A pretraining checkpoint whose encoder (48 wide, 1 block, 2 heads, hidden 16) is like
    no preset's."""
    cfg = dataclasses.replace(pretrain.PRESETS["tiny"], dim=48, depth=1, heads=2, embed_hidden=16)
    torch.manual_seed(0)
    model = pretrain.build_model(cfg)
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("pre") / "ckpt-final", model,
                                {"config": dataclasses.asdict(cfg), "step": 0})


SHAPE = {"dim": 48, "depth": 1, "heads": 2, "embed_hidden": 16}


@pytest.mark.parametrize("script", ["finetune_cls.py", "partseg.py", "semseg.py"])
def test_downstream_scripts_take_the_encoder_shape_from_the_checkpoint(small_checkpoint, script):
    module = SCRIPTS[script]
    for preset in module.PRESETS:
        cfg = parse(module.Config, module.PRESETS,
                    ["--preset", preset, "--pretrained", str(small_checkpoint)], resolve=module.resolve)
        assert {k: getattr(cfg, k) for k in SHAPE} == SHAPE, (script, preset)
        assert cfg.num_group == module.PRESETS[preset].num_group  # the task's own grouping
    ok = parse(module.Config, module.PRESETS, ["--pretrained", str(small_checkpoint), "--dim", "48"],
               resolve=module.resolve)  # a flag that agrees is fine
    assert ok.depth == 1
    with pytest.raises(BadInput, match=r"--depth 12 contradicts the checkpoint .* depth = 1"):
        parse(module.Config, module.PRESETS, ["--pretrained", str(small_checkpoint), "--depth", "12"],
              resolve=module.resolve)


def test_fewshot_passes_the_checkpoint_and_its_shape_to_every_fold(small_checkpoint):
    cfg = parse(fewshot.Config, fewshot.PRESETS, ["--pretrained", str(small_checkpoint)],
                resolve=fewshot.resolve)
    assert cfg.finetune.pretrained == str(small_checkpoint)
    assert {k: getattr(cfg.finetune, k) for k in SHAPE} == SHAPE
    with pytest.raises(BadInput, match="--finetune.heads 6 contradicts"):
        parse(fewshot.Config, fewshot.PRESETS, ["--pretrained", str(small_checkpoint),
                                                "--finetune.heads", "6"], resolve=fewshot.resolve)


def test_a_converted_reference_checkpoint_gives_its_shape_from_its_weights(tmp_path):
    torch.manual_seed(0)
    model = PointPQAE(dim=48, depth=2, heads=4, decoder_depth=1, embed_hidden=16)
    ckpt.save_weights(tmp_path / "ref.safetensors", model.state_dict())  # no config inside
    assert ckpt.encoder_shape(tmp_path / "ref.safetensors") == {
        "dim": 48, "depth": 2, "heads": None, "embed_hidden": 16}
    cfg = parse(finetune_cls.Config, finetune_cls.PRESETS,
                ["--pretrained", str(tmp_path / "ref.safetensors"), "--heads", "4"],
                resolve=finetune_cls.resolve)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.embed_hidden) == (48, 2, 4, 16)


def test_eval_ckpt_rebuilds_the_model_from_the_checkpoint(tmp_path):
    trained = dataclasses.replace(partseg.PRESETS["tiny"], dim=48, depth=2, heads=2,
                                  feature_blocks=(1, 2), fp_dims=(16,), head_dims=(8, 8),
                                  out_dir=str(tmp_path / "run"), seed=3)
    torch.manual_seed(0)
    saved = ckpt.save_checkpoint(tmp_path / "run" / "ckpt-best", partseg.build_model(trained),
                                 {"config": dataclasses.asdict(trained)})
    cfg = parse(partseg.Config, partseg.PRESETS, ["--eval-ckpt", str(saved)], resolve=partseg.resolve)
    for name in partseg.MODEL_FIELDS + partseg.RUN_FIELDS:
        assert getattr(cfg, name) == getattr(trained, name), name
    # A run field may be changed by a flag; a model field may not.
    cfg = parse(partseg.Config, partseg.PRESETS, ["--eval-ckpt", str(saved), "--out-dir", "elsewhere"],
                resolve=partseg.resolve)
    assert cfg.out_dir == "elsewhere"
    with pytest.raises(BadInput, match=r"--fp-dims \(32,\) contradicts"):
        parse(partseg.Config, partseg.PRESETS, ["--eval-ckpt", str(saved), "--fp-dims", "32"],
              resolve=partseg.resolve)


def test_data_path_means_what_it_says():
    cfg = parse(pretrain.Config, pretrain.PRESETS, ["--preset", "tiny", "--data-path", "a.npz"],
                resolve=pretrain.resolve)
    assert cfg.data == "airplanes"  # the kind follows the suffix
    assert parse(pretrain.Config, pretrain.PRESETS, ["--data", "airplanes"]).data_path == ""
    assert pretrain.DATA_PATHS["airplanes"].endswith(".npz")
    with pytest.raises(BadInput, match="not read with --data procedural"):
        parse(pretrain.Config, pretrain.PRESETS, ["--data", "procedural", "--data-path", "a.npz"],
              resolve=pretrain.resolve)
    for module, kinds in ((finetune_cls, "scanobjectnn or modelnet40"), (partseg, "shapenetpart"),
                          (semseg, "s3dis")):
        with pytest.raises(BadInput, match=f"add --data {kinds}"):
            parse(module.Config, module.PRESETS, ["--preset", "tiny", "--data-path", "x.h5"],
                  resolve=module.resolve)


def test_a_refused_run_changes_nothing_and_overwrite_replaces_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="already holds a run.*--resume.*--overwrite"):
        ckpt.claim_out_dir(run, resume=False, overwrite=False)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "keep.txt"]
    ckpt.claim_out_dir(run, resume=True, overwrite=False)  # continuing is fine
    ckpt.claim_out_dir(run, resume=False, overwrite=True)
    assert [p.name for p in run.iterdir()] == [".lock"]  # all gone but the lock this run holds
    ckpt.claim_out_dir(tmp_path / "new", resume=False, overwrite=False)  # nothing there: fine
    lock.release_all()


def script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_user_errors_are_short_and_name_the_fix(tmp_path):
    proc = script(["finetune_cls.py", "--preset", "scan-hardest"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) <= 2, message
    assert ("python -m data_prep.scanobjectnn --root data/ScanObjectNN --variant hardest --out "
            "data/scanobjectnn_hardest.h5") in message
    assert "python finetune_cls.py --preset tiny" in message and "shared" not in message
    proc = script(["partseg.py", "--preset", "tiny", "--pretrained", "no/such/ckpt"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: checkpoint no/such/ckpt does not exist")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_aggregate_has_its_own_help_and_is_listed(tmp_path):
    top = script(["finetune_cls.py", "--help"], tmp_path)
    assert top.returncode == 0 and "finetune_cls.py aggregate" in top.stdout
    sub = script(["finetune_cls.py", "aggregate", "--help"], tmp_path)
    assert sub.returncode == 0 and "results.json" in sub.stdout
    with pytest.raises(UserError, match="no such file"):
        finetune_cls.aggregate([str(tmp_path / "none.json")])
