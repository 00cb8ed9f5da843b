"""The paper's downstream tables from one pretrained checkpoint, as seed distributions.

    python -m pqae.reproduce --ckpt runs/pretrain/ckpt-epoch-300          # 8 seeds per task
    python -m pqae.reproduce --ckpt ... --dry-run                         # the plan, nothing run
    python -m pqae.reproduce --pretrain                                   # pretrain first
    python -m pqae.reproduce --preset tiny --pretrain                     # the whole table on a CPU

Every run is one of the existing scripts (finetune_cls.py, fewshot.py, partseg.py,
semseg.py), launched as a user would launch it, with `--seed S` and its own `--out-dir`
under this command's out-dir. The command is idempotent: a run whose results.json exists
is read back, a run that was killed is continued with --resume, so a second invocation
runs only what is missing. A failed run is reported with the tail of its log and does not
stop the others. At the end (and with `--report-only`, at any time) it writes:

* report.json: per task and selection (the epoch selected on the test set, as the paper
  reports; the last epoch), every seed's number, mean, sample std, median, min, max (the
  best of N), the paper's number and where it falls among the seeds; each run's command,
  wall time, device hours, exit status; the machine, versions and commit;
* report.md: the same as tables a person reads;
* figures/*.png (with matplotlib, `pip install -e ".[plots]"`): the seed distributions as
  strip plots with the paper's number marked, the learning curves of every seed, and the
  few-shot table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Task:
    """One row of the paper's tables: a script, its preset, and how to read its results."""
    name: str
    title: str
    script: str
    args: tuple[str, ...]
    kind: str  # cls | fewshot | partseg | semseg
    paper: float | None = None  # the paper's number (a mean +- std per setting for few-shot)
    seeded: bool = True  # False: one run whose units are its folds (few-shot)


PAPER_FEWSHOT = {"5way_10shot": (96.9, 3.2), "5way_20shot": (98.9, 1.0),
                 "10way_10shot": (94.1, 4.2), "10way_20shot": (96.3, 2.7)}

FULL = [
    Task("scan-objbg", "ScanObjectNN OBJ-BG", "finetune_cls.py", ("--preset", "scan-objbg"),
         "cls", 95.0),
    Task("scan-objonly", "ScanObjectNN OBJ-ONLY", "finetune_cls.py",
         ("--preset", "scan-objonly"), "cls", 93.6),
    Task("scan-hardest", "ScanObjectNN PB_T50_RS", "finetune_cls.py",
         ("--preset", "scan-hardest"), "cls", 89.6),
    Task("modelnet-1k", "ModelNet40, 1k points", "finetune_cls.py", ("--preset", "modelnet-1k"),
         "cls", 94.0),
    Task("modelnet-8k", "ModelNet40, 8k points", "finetune_cls.py", ("--preset", "modelnet-8k"),
         "cls", 94.3),
    Task("fewshot", "ModelNet40 few-shot", "fewshot.py", (), "fewshot", seeded=False),
    Task("partseg", "ShapeNetPart (class mIoU)", "partseg.py", (), "partseg", 84.6),
    Task("semseg", "S3DIS Area 5 (mIoU)", "semseg.py", (), "semseg", 61.4),
]
HEADS = {"linear": None, "mlp3": None}  # the other protocols; the paper's numbers not listed

TINY = [  # built-in data: the table's mechanics on a CPU, no paper numbers to compare with
    Task("cls-tiny", "built-in classes (classification)", "finetune_cls.py",
         ("--preset", "tiny"), "cls"),
    Task("fewshot-tiny", "built-in classes (few-shot)", "fewshot.py", ("--preset", "tiny"),
         "fewshot", seeded=False),
    Task("partseg-tiny", "built-in parts (class mIoU)", "partseg.py", ("--preset", "tiny"),
         "partseg"),
    Task("semseg-tiny", "built-in rooms (mIoU)", "semseg.py", ("--preset", "tiny"), "semseg"),
]


