"""Compare FedAvg with each imbalance remedy on one scenario, same seeds, and tabulate the results.

Every method is a list of ``[[plugins]]`` tables put on the scenario (FedAvg is the empty list).
Each (method, seed) runs through the Python API, ``fedlt.run``, in its own run folder; the script
then writes a Markdown table (mean ± std over seeds) and a grouped-bar plot of balanced, tail and
personalised accuracy::

    python scenarios/compare_remedies.py quickstart --seeds 0 1 2 --out docs/results
    python scenarios/compare_remedies.py scenarios/cifar10_lt.toml --methods fedavg fedloge \\
        --set model.name=cnn --set federation.rounds=30

Methods whose plugins are not installed, or installed but unusable (``fedlt plugins`` says why),
are skipped with a note in the table; a run that raises is reported as failed and the rest go on.
``compare_continual.py`` (the ``[stream]`` counterpart) reuses the helpers defined here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PluginList = list[dict[str, Any]]
#: A method: its ``[[plugins]]`` tables and any other scenario overrides it needs.
Method = tuple[PluginList, dict[str, Any]]

#: Columns of the offline table: (summary["final"] key, header).
REMEDY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "acc"),
    ("balanced_accuracy", "bal. acc"),
    ("head_accuracy", "head"),
    ("medium_accuracy", "medium"),
    ("tail_accuracy", "tail"),
    ("personalized_accuracy", "pers. acc"),
    ("auroc_macro", "AUROC"),
)
#: Metrics shown as "difference from FedAvg" columns, and bars of the plot.
REMEDY_DELTAS: tuple[tuple[str, str], ...] = (
    ("balanced_accuracy", "Δbal"),
    ("tail_accuracy", "Δtail"),
    ("personalized_accuracy", "Δpers"),
)


def _plugins(*tables: dict[str, Any]) -> PluginList:
    return [dict(t) for t in tables]


def remedy_methods(rounds: int) -> dict[str, Method]:
    """The offline methods, by the name users see, in table order.

    ``rounds`` sets the round-dependent schedules: LDAM's DRW starts at about 2/3 of the rounds;
    temperature sampling starts near uniform (tau 10) and cools down linearly to tau 2 over the
    third of the rounds that starts halfway.
    """
    drw = max(1, round(2 * rounds / 3))
    cool = max(1, rounds // 2)
    table: dict[str, PluginList] = {
        "fedavg": [],
        "focal": _plugins({"name": "focal"}),
        "class-balanced": _plugins({"name": "class-balanced", "prior": "global"}),
        "ldam": _plugins({"name": "ldam", "drw": True, "drw_start_round": drw}),
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
    return {name: (plugins, {}) for name, plugins in table.items()}


# --------------------------------------------------------------------------- running


@dataclass
class MethodResult:
    """All seeds of one method: the summaries that finished, and why the others did not."""

    name: str
    plugins: PluginList
    summaries: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None
    wall_seconds: list[float] = field(default_factory=list)
    reused: int = 0

    def values(self, key: str) -> list[float]:
        """``summary["final"][key]`` of every finished seed (None values dropped)."""
        out = []
        for s in self.summaries:
            v = s["final"].get(key)
            if isinstance(v, int | float):
                out.append(float(v))
        return out


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` into ``{"a.b": 1, ...}``, in order (values parsed as ``fedlt --set`` does)."""
    from fedlt.config import parse_value

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
    from fedlt.discovery import discover_plugins

    found = discover_plugins()
    for spec in plugins:
        info = found.get(spec["name"])
        if info is None:
            return f"plugin '{spec['name']}' is not installed"
        if info.error:
            return f"plugin '{spec['name']}' is unusable: {info.error}"
    return None


def resolve_scenario(scenario: str, sets: Mapping[str, Any]) -> Any:
    """The validated scenario with ``sets`` applied (to read its name, seed and rounds)."""
    from fedlt.config import load_scenario

    return load_scenario(scenario, dict(sets))


