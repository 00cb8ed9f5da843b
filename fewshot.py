"""Few-shot classification on ModelNet40: all settings and folds in one command.

    python -m data_prep.modelnet_fewshot convert --root data/ModelNetFewshot  # once (or `generate`)
    python fewshot.py --pretrained runs/pretrain/ckpt-epoch-300               # 4 settings x 10 folds
    python fewshot.py --ways 5 --shots 10 --folds 0 1 --pretrained ...        # a subset
    torchrun --nproc_per_node=4 fewshot.py --pretrained ...
    python fewshot.py --preset tiny --data-dir /tmp/episodes                  # tiny model, CPU

The reference leaves 40 hand-launched runs and the averaging to the user. Here each fold of
each (way, shot) setting is one ordinary `finetune_cls.main` run with the reference's few-shot
recipe (`RECIPE`: full protocol, 150 cosine epochs, lr 5e-4 (x10 for `cls*`), drop path 0.1,
64 groups, 1024 points, rotation augmentation, batch 32 with drop_last, 40-way head, no
voting) on the episode file `{data_dir}/{way}way_{shot}shot/{fold}.h5` written by
`data_prep/modelnet_fewshot.py` (or, with --procedural, by `pqae.episodes`). Any fine-tuning
field can be changed with `--finetune.FIELD`; `data`, `data_path`, `out_dir` and `resume` of it
are set per fold.

Per fold (out_dir/{way}way_{shot}shot/fold{fold}/results.json, written by finetune_cls):
* best_acc: the best test accuracy over epochs, the reference's per-fold number. It SELECTS THE
            EPOCH ON THE FOLD'S TEST SET (there is no validation split);
* last_acc: the accuracy after the last epoch, an honest number to set beside it.
A fold stopped (--finetune.max-steps) before its first evaluation has neither; the table
leaves it out and says so.
The table (printed, and saved as out_dir/fewshot_table.txt and results.json) gives per
setting the mean +- SAMPLE standard deviation (n - 1 in the denominator) of both over the folds
of this invocation, beside the paper's numbers (which do not say which std they use).

Resumable with --resume: a fold whose results.json exists (with the same fine-tuning config) is
read back and not re-run; a fold with a ckpt-last but no results resumes through finetune_cls's
own --resume. Without --resume, an out_dir that holds a run is refused (--overwrite starts over).
Under torchrun every rank walks the same fold sequence and the skip/resume decision is read
from the same files (which only change while all ranks are inside a fold); rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


import finetune_cls
from pqae import checkpoint as ckpt
from pqae import cli, dist, lock, preempt
from pqae.episodes import FOLDS, SHOTS, WAYS, episode_name, episode_path, procedural_episode
from pqae.errors import BadInput, MissingFile
from pqae.log import finish, print0, write_json
from pqae.run import resume_command
from pqae.model import TINY_ENCODER

# The reference's few-shot configuration, on top of the ModelNet40-1k fine-tuning preset. It
# picks the rotation augmentation for few-shot (not ModelNet's scale & translate) and runs no
# vote test.
RECIPE = dataclasses.replace(
    finetune_cls.PRESETS["modelnet-1k"], data="modelnet40", num_classes=40, num_points=1024,
    num_group=64, drop_path_rate=0.1, epochs=150, warmup_epochs=10, batch_size=32,
    lr_full=5e-4, lr_linear=1e-3, lr_mlp3=1e-3, augment="rotate", vote_augment="none", votes=0,
    data_path="(set per fold)", out_dir="(set per fold)")

# README of the reference, few-shot ModelNet40, mean +- std over 10 folds.
PAPER = {(5, 10): (96.9, 3.2), (5, 20): (98.9, 1.0), (10, 10): (94.1, 4.2), (10, 20): (96.3, 2.7)}


@dataclass(frozen=True)
class Config:
    data_dir: str = "data/modelnet40_fewshot"
    """directory of the episodes, `{way}way_{shot}shot/{fold}.h5`, from
    `python -m data_prep.modelnet_fewshot`."""
    ways: tuple[int, ...] = WAYS
    """the N of the N-way settings to run (classes per episode)."""
    shots: tuple[int, ...] = SHOTS
    """the K of the K-shot settings to run (training shapes per class)."""
    folds: tuple[int, ...] = FOLDS
    """the folds (episodes) to run for every setting; the table covers these only."""
    pretrained: str = ""
    """pretraining checkpoint whose encoder every fold fine-tunes (sets finetune.pretrained);
    its shape (dim, depth, heads, embed_hidden) comes from it. Empty: from scratch."""
    out_dir: str = "runs/fewshot"
    """directory of the runs: config.json, one sub-directory per fold run,
    `{way}way_{shot}shot/fold{fold}`, plus the table (fewshot_table.txt and results.json)."""
    resume: bool = False
    """continue the run in out_dir: finished folds are read back, a killed fold resumes."""
    overwrite: bool = False
    """delete out_dir first when it already holds a run (without this or --resume, such a run
    is refused and left untouched)."""
    keep_checkpoints: bool = False
    """keep each finished fold's ckpt-last / ckpt-best (about 0.35 GB per fold at full size);
    `python finetune_cls.py --eval-ckpt OUT_DIR/5way_10shot/fold0/ckpt-best` then evaluates one
    again, to exactly the fold's best_acc. False deletes them once the fold's results.json is
    written (the table needs only that)."""
    finetune: finetune_cls.Config = RECIPE
    """the fine-tuning run of every fold, a nested finetune_cls.Config (`--finetune.head`,
    `--finetune.lr`, ...); its data, data_path, out_dir, resume and overwrite are set per fold."""
    procedural: bool = False
    """first write missing episodes from the built-in procedural classes (at most 5-way) into
    data_dir: a smoke run without ModelNet40. Never for reported numbers."""


PRESETS = {
    "reference": Config(),
    "tiny": Config(  # a CPU smoke run: procedural 5-way episodes, tiny model, a few epochs
        data_dir="runs/fewshot-tiny/episodes", ways=(5,), shots=(10,), folds=(0, 1),
        out_dir="runs/fewshot-tiny", procedural=True, finetune=dataclasses.replace(
            RECIPE, num_points=64, **TINY_ENCODER, num_group=8, group_size=8, batch_size=8, epochs=3, warmup_epochs=0, log_every=5, device="cpu")),
}


def resolve(cfg: Config, explicit: set[str]) -> Config:
    """--pretrained is every fold's finetune.pretrained (whose encoder shape the folds take,
    `finetune_cls.resolve`)."""
    if cfg.pretrained:
        if cfg.finetune.pretrained and cfg.finetune.pretrained != cfg.pretrained:
            raise BadInput(f"--pretrained {cfg.pretrained} and --finetune.pretrained "
                           f"{cfg.finetune.pretrained} differ; give one")
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(
            cfg.finetune, pretrained=cfg.pretrained))
        if "pretrained" in explicit:
            explicit = explicit | {"finetune.pretrained"}
    return dataclasses.replace(cfg, finetune=finetune_cls.resolve(cfg.finetune, explicit,
                                                                  prefix="finetune."))


def fold_dir(out_dir: str | Path, way: int, shot: int, fold: int) -> Path:
    return Path(out_dir) / episode_name(way, shot) / f"fold{fold}"


def fold_config(cfg: Config, way: int, shot: int, fold: int) -> finetune_cls.Config:
    """The fine-tuning config of one fold, resuming when the fold left a ckpt-last behind."""
    run_dir = fold_dir(cfg.out_dir, way, shot, fold)
    # The fold directories are this run's own: a fold killed before its first checkpoint is
    # started again over its remains (overwrite), one with a checkpoint resumes.
    return dataclasses.replace(
        cfg.finetune, data="modelnet40", data_path=str(episode_path(cfg.data_dir, way, shot, fold)),
        out_dir=str(run_dir), resume=ckpt.find_checkpoint(run_dir / "ckpt-last") is not None,
        overwrite=True)


def finished_result(fold_cfg: finetune_cls.Config) -> dict | None:
    """The fold's results.json if it finished, else None. A result written under a different
    fine-tuning config is an error, not silently mixed into the table."""
    path = Path(fold_cfg.out_dir) / "results.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    ours = json.loads(json.dumps(dataclasses.asdict(fold_cfg)))  # tuples -> lists, as stored
    diff = sorted(k for k in ours.keys() | result.get("config", {}).keys()
                  if k not in ("resume", "overwrite") and ours.get(k) != result.get("config", {}).get(k))
    if diff or "best_acc" not in result:
        raise BadInput(f"{path} was written by a different run (config fields differ: {diff}); "
                       f"use another --out-dir, or --overwrite to start again")
    return result


def run_fold(fold_cfg: finetune_cls.Config) -> dict:
    """One fine-tuning run; its results without the model."""
    result = finetune_cls.main(fold_cfg, show=False)
    result.pop("model", None)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and SAMPLE standard deviation (n - 1 in the denominator); std is nan for n < 2."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def pm(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} +- " + ("n/a" if math.isnan(std) else f"{std:.{digits}f}")


def summarize(folds: dict[tuple[int, int], list[dict]], head: str) -> tuple[dict, str]:
    """Per setting: mean +- sample std of best_acc and last_acc over the folds, and the table."""
    summary, lines = {}, [
        f"Few-shot ModelNet40, {head} fine-tuning | accuracy in %, mean +- SAMPLE std (n-1) over folds",
        f"{'setting':15s} {'folds':>5s}  {'best epoch (test-set selection)':33s} "
        f"{'last epoch':17s} paper (best epoch)"]
    for (way, shot), runs in folds.items():
        done = [r for r in runs if r["best_acc"] is not None]  # a fold cut short has no score
        skipped = [r["fold"] for r in runs if r["best_acc"] is None]
        best = mean_std([r["best_acc"] for r in done])
        last = mean_std([r["last_acc"] for r in done])
        paper = PAPER.get((way, shot))
        summary[episode_name(way, shot)] = {
            "folds": [r["fold"] for r in done], "unevaluated_folds": skipped,
            "best_acc_mean": best[0], "best_acc_std": best[1],
            "last_acc_mean": last[0], "last_acc_std": last[1],
            "paper_mean": paper[0] if paper else None, "paper_std": paper[1] if paper else None}
        lines.append(f"{f'{way}-way {shot}-shot':15s} {len(done):5d}  {pm(*best):33s} "
                     f"{pm(*last):17s} {pm(*paper, digits=1) if paper else '-'}")
        if skipped:
            lines.append(f"  (folds {skipped} stopped before their first evaluation: left out)")
    return summary, "\n".join(lines)


def fold_text(result: dict) -> str:
    """A fold's scores, or why it has none."""
    if result["best_acc"] is None:
        return f"no evaluation (stopped at step {result.get('step')}, before epoch 1 ended)"
    return (f"best-epoch acc {result['best_acc']:.2f} % (epoch {result['best_epoch']}, test-set "
            f"selection) | last-epoch acc {result['last_acc']:.2f} %")


