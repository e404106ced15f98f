"""``ps-experiment``: run a grid of ps-launch jobs and report what it shows.

A *manifest* (a TOML file, ``--manifest FILE``, or the same keys as flags;
flags win) describes a grid::

    workloads x servers x workers x staleness bounds x straggler profiles
              x optimizers x lr x staleness_lr x dc_lambda x batch sizes x steps x seeds

Every *cell* (one point of the grid, one seed) runs as one
``bin/ps-launch ... --quiet --out OUT/runs/<cell-id>`` subprocess.  A cell is
*finished* when its ``summary.json`` exists and parses; a rerun with the same
``--out`` skips finished cells, so an interrupted experiment resumes.  Progress
lines show ``[i/N]``, elapsed time, an ETA and the cell's result.  Ctrl-C,
SIGTERM and SIGHUP stop the running job and write the results of the finished
cells (exit status 128 + the signal); a ps-experiment killed outright takes its
job with it (the kernel sends the job SIGTERM).

The results folder gets (all small, all reproducible from ``runs/``):

    runs.csv       one row per run: the grid keys, seed, wall_seconds, time_to_target, ...
    summary.csv    the runs aggregated over seeds (mean, std, min, max; reached count)
    curves.csv     worker 0's evaluation rows of every run (the data behind the curves; join on cell_id)
    manifest.toml  the resolved grid, out and name included (``--manifest`` reruns it)
    *.png          the plots (matplotlib, Agg)
    report.md      grid, tables, plots and findings computed from the data
    .gitignore     ignores runs/ (the per-run logs and metrics)

Pure pieces (manifest parsing, the grid, :func:`time_to_target`,
:func:`aggregate`, :func:`findings`) do no I/O and are unit-tested; the
executor (:func:`run_grid`) does the subprocesses; :func:`write_results`
reads the finished runs and writes the folder.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from typing import Any, Callable, Iterable, Mapping, Sequence

from common.errors import ConfigError
from worker.stragglers import StragglerProfile
from worker.workloads import WORKLOADS
from zpscluster.procs import bin_cmd, guarded

__all__ = ["ManifestError", "OptimizerSpec", "Manifest", "Cell", "parse_manifest", "grid", "launch_command",
           "is_finished", "time_to_target", "run_record", "aggregate", "findings", "run_grid",
           "write_results", "main"]

#: grid keys, in column order (each named after its ps-experiment flag, '-' written '_')
GRID_KEYS = ("workload", "servers", "workers", "staleness", "straggler", "optimizer", "lr",
             "staleness_lr", "dc_lambda", "batch_size", "steps")
#: per-run measurements in runs.csv, after the grid keys and the seed
RUN_FIELDS = ("cell_id", "metric", "target", "wall_seconds", "train_seconds", "iterations",
              "time_to_target", "clock_to_target", "final_metric", "final_loss", "staleness_mean",
              "staleness_max", "wait_seconds", "compute_seconds", "delay_seconds", "bytes",
              "optimizer_used", "lr_used", "momentum_used")
#: measurements aggregated over seeds as mean/std/min/max
AGG_FIELDS = ("wall_seconds", "train_seconds", "iterations", "final_metric", "final_loss",
              "staleness_mean", "staleness_max", "wait_seconds", "compute_seconds", "delay_seconds",
              "bytes", "clock_to_target")
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
OPT_KEYS = {"lr": float, "momentum": float, "weight_decay": float}


class ManifestError(ConfigError):
    """A manifest key with a bad value; the message names the key and the value."""


# --------------------------------------------------------------------------- manifest
@dataclasses.dataclass(frozen=True, order=True)
class OptimizerSpec:
    """An optimizer token ``NAME[:key=value...]`` (keys lr, momentum, weight_decay), e.g. ``sgd:momentum=0.9``.

    ``default`` is the workload's optimizer.  The token, normalised, is what
    runs.csv records in its ``optimizer`` column.
    """

    name: str = "default"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None

    @classmethod
    def parse(cls, text: str) -> "OptimizerSpec":
        t = str(text).strip().lower()
        parts = t.split(":")
        name = parts[0]
        if name not in OPTIMIZERS + ("default",):
            raise ManifestError(f"optimizer: {text!r} names no known optimizer; "
                                f"known: {', '.join(OPTIMIZERS)}, default")
        vals: dict[str, float] = {}
        for p in parts[1:]:
            key, eq, v = p.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in OPT_KEYS:
                raise ManifestError(f"optimizer: {text!r} has the bad option {p!r}; write NAME:key=value "
                                    f"with key one of {', '.join(OPT_KEYS)}")
            try:
                x = float(v)
            except ValueError:
                raise ManifestError(f"optimizer: {text!r}: {key} must be a number, got {v!r}") from None
            if not math.isfinite(x) or x < 0 or (key == "lr" and x == 0) or (key == "momentum" and x >= 1):
                raise ManifestError(f"optimizer: {text!r}: {key}={v} is out of range")
            vals[key] = x
        if "momentum" in vals and name != "sgd":
            raise ManifestError(f"optimizer: {text!r}: momentum applies to sgd only")
        return cls(name, **vals)

    def __str__(self) -> str:
        opts = [f"{k}={_num(getattr(self, k))}" for k in OPT_KEYS if getattr(self, k) is not None]
        return ":".join([self.name] + opts)


def _num(x: float) -> str:
    return f"{x:g}"


def _staleness(key: str, v: Any) -> str:
    s = str(v).strip().lower()
    if s in ("inf", "infinity", "asp"):
        return "inf"
    if isinstance(v, float) and v == math.inf:
        return "inf"
    try:
        n = int(v) if isinstance(v, float) and v.is_integer() else int(s)   # TOML 3.0 is 3
    except ValueError:
        n = -1
    if n < 0 or isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ManifestError(f"{key}: {v!r} is not a staleness bound (a non-negative integer or inf)")
    return str(n)


def _int(minimum: int) -> Callable[[str, Any], int]:
    def conv(key: str, v: Any) -> int:
        try:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            n = int(str(v).strip()) if not isinstance(v, float) else int(v)
        except ValueError:
            raise ManifestError(f"{key}: {v!r} is not an integer") from None
        if n < minimum:
            raise ManifestError(f"{key}: {v!r} must be >= {minimum}")
        return n
    return conv


def _float(minimum: float, strict: bool = False) -> Callable[[str, Any], float]:
    def conv(key: str, v: Any) -> float:
        try:
            if isinstance(v, bool):
                raise ValueError
            x = float(str(v).strip())
        except ValueError:
            raise ManifestError(f"{key}: {v!r} is not a number") from None
        if not math.isfinite(x) or x < minimum or (strict and x == minimum):
            raise ManifestError(f"{key}: {v!r} must be a finite number {'>' if strict else '>='} {minimum:g}")
        return x
    return conv


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ManifestError(f"{key}: {v!r} is not a boolean (true/false)")


def _workload(key: str, v: Any) -> str:
    s = str(v).strip().lower()
    if s not in WORKLOADS:
        raise ManifestError(f"{key}: {v!r} is not a workload; known: {', '.join(sorted(WORKLOADS))}")
    return s


def _straggler(key: str, v: Any) -> str:
    try:
        return StragglerProfile.parse(str(v)).text
    except ConfigError as exc:
        raise ManifestError(f"{key}: {v!r} is not a straggler profile ({exc})") from None


def _optimizer(key: str, v: Any) -> OptimizerSpec:
    return OptimizerSpec.parse(str(v))


def _optional(conv: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def wrapped(key: str, v: Any) -> Any:
        if v is None or str(v).strip().lower() in ("", "default", "none"):
            return None
        return conv(key, v)
    return wrapped


#: list-valued keys: key -> (converter of one value, default list)
LIST_KEYS: dict[str, tuple[Callable[[str, Any], Any], list]] = {
    "workload": (_workload, []),
    "servers": (_int(1), [1]),
    "workers": (_int(1), [4]),
    "staleness": (_staleness, ["0", "3", "inf"]),
    "straggler": (_straggler, ["none"]),
    "optimizer": (_optimizer, [OptimizerSpec()]),
    "lr": (_optional(_float(0.0, strict=True)), [None]),
    "staleness_lr": (_bool, [False]),
    "dc_lambda": (_float(0.0), [0.0]),
    "batch_size": (_optional(_int(1)), [None]),
    "steps": (_optional(_int(1)), [None]),
}
#: scalar keys: key -> (converter, default)
SCALAR_KEYS: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "eval_every": (_optional(_int(1)), None),
    "timeout": (_float(1.0), 1800.0),
    "out": (lambda k, v: str(v), "out/experiment"),
    "name": (lambda k, v: str(v), ""),
}


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A resolved, validated grid (what ``parse_manifest`` returns)."""

    workload: tuple[str, ...]
    servers: tuple[int, ...] = (1,)
    workers: tuple[int, ...] = (4,)
    staleness: tuple[str, ...] = ("0", "3", "inf")
    straggler: tuple[str, ...] = ("none",)
    optimizer: tuple[OptimizerSpec, ...] = (OptimizerSpec(),)
    lr: tuple[float | None, ...] = (None,)
    staleness_lr: tuple[bool, ...] = (False,)
    dc_lambda: tuple[float, ...] = (0.0,)
    batch_size: tuple[int | None, ...] = (None,)
    steps: tuple[int | None, ...] = (None,)
    seeds: tuple[int, ...] = (0,)
    target: Mapping[str, float] = dataclasses.field(default_factory=dict)
    eval_every: int | None = None
    timeout: float = 1800.0
    out: str = "out/experiment"
    name: str = ""

    def target_for(self, workload: str) -> float:
        """The time-to-target threshold of ``workload``: the manifest's, else its defaults.target."""
        return self.target.get(workload, WORKLOADS[workload].defaults.target)

    def varying(self) -> list[str]:
        """The grid keys that take more than one value (the seeds excluded)."""
        return [k for k in GRID_KEYS if len(getattr(self, k)) > 1]