def run_methods(
    scenario: str,
    methods: Mapping[str, Method],
    seeds: Sequence[int],
    sets: Mapping[str, Any],
    runs_dir: Path,
    reuse: bool = False,
) -> list[MethodResult]:
    """Run every method on every seed (same seeds for all) and collect the summaries."""
    import fedlt

    runs_dir.mkdir(parents=True, exist_ok=True)
    results = []
    total = len(methods) * len(seeds)
    done = 0
    for name, (plugins, extra) in methods.items():
        result = MethodResult(name, plugins)
        results.append(result)
        result.skipped = unusable_plugins(plugins)
        if result.skipped:
            done += len(seeds)
            print(f"[skip] {name}: {result.skipped}", flush=True)
            continue
        for seed in seeds:
            done += 1
            out = runs_dir / f"{name}-s{seed}"
            if reuse and (out / "summary.json").is_file():
                summary = json.loads((out / "summary.json").read_text())
                result.summaries.append(summary)
                result.wall_seconds.append(float(summary.get("wall_seconds", float("nan"))))
                result.reused += 1
                print(f"[{done}/{total}] {name} seed {seed}: reused {out}", flush=True)
                continue
            overrides = {"plugins": plugins, **extra, "seed": seed, **sets}
            start = time.perf_counter()
            try:
                summary = fedlt.run(scenario, out=out, **overrides)
            except Exception as exc:  # a broken remedy must not stop the comparison
                msg = f"seed {seed}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
                result.errors.append(msg)
                print(f"[{done}/{total}] {name} seed {seed}: FAILED {msg}", flush=True)
                continue
            wall = time.perf_counter() - start
            result.summaries.append(summary)
            result.wall_seconds.append(wall)
            final = summary["final"]
            brief = ", ".join(
                f"{k}={final[k]:.3f}"
                for k in ("balanced_accuracy", "tail_accuracy", "personalized_accuracy", "a_auc")
                if isinstance(final.get(k), int | float)
            )
            print(f"[{done}/{total}] {name} seed {seed}: {brief} ({wall:.0f} s) -> {out}", flush=True)
    return results


# --------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, str]:
    """nproc, CPU model, torch/fedlt versions, date, load and (read-only) git commit."""
    import torch

    import fedlt
    from fedlt.provenance import cpu_model, gpu_model

    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
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


def fmt_stat(values: Sequence[float], percent: bool = True, signed: bool = False) -> str:
    """``mean ± std`` (sample std over seeds; just the mean for one value), '–' for none."""
    if not values:
        return "–"
    scale = 100.0 if percent else 1.0
    digits = 1 if percent else 3
    sign = "+" if signed else ""
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:{sign}.{digits}f}"
    std = statistics.stdev(values) * scale
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def paired_deltas(result: MethodResult, base: MethodResult | None, key: str) -> list[float]:
    """Per-seed differences from the baseline on the same seed."""
    if base is None:
        return []
    by_seed = {s["seed"]: s["final"].get(key) for s in base.summaries}
    out = []
    for s in result.summaries:
        b, v = by_seed.get(s["seed"]), s["final"].get(key)
        if isinstance(b, int | float) and isinstance(v, int | float):
            out.append(float(v) - float(b))
    return out


def plugin_label(plugins: PluginList) -> str:
    """Plugins of a method as ``name(k=v, ...)`` joined by ' + '; '–' for none."""
    if not plugins:
        return "–"
    parts = []
    for spec in plugins:
        params = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
        parts.append(f"{spec['name']}({params})" if params else spec["name"])
    return " + ".join(parts)


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


def wall_note(results: Sequence[MethodResult], total: float, runs: Path) -> str:
    """Total wall time of this invocation, runs reused from earlier ones, and where they are."""
    reused = sum(r.reused for r in results)
    runs_total = sum(sum(r.wall_seconds) for r in results)
    extra = (
        f" ({reused} runs reused from an earlier invocation; the runs' own wall time: "
        f"{runs_total / 60:.1f} min in all)"
        if reused
        else ""
    )
    return f"Total wall time {total / 60:.1f} min{extra}; run folders in `{runs}`."


def notes(results: Sequence[MethodResult]) -> list[str]:
    """Skipped methods and failed runs, as Markdown lines."""
    lines = []
    for r in results:
        if r.skipped:
            lines.append(f"- **{r.name}** skipped: {r.skipped}")
        for err in r.errors:
            lines.append(f"- **{r.name}** failed ({err})")
    return ["Notes:", "", *lines, ""] if lines else []