@dataclass(frozen=True)
class Config:
    table: Literal["paper", "tiny"] = "paper"
    """paper: the paper's tasks on their data sets; tiny: the same mechanics on the built-in
    data (a few minutes on a CPU; no paper numbers to compare with)."""
    ckpt: str = ""
    """the pretrained checkpoint every task fine-tunes (empty with --pretrain: its
    ckpt-final)."""
    pretrain: bool = False
    """run the pretraining first (pretrain.py with this preset's recipe) into out_dir/pretrain."""
    seeds: int = 8
    """seeds per task (0..seeds-1); few-shot runs its folds instead."""
    heads: tuple[str, ...] = ()
    """other classification protocols to add: linear, mlp3 (the full fine-tuning always runs)."""
    tasks: tuple[str, ...] = ()
    """run only these tasks (names as in the report); empty: all."""
    out_dir: str = "runs/reproduce"
    nproc_per_node: int = 1
    """processes per run (torchrun --nproc_per_node) when > 1."""
    gpus: tuple[int, ...] = ()
    """pack single-process runs onto these GPUs, one run per GPU at a time
    (CUDA_VISIBLE_DEVICES); empty: one run at a time."""
    val_fraction: float = 0.0
    """classification: also hold out this share of each class of the training set
    (finetune_cls.py --val-fraction) and report the test accuracy at the epoch chosen on it,
    an honest selection (0: the paper's protocol only)."""
    extra: tuple[str, ...] = ()
    """more flags for a script's runs, as SCRIPT=FLAGS (e.g. 'finetune_cls.py=--amp')."""
    dry_run: bool = False
    """print the plan (runs, their state, estimated time where a finished run measured it)
    and run nothing."""
    report_only: bool = False
    """write the report from the runs that finished, run nothing."""


PRESETS = {"reference": Config(),
           "tiny": Config(table="tiny", seeds=2, out_dir="runs/reproduce-tiny")}


@dataclass
class Run:
    task: Task
    seed: int | None
    out_dir: Path
    argv: list[str]
    state: str = "new"  # new | resume | done
    status: str = "pending"  # pending | passed | failed | skipped
    seconds: float | None = None
    devices: int = 1
    log: Path | None = None
    log_tail: str = ""
    results: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.task.name + ("" if self.seed is None else f" seed {self.seed}")


# --------------------------------------------------------------------------------- the plan
def tasks_of(cfg: Config, tiny: bool) -> list[Task]:
    table = list(TINY if tiny else FULL)
    for head in cfg.heads:
        if head not in HEADS:
            raise SystemExit(f"error: --heads takes {sorted(HEADS)}, got {head!r}")
        table += [dataclasses.replace(t, name=f"{t.name}-{head}", title=f"{t.title}, {head} head",
                                      args=t.args + ("--head", head), paper=HEADS[head])
                  for t in table if t.kind == "cls" and "--head" not in t.args]
    if cfg.tasks:
        unknown = set(cfg.tasks) - {t.name for t in table}
        if unknown:
            raise SystemExit(f"error: unknown task(s) {sorted(unknown)}; the tasks are "
                             f"{[t.name for t in table]}")
        table = [t for t in table if t.name in cfg.tasks]
    return table


def extra_flags(cfg: Config) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in cfg.extra:
        script, _, flags = item.partition("=")
        if not flags:
            raise SystemExit(f"error: --extra takes SCRIPT=FLAGS, got {item!r}")
        out.setdefault(script, []).extend(shlex.split(flags))
    return out


def plan(cfg: Config, tiny: bool, ckpt: str) -> list[Run]:
    out, extra = Path(cfg.out_dir), extra_flags(cfg)
    runs = []
    for task in tasks_of(cfg, tiny):
        for seed in (range(cfg.seeds) if task.seeded else [None]):
            run_dir = out / task.name / (f"seed-{seed}" if seed is not None else "run")
            argv = [task.script, *task.args, "--pretrained", ckpt, "--out-dir", str(run_dir),
                    *(["--seed", str(seed)] if seed is not None else []),
                    *(["--val-fraction", str(cfg.val_fraction)]
                      if cfg.val_fraction and task.kind == "cls" else []),
                    *extra.get(task.script, [])]
            runs.append(Run(task, seed, run_dir, argv, state=state_of(run_dir)))
    return runs


