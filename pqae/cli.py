"""Command lines: named presets, saved configs, and errors without tracebacks.

    python pretrain.py --lr 1e-3                                # reference recipe, one field changed
    python pretrain.py --preset tiny --epochs 2                 # built-in tiny preset, one field changed
    python finetune_cls.py --config runs/finetune-cls/config.json --seed 1   # a saved run, again

`--preset NAME` picks the defaults (default: the script's first preset), `--config FILE` replaces
them by a saved `config.json` (on top of the preset, for fields the file lacks), and every
other flag overrides both. `run` also tells a script which fields were typed on the command
line (`resolve`), so that a value read from a checkpoint can replace a preset's default but
never silently a flag the user gave.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Callable, TypeVar

import tyro

from pqae import checkpoint as ckpt
from pqae import dist, lock, preempt
from pqae.errors import BadInput, MissingFile, UserError
from pqae.run import RunOptions

T = TypeVar("T")


def _take(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` / `flag=VALUE` from argv and return VALUE (None when absent)."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if a.startswith(flag + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def explicit_fields(argv: list[str]) -> set[str]:
    """The config fields named on a command line, as dotted field names (`finetune.dim`):
    `--field-name V`, `--field-name=V`, `--flag` and `--no-flag` all count."""
    names = set()
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name = a[2:].split("=", 1)[0].replace("-", "_")
            parts = name.split(".")
            if parts[-1].startswith("no_"):
                names.add(".".join(parts[:-1] + [parts[-1][3:]]))
            names.add(name)
    return names


def from_dict(cls: type[T], values: dict, base: T, source: str) -> T:
    """`base` with the fields of a saved config (JSON: lists for tuples, dicts for nested
    configs) put back; an unknown field is an error naming it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise BadInput(f"{source}: fields {unknown} are not fields of this script's config; "
                       f"is it the config.json of another script?")
    hints = typing.get_type_hints(cls)
    changes = {}
    for name, value in values.items():
        kind = hints[name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
        if choices and value not in choices:
            raise BadInput(f"{source}: {name} = {value!r} is not one of "
                           f"{', '.join(map(repr, choices))} (was the file written by an older "
                           f"version?)")
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(kind, value, getattr(base, name), f"{source} [{name}]")
        elif isinstance(value, list):
            value = tuple(value)
        changes[name] = value
    return dataclasses.replace(base, **changes)


def parse(config_cls: type[T], presets: dict[str, T], args: list[str] | None = None,
          doc: str | None = None, resolve: Callable[[T, set[str]], T] | None = None,
          prog: str | None = None) -> T:
    """Parse `args` (default: sys.argv[1:]) into `config_cls`, on top of the preset named by
    `--preset` and the saved config given by `--config`; then `resolve(cfg, explicit)`.
    `prog`: the command shown by --help (default: the script's file name)."""
    argv = list(sys.argv[1:] if args is None else args)
    name = _take(argv, "--preset") or next(iter(presets))
    if name not in presets:
        raise BadInput(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    default = presets[name]
    config_file = _take(argv, "--config")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise MissingFile(f"--config {path}: no such file (a run writes its config.json "
                              f"into its --out-dir)")
        default = from_dict(config_cls, json.loads(path.read_text()), default, str(path))
    listing = "--config FILE: start from a saved config.json instead (flags override it)"
    if len(presets) > 1:
        listing = ("presets (--preset NAME, then any flag overrides): " + ", ".join(presets)
                   + "\n" + listing)
    if isinstance(config_cls, type) and issubclass(config_cls, RunOptions):
        listing += ("\n\nThe options come in two parts: first this script's own (data, model, "
                    "optimisation), then, from --seed on, the run options every script shares "
                    "(device, speed, output, resume).")
    description = f"{doc}\n\n{listing}" if doc else listing
    cfg = tyro.cli(config_cls, default=default, args=argv, description=description,
                   prog=prog or Path(sys.argv[0]).name)
    return resolve(cfg, explicit_fields(argv)) if resolve is not None else cfg


def run(main: Callable[[T], object], config_cls: type[T], presets: dict[str, T],
        doc: str | None = None, resolve: Callable[[T, set[str]], T] | None = None,
        prog: str | None = None) -> None:
    """A script's entry point: parse, run `main`, and turn a UserError (a missing file, a
    wrong flag, a checkpoint that does not fit) into `error: ...` and exit status 2, and a
    collective that timed out on a stopped peer into a message naming it and exit status 3."""
    try:
        main(parse(config_cls, presets, doc=doc, resolve=resolve, prog=prog))
    except preempt.Preempted:
        raise  # saved and said so: exit status 75
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as e:
        if dist.handle_timeout(e):  # a peer stopped answering: name it, end the job
            raise SystemExit(3) from None
        raise
    finally:
        lock.release_all()
        preempt.release_all()


def adopt(cfg: T, values: dict, explicit: set[str], source: str, prefix: str = "",
          strict: bool = True) -> T:
    """`cfg` with the fields in `values` (e.g. read from a checkpoint) put in. A field the user
    typed (in `explicit`) with another value is an error naming both values (strict), or keeps
    the typed value (not strict). Values of None are unknown and left alone."""
    changes = {}
    for name, value in values.items():
        if value is None or name not in {f.name for f in dataclasses.fields(cfg)}:
            continue
        own = getattr(cfg, name)
        value = tuple(value) if isinstance(value, list) else value
        if own == value:
            continue
        if prefix + name in explicit:
            if not strict:
                continue
            flag = "--" + (prefix + name).replace("_", "-")
            raise BadInput(f"{flag} {own} contradicts {source}, which has {name} = {value}; "
                           f"leave {flag} out to use the checkpoint's")
        changes[name] = value
    return dataclasses.replace(cfg, **changes) if changes else cfg


def from_checkpoints(cfg: T, explicit: set[str], model_fields: tuple[str, ...],
                     run_fields: tuple[str, ...], builtin: str, prefix: str = "") -> T:
    """The rules a downstream script's command line shares with the others:
    * with `eval_ckpt`, the model (`model_fields`) is the checkpoint's, and so are its data and
      run (`run_fields`) unless flags say otherwise;
    * with `pretrained`, the encoder's shape (dim, depth, heads, embed_hidden) is the
      checkpoint's; each task keeps its own grouping, as the reference;
    * a typed flag that contradicts a checkpoint's model is an error naming both values;
    * `--data-path` typed with the built-in data kind (`builtin`), which reads no file, is an
      error. `prefix`: where the config sits inside another (fewshot.py's `finetune.`)."""
    if cfg.eval_ckpt:
        saved = ckpt.checkpoint_config(cfg.eval_ckpt)
        if saved is not None:
            source = f"the checkpoint {cfg.eval_ckpt}"
            cfg = adopt(cfg, {k: saved.get(k) for k in model_fields}, explicit, source, prefix)
            cfg = adopt(cfg, {k: saved.get(k) for k in run_fields}, explicit, source, prefix,
                        strict=False)
    elif cfg.pretrained:
        cfg = adopt(cfg, ckpt.encoder_shape(cfg.pretrained), explicit,
                    f"the checkpoint {cfg.pretrained}", prefix)
    if prefix + "data_path" in explicit and cfg.data == builtin:
        kinds = [k for k in typing.get_args(typing.get_type_hints(type(cfg))["data"]) if k != builtin]
        raise BadInput(f"--{prefix}data-path {cfg.data_path} is not read with --{prefix}data "
                       f"{builtin} (the built-in data); add --{prefix}data "
                       + " or ".join(kinds))
    return cfg
