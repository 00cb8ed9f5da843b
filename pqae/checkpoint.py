"""Checkpoint I/O: safetensors weights + JSON metadata + a separate resume file.

A checkpoint is a directory:
    model.safetensors   unwrapped weights, our own key names (no `module.` / `_orig_mod.`)
    resume.pt           (only for the "last" checkpoint) optimizer state, epoch, step
    meta.json           config, epoch, step, metrics (a downstream task's with the record of
                        their evaluation, `evaluation_record`), and the size of each file above;
                        written last, so a directory with a meta.json whose sizes match is complete
What is guaranteed (tests/test_faults.py kills and corrupts at every point):
* A checkpoint is written complete under a fresh `<name>.tmp-*` name, fsynced, and swapped in
  by renames; at every moment of a write the newest complete checkpoint exists as `<name>`,
  `<name>.old` or a `<name>.tmp-*`, and `find_checkpoint` picks it by its recorded step,
  skipping (and naming) incomplete or corrupt ones. Kills in a row lose nothing.
* A resumable checkpoint keeps its predecessor (`<name>.old`) until the training loop has seen
  a finite loss from the weights it holds (`stop_if_diverged` confirms it). If the next check
  fails, the unconfirmed one is set aside as `<name>.diverged` and the predecessor is put back:
  the last good checkpoint named in the message is one whose weights gave a checked loss.
* Loading refuses, naming the file and the cause, anything truncated or corrupt, weights that
  are not finite float32, and an optimizer state that does not fit the model.
Not guaranteed: the weights after the very last step of a run are saved without a following
loss (they are checked to be finite); a disk that lies about fsync.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pqae import lock
from pqae.errors import BadInput, CheckpointMismatch, MissingFile, UserError, WriteFailed


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in a directory durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_weights(path: str | Path, state: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write of a state dict (tensors made contiguous and unshared). A failed
    write (a full disk) removes its temporary file and says where and why."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(tmp),
                  metadata=metadata)
        _fsync(tmp)
    except Exception as e:  # a full disk, an unwritable directory
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"could not write {path} ({_why(e)}); nothing was replaced") from e
    os.replace(tmp, path)


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (None when it is): its header is read and the
    file size checked against the data it describes, without reading the tensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                return f"header of {n} bytes in a file of {size}"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        return f"not a safetensors file ({type(e).__name__}: {e})"
    if size != 8 + n + end:
        return f"truncated or padded: {size} bytes, the header describes {8 + n + end}"
    return None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (or a checkpoint directory's model.safetensors). A missing,
    truncated or corrupt file, or weights that are not finite float32, are refused with the
    file's name and what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise MissingFile(f"checkpoint {path} does not exist")
    problem = safetensors_problem(path)
    if problem is None:
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors' own errors carry no path
            problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise CheckpointMismatch(f"{path} cannot be read: {problem}")
    wrong = [f"{k} ({v.dtype})" for k, v in state.items()
             if v.is_floating_point() and v.dtype != torch.float32]
    if wrong:
        raise CheckpointMismatch(f"{path}: weights must be float32; found {listing(wrong)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointMismatch(f"{path}: non-finite weights (NaN or inf) in {listing(bad)}")
    return state


def listing(items: list[str], first: int = 4) -> str:
    """The first few items, then how many more: a readable line however long the list."""
    shown = "; ".join(items[:first])
    return shown + (f"; ... and {len(items) - first} more" if len(items) > first else "")


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                ignore: tuple[str, ...] = (), hint: str = "") -> None:
    """load_state_dict that fails with a short list of the missing and unexpected keys and of
    the shape mismatches (the first few of each, then a count), plus `hint` when shapes differ.
    Keys starting with a prefix in `ignore` are allowed to be missing."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the model:"]
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es), checkpoint vs model: {listing(shapes)}")
        if missing:
            lines.append(f"  {len(missing)} missing key(s): {listing(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): {listing(unexpected)}")
        if shapes and hint:
            lines.append(f"  {hint}")
        raise CheckpointMismatch("\n".join(lines))
    model.load_state_dict(state, strict=not ignore)


_counter = itertools.count()