def state_of(run_dir: Path) -> str:
    if (run_dir / "results.json").is_file():
        return "done"
    return "resume" if (run_dir / "ckpt-last").exists() or (run_dir / "config.json").exists() \
        else "new"


# ------------------------------------------------------------------------------ running them
def command(run: Run, cfg: Config) -> list[str]:
    argv = run.argv + (["--resume"] if run.state == "resume" else [])
    script = str(ROOT / argv[0])
    if cfg.nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={cfg.nproc_per_node}", script, *argv[1:]]
    return [sys.executable, script, *argv[1:]]


def shown(cmd: list[str]) -> str:
    """A command as a user types it: `python SCRIPT ...` from the checkout."""
    cmd = ["python" if c == sys.executable else
           (str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT) + os.sep) else c) for c in cmd]
    return shlex.join(cmd)


def launch(run: Run, cfg: Config, gpu: int | None) -> subprocess.Popen:
    run.log = run.out_dir.parent / f"{run.out_dir.name}.log"
    run.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    run.devices = cfg.nproc_per_node
    log = open(run.log, "a")
    log.write(f"$ {shlex.join(command(run, cfg))}\n")
    log.flush()
    proc = subprocess.Popen(command(run, cfg), stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=os.getcwd())
    proc._pqae = (log, time.time(), gpu)  # noqa: SLF001
    return proc


def execute(runs: list[Run], cfg: Config, say=print) -> None:
    """Run what is not done: one at a time, or one per GPU of --gpus at a time."""
    todo = [r for r in runs if r.state != "done"]
    slots: list[int | None] = list(cfg.gpus) or [None]
    active: dict[subprocess.Popen, Run] = {}
    free = list(slots)
    for i, run in enumerate(todo + [None] * len(slots)):
        while active and (not free or run is None):
            proc = next((p for p in active if p.poll() is not None), None)
            if proc is None:
                time.sleep(0.2)
                continue
            done = active.pop(proc)
            log, t0, gpu = proc._pqae  # noqa: SLF001
            log.close()
            done.seconds = time.time() - t0
            done.status = "passed" if proc.returncode == 0 else "failed"
            if proc.returncode != 0:
                done.log_tail = "".join(done.log.read_text(errors="replace").splitlines(True)[-30:])
            elif not (done.out_dir / "results.json").is_file():
                done.status, done.log_tail = "failed", "finished without writing results.json"
            record(done)
            free.append(gpu)
            say(f"  {done.label}: {done.status} in {done.seconds:.0f} s ({len(todo) - sum(1 for r in todo if r.status == 'pending') - len(active)}/{len(todo)} runs)")
        if run is None:
            continue
        gpu = free.pop(0)
        say(f"  {run.label}: {'resuming' if run.state == 'resume' else 'starting'}"
            f"{f' on GPU {gpu}' if gpu is not None else ''} (log {run.out_dir.parent / (run.out_dir.name + '.log')})")
        active[launch(run, cfg, gpu)] = run


def record(run: Run) -> None:
    """<run dir>.json: the run's command, status and wall time, kept for later reports and
    for the next --dry-run's estimates."""
    from pqae.log import write_json
    write_json(run.out_dir.parent / f"{run.out_dir.name}.json",
               {"status": run.status, "seconds": run.seconds, "devices": run.devices,
                "log": str(run.log), "log_tail": run.log_tail})


def recorded(run: Run) -> dict:
    path = run.out_dir.parent / f"{run.out_dir.name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------ the numbers