def _split(key: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = [p.strip() for p in value.split(",")]
    else:
        items = [value]
    if not items or any(isinstance(i, str) and i == "" for i in items):
        raise ManifestError(f"{key}: {value!r} has an empty value")
    return items


def _seeds(value: Any) -> tuple[int, ...]:
    """``N`` means seeds 0..N-1; a list (TOML, or text with a comma: ``7,9``, ``7,`` for 7 alone) is the seeds."""
    if isinstance(value, str) and "," in value:
        text = value.strip()
        value = _split("seeds", text[:-1] if text.endswith(",") and text.count(",") == 1 else text)
    if isinstance(value, (list, tuple)):
        seeds = tuple(_int(0)("seeds", v) for v in _split("seeds", value))
    else:
        seeds = tuple(range(_int(1)("seeds", value)))
    if len(set(seeds)) != len(seeds):
        raise ManifestError(f"seeds: {value!r} repeats a seed")
    return seeds


def _targets(value: Any, workloads: Sequence[str]) -> dict[str, float]:
    """``0.5``, ``"mf=0.5,digits=0.9"`` or a TOML table ``{mf = 0.5}``."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str) and "=" in value:
        pairs = []
        for item in _split("target", value):
            k, _, v = item.partition("=")
            pairs.append((k.strip(), v))
    else:
        x = _float(-math.inf)("target", value)
        return {w: x for w in workloads}
    out = {}
    for k, v in pairs:
        if k not in workloads:
            raise ManifestError(f"target: {k!r}={v!r} names a workload that is not in the grid "
                                f"({', '.join(workloads)})")
        out[k] = _float(-math.inf)("target", v)
    return out


def parse_manifest(values: Mapping[str, Any]) -> Manifest:
    """A validated Manifest from a mapping (a parsed TOML file merged with flags).

    Every value may be a list, a scalar or a comma-separated string.  Raises
    :class:`ManifestError` naming the key and the value.
    """
    known = set(LIST_KEYS) | set(SCALAR_KEYS) | {"seeds", "target"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ManifestError(f"unknown manifest key(s) {', '.join(map(repr, unknown))}; "
                            f"known keys: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    for key, (conv, default) in LIST_KEYS.items():
        if key in values and values[key] is not None:
            items = [conv(key, v) for v in _split(key, values[key])]
        else:
            items = list(default)
        seen = []
        for it in items:
            if it in seen:
                raise ManifestError(f"{key}: {values.get(key)!r} repeats the value {it!r}")
            seen.append(it)
        kw[key] = tuple(items)
    if not kw["workload"]:
        raise ManifestError("workload: the manifest names no workload (e.g. workload = \"mf\")")
    for key, (conv, default) in SCALAR_KEYS.items():
        kw[key] = conv(key, values[key]) if values.get(key) is not None else default
    kw["seeds"] = _seeds(values["seeds"]) if values.get("seeds") is not None else (0,)
    kw["target"] = _targets(values["target"], kw["workload"]) if values.get("target") is not None else {}
    for text in kw["straggler"]:
        for r in StragglerProfile.parse(text).ranks:
            too_small = [w for w in kw["workers"] if r >= w]
            if too_small:
                raise ManifestError(f"straggler: {text!r} names worker rank {r} but workers={too_small[0]} "
                                    f"has ranks 0..{too_small[0] - 1}")
    return Manifest(**kw)


def load_manifest_file(path: str) -> dict[str, Any]:
    """The raw mapping of a TOML manifest (keys with '-' are read as '_')."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ManifestError(f"manifest {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"manifest {path!r} is not valid TOML: {exc}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def manifest_toml(m: Manifest) -> str:
    """The resolved manifest as TOML (``ps-experiment --manifest`` reads it back)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))

    lines = [f"# resolved grid of {m.name or m.out}"]
    for key in GRID_KEYS:
        items = [v if v is not None else "default" for v in getattr(m, key)]
        lines.append(f"{key} = [{', '.join(val(v) for v in items)}]")
    lines.append(f"seeds = [{', '.join(str(s) for s in m.seeds)}]")
    lines.append("target = {" + ", ".join(f"{w} = {m.target_for(w)!r}" for w in m.workload) + "}")
    if m.eval_every is not None:
        lines.append(f"eval_every = {m.eval_every}")
    lines.append(f"timeout = {m.timeout!r}")
    lines.append(f"out = {val(m.out)}")     # as given: relative to the directory ps-experiment ran in
    if m.name:
        lines.append(f"name = {val(m.name)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- grid
@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: every grid key's value, the seed and the manifest's ``eval_every``."""

    workload: str
    servers: int
    workers: int
    staleness: str
    straggler: str
    optimizer: OptimizerSpec
    lr: float | None
    staleness_lr: bool
    dc_lambda: float
    batch_size: int | None
    steps: int | None
    seed: int
    eval_every: int | None = None   # not a grid key, but it changes time_to_target's resolution

    def keys(self) -> dict[str, Any]:
        """The grid keys as runs.csv writes them (None as empty)."""
        d = {k: getattr(self, k) for k in GRID_KEYS}
        d["optimizer"] = str(self.optimizer)
        return {k: ("" if v is None else v) for k, v in d.items()}

    @property
    def effective_lr(self) -> float | None:
        return self.optimizer.lr if self.optimizer.lr is not None else self.lr

    @property
    def cell_id(self) -> str:
        """A readable, stable folder name: the main keys plus a hash of every setting that changes the run.

        ``eval_every`` is hashed only when given, so that runs at the trainer's
        interval keep the ids they had before it was part of the hash.
        """
        ident = {**self.keys(), "seed": self.seed}
        if self.eval_every is not None:
            ident["eval_every"] = self.eval_every
        full = json.dumps(ident, sort_keys=True, default=str)
        digest = hashlib.sha1(full.encode()).hexdigest()[:8]
        slug = f"{self.workload}-S{self.servers}-W{self.workers}-s{self.staleness}-{self.straggler}-" \
               f"{self.optimizer}-seed{self.seed}"
        slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", slug)
        return f"{slug}-{digest}"


def grid(m: Manifest) -> list[Cell]:
    """Every cell of the manifest, in a stable order (the seeds vary fastest).

    An optimizer token with its own lr ignores the lr axis; cells that end up
    the same run are kept once.
    """
    cells: list[Cell] = []
    seen: set = set()
    axes = [getattr(m, k) for k in GRID_KEYS] + [m.seeds]
    for values in itertools.product(*axes):
        d = dict(zip(GRID_KEYS + ("seed",), values))
        if d["optimizer"].lr is not None:
            d["lr"] = None
        cell = Cell(**d, eval_every=m.eval_every)
        if cell in seen:
            continue
        seen.add(cell)
        cells.append(cell)
    return cells


def launch_command(cell: Cell, m: Manifest, run_dir: str) -> list[str]:
    """The ps-launch command line of one cell."""
    cmd = ["--workload", cell.workload, "--servers", str(cell.servers), "--workers", str(cell.workers),
           "--staleness", cell.staleness, "--straggler", cell.straggler, "--seed", str(cell.seed)]
    opt = cell.optimizer
    if opt.name != "default":
        cmd += ["--optimizer", opt.name]
    if cell.effective_lr is not None:
        cmd += ["--lr", _num(cell.effective_lr)]
    if opt.momentum is not None:
        cmd += ["--momentum", _num(opt.momentum)]
    if opt.weight_decay is not None:
        cmd += ["--weight-decay", _num(opt.weight_decay)]
    if cell.staleness_lr:
        cmd.append("--staleness-lr")
    if cell.dc_lambda > 0:
        cmd += ["--dc-lambda", _num(cell.dc_lambda)]
    if cell.batch_size is not None:
        cmd += ["--batch-size", str(cell.batch_size)]
    if cell.steps is not None:
        cmd += ["--steps", str(cell.steps)]
    if cell.eval_every is not None:
        cmd += ["--eval-every", str(cell.eval_every)]
    cmd += ["--timeout", _num(m.timeout), "--quiet", "--out", run_dir]
    return bin_cmd("ps-launch", *cmd)


def is_finished(run_dir: str) -> bool:
    """A cell is finished when its summary.json exists and parses."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as fh:
            return isinstance(json.load(fh), dict)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- measurements (pure)
def time_to_target(evals: Iterable[Mapping[str, Any]], target: float, higher_is_better: bool,
                   key: str = "elapsed") -> float | None:
    """``key`` (elapsed seconds, or clock) of the first evaluation that reaches ``target``; None if none does.

    ``evals`` are worker 0's rows carrying ``eval``; they are taken in
    ``elapsed`` order.  Reaching means ``eval >= target`` when higher is
    better, ``eval <= target`` otherwise.
    """
    for r in sorted(evals, key=lambda r: r["elapsed"]):
        v = r.get("eval")
        if v is None or not math.isfinite(v):
            continue
        if (v >= target) if higher_is_better else (v <= target):
            return float(r[key])
    return None


def run_record(cell: Cell, summary: Mapping[str, Any], evals: Sequence[Mapping[str, Any]],
               train_seconds: float, target: float, higher_is_better: bool) -> dict[str, Any]:
    """One runs.csv row from a finished run's summary.json and worker 0's eval rows."""
    ttt = time_to_target(evals, target, higher_is_better)
    ctt = time_to_target(evals, target, higher_is_better, key="clock")
    return {
        **cell.keys(), "seed": cell.seed, "cell_id": cell.cell_id,
        "metric": summary["eval_metric"]["name"], "target": target,
        "wall_seconds": summary["wall_seconds"], "train_seconds": round(train_seconds, 3),
        "iterations": summary["iterations"],
        "time_to_target": "" if ttt is None else round(ttt, 3),
        "clock_to_target": "" if ctt is None else int(ctt) + 1,
        "final_metric": summary["eval_metric"]["value"], "final_loss": summary["final_loss"],
        "staleness_mean": round(summary["staleness_mean"], 4), "staleness_max": summary["staleness_max"],
        "wait_seconds": round(summary["wait_seconds_total"], 4),
        "compute_seconds": round(summary["compute_seconds_total"], 4),
        "delay_seconds": round(summary.get("delay_seconds_total", 0.0), 4),
        "bytes": summary.get("bytes_sent", 0) + summary.get("bytes_received", 0),
        "optimizer_used": summary.get("optimizer") or "", "lr_used": summary.get("lr") or "",
        "momentum_used": "" if summary.get("momentum") is None else summary["momentum"],
    }


def _floats(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    out = []
    for r in rows:
        v = r.get(key, "")
        if v == "" or v is None:
            continue
        out.append(float(v))
    return out


def aggregate(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] = GRID_KEYS) -> list[dict[str, Any]]:
    """Rows grouped by ``keys`` (every grid key: one group per cell minus the seed).

    Per group: ``seeds`` (runs), ``<field>_mean/_std/_min/_max`` for every
    AGG_FIELDS column present, and ``time_to_target_mean/_std/_min/_max`` over
    the runs that reached the target with ``reached`` their count.  std is the
    sample standard deviation (0 for one value); empty when no value.
    """
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for gkey, rs in groups.items():
        row: dict[str, Any] = dict(zip(keys, gkey))
        row["seeds"] = len(rs)
        for f in AGG_FIELDS + ("time_to_target",):
            if not any(f in r for r in rs):
                continue
            xs = _floats(rs, f)
            row.update(_stats(f, xs))
            if f == "time_to_target":
                row["reached"] = len(xs)
        if "metric" in rs[0]:
            row["metric"] = rs[0]["metric"]
            row["target"] = rs[0].get("target", "")
        out.append(row)
    return out


def _stats(name: str, xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {f"{name}_{s}": "" for s in ("mean", "std", "min", "max")}
    return {f"{name}_mean": round(statistics.fmean(xs), 6),
            f"{name}_std": round(statistics.stdev(xs), 6) if len(xs) > 1 else 0.0,
            f"{name}_min": round(min(xs), 6), f"{name}_max": round(max(xs), 6)}


def staleness_order(s: Any) -> float:
    """Sort key of a staleness bound written as text ('inf' last)."""
    return math.inf if str(s) == "inf" else float(s)


def _label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys) if keys else "all runs"


def _fmt(x: Any, digits: int = 3) -> str:
    if x == "" or x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def findings(summary_rows: Sequence[Mapping[str, Any]], varying: Sequence[str],
             higher_is_better: Mapping[str, bool]) -> list[str]:
    """Plain sentences about what the aggregated runs show, computed from them (never hard-coded).

    ``varying`` are the grid keys with more than one value.  Per combination
    of the non-staleness keys: the bound that reached the target first, BSP
    against the fastest bound, whether time-to-target against the bound is
    U-shaped, per-iteration quality against BSP, the wait share.  Across a
    varying key (stragglers, optimizers, ...): how the ranking of the bounds
    changed, and how much each value lost to staleness.
    """
    out: list[str] = []
    other = [k for k in varying if k != "staleness"]
    facets: dict[tuple, list] = {}
    for r in summary_rows:
        facets.setdefault(tuple(r[k] for k in other), []).append(r)
    rankings: dict[tuple, list[str]] = {}
    losses: dict[tuple, tuple[float, str, str]] = {}
    for fkey, rows in facets.items():
        rows = sorted(rows, key=lambda r: staleness_order(r["staleness"]))
        label = _label(dict(zip(other, fkey)), other)
        metric = rows[0].get("metric", "metric")
        hib = higher_is_better.get(rows[0]["workload"], False)
        target = rows[0].get("target", "")
        n = rows[0]["seeds"]
        reached = [r for r in rows if r["reached"]]
        ranked = sorted(reached, key=lambda r: (-r["reached"], r["time_to_target_mean"]))
        rankings[fkey] = [str(r["staleness"]) for r in ranked]
        bsp = next((r for r in rows if str(r["staleness"]) == "0"), None)
        best = ranked[0] if ranked else None
        if best is None:   # the other findings still hold
            out.append(f"**{label}**: no bound reached the target {metric} {target} in any seed.")
        else:
            out += _reached_findings(label, metric, target, n, rows, ranked, bsp)
        if bsp is not None and len(rows) > 1:
            fm = [(r["staleness"], r["final_metric_mean"]) for r in rows]
            base = bsp["final_metric_mean"]
            better = [s for s, v in fm if s != "0" and ((v > base) if hib else (v < base))]
            best_q = max(fm, key=lambda t: t[1]) if hib else min(fm, key=lambda t: t[1])
            ctt = ", ".join(f"s={r['staleness']}: {r['clock_to_target_mean']:.0f}" for r in rows
                            if r.get("clock_to_target_mean") not in ("", None))
            if ctt:
                out.append(f"  Per iteration: worker 0's mean clock at the target was {ctt} "
                           f"(a push is one server step when s > 0, a clock is one averaged step at s = 0).")
            iters = rows[0]["iterations_mean"]
            out.append(f"  After the same {iters / rows[0]['workers']:.0f} clocks per worker ({iters:.0f} iterations "
                       f"in all) the final {metric} ({'higher' if hib else 'lower'} is better) was "
                       + ", ".join(f"s={s}: {v:.4f}" for s, v in fm)
                       + f"; best s={best_q[0]}; "
                       + (f"{len(better)} of {len(fm) - 1} stale bounds beat BSP per iteration."
                          if better else "no stale bound beat BSP per iteration."))
            if best is not None and best_q[0] != best["staleness"]:
                out.append(f"  Speed against quality: s={best['staleness']} reached the target first but "
                           f"s={best_q[0]} ended with the best {metric}.")
            waits = ", ".join(f"s={r['staleness']}: {_share(r):.0%}" for r in rows)
            stale = ", ".join(f"s={r['staleness']}: {r['staleness_mean_mean']:.2f}/{r['staleness_max_max']:.0f}"
                              for r in rows)
            out.append(f"  Share of the workers' training time spent waiting for the bound: {waits}; "
                       f"observed read staleness mean/max: {stale}.")
            sign = -1.0 if hib else 1.0
            losses[fkey] = ([(str(r["staleness"]), sign * (r["final_metric_mean"] - bsp["final_metric_mean"]))
                             for r in rows if r is not bsp], metric)
    for key in other:
        vals = sorted({r[key] for r in summary_rows}, key=str)
        if key == "straggler" and len(vals) > 1:
            out += _ranking_change(key, other, rankings)
        if key not in ("straggler", "workload") and len(vals) > 1 and losses:   # workloads' metrics differ
            out += _sensitivity(key, other, losses)
    return out


def _reached_findings(label: str, metric: str, target: Any, n: int, rows: Sequence[Mapping[str, Any]],
                      ranked: Sequence[Mapping[str, Any]], bsp: Mapping[str, Any] | None) -> list[str]:
    """The time-to-target findings of one combination where some bound reached the target."""
    out: list[str] = []
    best = ranked[0]
    parts = [f"**{label}**: staleness {best['staleness']} reached {metric} {target} first "
             f"(mean {best['time_to_target_mean']:.2f} s over {best['reached']}/{n} seeds)"]
    quicker = [r for r in ranked[1:] if r["time_to_target_mean"] < best["time_to_target_mean"]]
    if quicker:
        parts[0] = parts[0].replace(" first ", " in the most seeds ")
        parts.append("faster where fewer seeds reached it: " + ", ".join(
            f"s={r['staleness']} ({r['time_to_target_mean']:.2f} s, {r['reached']}/{n})" for r in quicker))
    close = [r for r in ranked[1:] if r["reached"] == best["reached"] and _within_noise(best, r)]
    if close:
        parts.append("within one standard deviation of " + ", ".join(
            f"s={r['staleness']} ({r['time_to_target_mean']:.2f} s)" for r in close))
    ttts = ", ".join(f"s={r['staleness']}: " + (f"{r['time_to_target_mean']:.2f} s"
                                                 + (f" ({r['reached']}/{n})" if r['reached'] < n else "")
                                                 if r["reached"] else "never")
                     for r in rows)
    parts.append(f"time-to-target by bound {ttts}")
    if bsp is not None and best is not bsp:
        if bsp["reached"]:
            parts.append(f"BSP (s=0) took {bsp['time_to_target_mean'] / best['time_to_target_mean']:.2f}x "
                         f"as long as s={best['staleness']}")
        else:
            parts.append("BSP (s=0) never reached it")
    elif bsp is not None:
        parts.append("BSP itself ranked first")
    out.append("; ".join(parts) + ".")
    if len(rows) >= 3:
        out.append(f"  Shape: {_shape(rows)}")
    return out


def _within_noise(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two groups' mean times-to-target differ by at most the larger of their standard deviations."""
    spread = max(a.get("time_to_target_std") or 0.0, b.get("time_to_target_std") or 0.0)
    return abs(a["time_to_target_mean"] - b["time_to_target_mean"]) <= spread


def _share(r: Mapping[str, Any]) -> float:
    busy = sum(r.get(f"{k}_mean") or 0.0 for k in ("wait_seconds", "compute_seconds", "delay_seconds"))
    span = (r.get("train_seconds_mean") or 0.0) * r["workers"]
    total = max(span, busy)
    return (r.get("wait_seconds_mean") or 0.0) / total if total > 0 else 0.0


def _shape(rows: Sequence[Mapping[str, Any]]) -> str:
    """Whether time-to-target against the (sorted) bounds dips in the middle ('never' counts as infinite)."""
    vals = [r["time_to_target_mean"] if r["reached"] else math.inf for r in rows]
    i = min(range(len(vals)), key=lambda k: vals[k])
    bounds = [str(r["staleness"]) for r in rows]
    if math.isinf(vals[i]):
        return "no bound reached the target."
    if 0 < i < len(vals) - 1 and vals[0] > vals[i] and vals[-1] > vals[i]:
        if any(_within_noise(rows[i], rows[k]) for k in (0, len(rows) - 1) if rows[k]["reached"]):
            return (f"U-shaped only within noise: the minimum is at the interior bound s={bounds[i]} "
                    f"({vals[i]:.2f} s) but an end of the curve is within one standard deviation of it.")
        def t(v: float) -> str:
            return "never" if math.isinf(v) else f"{v:.2f} s"
        return (f"U-shaped: the minimum is at the interior bound s={bounds[i]} ({vals[i]:.2f} s), "
                f"below both s={bounds[0]} ({t(vals[0])}) and s={bounds[-1]} ({t(vals[-1])}).")
    side = "smallest" if i == 0 else "largest" if i == len(vals) - 1 else "interior"
    mono = all(a >= b for a, b in zip(vals, vals[1:])) or all(a <= b for a, b in zip(vals, vals[1:]))
    return (f"not U-shaped: the minimum is at the {side} bound s={bounds[i]} ({vals[i]:.2f} s)"
            + (" and time-to-target is monotone in the bound." if mono else "; the curve is not monotone."))


def _ranking_change(key: str, other: Sequence[str], rankings: Mapping[tuple, list[str]]) -> list[str]:
    idx = list(other).index(key)
    groups: dict[tuple, dict[str, list[str]]] = {}
    for fkey, ranking in rankings.items():
        rest = fkey[:idx] + fkey[idx + 1:]
        groups.setdefault(rest, {})[str(fkey[idx])] = ranking
    out = []
    for rest, by in groups.items():
        base = by.get("none")
        rest_label = _label(dict(zip([k for k in other if k != key], rest)), [k for k in other if k != key])
        desc = "; ".join(f"{v}: {' < '.join('s=' + s for s in r) if r else 'none reached'}" for v, r in by.items())
        line = f"Ranking of the bounds by time-to-target ({rest_label}) — {desc}."
        if base:
            changed = [v for v, r in by.items() if v != "none" and r[:1] != base[:1]]
            line += (" Stragglers changed the fastest bound under " + ", ".join(changed) + "."
                     if changed else " The fastest bound was the same with and without stragglers.")
        out.append(line)
    return out


def _sensitivity(key: str, other: Sequence[str], losses: Mapping[tuple, tuple[list, str]]) -> list[str]:
    idx = list(other).index(key)
    by: dict[tuple, list] = {}
    for fkey, (per_bound, metric) in losses.items():
        rest = fkey[:idx] + fkey[idx + 1:]
        mean = statistics.fmean(loss for _, loss in per_bound)
        by.setdefault(rest, []).append((mean, str(fkey[idx]), per_bound, metric))
    out = []
    for rest, items in by.items():
        items.sort(key=lambda t: t[0])
        rest_keys = [k for k in other if k != key]
        metric = items[0][3]
        desc = "; ".join(f"{v}: " + ", ".join(f"s={b} {loss:+.4f}" for b, loss in pb) for _, v, pb, _ in items)
        out.append(f"Cost of staleness by {key} ({_label(dict(zip(rest_keys, rest)), rest_keys)}): how much worse "
                   f"the final {metric} was than BSP's (positive: staleness hurt, negative: it helped) — {desc}. "
                   f"Averaged over the stale bounds, {items[-1][1]} suffered most and {items[0][1]} least.")
    return out


# --------------------------------------------------------------------------- executor
def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + f"{rest // 60:02d}:{rest % 60:02d}"


def run_grid(m: Manifest, out: str, say: Callable[[str], None] = print,
             clock: Callable[[], float] = time.monotonic, failed: list[str] | None = None) -> tuple[int, list[str]]:
    """Run every unfinished cell; returns (cells run, ids of cells that failed).

    ``failed``, when given, is filled as cells fail, so that a caller
    interrupted (KeyboardInterrupt) still knows which did.
    """
    cells = grid(m)
    runs = os.path.join(out, "runs")
    os.makedirs(runs, exist_ok=True)
    pending = [c for c in cells if not is_finished(os.path.join(runs, c.cell_id))]
    say(f"[experiment] {len(cells)} cells, {len(cells) - len(pending)} already finished, "
        f"{len(pending)} to run; results in {out}")
    t0 = clock()
    durations: list[float] = []
    failed = [] if failed is None else failed
    done = 0
    for i, cell in enumerate(cells, 1):
        run_dir = os.path.join(runs, cell.cell_id)
        if is_finished(run_dir):
            say(f"[{i}/{len(cells)}] {cell.cell_id}: skipped (finished)")
            continue
        start = clock()
        code, result = _run_cell(cell, m, run_dir)
        dur = clock() - start
        durations.append(dur)
        done += 1
        left = len(pending) - done
        eta = statistics.fmean(durations) * left
        if code != 0:
            failed.append(cell.cell_id)
        say(f"[{i}/{len(cells)}] {cell.cell_id}: {result} in {dur:.1f}s | elapsed {_clock(clock() - t0)}, "
            f"ETA {_clock(eta)} ({left} to run)")
    return done, failed


def _run_cell(cell: Cell, m: Manifest, run_dir: str) -> tuple[int, str]:
    os.makedirs(run_dir, exist_ok=True)
    cmd = launch_command(cell, m, run_dir)
    with open(os.path.join(run_dir, "launch.log"), "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        # guarded: the job gets SIGTERM if ps-experiment dies, even by SIGKILL (started from the main
        # thread, which lives as long as the process); its own session: Ctrl-C reaches it only through us
        proc = subprocess.Popen(guarded(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait(m.timeout + 120)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = -1
        except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: the launcher stops its roles on SIGTERM
            _stop(proc)
            raise
    if code != 0 or not is_finished(run_dir):
        return code or 1, f"FAILED (exit {code}; see {os.path.join(run_dir, 'launch.log')})"
    with open(os.path.join(run_dir, "summary.json")) as fh:
        s = json.load(fh)
    ev = s["eval_metric"]
    return 0, f"{ev['name']} {ev['value']:.4f}, max staleness {s['staleness_max']}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --------------------------------------------------------------------------- results
def read_run(run_dir: str) -> tuple[dict, list[dict], float]:
    """A finished run's summary, worker 0's eval rows and the training span (seconds)."""
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    evals, span = [], 0.0
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                if not line.strip():
                    continue
                r = json.loads(line)
                span = max(span, r.get("elapsed", 0.0))
                if r.get("worker") == 0 and "eval" in r:
                    evals.append({k: r[k] for k in ("clock", "elapsed", "eval", "eval_loss") if k in r})
    return summary, evals, span


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_results(m: Manifest, out: str, command: str = "", failed: Sequence[str] = (),
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Read every finished cell of the grid and write runs.csv, summary.csv, curves.csv, plots, report.md."""
    cells = grid(m)
    rows, curves, hists = [], [], {}
    for cell in cells:
        run_dir = os.path.join(out, "runs", cell.cell_id)
        if not is_finished(run_dir):
            continue
        summary, evals, span = read_run(run_dir)
        wl = WORKLOADS[cell.workload]
        row = run_record(cell, summary, evals, span, m.target_for(cell.workload), wl.higher_is_better)
        rows.append(row)
        hists[cell.cell_id] = summary.get("staleness_histogram", {})
        for e in evals:
            curves.append({"cell_id": cell.cell_id, **cell.keys(), "seed": cell.seed, **e})
    columns = list(GRID_KEYS) + ["seed"] + list(RUN_FIELDS)
    write_csv(os.path.join(out, "runs.csv"), rows, columns)
    write_csv(os.path.join(out, "curves.csv"),
              [{**c, **{k: round(c[k], 6) for k in ("elapsed", "eval", "eval_loss") if k in c}} for c in curves],
              ["cell_id", "clock", "elapsed", "eval", "eval_loss"])
    agg = aggregate(rows)
    agg.sort(key=lambda r: tuple(staleness_order(r[k]) if k == "staleness" else str(r[k]) for k in GRID_KEYS))
    agg_cols = list(GRID_KEYS) + ["metric", "target", "seeds", "reached"] + [
        f"{f}_{s}" for f in ("time_to_target",) + AGG_FIELDS for s in ("mean", "std", "min", "max")]
    write_csv(os.path.join(out, "summary.csv"), agg, agg_cols)
    with open(os.path.join(out, "manifest.toml"), "w") as fh:
        fh.write(manifest_toml(m))
    with open(os.path.join(out, ".gitignore"), "w") as fh:
        fh.write("# per-run logs and metrics: reproducible, too large to commit\nruns/\n")
    plots = make_plots(m, out, rows, agg, curves, hists) if rows else []
    hib = {w: WORKLOADS[w].higher_is_better for w in m.workload}
    notes = findings(agg, m.varying(), hib) if agg else []
    report = render_report(m, command, rows, agg, plots, notes, len(cells), failed)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(report)
    say(f"[experiment] wrote {len(rows)} runs: {os.path.join(out, 'report.md')}")
    return {"runs": rows, "summary": agg, "plots": plots, "findings": notes}


# --------------------------------------------------------------------------- plots
def _metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metric names of ``rows`` (one per workload), in order of appearance."""
    return list(dict.fromkeys(r["metric"] for r in rows))


def _facets(m: Manifest) -> list[str]:
    return [k for k in m.varying() if k != "staleness"]


def _bound_colors(bounds: Sequence[str]) -> dict[str, Any]:
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    n = max(1, len(bounds) - 1)
    return {b: cmap(0.9 * i / n) for i, b in enumerate(bounds)}


def _grid_axes(plt, n: int, width: float = 5.0, height: float = 3.6):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def _mean_curve(runs: Sequence[list[tuple[float, float]]]) -> tuple[list[float], list[float]]:
    """Mean over seeds of curves (x, y), on the union of their x within the range all of them cover."""
    import numpy as np
    lo = max(r[0][0] for r in runs)
    hi = min(r[-1][0] for r in runs)
    if hi < lo:
        return [], []
    xs = sorted({x for r in runs for x, _ in r if lo <= x <= hi})
    ys = np.mean([np.interp(xs, [p[0] for p in r], [p[1] for p in r]) for r in runs], axis=0)
    return xs, list(ys)


def make_plots(m: Manifest, out: str, rows, agg, curves, hists) -> list[tuple[str, str]]:
    """The PNGs; returns (file name, caption) pairs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    facets = _facets(m)
    bounds = sorted({str(r["staleness"]) for r in rows}, key=staleness_order)
    colors = _bound_colors(bounds)
    fkeys = sorted({tuple(str(r[k]) for k in facets) for r in rows})
    metric = " / ".join(_metrics(rows))    # one name per workload of the grid
    made = []

    def title(fk):
        return _label(dict(zip(facets, fk)), facets)

    def by_facet(items, fk):
        return [r for r in items if tuple(str(r[k]) for k in facets) == fk]

    for xkey, fname, xlabel in (("elapsed", "metric_vs_time.png", "training time (s, from the first iteration)"),
                                ("clock", "metric_vs_clock.png", "worker 0 clock (iterations)")):
        fig, axes = _grid_axes(plt, len(fkeys))
        for ax, fk in zip(axes, fkeys):
            fc = by_facet(curves, fk)
            for b in bounds:
                per_seed: dict[str, list] = {}
                for c in fc:
                    if str(c["staleness"]) == b:
                        per_seed.setdefault(c["cell_id"], []).append((float(c[xkey]), float(c["eval"])))
                runs_ = [sorted(v) for v in per_seed.values() if v]
                for r in runs_:
                    ax.plot([p[0] for p in r], [p[1] for p in r], color=colors[b], alpha=0.25, lw=0.8)
                if runs_:
                    xs, ys = _mean_curve(runs_)
                    ax.plot(xs, ys, color=colors[b], lw=2, label=f"s={b}")
            first = by_facet(rows, fk)[0]     # a panel is one workload whenever workloads vary
            if first["target"] not in (None, ""):
                ax.axhline(float(first["target"]), color="grey", ls="--", lw=1, label="target")
            ax.set_title(title(fk), fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(first["metric"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{metric} against {'training time' if xkey == 'elapsed' else 'clock'}"
                     " (thin: seeds, thick: mean)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=90)
        plt.close(fig)
        made.append((fname, f"{metric} against {'wall-clock training time' if xkey == 'elapsed' else 'clock'}, "
                             "one line per staleness bound"))

    # time-to-target against the bound
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xpos = {b: i for i, b in enumerate(bounds)}
    never = []
    for i, fk in enumerate(fkeys):
        color = f"C{i % 10}"
        rs = sorted(by_facet(agg, fk), key=lambda r: staleness_order(r["staleness"]))
        never += [(xpos[str(r["staleness"])], color) for r in rs if not r["reached"]]
        pts = [(xpos[str(r["staleness"])], r["time_to_target_mean"], r["time_to_target_min"],
                r["time_to_target_max"], r["reached"], r["seeds"]) for r in rs if r["reached"]]
        if not pts:
            ax.plot([], [], marker="o", color=color, label=title(fk))
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                    marker="o", capsize=3, color=color, label=title(fk))
        for p in pts:
            if p[4] < p[5]:
                ax.annotate(f"{p[4]}/{p[5]}", (p[0], p[1]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=color)
    reached_any = any(r["reached"] for r in agg)
    if never:
        lo, hi = ax.get_ylim() if reached_any else (0.0, 1.0)
        top = hi + 0.08 * (hi - lo)
        for k, (x, color) in enumerate(never):
            ax.scatter([x], [top], marker="x", color=color, zorder=3,
                       label="x: never reached" if k == 0 else None)
        ax.set_ylim(lo, top + 0.08 * (hi - lo))
    if not reached_any:   # no time to draw: no time axis either
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no bound reached the target in any seed", transform=ax.transAxes, ha="center",
                va="center")
    ax.set_xticks(range(len(bounds)), [f"s={b}" for b in bounds])
    ax.set_xlabel("staleness bound")
    ax.set_ylabel("time to target (s): mean, min-max over seeds" if reached_any else "time to target")
    ax.set_title(f"time to {metric} target (k/n: seeds that reached it)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "time_to_target.png"), dpi=90)
    plt.close(fig)
    made.append(("time_to_target.png", "time-to-target against the staleness bound (bounds never reaching "
                                        "it have no point)"))

    # compute vs wait per bound
    fig, axes = _grid_axes(plt, len(fkeys), width=4.6)
    parts = (("compute_seconds_mean", "compute", "#4c72b0"), ("delay_seconds_mean", "injected delay", "#dd8452"),
             ("wait_seconds_mean", "wait for the bound", "#c44e52"), (None, "other (communication, eval)", "#bbbbbb"))
    for ax, fk in zip(axes, fkeys):
        rs = sorted(by_facet(agg, fk), key=lambda r: staleness_order(r["staleness"]))
        bottom = [0.0] * len(rs)
        for key, label, color in parts:
            if key is None:
                vals = [max(0.0, (r["train_seconds_mean"] or 0.0) - b) for r, b in zip(rs, bottom)]
            else:
                vals = [(r[key] or 0.0) / r["workers"] for r in rs]
            ax.bar(range(len(rs)), vals, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(rs)), [f"s={r['staleness']}" for r in rs])
        ax.set_ylabel("seconds per worker (mean over seeds)")
        ax.set_title(title(fk), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("where a worker's training time goes")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compute_vs_wait.png"), dpi=90)
    plt.close(fig)
    made.append(("compute_vs_wait.png", "per-worker compute, injected delay, wait and other time, stacked, "
                                        "per bound"))

    # histograms of read staleness
    stale_bounds = [b for b in bounds if b != "0"] or bounds
    fig, axes = _grid_axes(plt, len(stale_bounds), width=4.4, height=3.2)
    for ax, b in zip(axes, stale_bounds):
        for fk in fkeys:
            total: dict[int, int] = {}
            for r in rows:
                if str(r["staleness"]) == b and tuple(str(r[k]) for k in facets) == fk:
                    for k, v in hists.get(r["cell_id"], {}).items():
                        total[int(k)] = total.get(int(k), 0) + v
            if not total:
                continue
            n = sum(total.values())
            ks = list(range(0, max(total) + 1))
            ax.step(ks, [total.get(k, 0) / n for k in ks], where="mid", label=title(fk))
        ax.set_title(f"s={b}", fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("read staleness (clocks)")
        ax.set_ylabel("fraction of reads")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("observed read staleness, all workers and seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "staleness_hist.png"), dpi=90)
    plt.close(fig)
    made.append(("staleness_hist.png", "histograms of the observed read staleness per bound"))
    return made


# --------------------------------------------------------------------------- report
def _md_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k, "")) if not callable(k) else k(r) for k, _ in cols) + " |"
            for r in rows]
    return "\n".join([head, sep] + body)


def render_report(m: Manifest, command: str, rows, agg, plots, notes, n_cells: int,
                  failed: Sequence[str] = ()) -> str:
    import torch
    facets = _facets(m)
    metrics = _metrics(rows)

    def final_columns(value: Callable[[Mapping[str, Any]], str]) -> list[tuple[Callable, str]]:
        """A 'final METRIC' column per metric (one per workload of the grid); '–' in other workloads' rows."""
        return [(lambda r, mt=mt: value(r) if r["metric"] == mt else "–", f"final {mt}") for mt in metrics]

    lines = [f"# Experiment: {m.name or os.path.basename(os.path.normpath(m.out))}", ""]
    if command:
        lines += ["Command:", "", "```sh", command, "```", ""]
    lines += [f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
              f"torch {torch.__version__}. Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.", "",
              "## Grid", "", "| key | values |", "|---|---|"]
    for k in GRID_KEYS:
        vals = [("default" if v is None else str(v)) for v in getattr(m, k)]
        lines.append(f"| {k} | {', '.join(vals)} |")
    lines += [f"| seeds | {', '.join(map(str, m.seeds))} |",
              f"| target | {', '.join(f'{w}: {m.target_for(w)} ' + WORKLOADS[w].metric_name + (' (higher is better)' if WORKLOADS[w].higher_is_better else ' (lower is better)') for w in m.workload)} |",
              "", f"{n_cells} runs in the grid, {len(rows)} finished"
              + (f", {len(failed)} failed this time: {', '.join(failed)}" if failed else "") + ".", "",
              "Time-to-target is the `elapsed` time (seconds since the job's first finished iteration, "
              "so process start-up is excluded) of worker 0's first evaluation that reaches the target; "
              "`wall_seconds` is the whole job including start-up. Means of time-to-target are over the "
              "seeds that reached it (`reached` of `seeds`).", ""]
    if notes:
        lines += ["## What the runs show", "", "Computed from summary.csv by `ps-experiment`:", ""]
        lines += [("- " + n) if not n.startswith("  ") else ("  - " + n.strip()) for n in notes]
        lines.append("")
    if agg:
        cols = [(k, k) for k in facets] + [
            ("staleness", "s"),
            (lambda r: f"{_fmt(r['time_to_target_mean'])} ± {_fmt(r['time_to_target_std'])}"
             if r["reached"] else "never", "time to target (s)"),
            (lambda r: f"{r['reached']}/{r['seeds']}", "reached"),
            (lambda r: f"{_fmt(r['clock_to_target_mean'])}" if r.get("clock_to_target_mean") != "" else "–",
             "clock to target"),
            *final_columns(lambda r: f"{r['final_metric_mean']:.4f} ± {r['final_metric_std']:.4f}"),
            ("train_seconds_mean", "train s"), ("wall_seconds_mean", "wall s"),
            ("staleness_mean_mean", "mean staleness"), ("staleness_max_max", "max staleness"),
            (lambda r: f"{(r['wait_seconds_mean'] or 0) / r['workers']:.2f}", "wait s/worker"),
            (lambda r: f"{(r['compute_seconds_mean'] or 0) / r['workers']:.2f}", "compute s/worker"),
            (lambda r: f"{(r['bytes_mean'] or 0) / 1e6:.1f}", "MB moved"),
        ]
        sorted_agg = sorted(agg, key=lambda r: tuple(str(r[k]) for k in facets) + (staleness_order(r["staleness"]),))
        lines += ["## Summary (mean ± std over seeds)", "", _md_table(sorted_agg, cols), ""]
    for fname, caption in plots:
        lines += [f"![{caption}]({fname})", "", f"*{caption}*", ""]
    if rows:
        run_cols = [(k, k) for k in facets] + [("staleness", "s"), ("seed", "seed"),
                                               ("time_to_target", "time to target (s)"),
                                               *final_columns(lambda r: _fmt(r["final_metric"])),
                                               ("wall_seconds", "wall s"),
                                               ("staleness_max", "max staleness"), ("wait_seconds", "wait s")]
        lines += ["## Runs", "", "<details><summary>every run (runs.csv)</summary>", "",
                  _md_table(rows, run_cols), "", "</details>", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def experiment_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-experiment",
        description="Run a grid of ps-launch jobs (workloads x staleness bounds x workers x straggler profiles "
                    "x optimizers x seeds) and write runs.csv, summary.csv, plots and report.md. Every list "
                    "flag takes comma-separated values; flags override the manifest's keys. A rerun with the "
                    "same --out skips finished runs.")
    p.add_argument("--manifest", help="TOML file with the same keys as the flags (underscores for dashes)")
    p.add_argument("--workload", help="workloads: linreg, digits, mf, charlm")
    p.add_argument("--servers", help="server counts [1]")
    p.add_argument("--workers", help="worker counts [4]")
    p.add_argument("--staleness", help="staleness bounds: 0 (BSP), K (SSP), inf (ASP) [0,3,inf]")
    p.add_argument("--straggler", help="straggler profiles: none, RANK:FACTOR, random:P:FACTOR, "
                                       "pause:RANK|all:EVERY:SECONDS, dist:exp:MEAN, dist:lognormal:MU:SIGMA, "
                                       "dist:uniform:LO:HI, A+B [none]")
    p.add_argument("--optimizer", help="optimizers NAME[:lr=X][:momentum=M][:weight_decay=D], NAME one of "
                                       "sgd, adam, adamw, adagrad, default [default: the workload's]")
    p.add_argument("--lr", help="learning rates (an optimizer's own lr= wins) [the workload's]")
    p.add_argument("--staleness-lr", help="server-side staleness-aware lr: true/false list [false]")
    p.add_argument("--dc-lambda", help="delay compensation lambdas (0 = off) [0]")
    p.add_argument("--batch-size", help="per-worker batch sizes [the workload's]")
    p.add_argument("--steps", help="iterations per worker [the workload's]")
    p.add_argument("--seeds", help="N (seeds 0..N-1) or a comma list of seeds (7, is seed 7 alone) [1]")
    p.add_argument("--target", help="time-to-target metric value, or WORKLOAD=VALUE list "
                                    "[each workload's defaults.target]")
    p.add_argument("--eval-every", help="worker 0 evaluates every N clocks [the trainer's: steps/20]")
    p.add_argument("--timeout", help="seconds one run may take [1800]")
    p.add_argument("--name", help="title of the report [the --out folder's name]")
    p.add_argument("--out", help="results folder [out/experiment]")
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite the results from finished runs")
    return p


def manifest_from_args(args: argparse.Namespace) -> Manifest:
    values: dict[str, Any] = load_manifest_file(args.manifest) if args.manifest else {}
    for key in list(LIST_KEYS) + list(SCALAR_KEYS) + ["seeds", "target"]:
        v = getattr(args, key, None)
        if v is not None:
            values[key] = v
    return parse_manifest(values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = experiment_parser().parse_args(argv)
    try:
        m = manifest_from_args(args)
    except ConfigError as exc:
        sys.stderr.write(f"ps-experiment: error: {exc}\n")
        return 2
    out = m.out
    from common.cli import folder_problem, on_stop_signal
    why = folder_problem(out)
    if why:
        sys.stderr.write(f"ps-experiment: error: --out: {why}\n")
        return 2

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    command = "bin/ps-experiment " + shlex.join(argv)
    failed: list[str] = []
    stopped: list[int] = []    # the stop signal, once one came
    running = not args.report_only
    interrupted = 0            # the signal that stopped the grid

    def stop(signum: int) -> None:
        stopped.append(signum)
        if running:   # the Ctrl-C path: the running job is stopped, the finished results are written
            raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    on_stop_signal(stop)   # SIGINT and SIGTERM, the first signal only
    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))   # the same handler, so still the first only
    try:
        if running:
            try:
                run_grid(m, out, say=say, failed=failed)
                running = False
            except KeyboardInterrupt:
                running = False
                interrupted = stopped[0] if stopped else signal.SIGINT
                say(f"[experiment] interrupted ({signal.Signals(interrupted).name}); finished runs are kept, "
                    "a rerun resumes")
        write_results(m, out, command, failed, say=say)
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
    if interrupted:
        return 128 + interrupted   # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    if failed:
        say(f"[experiment] {len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