def remedies_table(results: Sequence[MethodResult], baseline: str = "fedavg") -> list[str]:
    """The offline comparison as Markdown table lines (accuracies in %)."""
    base = next((r for r in results if r.name == baseline and r.summaries), None)
    head = ["method", *[h for _, h in REMEDY_COLUMNS]]
    if base is not None:
        head += [f"{h} vs {baseline}" for _, h in REMEDY_DELTAS]
    head += ["seeds", "s/run", "plugins"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if not r.summaries:
            continue
        row = [r.name]
        for key, _ in REMEDY_COLUMNS:
            row.append(fmt_stat(r.values(key), percent=key != "auroc_macro"))
        if base is not None:
            for key, _ in REMEDY_DELTAS:
                row.append("–" if r is base else fmt_stat(paired_deltas(r, base, key), signed=True))
        row += [
            str(len(r.summaries)),
            f"{statistics.fmean(r.wall_seconds):.0f}",
            f"`{plugin_label(r.plugins)}`",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def bar_plot(
    results: Sequence[MethodResult],
    metrics: Sequence[tuple[str, str]],
    path: Path,
    title: str,
) -> None:
    """Grouped bars (one group per method, one bar per metric) with std error bars, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.summaries]
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(shown) + 2), 4.0))
    for j, (key, label) in enumerate(metrics):
        means, errs = [], []
        for r in shown:
            vals = [100 * v for v in r.values(key)]
            means.append(statistics.fmean(vals) if vals else 0.0)
            errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(shown))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(range(len(shown)), [r.name for r in shown], rotation=35, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 114)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(metrics), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_raw(results: Sequence[MethodResult], path: Path) -> None:
    """Per-run final metrics as JSON (kept with the run folders, not in the docs)."""
    raw = {
        r.name: {
            "plugins": r.plugins,
            "skipped": r.skipped,
            "errors": r.errors,
            "runs": [
                {"seed": s["seed"], "wall_seconds": w, "final": s["final"]}
                for s, w in zip(r.summaries, r.wall_seconds, strict=True)
            ],
        }
        for r in results
    }
    path.write_text(json.dumps(raw, indent=1, default=str))


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
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for the table and plot")
    p.add_argument(
        "--runs", type=Path, default=None, help="folder for the run folders (default: a new one under /tmp)"
    )
    p.add_argument(
        "--tag", default="", help="suffix of the table and plot file names (to keep several studies)"
    )
    p.add_argument("--reuse", action="store_true", help="reuse run folders under --runs that have a summary")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: federation.rounds={quick_rounds} (before --set) and one seed unless --seeds",
    )
    return p


def prepare(
    args: argparse.Namespace, quick_sets: Mapping[str, Any], kind: str
) -> tuple[dict[str, Any], Any, list[int], Path]:
    """Overrides, resolved scenario, seeds and run folder from parsed arguments."""
    sets = {**(quick_sets if args.quick else {}), **parse_sets(args.sets)}
    resolved = resolve_scenario(args.scenario, sets)
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
    alpha = f" alpha {part['alpha']:g}" if "alpha" in part else ""
    return (
        f"`{resolved.name}`: {resolved.data.dataset}, long tail {resolved.long_tail.profile}{tail}, "
        f"{resolved.partition.kind}{alpha} over {resolved.partition.n_clients} clients, "
        f"{resolved.federation.fraction_clients:g} per round, {resolved.federation.rounds} rounds, "
        f"{resolved.train.local_epochs} local epoch(s), model {model}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the offline comparison; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    all_methods = remedy_methods(1)
    args = build_parser(__doc__.splitlines()[0], list(all_methods), 2).parse_args(argv)
    sets, resolved, seeds, runs = prepare(args, {"federation.rounds": 2}, "remedies")
    if resolved.stream.kind != "none":
        print("note: this is a [stream] scenario; compare_continual.py reports its continual metrics")
    names = args.methods or list(all_methods)
    methods = {n: m for n, m in remedy_methods(resolved.federation.rounds).items() if n in names}
    methods = with_params(methods, args.params)
    print(
        f"{len(methods)} methods x {len(seeds)} seed(s) on {resolved.name}; run folders in {runs}", flush=True
    )
    machine = machine_info()
    start = time.perf_counter()
    results = run_methods(args.scenario, methods, seeds, sets, runs, args.reuse)
    total = time.perf_counter() - start

    stem = f"remedies-{resolved.name}" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    table_path, plot_path = args.out / f"{stem}.md", args.out / f"{stem}.png"
    lines = markdown_header(
        f"Remedies on {resolved.name}", argv, "scenarios/compare_remedies.py", describe(resolved), machine
    )
    lines += [
        f"Seeds: {' '.join(map(str, seeds))}. Accuracies in % on the balanced global test set "
        "(personalised: mean over clients of the accuracy on each client's local test view), "
        "mean ± sample std over seeds; the Δ columns are per-seed differences from FedAvg. "
        + wall_note(results, total, runs),
        "",
        *remedies_table(results),
        "",
        f"![balanced, tail and personalised accuracy]({plot_path.name})",
        "",
        *notes(results),
    ]
    table_path.write_text("\n".join(lines))
    bar_plot(
        results,
        [
            ("balanced_accuracy", "balanced"),
            ("tail_accuracy", "tail"),
            ("personalized_accuracy", "personalised"),
        ],
        plot_path,
        f"{resolved.name}: {len(seeds)} seed(s), {resolved.federation.rounds} rounds",
    )
    save_raw(results, runs / "results.json")
    print(f"wrote {table_path} and {plot_path} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