def selections(task: Task, results: dict) -> dict[str, dict[str, float | None]]:
    """{sub-task: {selection: number}} of one run's results.json. Sub-tasks: the metric
    itself, or a few-shot setting's folds (fold i under 'fold-i')."""
    if task.kind == "cls":
        return {"acc": {"test-selected epoch": results.get("best_acc"),
                        "last epoch": results.get("last_acc"),
                        "val-selected epoch": results.get("val_selected_acc"),
                        "voting (last epoch)": results.get("vote_acc")}}
    if task.kind == "partseg":
        best, last = results.get("best_on_test", {}), results.get("last", {})
        return {m: {"test-selected epoch": best.get(m), "last epoch": last.get(m)}
                for m in ("class_miou", "instance_miou")}
    if task.kind == "semseg":
        hist = [h for h in results.get("history", []) if h.get("miou") is not None]
        return {"miou": {"test-selected epoch": results.get("best_miou"),
                         "last epoch": hist[-1]["miou"] if hist else None}}
    return {setting: {"test-selected epoch": [f["best_acc"] for f in folds],
                      "last epoch": [f["last_acc"] for f in folds]}
            for setting, folds in results.get("folds", {}).items()}


def curve(task: Task, results: dict) -> list[tuple[int, float]]:
    """(epoch, test number) of every evaluated epoch of one run."""
    key = {"cls": "acc", "partseg": "class_miou", "semseg": "miou"}.get(task.kind)
    return [(h["epoch"], h[key]) for h in results.get("history", [])
            if key and h.get(key) is not None]


def distribution(values: list[float], paper: float | None) -> dict:
    """Statistics of one selection over the seeds, and where the paper's number falls."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    out = {"values": values, "n": len(values), "mean": statistics.fmean(values),
           "std": statistics.stdev(values) if len(values) > 1 else None,
           "median": statistics.median(values), "min": min(values), "max": max(values)}
    if paper is not None:
        above = sum(paper > v for v in values)
        out["paper"] = paper
        out["paper_above"] = above
        out["paper_position"] = (f"the paper's {paper:g} is above {above} of our {len(values)} "
                                 f"seeds" + (" (above our best)" if above == len(values) else ""))
    return out


def report(runs: list[Run], cfg: Config, tiny: bool, ckpt: str, wall: float) -> dict:
    """report.json's content: per task, sub-task and selection, the distribution."""
    tasks: dict[str, dict] = {}
    for run in runs:
        if run.state == "done" or run.status == "passed":
            run.results = json.loads((run.out_dir / "results.json").read_text())
        if run.state == "done":  # finished by an earlier invocation: its recorded time
            rec = recorded(run)
            run.seconds, run.devices = rec.get("seconds"), rec.get("devices", 1)
    for task in dict.fromkeys(r.task for r in runs):
        mine = [r for r in runs if r.task == task and r.results]
        per = [selections(task, r.results) for r in mine]
        entry = {"title": task.title, "script": task.script, "kind": task.kind,
                 "seeds": [r.seed for r in mine], "metrics": {}, "curves": {}}
        for sub in dict.fromkeys(k for p in per for k in p):
            entry["metrics"][sub] = {}
            for sel in dict.fromkeys(s for p in per for s in p.get(sub, {})):
                vals = [p[sub][sel] for p in per if sub in p]
                if task.kind == "fewshot":  # one run: its folds are the distribution
                    vals, paper = (vals[0] if vals else []), PAPER_FEWSHOT.get(sub, (None,))[0]
                    if tiny:
                        paper = None
                else:
                    paper = task.paper if sub in ("acc", "class_miou", "miou") and \
                        sel == "test-selected epoch" else None
                d = distribution(vals, paper)
                if d["n"]:  # a selection no run made (val-selected without --val-fraction)
                    entry["metrics"][sub][sel] = d
        entry["curves"] = {str(r.seed): curve(task, r.results) for r in mine if curve(task, r.results)}
        tasks[task.name] = entry
    return {"checkpoint": ckpt, "preset": "tiny" if tiny else "reference",
            "seeds": cfg.seeds, "wall_s": round(wall, 1), "machine": machine(),
            "tasks": tasks,
            "runs": [{"task": r.task.name, "seed": r.seed, "out_dir": str(r.out_dir),
                      "command": shown(command(r, cfg)), "state": r.state,
                      "status": "done before" if r.state == "done" else r.status,
                      "seconds": None if r.seconds is None else round(r.seconds, 1),
                      "device_hours": None if r.seconds is None else
                      round(r.seconds * r.devices / 3600, 4),
                      "log": str(r.log) if r.log else None,
                      **({"log_tail": r.log_tail} if r.log_tail else {})} for r in runs]}