def save_checkpoint(directory: str | Path, model: nn.Module, meta: dict,
                    resume: dict | None = None) -> Path:
    """Write model.safetensors (+ resume.pt) + meta.json into `directory`, atomically (see the
    module docstring). A resumable checkpoint (`resume` given) keeps its predecessor as
    `<name>.old` until `stop_if_diverged` confirms it. Non-finite weights raise
    FloatingPointError instead, and a failed write (a full disk) an OSError naming the
    directory and the cause; either way the previous checkpoint stays."""
    final = Path(directory)
    state = unwrap(model).state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged model never replaces a good checkpoint
        if resume is not None:
            fall_back(final)
        raise FloatingPointError(
            f"refusing to write {final}: non-finite weights in {listing(bad)}. "
            + (last_good(final) if resume is not None else
               f"The last good checkpoint {find_checkpoint(final)} is kept as it was"))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{next(_counter)}")
    try:
        tmp.mkdir()
        save_weights(tmp / "model.safetensors", state,
                     {"format": "pqae", "step": str(meta.get("step", "")),
                      "config": json.dumps(meta.get("config", {}), default=str)})
        if resume is not None:
            torch.save(resume, tmp / "resume.pt")
            _fsync(tmp / "resume.pt")
        files = {f.name: f.stat().st_size for f in tmp.iterdir()}
        (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=2, default=str))
        _fsync(tmp / "meta.json")
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as RuntimeError ("file write failed", "unexpected
        # pos"); any other RuntimeError is not a write failure and goes up as it is
        free = _free(final.parent)  # before the temporary files go: what the write met
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, RuntimeError) and not _write_error(e):
            raise
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
        raise WriteFailed(f"could not write checkpoint {final} ({_why(cause)}; {free}); its temporary "
                          f"files were removed and the previous checkpoint "
                          f"{find_checkpoint(final)} is intact") from None
    # Swap. At every moment the newest complete checkpoint is <name>, <name>.old or the new
    # .tmp-*. For a resumable checkpoint, .old is the newest one whose loss was checked:
    # <name> becomes .old only when it is complete and checked; an unchecked one is superseded.
    old = final.with_name(final.name + ".old")
    if final.exists():
        if checkpoint_problem(final) is not None or (resume is not None and not checked(final)):
            shutil.rmtree(final)
        else:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if resume is None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(final.name + ".tmp-*"):  # interrupted writes: all older
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write_error(e: RuntimeError) -> bool:
    text = str(e).lower()
    return "write" in text or "unexpected pos" in text


