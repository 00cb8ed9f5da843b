"""tyro parsing with named presets: `--preset NAME` picks the defaults, flags override them.

    python pretrain.py --lr 1e-3                 # reference recipe, one field changed
    python pretrain.py --preset tiny --epochs 2  # built-in tiny preset, one field changed
"""

from __future__ import annotations

import sys
from typing import TypeVar

import tyro

T = TypeVar("T")


def parse(config_cls: type[T], presets: dict[str, T], args: list[str] | None = None,
          doc: str | None = None) -> T:
    """Parse `args` (default: sys.argv[1:]) into `config_cls`, on top of the preset named by
    `--preset` (default: the first preset)."""
    argv = list(sys.argv[1:] if args is None else args)
    name = next(iter(presets))
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--preset="):
            name = a.split("=", 1)[1]
            del argv[i]
            break
    if name not in presets:
        raise SystemExit(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    listing = "presets (--preset NAME, then any flag overrides): " + ", ".join(presets)
    description = f"{doc}\n\n{listing}" if doc else listing
    return tyro.cli(config_cls, default=presets[name], args=argv, description=description)