def machine() -> dict:
    import torch
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or None
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpus": gpus, "cpu": platform.processor() or platform.machine(),
            "commit": commit, "uncommitted_changes": dirty}


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [f"# Reproduction report ({rep['preset']})", "",
             f"Checkpoint `{rep['checkpoint']}`; commit {m['commit']}"
             f"{' with uncommitted changes' if m['uncommitted_changes'] else ''}; torch "
             f"{m['torch']}; {', '.join(m['gpus']) or 'CPU ' + m['cpu']}; wall time "
             f"{rep['wall_s'] / 60:.1f} min.", "",
             "Numbers in %. **test-selected epoch** is the paper's protocol: the best epoch chosen "
             "on the test set itself, an optimistic number. **last epoch** and (with "
             "--val-fraction) **val-selected epoch**, the test accuracy at the epoch chosen on "
             "a part of the training set held out at each seed, are honest ones. std is the sample std (n-1). The paper reports the best of about 8 "
             "seeds (its README's recommendation); `max` is that number here.", ""]
    for name, t in rep["tasks"].items():
        lines += [f"## {t['title']} (`{name}`)", "",
                  "| metric | selection | n | mean ± std | median | min | max (best of n) | "
                  "paper | per seed (or fold) |", "|---|---|---|---|---|---|---|---|---|"]
        for sub, sels in t["metrics"].items():
            for sel, d in sels.items():
                if not d.get("n"):
                    continue
                lines.append(
                    f"| {sub} | {sel} | {d['n']} | {fmt(d['mean'])} ± {fmt(d['std'])} | "
                    f"{fmt(d['median'])} | {fmt(d['min'])} | {fmt(d['max'])} | "
                    f"{fmt(d.get('paper'), 1)} | {', '.join(fmt(v) for v in d['values'])} |")
        notes = [d["paper_position"] for sels in t["metrics"].values() for d in sels.values()
                 if d.get("paper_position")]
        lines += [""] + [f"* {n}." for n in notes] + ([""] if notes else [])
    lines += ["## Runs", ""]
    pre = rep.get("pretraining")
    if pre:
        lines += [f"Pretraining (`--pretrain`) into `{pre['out_dir']}`: {pre['status']}"
                  + (f" in {pre['seconds'] / 60:.1f} min" if pre.get("seconds") else "") + ".",
                  ""]
    lines += ["| task | seed | status | minutes | device hours | command |",
              "|---|---|---|---|---|---|"]
    for r in rep["runs"]:
        lines.append(f"| {r['task']} | {'-' if r['seed'] is None else r['seed']} | {r['status']} | "
                     f"{fmt(r['seconds'] / 60 if r['seconds'] is not None else None, 1)} | "
                     f"{fmt(r['device_hours'], 3)} | `{r['command']}` |")
    failed = [r for r in rep["runs"] if r["status"] == "failed"]
    for r in failed:
        lines += ["", f"### {r['task']} seed {r['seed']} failed: log tail ({r['log']})", "",
                  "```", r.get("log_tail", "").rstrip(), "```"]
    figures = rep.get("figures")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    elif figures is None:
        lines += ["", "Figures need matplotlib: `pip install -e \".[plots]\"`, then "
                      "`python -m pqae.reproduce --report-only` with the same flags."]
    return "\n".join(lines) + "\n"