def write_procedural_episodes(data_dir: str, plan: list, rank: int, timeout_s: float = 120) -> None:
    """Rank 0 writes the missing procedural episodes; the other ranks wait for the files."""
    paths = {(w, s, f): episode_path(data_dir, w, s, f) for w, s, f in plan}
    if rank == 0:
        for (w, s, f), path in paths.items():
            if not path.is_file():
                procedural_episode(data_dir, w, s, f)
    deadline = time.monotonic() + timeout_s
    while not all(p.is_file() for p in paths.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"procedural episodes did not appear in {data_dir}")
        time.sleep(0.2)


def main(cfg: Config) -> dict:
    cfg = resolve(cfg, set())  # the encoder shape of --pretrained
    env = dist.setup(cfg.finetune.device, cfg.finetune.collective_timeout)
    rank = env.rank
    out_dir = Path(cfg.out_dir)
    ckpt.claim_out_dir(out_dir, cfg.resume, cfg.overwrite, rank)  # before anything is written
    preempt.hold(verbose=rank == 0)  # across the folds: a signal between two stops there
    if rank == 0:
        (out_dir / "preempted.json").unlink(missing_ok=True)
    dist.barrier()
    settings = [(w, s) for w in cfg.ways for s in cfg.shots]
    plan = [(w, s, f) for w, s in settings for f in cfg.folds]
    if cfg.procedural:
        write_procedural_episodes(cfg.data_dir, plan, rank)
    missing = [p for w, s, f in plan if not (p := episode_path(cfg.data_dir, w, s, f)).is_file()
               and finished_result(fold_config(cfg, w, s, f)) is None]
    if missing:
        raise MissingFile(
            f"{len(missing)} episode file(s) missing, e.g. {missing[0]}. Create them with "
            f"`python -m data_prep.modelnet_fewshot convert --root data/ModelNetFewshot --out "
            f"{cfg.data_dir}` (released episodes) or `python -m data_prep.modelnet_fewshot "
            f"generate --modelnet data/modelnet40.h5 --out {cfg.data_dir}`, or try the built-in "
            f"data first: `python fewshot.py --preset tiny`")
    if rank == 0:
        write_json(out_dir / "config.json", dataclasses.asdict(cfg))

    folds: dict[tuple[int, int], list[dict]] = {setting: [] for setting in settings}
    for i, (way, shot, fold) in enumerate(plan):
        fold_cfg = fold_config(cfg, way, shot, fold)
        tag = f"[{episode_name(way, shot)} fold {fold}, run {i + 1}/{len(plan)}]"
        result = finished_result(fold_cfg)
        if result is not None:
            print0(f"{tag} already finished: {fold_cfg.out_dir}/results.json", rank=rank)
        else:
            if dist.agree_any(preempt.received() is not None):
                raise preempted(out_dir, rank, f"before {tag}", preempt.received())
            print0(f"{tag} {'resuming' if fold_cfg.resume else 'starting'} {fold_cfg.out_dir}",
                   rank=rank)
            try:
                result = run_fold(fold_cfg)
            except preempt.Preempted as stop:  # the fold saved and said so; mark our out_dir
                raise preempted(out_dir, rank, f"in {tag}", stop.signal, quiet=True) from None
        if rank == 0 and not cfg.keep_checkpoints:
            for name in ("ckpt-last", "ckpt-best", "ckpt-last.old", "ckpt-best.old"):
                shutil.rmtree(Path(fold_cfg.out_dir) / name, ignore_errors=True)
        folds[(way, shot)].append({"fold": fold, "best_acc": result["best_acc"],
                                   "best_epoch": result["best_epoch"], "last_acc": result["last_acc"],
                                   "history": result.get("history")})
        print0(f"{tag} {fold_text(result)}", rank=rank)

    summary, table = summarize(folds, cfg.finetune.head)
    print0(table, rank=rank)
    out = {"config": dataclasses.asdict(cfg), "std": "sample (n-1)",
           "best_note": "per fold: best epoch selected on the fold's TEST set (the reference)",
           "settings": summary, "folds": {episode_name(*k): v for k, v in folds.items()},
           "table": table}
    if rank == 0:
        (out_dir / "fewshot_table.txt").write_text(table + "\n")
        write_json(out_dir / "results.json", out)
    tiny = "--preset tiny " if cfg.procedural else ""
    finish("the table above", {"results": out_dir / "results.json",
                               "table": out_dir / "fewshot_table.txt", "fold runs": out_dir},
           [f"python partseg.py {tiny}--pretrained {cfg.finetune.pretrained}"]
           if cfg.finetune.pretrained else [], rank=rank)
    lock.release(out_dir)
    preempt.release()
    dist.cleanup()
    return out


def preempted(out_dir: Path, rank: int, where: str, signal_name: str | None,
              quiet: bool = False) -> preempt.Preempted:
    """A preemption signal stopped the folds: out_dir/preempted.json (a job script's cue to
    requeue), the line saying how to resume (unless the fold's run said it), exit status 75."""
    line = f"preempted {where}; resume with: {resume_command()}"
    if rank == 0:
        write_json(out_dir / "preempted.json", {"where": where, "signal": signal_name,
                                                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                "resume": resume_command()})
        if not quiet:
            print(line, flush=True)
    lock.release(out_dir)
    preempt.consume()
    preempt.release_all()
    dist.cleanup()
    return preempt.Preempted(line, signal_name)


if __name__ == "__main__":
    cli.run(main, Config, PRESETS, doc=__doc__.split("\n\n")[0], resolve=resolve)