def _why(e: BaseException) -> str:
    """A write failure in a few words: the errno's name and text when there is one."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
    text = str(e).strip().splitlines()[0]
    if "] . " in text:  # c10's "[enforce fail at FILE:LINE] . what"
        text = text.split("] . ", 1)[1]
    return f"{type(e).__name__}: {text[:200]}"


def _free(directory: Path) -> str:
    try:
        st = os.statvfs(directory)
    except OSError:
        return "free space unknown"
    return f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free on its file system"


def checkpoint_problem(cand: Path) -> str | None:
    """Why `cand` is not a complete checkpoint directory (None when it is)."""
    meta_path = cand / "meta.json"
    if not meta_path.is_file():
        return "no meta.json (written last: the write did not finish)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    files = meta.get("files", {"model.safetensors": None})
    for name, size in files.items():
        f = cand / name
        if not f.is_file():
            return f"{name} missing"
        if size is not None and f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return safetensors_problem(cand / "model.safetensors")


def _step(cand: Path) -> int:
    try:
        return int(json.loads((cand / "meta.json").read_text()).get("step") or 0)
    except (OSError, ValueError, TypeError):
        return -1


def find_checkpoint(directory: str | Path, skipped: list[str] | None = None) -> Path | None:
    """The newest complete checkpoint among `directory`, `<directory>.old` and any
    `<directory>.tmp-*` left by an interrupted write, by recorded step (ties: the final name
    first); None if there is none. Incomplete or corrupt candidates are skipped, and why is
    appended to `skipped`."""
    final = Path(directory)
    cands = [final, final.with_name(final.name + ".old"),
             *sorted(final.parent.glob(final.name + ".tmp-*"))] if final.parent.is_dir() else []
    good = []
    for order, cand in enumerate(cands):
        if not cand.is_dir():
            continue
        problem = checkpoint_problem(cand)
        if problem is None:
            good.append((_step(cand), -order, cand))
        elif skipped is not None:
            skipped.append(f"{cand}: {problem}")
    return max(good)[2] if good else None


def load_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "meta.json").read_text())


def load_resume(directory: str | Path) -> dict:
    path = Path(directory) / "resume.pt"
    if not path.exists():
        raise MissingFile(f"{path} missing: {directory} is not a resumable checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message names no file
        raise CheckpointMismatch(f"{path} cannot be read: {type(e).__name__}: {e}") from None


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict, source: str) -> None:
    """optimizer.load_state_dict, after checking that every saved per-parameter state tensor
    has its parameter's shape (torch accepts a misfit that crashes the fused step later)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_groups = state.get("param_groups", [])
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointMismatch(f"{source}: its optimizer state has parameter groups of sizes "
                                 f"{[len(g['params']) for g in saved_groups]}, this model "
                                 f"{[len(g['params']) for g in optimizer.param_groups]}")
    ids = [i for g in saved_groups for i in g["params"]]
    wrong = []
    for pid, param in zip(ids, params):
        for key, value in state.get("state", {}).get(pid, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                wrong.append(f"{key} {tuple(value.shape)} vs {tuple(param.shape)}")
    if wrong:
        raise CheckpointMismatch(f"{source}: its optimizer state does not fit this model "
                                 f"({len(wrong)} tensors, saved vs model: {listing(wrong)}); was it "
                                 f"written by another configuration?")
    optimizer.load_state_dict(state)


def resume_from(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                rank: int = 0) -> tuple[Path, dict, dict]:
    """--resume: the newest complete out_dir/ckpt-last (or its twins), loaded strictly into the
    model and the optimizer before any step runs. Returns (path, resume state, meta)."""
    skipped: list[str] = []
    last = find_checkpoint(Path(out_dir) / "ckpt-last", skipped)
    if rank == 0:
        for s in skipped:
            print(f"note: skipped {s}", flush=True)
    if last is None:
        raise MissingFile(f"--resume: no complete checkpoint in {Path(out_dir) / 'ckpt-last'}"
                          + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
                          + "; start the run without --resume")
    load_strict(model, load_weights(last), source=str(last))
    state = load_resume(last)
    load_optimizer(optimizer, state["optimizer"], str(last / "resume.pt"))
    return last, state, load_meta(last)


# Keys of a pretraining checkpoint that no downstream task uses: the decoder side.
PRETRAIN_ONLY = ("decoder.", "query_attn.", "head.")


def load_pretrained_encoder(encoder: nn.Module, path: str | Path,
                            drop: tuple[str, ...] = ()) -> list[str]:
    """Load the `encoder.*` weights of a pretraining checkpoint (ours, or a reference one
    converted by `data_prep.convert_checkpoint`) into a PointEncoder, strictly.

    Only the pretraining-only keys (PRETRAIN_ONLY) and the full key names in `drop` (e.g. the
    class token, for an encoder without one) are dropped; they are returned so the caller can
    print them. Any other key that does not fit the encoder is an error naming it.
    """
    state = load_weights(path)
    dropped = sorted(k for k in state if k.startswith(PRETRAIN_ONLY) or k in drop)
    other = [k for k in state if not k.startswith(("encoder.",) + PRETRAIN_ONLY)]
    if other:
        raise CheckpointMismatch(
            f"{path} is not a pretraining checkpoint: {len(other)} key(s) outside the encoder "
            f"and the pretraining decoder: {listing(other)}. A fine-tuned model is evaluated "
            f"with --eval-ckpt, not loaded with --pretrained")
    enc = {k[len("encoder."):]: v for k, v in state.items()
           if k.startswith("encoder.") and k not in drop}
    load_strict(encoder, enc, source=f"the encoder of {path}",
                hint="the encoder's shape (--dim, --depth, --embed-hidden) differs from the "
                     "checkpoint's; leave those flags out to take them from the checkpoint")
    return dropped


def loaded_note(path: str | Path, dropped: list[str]) -> str:
    """The line a script prints after `load_pretrained_encoder`: what it dropped."""
    return (f"loaded the encoder of {path}; dropped {len(dropped)} pretraining-only keys: "
            f"{listing(dropped)}")


CHECKED = "checked.json"
"""A resumable checkpoint's mark that a loss computed with its weights passed the check."""


def checked(directory: Path) -> bool:
    return (Path(directory) / CHECKED).is_file()


def _mark_checked(directory: Path, step: int, losses: list[float]) -> None:
    tmp = directory / (CHECKED + ".tmp")
    tmp.write_text(json.dumps({"checked_at_step": step, "losses": losses}))
    os.replace(tmp, directory / CHECKED)


def fall_back(directory: str | Path) -> None:
    """A run diverged: a resumable checkpoint saved since the last passing loss check is set
    aside as `<name>.diverged`, and its checked predecessor `.old`, if there is one, becomes
    `<name>` again (else no `<name>` remains: nothing of the run had a checked loss)."""
    last = Path(directory)
    old = last.with_name(last.name + ".old")
    if last.is_dir() and checked(last):
        return
    aside = last.with_name(last.name + ".diverged")
    if last.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(last, aside)
    if old.is_dir() and checkpoint_problem(old) is None and checked(old):
        os.replace(old, last)
    _fsync_dir(last.parent)


def confirm(directory: str | Path, rank: int = 0) -> None:
    """A run that ended normally: its last resumable checkpoint needs no predecessor kept for
    a divergence any more (`<name>.old` is removed)."""
    if rank == 0:
        shutil.rmtree(Path(directory).with_name(Path(directory).name + ".old"), ignore_errors=True)


def stop_if_diverged(losses: float | list[float], step: int, epoch: int,
                     out_dir: str | Path, max_loss: float = math.inf, rank: int = 0) -> None:
    """The loss check of a log line. Passing it confirms out_dir/ckpt-last if it was saved
    before this step (its weights gave these losses): its predecessor `.old` is removed.
    Failing it (a NaN or inf loss, or one above `max_loss`: a run exploding without NaN)
    sets an unconfirmed ckpt-last aside as `ckpt-last.diverged`, puts the predecessor back,
    and stops with FloatingPointError naming that last good checkpoint. Rank 0 alone touches
    the files."""
    values = losses if isinstance(losses, list) else [losses]
    last = Path(out_dir) / "ckpt-last"
    old = last.with_name(last.name + ".old")
    if all(math.isfinite(v) and v <= max_loss for v in values):
        if rank == 0 and last.is_dir() and _step(last) < step and not checked(last) \
                and checkpoint_problem(last) is None:
            _mark_checked(last, step, values)
            shutil.rmtree(old, ignore_errors=True)
        return
    if rank == 0:
        fall_back(last)
    why = "not finite" if not all(math.isfinite(v) for v in values) else f"above --max-loss {max_loss:g}"
    raise FloatingPointError(f"loss is {values[0]} at step {step} (epoch {epoch}), {why}; "
                             f"stopping. {last_good(last)}")


def last_good(last: Path) -> str:
    """The sentence naming the last good checkpoint after a divergence (`fall_back` ran)."""
    good = find_checkpoint(last)
    if good is None or not checked(good):
        return (f"No checkpoint of this run has had its loss checked yet (an unchecked one is "
                f"set aside as {last.with_name(last.name + '.diverged')}): start the run again, "
                f"e.g. with a lower --lr or a longer warmup")
    at = json.loads((good / CHECKED).read_text())["checked_at_step"]
    return (f"The last good checkpoint is {good}, saved at step {_step(good)} and checked by "
            f"the loss at step {at} (resume from it with --resume; a lower --lr needs "
            f"--allow-config-change)")


# ---------------------------------------------------------------------------------------------
# What a checkpoint says about the model it holds

ENCODER_FIELDS = ("dim", "depth", "heads", "embed_hidden")
"""The config fields that fix the shape of a PointEncoder, named alike in every script."""


def weights_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def checkpoint_config(path: str | Path) -> dict | None:
    """The config a checkpoint of ours was written with (its meta.json, else the copy in the
    safetensors header), or None (a converted reference checkpoint has none)."""
    path = Path(path)
    if path.suffix == ".pth":  # a reference checkpoint: weights only
        return None
    meta = path / "meta.json"
    if path.is_dir() and meta.is_file():
        return json.loads(meta.read_text()).get("config")
    file = weights_file(path)
    if not file.is_file():
        raise MissingFile(f"checkpoint {path} does not exist")
    with safe_open(str(file), "pt") as f:
        header = f.metadata() or {}
    return json.loads(header["config"]) if "config" in header else None


def encoder_shape(path: str | Path) -> dict:
    """dim, depth, heads, embed_hidden of the encoder in a checkpoint (pretraining or
    fine-tuned). From the config it was written with when there is one; otherwise dim, depth
    and embed_hidden are read off the weights' shapes and heads is None (not in the weights)."""
    config = checkpoint_config(path)
    if config is not None and all(k in config for k in ENCODER_FIELDS):
        return {k: config[k] for k in ENCODER_FIELDS}
    with safe_open(str(weights_file(path)), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    try:
        blocks = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.blocks.")}
        return {"dim": shapes["encoder.norm.weight"][0], "depth": len(blocks),
                "heads": None, "embed_hidden": shapes["encoder.patch_embed.fc1.weight"][0]}
    except KeyError:
        raise CheckpointMismatch(f"{path} holds no point encoder (no encoder.norm.weight / "
                                 f"encoder.patch_embed.fc1.weight)") from None


def claim_out_dir(out_dir: str | Path, resume: bool, overwrite: bool, rank: int = 0) -> None:
    """A run never destroys or shares another one. Rank 0 takes the directory's lock
    (`pqae.lock`: a second run in it refuses at once; an unwritable directory is refused before
    any work), and every rank raises rank 0's refusal. A directory that already holds a run
    (config.json, a checkpoint or results) is refused unless --resume continues it or
    --overwrite deletes it first. Call on every rank before anything is written; rank 0 alone
    deletes."""
    out_dir = Path(out_dir)
    _refuse_existing_run(out_dir, resume, overwrite)  # before the lock: a refusal writes nothing
    problem = note = None
    if rank == 0:
        try:
            note = lock.acquire(out_dir)
            _refuse_existing_run(out_dir, resume, overwrite)  # one that started meanwhile
        except UserError as e:
            lock.release(out_dir)
            problem = e
    problem = _from_rank0(problem)
    if problem is not None:
        raise problem
    if note and rank == 0:
        print(f"note: {note}", flush=True)
    if overwrite and not resume and rank == 0:
        for child in out_dir.iterdir():  # all but the lock this run holds
            if child.name == lock.NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _refuse_existing_run(out_dir: Path, resume: bool, overwrite: bool) -> None:
    found = [n for n in ("config.json", "results.json", "ckpt-last", "ckpt-last.old")
             if (out_dir / n).exists()]
    if resume or not found:
        return
    if not overwrite:
        raise BadInput(
            f"{out_dir} already holds a run ({', '.join(found)}). Continue it with --resume, or "
            f"start a new one with --out-dir NEW_DIR, or delete it with --overwrite")
    resolved = out_dir.resolve()
    if resolved in (Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)):
        raise BadInput(f"--overwrite would delete {resolved}: give a run directory as --out-dir")


def _from_rank0(value):
    """Rank 0's `value` on every rank (itself in a single process)."""
    if not tdist.is_initialized():
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------
# What a checkpoint records of the evaluation of its weights, and --eval-ckpt's comparison

ROUNDING = ("device", "device_name", "threads", "world_size", "torch", "kernels", "compile")
"""Entries of an evaluation record that move its figures by float rounding at most (the
order and kind of the arithmetic), never the test draws."""


def evaluation_record(cfg, fields: tuple[str, ...], device: torch.device, world_size: int,
                      **when) -> dict:
    """What an evaluation's figures depend on besides the weights, JSON-ready: `when` (the
    epoch whose test draws it used, the step of the weights), the config `fields` (test data,
    seeds, batch sizes), amp and compile, and where the arithmetic ran: device kind and name,
    CPU threads, processes, torch version, kernel path. A training run stores it with the
    figures it reports (a checkpoint's metrics["evaluation"]); --eval-ckpt compares its own."""
    import platform

    import kernels
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        platform.processor() or "cpu"
    backend = kernels.get_backend()
    path = "reference" if backend == "reference" or (
        backend == "auto" and device.type not in kernels.TRITON_DEVICES) else "triton"
    record = {**when, **{f: getattr(cfg, f) for f in fields}, "amp": cfg.amp,
              "compile": cfg.compile, "device": device.type, "device_name": name,
              "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "world_size": world_size, "torch": torch.__version__, "kernels": path}
    return json.loads(json.dumps(record, default=str))  # tuples as lists, as read back


def recorded_evaluation(path: str | Path, fields: tuple[str, ...] = ()) -> dict | None:
    """What checkpoint `path` records of its weights' evaluation: {"epoch", "step" (of the
    weights), "metrics" (its figures), "evaluation" (the record of `evaluation_record`)}, from
    its meta.json. A checkpoint written before records existed gets a partial one: its config's
    `fields`, the epoch of its metrics and its own step. None for bare weights (a reference
    .pth, a .safetensors file), which record no evaluation."""
    path = Path(path)
    if not (path.is_dir() and (path / "meta.json").is_file()):
        return None
    meta = load_meta(path)
    metrics = dict(meta.get("metrics") or {})
    record = metrics.pop("evaluation", None)
    if record is None:
        config = meta.get("config") or {}
        record = {"epoch": metrics.get("epoch", meta.get("epoch")), "step": meta.get("step"),
                  **{f: config[f] for f in fields if f in config}}
    return {"epoch": meta.get("epoch"), "step": meta.get("step"), "metrics": metrics,
            "evaluation": record}


def run_results(path: str | Path) -> dict:
    """The results.json of the run a checkpoint directory belongs to (its parent), or {}."""
    file = Path(path).parent / "results.json"
    return json.loads(file.read_text()) if Path(path).is_dir() and file.is_file() else {}


def reproduction(scores: dict, recorded: dict, record: dict | None, now: dict,
                 rounding: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> dict:
    """How this evaluation's `scores` compare with the figures a run `recorded` for the same
    weights ({name: value}; only names in both, with values, are compared, exactly), given the
    recorded evaluation's `record` and this one's (`now`, both from `evaluation_record`; their
    "step" is the weights'). `rounding`: the script's record entries that change figures by
    float rounding only (e.g. an evaluation batch size), besides ROUNDING; `ignore`: entries
    this evaluation does not depend on. Returns {"recorded", "identical" (None: nothing to
    compare), "mismatches", "differences", "note"}: the note says which, and why."""
    out = {"recorded": recorded, "identical": None, "mismatches": {}, "differences": []}
    if record is None:
        return {**out, "note": "the checkpoint records no evaluation to compare with (bare "
                               "weights: a reference .pth or a .safetensors file)"}
    at = (f"epoch {record['epoch']} (step {record.get('step')})" if record.get("epoch") is not None
          else f"step {record.get('step')}")
    if record.get("step") != now.get("step"):
        return {**out, "note": f"the recorded figures are of the evaluation at {at}; these "
                               f"weights were saved at step {now.get('step')}, after it: nothing "
                               f"to reproduce"}
    names = [k for k in recorded if recorded[k] is not None and scores.get(k) is not None]
    mismatches = {k: [recorded[k], scores[k]] for k in names if recorded[k] != scores[k]}
    skip = {"step", *ignore}
    differences = [f"{k} {record.get(k)} -> {v}" for k, v in now.items()
                   if k not in skip and k in record and record[k] != v]
    unknown = [k for k in ("device", "world_size") if k not in record]
    draws = [d for d in differences if d.split()[0] not in ROUNDING + tuple(rounding)]
    out = {**out, "identical": not mismatches if names else None, "mismatches": mismatches,
           "differences": differences}
    if not names:
        return {**out, "note": f"the checkpoint records no figure at {at} to compare with"}
    said = ", ".join(differences) + (" differs" if len(differences) == 1 else " differ")
    if not mismatches:
        note = f"identical to the figures recorded at {at} ({', '.join(names)})"
        if differences:
            note += f", although {said} from that evaluation"
        return {**out, "note": note}
    shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in mismatches.items())
    note = f"differs from the figures recorded at {at}: {shown}. "
    if draws:
        note += (f"{said} from that evaluation: its test data or random draws are not "
                 f"the recorded ones")
    elif differences:
        note += (f"{said} from that evaluation: the figures may differ by float rounding "
                 f"(the arithmetic's order, not the data)")
    elif unknown:
        note += ("the checkpoint does not record its evaluation's device and processes (written "
                 "before evaluation records): they may differ, and so the figures by float "
                 "rounding")
    else:
        note += ("every recorded setting is the same: nondeterministic arithmetic on this "
                 "device, or a bug")
    return {**out, "note": note}