def figures(rep: dict, out: Path) -> list[str] | None:
    """Strip plots of every task's seed distribution (paper marked), learning curves, and the
    few-shot table; None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    (out / "figures").mkdir(parents=True, exist_ok=True)
    made = []
    panels = [(f"{t['title']}: {sub}", [(sel, d) for sel, d in sels.items()
                                         if d.get("n") and sel != "voting (last epoch)"])
              for name, t in rep["tasks"].items() if t["kind"] != "fewshot"
              for sub, sels in t["metrics"].items()]
    panels = [p for p in panels if p[1]]
    if panels:  # one panel per task and metric, each on its own scale
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.25 * len(panels) + 0.6),
                                 squeeze=False)
        for ax, (title, rows) in zip(axes[:, 0], panels):
            for i, (sel, d) in enumerate(rows):
                ax.scatter(d["values"], [i] * d["n"], s=22, alpha=0.7, color="tab:blue")
                ax.plot([d["mean"]] * 2, [i - 0.3, i + 0.3], color="tab:blue")
                if d.get("paper") is not None:
                    ax.scatter([d["paper"]], [i], marker="*", s=140, color="tab:red", zorder=3)
            ax.set_yticks(range(len(rows)), [sel for sel, _ in rows], fontsize=7)
            ax.set_ylim(-0.6, len(rows) - 0.4)
            ax.set_title(title, fontsize=8, loc="left")
            ax.tick_params(axis="x", labelsize=7)
        axes[-1, 0].set_xlabel("%  (dots: seeds, bar: mean, red star: the paper)")
        fig.tight_layout()
        fig.savefig(out / "figures" / "distributions.png", dpi=110)
        plt.close(fig)
        made.append("figures/distributions.png")
    for name, t in rep["tasks"].items():
        if not t["curves"]:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for seed, pts in t["curves"].items():
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker=".", label=f"seed {seed}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test %")
        ax.set_title(f"{t['title']}: test score per epoch")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "figures" / f"curves-{name}.png", dpi=110)
        plt.close(fig)
        made.append(f"figures/curves-{name}.png")
    for name, t in rep["tasks"].items():
        if t["kind"] != "fewshot" or not t["metrics"]:
            continue
        settings = list(t["metrics"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, sel in enumerate(("test-selected epoch", "last epoch")):
            ds = [t["metrics"][s].get(sel, {}) for s in settings]
            ax.errorbar([i + 0.15 * k for i in range(len(settings))],
                        [d.get("mean", float("nan")) for d in ds],
                        [d.get("std") or 0 for d in ds], fmt="o", capsize=3, label=sel)
        papers = [PAPER_FEWSHOT.get(s) for s in settings]
        if rep["preset"] != "tiny" and any(papers):
            ax.errorbar([i + 0.3 for i in range(len(settings))], [p[0] for p in papers],
                        [p[1] for p in papers], fmt="*", color="tab:red", capsize=3, label="paper")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_ylabel("accuracy %  (mean ± std over folds)")
        ax.set_title(t["title"])
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "figures" / f"fewshot-{name}.png", dpi=110)
        plt.close(fig)
        made.append(f"figures/fewshot-{name}.png")
    return made


def write_report(runs: list[Run], cfg: Config, tiny: bool, ckpt: str, wall: float) -> dict:
    from pqae.log import write_json
    out = Path(cfg.out_dir)
    rep = report(runs, cfg, tiny, ckpt, wall)
    record_file = out / "pretrain.json"  # --pretrain's run (`record`)
    if record_file.is_file():
        rep["pretraining"] = {**json.loads(record_file.read_text()),
                              "out_dir": str(out / "pretrain")}
    rep["figures"] = figures(rep, out)
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(markdown(rep))
    return rep


# ------------------------------------------------------------------------------------ main
def dry_run(runs: list[Run], cfg: Config) -> None:
    measured: dict[str, float] = {}  # task -> seconds of a finished run in this out-dir
    for r in runs:
        rec = recorded(r)
        if rec.get("status") == "passed" and rec.get("seconds"):
            measured.setdefault(r.task.name, rec["seconds"] * rec.get("devices", 1))
    print(f"plan: {len(runs)} runs in {cfg.out_dir} "
          f"({sum(r.state == 'done' for r in runs)} done, "
          f"{sum(r.state == 'resume' for r in runs)} to resume, "
          f"{sum(r.state == 'new' for r in runs)} new)")
    total, unknown = 0.0, 0
    for r in runs:
        est = measured.get(r.task.name)
        if r.state != "done":
            if est is None:
                unknown += 1
            else:
                total += est
        print(f"  {r.label:28s} {r.state:7s} {epochs_of(r):>7s} ep "
              f"{'-' if r.state == 'done' else (duration(est) if est else 'time unknown'):>12s}"
              f"  $ {shown(command(r, cfg))}")
    print(f"estimated: {duration(total)} of device time for the runs with a measured time"
          + (f"; {unknown} runs have none yet (their task has no finished run here)"
             if unknown else ""))


def epochs_of(run: Run) -> str:
    """The epochs a run trains, from its script's own config for its flags ('?' when they do
    not parse, e.g. a flag of --extra the script does not know)."""
    from pqae.cli import parse
    from pqae.show import script
    module = script(Path(run.argv[0]).stem)
    try:
        cfg = parse(module.Config, module.PRESETS, args=run.argv[1:])  # reads no file
    except (SystemExit, Exception):  # noqa: BLE001  (the plan still prints)
        return "?"
    if hasattr(cfg, "finetune"):  # few-shot: every setting and fold
        runs = len(cfg.ways) * len(cfg.shots) * len(cfg.folds)
        return f"{runs}x{cfg.finetune.epochs + 1}"
    return str(cfg.epochs + 1)


def duration(seconds: float) -> str:
    return f"~{seconds / 3600:.1f} h" if seconds >= 3600 else f"~{seconds / 60:.1f} min"


def main(cfg: Config) -> dict:
    tiny = cfg.table == "tiny"
    out = Path(cfg.out_dir)
    ckpt = cfg.ckpt or (str(out / "pretrain" / "ckpt-final") if cfg.pretrain else "")
    if not ckpt:
        raise SystemExit("error: give --ckpt (a pretrained checkpoint) or --pretrain")
    runs = plan(cfg, tiny, ckpt)
    if cfg.dry_run:
        dry_run(runs, cfg)
        return {"runs": runs}
    t0 = time.time()
    if not cfg.report_only:
        if cfg.pretrain and not (out / "pretrain" / "results.json").is_file():
            pre = Run(Task("pretrain", "pretraining", "pretrain.py",
                           ("--preset", "tiny") if tiny else (), "pretrain", seeded=False),
                      None, out / "pretrain", [], state=state_of(out / "pretrain"))
            pre.argv = ["pretrain.py", *pre.task.args, "--out-dir", str(pre.out_dir),
                        *extra_flags(cfg).get("pretrain.py", [])]
            print(f"pretraining first into {pre.out_dir}")
            execute([pre], cfg)
            if pre.status == "failed":
                raise SystemExit(f"error: the pretraining failed; its log: {pre.log}\n"
                                 f"{pre.log_tail}")
        print(f"{len(runs)} runs ({sum(r.state == 'done' for r in runs)} done before) -> {out}")
        execute(runs, cfg)
    rep = write_report(runs, cfg, tiny, ckpt, time.time() - t0)
    failed = [r for r in runs if r.status == "failed"]
    print(f"done | {len(runs) - len(failed)}/{len(runs)} runs | report {out / 'report.md'}"
          + (f" | {len(failed)} failed (see the report)" if failed else ""))
    for name, t in rep["tasks"].items():
        for sub, sels in t["metrics"].items():
            d = sels.get("test-selected epoch", {})
            if d.get("n"):
                print(f"  {name:22s} {sub:14s} {fmt(d['mean'])} ± {fmt(d['std'])} "
                      f"(max {fmt(d['max'])}, n {d['n']})"
                      + (f" | paper {d['paper']:g}" if d.get("paper") is not None else ""))
    if failed:
        raise SystemExit(1)
    return {"runs": runs, "report": rep}


if __name__ == "__main__":
    from pqae.cli import run
    run(main, Config, PRESETS, doc=__doc__.split("\n\n")[0], prog="python -m pqae.reproduce")
