"""Compare FedAvg with each imbalance remedy on one scenario, same seeds, and tabulate the results.

Every method is a list of ``[[plugins]]`` tables put on the scenario (FedAvg is the empty list).
Each (method, seed) is one run of a :class:`fedlt.analysis.sweep.Sweep` (one sweep per method, no grid),
in its own folder ``RUNS/<method>/seed<seed>``. The table is ``fedlt compare``'s
(:mod:`fedlt.analysis.compare`): runs grouped by setting, mean, sample std and Student-t 95% interval per
method and metric, and per-seed paired differences from the baseline method (FedAvg)::

    python scenarios/compare_remedies.py quickstart --seeds 0 1 2 --out docs/results
    python scenarios/compare_remedies.py scenarios/cifar10_lt.toml --methods fedavg fedloge \\
        --set model.name=cnn --set federation.rounds=30

Options (``--help`` lists them all):

- ``--seeds S ...`` (default: the scenario's own seed), ``--methods M ...`` (default: all);
- ``--set KEY=VALUE`` scenario override for every method (as ``fedlt run --set``);
- ``--param PLUGIN.KEY=VALUE`` sets a plugin parameter in every method that lists that plugin;
- ``--runs DIR`` the run folders (default: a new folder under /tmp). Runs already finished there
  with the same settings are reused and interrupted ones resumed, so rerunning a command with more
  seeds only runs the new ones; a folder holding a run with *other* settings stops the script
  before any training. ``--reuse`` is accepted for old command lines (reuse is the default);
- ``--jobs N`` runs N runs at once in separate processes (each with cpu_count / N threads);
- ``--out DIR`` and ``--tag T`` name the outputs: ``DIR/remedies-<scenario>[-T].md`` (the compact
  table, then every metric's full statistics), ``.csv`` and ``.json`` (``fedlt compare``'s
  formats) and ``.png`` (balanced / tail / personalised accuracy bars);
- ``--no-plot`` skips the plot; without it a missing matplotlib stops the script before any run.

``RUNS/results.json`` keeps every run's final metrics and the comparison; it and the tables are
written before the plot, so a failing plot loses nothing. Methods whose plugins are not installed,
or installed but unusable (``fedlt plugins`` says why), are skipped with a note in the table; a
run that raises is reported as failed and the rest go on. ``compare_continual.py`` (the
``[stream]`` counterpart) reuses the helpers defined here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PluginList = list[dict[str, Any]]
#: A method: its ``[[plugins]]`` tables and any other scenario overrides it needs.
Method = tuple[PluginList, dict[str, Any]]
#: Table columns: (summary["final"] key, header).
Columns = Sequence[tuple[str, str]]

#: Columns of the offline table.
REMEDY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "acc"),
    ("balanced_accuracy", "bal. acc"),
    ("head_accuracy", "head"),
    ("medium_accuracy", "medium"),
    ("tail_accuracy", "tail"),
    ("personalized_accuracy", "pers. acc"),
    ("auroc_macro", "AUROC"),
)
#: Metrics shown as "paired difference from FedAvg" columns, and bars of the plot.
REMEDY_DELTAS: tuple[tuple[str, str], ...] = (
    ("balanced_accuracy", "Δbal"),
    ("tail_accuracy", "Δtail"),
    ("personalized_accuracy", "Δpers"),
)
#: Metrics that are not percentages (shown with three decimals).
PLAIN_METRICS = frozenset({"auroc_macro"})


def _plugins(*tables: dict[str, Any]) -> PluginList:
    return [dict(t) for t in tables]


def remedy_methods(rounds: int) -> dict[str, Method]:
    """The offline methods, by the name users see, in table order.

    ``rounds`` sets temperature sampling's schedule: it starts near uniform (tau 10) and cools down
    linearly to tau 2 over the third of the rounds that starts halfway. LDAM runs with deferred
    re-weighting from the plugin's default round (80% of the rounds) and its cosine head (s = 30).
    ``fedavg-masked`` is FedAvg with FedLoGe's personalised mask (``eval.personalized_mask =
    "train-classes"``), so personalised accuracies compare like for like.
    """
    cool = max(1, rounds // 2)
    table: dict[str, PluginList] = {
        "fedavg": [],
        "focal": _plugins({"name": "focal"}),
        "class-balanced": _plugins({"name": "class-balanced", "prior": "global"}),
        "ldam": _plugins({"name": "ldam", "drw": True}),
        "balanced-softmax": _plugins({"name": "balanced-softmax", "prior": "local"}),
        "logit-adjust": _plugins({"name": "logit-adjust", "prior": "global"}),
        "posthoc-adjust": _plugins({"name": "posthoc-adjust", "prior": "global"}),
        "oversample": _plugins({"name": "oversample"}),
        "class-aware": _plugins({"name": "class-aware"}),
        "temperature": _plugins(
            {
                "name": "temperature",
                "tau": 10.0,
                "tau_end": 2.0,
                "cooldown_start_round": cool,
                "cooldown_rounds": max(0, rounds // 3),
            }
        ),
        "etf": _plugins({"name": "etf"}),
        "fedbabu": _plugins({"name": "fedbabu"}),
        "creff": _plugins({"name": "creff"}),
        "fedloge": _plugins({"name": "sse-c"}, {"name": "gla-fr"}),
    }
    methods: dict[str, Method] = {}
    for name, plugins in table.items():
        methods[name] = (plugins, {})
        if name == "fedavg":
            # FedAvg evaluated with the personalised mask FedLoGe's gla-fr asks for (the classes a
            # client has no training samples of): its personalised accuracy is FedLoGe's like for like.
            methods["fedavg-masked"] = ([], {"eval.personalized_mask": "train-classes"})
    return methods


# --------------------------------------------------------------------------- overrides


def toml_inline(value: Any) -> str:
    """``value`` as a TOML literal that ``fedlt.scenario.config.parse_value`` (``--set``) reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = (f"{_toml_key(str(k))} = {toml_inline(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def method_overrides(plugins: PluginList, extra: Mapping[str, Any]) -> list[str]:
    """A method as ``--set`` strings: its plugin list, then its other overrides."""
    return [f"plugins={toml_inline(plugins)}", *(f"{k}={toml_inline(v)}" for k, v in extra.items())]


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` into ``{"a.b": 1, ...}``, in order (values parsed as ``fedlt --set`` does)."""
    from fedlt.scenario.config import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: expected key.sub=value, e.g. federation.rounds=5")
        out[key.strip()] = parse_value(value.strip())
    return out


def with_params(methods: Mapping[str, Method], params: Sequence[str]) -> dict[str, Method]:
    """``methods`` with ``PLUGIN.KEY=VALUE`` parameters set on every table of that plugin."""
    by_plugin: dict[str, dict[str, Any]] = {}
    for key, value in parse_sets(params).items():
        plugin, sep, param = key.rpartition(".")
        if not sep or not plugin:
            raise SystemExit(f"--param {key!r}: expected PLUGIN.KEY=VALUE, e.g. sse-c.norm=1")
        by_plugin.setdefault(plugin, {})[param] = value
    return {
        name: ([{**t, **by_plugin.get(t["name"], {})} for t in plugins], extra)
        for name, (plugins, extra) in methods.items()
    }


def unusable_plugins(plugins: PluginList) -> str | None:
    """Why a method cannot run here (a plugin missing or unusable), or None."""
    from fedlt.hooks.discovery import discover_plugins

    found = discover_plugins()
    for spec in plugins:
        info = found.get(spec["name"])
        if info is None:
            return f"plugin '{spec['name']}' is not installed"
        if info.error:
            return f"plugin '{spec['name']}' is unusable: {info.error}"
    return None


# --------------------------------------------------------------------------- running


@dataclass
class MethodRuns:
    """One method's sweep: its finished run folders, and why the others did not finish."""

    name: str
    plugins: PluginList
    sweep: Any = None
    finished: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None
    reused: int = 0


def build_sweeps(
    scenario: str, methods: Mapping[str, Method], seeds: Sequence[int], sets: Sequence[str], runs_dir: Path
) -> list[MethodRuns]:
    """One :class:`fedlt.analysis.sweep.Sweep` per usable method (validated: a bad override stops here)."""
    from fedlt.analysis.sweep import Sweep
    from fedlt.errors import FedltError

    out = []
    for name, (plugins, extra) in methods.items():
        result = MethodRuns(name, plugins, skipped=unusable_plugins(plugins))
        if not result.skipped:
            fixed = [*method_overrides(plugins, extra), *sets]
            try:
                result.sweep = Sweep(scenario, runs_dir / name, {}, list(seeds), fixed)
            except FedltError as exc:
                raise SystemExit(f"{name}: {exc}") from None
        out.append(result)
    return out


def check_existing(results: Sequence[MethodRuns]) -> None:
    """Stop (before any training) when a run folder holds a run with other settings than its job's.

    Settings are compared as ``fedlt compare`` groups runs (seed, engine, data paths and the
    evaluation cadence aside).
    """
    from fedlt.analysis.compare import RunRecord, compare, load_run
    from fedlt.hooks.dispatch import build_hooks_spelled_out
    from fedlt.scenario.config import load_scenario

    for r in results:
        if r.sweep is None:
            continue
        for job in r.sweep.jobs:
            if not (job.run_dir / "scenario.toml").is_file():
                continue
            found = load_run(job.run_dir, require_summary=False)
            resolved = load_scenario(r.sweep.scenario, job.overrides)
            build_hooks_spelled_out(resolved.plugins)  # plugin defaults written out, as in scenario.toml
            wanted = resolved.model_dump(mode="json")
            groups = compare([found, RunRecord(job.run_dir, scenario=wanted)], metrics=[]).groups
            if len(groups) > 1:
                raise SystemExit(
                    f"{job.run_dir} holds a run with other settings ({groups[0].label}; this study "
                    f"wants {groups[1].label}): pass another --runs folder, or remove that run"
                )


def _brief(run_dir: Path) -> str:
    """Headline final metrics and wall time of a finished run, for the progress log."""
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary.get("final", {})
    keys = ("balanced_accuracy", "tail_accuracy", "personalized_accuracy", "a_auc")
    text = ", ".join(f"{k}={final[k]:.3f}" for k in keys if isinstance(final.get(k), int | float))
    return f"{text} ({summary.get('wall_seconds', float('nan')):.0f} s)"


def run_sweeps(results: Sequence[MethodRuns], jobs: int = 1) -> None:
    """Run every job of every method (in this process, or ``jobs`` processes at once).

    Each job goes through :func:`fedlt.analysis.sweep.run_job` (run, resume an interrupted run, or skip a
    finished one). A job that raises is recorded in its method's ``errors`` and the others go on.
    """
    from fedlt.analysis.sweep import run_job

    pending = []
    for r in results:
        if r.sweep is None:
            continue
        for job in r.sweep.jobs:
            if (job.run_dir / "summary.json").is_file():
                r.finished.append(job.run_dir)
                r.reused += 1
                print(f"[reuse] {r.name} {job.run_dir.name}: {_brief(job.run_dir)}", flush=True)
            else:
                pending.append((r, job))
    total = len(pending)

    def done(i: int, r: MethodRuns, job: Any, exc: BaseException | None) -> None:
        if exc is None:
            r.finished.append(job.run_dir)
            print(f"[{i}/{total}] {r.name} {job.run_dir.name}: {_brief(job.run_dir)}", flush=True)
        else:
            msg = f"{job.run_dir.name}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            r.errors.append(msg)
            print(f"[{i}/{total}] {r.name} FAILED {msg}", flush=True)

    if jobs <= 1:
        for i, (r, job) in enumerate(pending, 1):
            try:
                run_job(r.sweep.scenario, job)
            except Exception as exc:  # a broken remedy must not stop the comparison
                done(i, r, job, exc)
            else:
                done(i, r, job, None)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, r.sweep.scenario, job, threads): (r, job) for r, job in pending}
        for i, future in enumerate(as_completed(futures), 1):
            r, job = futures[future]
            done(i, r, job, future.exception())
    for r in results:  # in job order, not completion order
        if r.sweep is not None:
            order = [j.run_dir for j in r.sweep.jobs]
            r.finished.sort(key=order.index)


# --------------------------------------------------------------------------- the comparison


def comparison(results: Sequence[MethodRuns], metrics: Sequence[str], baseline: str | None) -> Any:
    """``fedlt compare``'s table of the finished runs, its groups labelled by method name.

    Runs are grouped by their resolved settings, not by method: two methods that resolve to the
    same scenario form one group, labelled ``a = b``. ``baseline`` names the method the paired
    differences are taken against (ignored when it has no finished run).
    """
    from fedlt.analysis.compare import collect_runs, compare

    owner = {p.resolve(): r.name for r in results for p in r.finished}
    runs = collect_runs([p for r in results for p in r.finished])
    table = compare(runs, metrics=metrics)
    names = {}
    order = [r.name for r in results]
    for g in table.groups:
        members = sorted({owner[run.path.resolve()] for run in g.runs}, key=order.index)
        names[g.label] = " = ".join(members)
    base_label = next((label for label, name in names.items() if baseline in name.split(" = ")), None)
    if base_label is not None:
        table = compare(runs, metrics=metrics, baseline=base_label)
    relabel(table, names)
    # Groups in method order (the baseline first).
    table.groups.sort(key=lambda g: (g.label != table.baseline, order.index(g.label.split(" = ")[0])))
    rank = {g.label: i for i, g in enumerate(table.groups)}
    table.rows.sort(key=lambda row: (table.metrics.index(row.metric), rank[row.group]))
    return table


def relabel(table: Any, names: Mapping[str, str]) -> None:
    """Rename ``table``'s groups (label -> method name) everywhere: groups, rows, baseline, notes."""
    for g in table.groups:
        g.label = names.get(g.label, g.label)
    for row in table.rows:
        row.group = names.get(row.group, row.group)
    if table.baseline is not None:
        table.baseline = names.get(table.baseline, table.baseline)
    notes = []
    for note in table.notes:
        for old, new in names.items():
            if note.startswith(old + ":"):
                note = new + note[len(old) :]
                break
        notes.append(note)
    table.notes = notes


def _scale(metric: str) -> tuple[float, int]:
    return (1.0, 3) if metric in PLAIN_METRICS else (100.0, 1)


def fmt_mean_std(stat: Any, metric: str) -> str:
    """``mean ± std`` of a :class:`fedlt.analysis.compare.Stat` (the mean alone for one value), '–' for
    none."""
    if stat.mean is None:
        return "–"
    scale, digits = _scale(metric)
    if stat.std is None:
        return f"{stat.mean * scale:.{digits}f}"
    return f"{stat.mean * scale:.{digits}f} ± {stat.std * scale:.{digits}f}"


def fmt_diff(stat: Any, metric: str) -> str:
    """A paired difference: ``mean [95% CI]`` (the mean alone for one pair), '–' for none."""
    if stat is None or stat.mean is None:
        return "–"
    scale, digits = _scale(metric)
    text = f"{stat.mean * scale:+.{digits}f}"
    if stat.ci_low is not None:
        text += f" [{stat.ci_low * scale:+.{digits}f}, {stat.ci_high * scale:+.{digits}f}]"
    return text


def plugin_label(plugins: PluginList) -> str:
    """Plugins of a method as ``name(k=v, ...)`` joined by ' + '; '–' for none."""
    if not plugins:
        return "–"
    parts = []
    for spec in plugins:
        params = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
        parts.append(f"{spec['name']}({params})" if params else spec["name"])
    return " + ".join(parts)


def summary_table(table: Any, results: Sequence[MethodRuns], columns: Columns, deltas: Columns) -> list[str]:
    """The compact table: one row per group (method), ``mean ± std`` per metric, the paired
    differences from the baseline as ``mean [95% CI]``, seeds, wall time per run and plugins."""
    from fedlt.analysis.compare import summarize

    plugins = {r.name: r.plugins for r in results}
    head = ["method", *(h for _, h in columns)]
    if table.baseline is not None:
        head += [f"{h} vs {table.baseline}" for _, h in deltas]
    head += ["seeds", "s/run", "plugins"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in table.groups:
        row = [g.label, *(fmt_mean_std(table.row(g.label, key).stat, key) for key, _ in columns)]
        if table.baseline is not None:
            for key, _ in deltas:
                row.append("–" if g.label == table.baseline else fmt_diff(table.row(g.label, key).diff, key))
        wall = summarize(float(run.summary.get("wall_seconds", float("nan"))) for run in g.runs).mean
        seeds = seed_list(g.seeds)
        label = plugin_label(plugins.get(g.label.split(" = ")[0], []))
        row += [seeds, f"{wall:.0f}", f"`{label}`"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def seed_list(seeds: Sequence[int | None]) -> str:
    """Seeds as ``0-9`` / ``0-2,5`` (consecutive runs joined), ``?`` for an unknown one."""
    known = sorted({s for s in seeds if s is not None})
    parts: list[str] = []
    for s in known:
        if parts and parts[-1].split("-")[-1] == str(s - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{s}"
        else:
            parts.append(str(s))
    return ",".join(parts + ["?"] * (len(seeds) != len([s for s in seeds if s is not None])))


def notes(results: Sequence[MethodRuns]) -> list[str]:
    """Skipped methods and failed runs, as Markdown lines."""
    lines = []
    for r in results:
        if r.skipped:
            lines.append(f"- **{r.name}** skipped: {r.skipped}")
        for err in r.errors:
            lines.append(f"- **{r.name}** failed ({err})")
    return ["Notes:", "", *lines, ""] if lines else []


# --------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, str]:
    """nproc, CPU model, torch/fedlt versions, date, load and (read-only) git commit."""
    import torch

    import fedlt
    from fedlt.base.provenance import cpu_model, gpu_model

    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "fedlt": getattr(fedlt, "__version__", "?"),
        "python": platform.python_version(),
    }
    if gpu_model() is not None:
        info["gpu"] = gpu_model()
    with contextlib.suppress(OSError):
        info["load average (1/5/15 min) at start"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        commit = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        info["git commit"] = commit + " (working tree may differ)"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def markdown_header(
    title: str, argv: Sequence[str], script: str, scenario_desc: str, machine: Mapping[str, str]
) -> list[str]:
    """Title, the exact command line and the machine (from :func:`machine_info`), as Markdown lines."""
    lines = [f"# {title}", "", "Command:", "", "```sh", f"python {script} {shlex.join(argv)}", "```", ""]
    lines += [f"Scenario: {scenario_desc}", "", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    with contextlib.suppress(OSError):
        lines.append("- load average (1/5/15 min) at end: " + " / ".join(f"{x:.1f}" for x in os.getloadavg()))
    return [*lines, ""]


def wall_note(results: Sequence[MethodRuns], total: float, runs: Path) -> str:
    """Total wall time of this invocation, runs reused from earlier ones, and where they are."""
    reused = sum(r.reused for r in results)
    extra = f" ({reused} finished runs reused from an earlier invocation)" if reused else ""
    return f"Total wall time {total / 60:.1f} min{extra}; run folders in `{runs}`."


def stats_section(table: Any) -> list[str]:
    """Every metric's statistics as ``fedlt compare`` writes them (fractions, not %)."""
    return [
        "## Every metric (`fedlt compare`)",
        "",
        "Fractions, not percentages. n = runs; 95% CI: Student t over seeds; Δ: per-seed paired "
        f"difference from {table.baseline or 'no baseline'}.",
        "",
        table.to_markdown(),
    ]


def save_results(results: Sequence[MethodRuns], table: Any, path: Path) -> None:
    """Per-run final metrics and the comparison as JSON (kept with the run folders)."""
    raw: dict[str, Any] = {}
    for r in results:
        runs = []
        for p in r.finished:
            summary = json.loads((p / "summary.json").read_text())
            runs.append(
                {
                    "run": str(p),
                    "seed": summary.get("seed"),
                    "wall_seconds": summary.get("wall_seconds"),
                    "final": summary.get("final"),
                }
            )
        raw[r.name] = {"plugins": r.plugins, "skipped": r.skipped, "errors": r.errors, "runs": runs}
    out = {"methods": raw, "comparison": None if table is None else table.to_dict()}
    path.write_text(json.dumps(out, indent=1, default=str))


def write_outputs(table: Any, lines: Sequence[str], out: Path, stem: str) -> tuple[Path, Path, Path]:
    """The Markdown report, ``fedlt compare``'s CSV and JSON of ``table``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path, json_path = out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.json"
    md.write_text("\n".join(lines).rstrip("\n") + "\n")
    if table is not None:
        csv_path.write_text(table.to_csv())
        json_path.write_text(table.to_json())
    return md, csv_path, json_path


def require_matplotlib() -> None:
    """Stop now (before any run) when the plot was asked for and matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"matplotlib is needed for the plot ({exc}); install it (pip install matplotlib) or pass "
            "--no-plot"
        ) from None


def try_plot(plot: Callable[[], None], path: Path) -> bool:
    """Draw the plot; on failure say so (the tables and results.json are already written)."""
    try:
        plot()
    except Exception as exc:  # the results must survive a broken plot
        print(f"plot {path} failed: {type(exc).__name__}: {exc} (tables and results.json are written)")
        return False
    return True


def bar_plot(table: Any, metrics: Columns, path: Path, title: str) -> None:
    """Grouped bars (one group per method, one bar per metric) with std error bars, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g.label for g in table.groups]
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(groups) + 2), 4.0))
    for j, (key, label) in enumerate(metrics):
        stats = [table.row(g, key).stat for g in groups]
        means = [100 * (s.mean or 0.0) for s in stats]
        errs = [100 * (s.std or 0.0) for s in stats]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=35, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 114)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(metrics), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def build_parser(description: str, methods: Sequence[str], quick_rounds: int) -> argparse.ArgumentParser:
    """The CLI shared by both comparison scripts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("scenario", help="scenario file or built-in name (e.g. quickstart)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds (default: the scenario's own seed)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(methods),
        metavar="M",
        help=f"of: {' '.join(methods)}",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="scenario override for every method (repeatable; not for plugin keys: see --param)",
    )
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="PLUGIN.KEY=VALUE",
        help="set parameter KEY of PLUGIN in every method that lists it (repeatable), e.g. sse-c.norm=1",
    )
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for the tables and plot")
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="folder of the run folders, RUNS/<method>/seed<seed> (default: a new one under /tmp); "
        "finished runs with the same settings are reused, interrupted ones resumed",
    )
    p.add_argument("--tag", default="", help="suffix of the output file names (to keep several studies)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="accepted for old command lines: finished runs under --runs are always reused",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes (default 1)")
    p.add_argument("--no-plot", action="store_true", help="write the tables only (no matplotlib needed)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: federation.rounds={quick_rounds} (before --set) and one seed unless --seeds",
    )
    return p


def prepare(args: argparse.Namespace, quick_rounds: int, kind: str) -> tuple[list[str], Any, list[int], Path]:
    """Overrides (as ``--set`` strings), resolved scenario, seeds and run folder from the arguments.

    Checks matplotlib first (unless ``--no-plot``), so nothing runs when the plot cannot be drawn.
    """
    if not args.no_plot:
        require_matplotlib()
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: expected an integer >= 1")
    sets = [*([f"federation.rounds={quick_rounds}"] if args.quick else []), *args.sets]
    parse_sets(sets)  # a malformed --set stops here
    from fedlt.errors import FedltError
    from fedlt.scenario.config import load_scenario

    try:
        resolved = load_scenario(args.scenario, sets)
    except FedltError as exc:
        raise SystemExit(str(exc)) from None
    seeds = args.seeds if args.seeds is not None else [resolved.seed]
    if args.quick and args.seeds is None:
        seeds = seeds[:1]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = args.runs or Path(tempfile.gettempdir()) / f"fedlt-{kind}-{resolved.name}-{stamp}"
    return sets, resolved, seeds, runs


def describe(resolved: Any) -> str:
    """One line on the scenario actually run."""
    m = resolved.model
    model = m.name + "".join(f" {k}={v}" for k, v in m.params().items() if v is not None)
    lt, part = resolved.long_tail.params(), resolved.partition.params()
    tail = f" IF {lt['imbalance_factor']:g}" if "imbalance_factor" in lt else ""
    nmax = f" n_max {lt['n_max']}" if lt.get("n_max") else ""
    alpha = f" alpha {part['alpha']:g}" if "alpha" in part else ""
    return (
        f"`{resolved.name}`: {resolved.data.dataset}, long tail {resolved.long_tail.profile}{tail}{nmax}, "
        f"{resolved.partition.kind}{alpha} over {resolved.partition.n_clients} clients, "
        f"{resolved.federation.fraction_clients:g} per round, {resolved.federation.rounds} rounds, "
        f"{resolved.train.local_epochs} local epoch(s) of batch {resolved.train.batch_size}, model {model}"
    )


def run_study(
    args: argparse.Namespace,
    scenario: str,
    methods: Mapping[str, Method],
    seeds: Sequence[int],
    sets: Sequence[str],
    runs: Path,
) -> tuple[list[MethodRuns], float]:
    """Build, check and run every method's sweep; returns the results and the wall time."""
    results = build_sweeps(scenario, methods, seeds, sets, runs)
    check_existing(results)
    print(f"{len(methods)} methods x {len(seeds)} seed(s); run folders in {runs}", flush=True)
    start = time.perf_counter()
    run_sweeps(results, args.jobs)
    return results, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    """Run the offline comparison; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    all_methods = remedy_methods(1)
    args = build_parser(__doc__.splitlines()[0], list(all_methods), 2).parse_args(argv)
    sets, resolved, seeds, runs = prepare(args, 2, "remedies")
    if resolved.stream.kind != "none":
        print("note: this is a [stream] scenario; compare_continual.py reports its continual metrics")
    names = args.methods or list(all_methods)
    methods = {n: m for n, m in remedy_methods(resolved.federation.rounds).items() if n in names}
    methods = with_params(methods, args.params)
    machine = machine_info()
    results, total = run_study(args, args.scenario, methods, seeds, sets, runs)

    metrics = [key for key, _ in REMEDY_COLUMNS]
    have = any(r.finished for r in results)
    table = comparison(results, metrics, "fedavg") if have else None
    stem = f"remedies-{resolved.name}" + (f"-{args.tag}" if args.tag else "")
    plot_path = args.out / f"{stem}.png"
    lines = markdown_header(
        f"Remedies on {resolved.name}", argv, "scenarios/compare_remedies.py", describe(resolved), machine
    )
    lines += [
        f"Seeds: {' '.join(map(str, seeds))}. Accuracies in % on the balanced global test set "
        "(personalised: mean over clients of the accuracy on each client's local test view), "
        "mean ± sample std over seeds; the Δ columns are per-seed paired differences from FedAvg, "
        "mean [95% t interval]. " + wall_note(results, total, runs),
        "",
    ]
    if table is not None:
        lines += [*summary_table(table, results, REMEDY_COLUMNS, REMEDY_DELTAS), ""]
        if not args.no_plot:
            lines += [f"![balanced, tail and personalised accuracy]({plot_path.name})", ""]
    lines += notes(results)
    if table is not None:
        lines += stats_section(table)
    runs.mkdir(parents=True, exist_ok=True)
    save_results(results, table, runs / "results.json")
    md, _, _ = write_outputs(table, lines, args.out, stem)
    print(f"wrote {md} (+ .csv, .json) and {runs / 'results.json'} ({total / 60:.1f} min)")
    if table is None or args.no_plot:
        return 0 if table is not None else 1
    bars = [
        ("balanced_accuracy", "balanced"),
        ("tail_accuracy", "tail"),
        ("personalized_accuracy", "personalised"),
    ]
    title = f"{resolved.name}: {len(seeds)} seed(s), {resolved.federation.rounds} rounds"
    ok = try_plot(lambda: bar_plot(table, bars, plot_path, title), plot_path)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
