"""The ``fedlt`` command: run, resume, validate, inspect, plugins, plot, compare, sweep, export-flower.

Bad input (a scenario key, a plugin, a missing data root) exits with status 2 and one paragraph
naming the key, the value and what is allowed, before any work starts. Commands that need no
torch (``--help``, ``--version``, ``plugins --names``) import none: every command imports what
it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlt import __version__
from fedlt.errors import FedltError, NonFiniteLossError

__all__ = ["main"]


def _add_scenario(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument(
            "scenario",
            nargs="?",
            default="quickstart",
            help="scenario .toml file or built-in name (default: the embedded quickstart)",
        )
    else:
        p.add_argument("scenario", help="scenario .toml file or built-in name (e.g. quickstart)")
    _add_set(p)


def _add_set(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help or "override a scenario key, e.g. --set federation.rounds=5 (repeatable)",
    )


def _dpi(text: str) -> int:
    """``--dpi``: a whole number of dots per inch, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlt", description="Federated learning under class imbalance.")
    parser.add_argument("--version", action="version", version=f"fedlt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a scenario")
    _add_scenario(p, optional=True)
    p.add_argument("--out", type=Path, help="run folder (default runs/<name>-<plugins>-<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("resume", help="continue a run folder from its last checkpoint")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder to continue")
    _add_set(p, "change a setting that keeps the checkpoint valid (learning rate, rounds, engine...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("validate", help="check a scenario without running it")
    _add_scenario(p)

    p = sub.add_parser(
        "config", help="print the fully resolved scenario, every default spelled out (builds nothing)"
    )
    _add_scenario(p)
    p.add_argument("--json", action="store_true", help="JSON instead of TOML")

    p = sub.add_parser("inspect", help="show the data as the scenario will use it")
    _add_scenario(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--with-indices", action="store_true", help="include stream sample indices (with --json)")
    p.add_argument("--plot", type=Path, metavar="DIR", help="also draw the split (and streams) into DIR")

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--names", action="store_true", help="only the names (fast: loads no plugin)")

    p = sub.add_parser("plot", help="draw the curves of runs (overlaid) or of groups of runs (mean, band)")
    p.add_argument(
        "runs", nargs="+", type=Path, help="run folders, or folders of run folders (a sweep: drawn by group)"
    )
    p.add_argument(
        "--out", type=Path, help="folder for the figures (default: the run or sweep folder's, or ./plots)"
    )
    p.add_argument("--labels", help="comma-separated labels, one per run (default: folder names)")
    p.add_argument(
        "--group",
        action="store_true",
        help="group runs as `fedlt compare` does: per group the mean over seeds and its 95%% band "
        "(implied when a folder holds run folders)",
    )
    p.add_argument("--format", dest="fmt", choices=("png", "pdf", "svg"), default="png", help="file format")
    p.add_argument("--dpi", type=_dpi, default=100, help="resolution of PNGs (default 100)")

    p = sub.add_parser("compare", help="a table of runs grouped by setting: mean, std, 95%% CI, paired diffs")
    p.add_argument("runs", nargs="+", type=Path, help="run folders, or folders of run folders")
    p.add_argument("--baseline", help="the group the others are compared with (its label, or part of it)")
    p.add_argument("--metrics", help="comma-separated metrics (default: the standard ones present)")
    p.add_argument(
        "--format",
        choices=("markdown", "csv", "json", "latex"),
        default="markdown",
        help="markdown (default), csv, json, or latex (a booktabs table for a paper)",
    )
    p.add_argument("--out", type=Path, help="write the table to this file instead of stdout")

    p = sub.add_parser("sweep", help="run a grid of settings x seeds as independent runs (locally or on Ray)")
    p.add_argument("scenario", help="scenario .toml file or built-in name")
    _add_set(p, "fix a scenario key for every run of the sweep (repeatable)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a swept key and its values (repeatable)",
    )
    p.add_argument("--seeds", default="0", help="seeds: a list '0,1,2' or a range '0-4' (default 0)")
    p.add_argument("--out", type=Path, required=True, help="folder for the sweep's runs (resumable)")
    p.add_argument("--jobs", type=int, default=1, help="local runs at once (default 1)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on Ray: 'local', 'auto' or host:port")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray: CPUs reserved per run")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray: GPUs (or a fraction) per run")
    p.add_argument("--baseline", help="baseline group for the final comparison table")

    p = sub.add_parser("export-flower", help="write the scenario as a Flower App project for `flwr run`")
    _add_scenario(p)
    p.add_argument("dir", type=Path, help="new or empty folder for the project (a valid Flower app name)")
    p.add_argument("--out", type=Path, help="run folder the app writes (default DIR/runs/fedlt-<name>)")
    return parser


# --------------------------------------------------------------------------- run and resume


class _Interrupted(Exception):
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir


def _execute(run: Any) -> dict[str, Any]:
    try:
        return run.execute()
    except KeyboardInterrupt:
        raise _Interrupted(run.run_dir) from None


def _cmd_run(args: argparse.Namespace) -> int:
    from fedlt.driver.runner import Run
    from fedlt.scenario.config import load_scenario

    scenario = load_scenario(args.scenario, args.overrides)
    run = Run.create(scenario, args.out, progress=not args.quiet, command=_command(args))
    print(f"run folder: {run.run_dir}", file=sys.stderr)
    _print_final(_execute(run))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from fedlt.driver.runner import Run, finished_summary

    done = finished_summary(args.run_dir) if not args.overrides else None
    if done is not None:
        print(f"{args.run_dir}: this run has finished; nothing to resume.", file=sys.stderr)
        _print_final(done)
        return 0
    run = Run.open(args.run_dir, progress=not args.quiet, overrides=args.overrides, command=_command(args))
    _print_final(_execute(run))
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that started this, as a run's starts.json records it."""
    return shlex.join(["fedlt", *getattr(args, "argv", [])])


def _print_final(summary: dict[str, Any]) -> None:
    f = summary["final"]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    from fedlt.analysis.compare import DEFAULT_METRICS

    rounds = summary.get("rounds_run", summary["rounds"])
    print(f"{summary['scenario']}: {rounds} rounds in {summary['wall_seconds']:.1f}s")
    if summary.get("stopped_early"):
        print(f"  stopped early: {summary['stopped_early']}")
    for k in DEFAULT_METRICS:
        if k in f:
            print(f"  {k:24s} {fmt(f[k])}")


# --------------------------------------------------------------------------- scenario tools


def _cmd_validate(args: argparse.Namespace) -> int:
    from fedlt.prepare import prepare
    from fedlt.scenario.config import load_scenario

    scenario = load_scenario(args.scenario, args.overrides)
    # What `fedlt run` checks and builds, on the CPU: every problem a run would stop for.
    prepared = prepare(scenario, "cpu")
    data, hooks = prepared.data, prepared.hooks
    outside = [
        f"{key} {getattr(section, section.__selector__)} from {origin}"
        for key, section in (("data", scenario.data), ("model", scenario.model))
        if (origin := section.origin()) is not None
    ]
    print(
        f"{args.scenario}: valid ({data.n_clients} clients, {int(data.train_class_counts.sum())} training "
        f"samples, {data.num_classes} classes, plugins: {', '.join(hooks.names) or 'none'}"
        + "".join(f", {o}" for o in outside)
        + ")"
    )
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    """The scenario as a run's scenario.toml would hold it; validated, but no data is read."""
    from fedlt.scenario.config import load_scenario, scenario_to_toml

    scenario = load_scenario(args.scenario, args.overrides)
    text = scenario_to_toml(scenario)
    if args.json:
        import tomllib

        text = json.dumps(tomllib.loads(text), indent=2) + "\n"
    sys.stdout.write(text)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fedlt.prepare import build_data, preflight, raise_problems
    from fedlt.scenario.config import load_scenario

    if args.plot is not None:
        from fedlt.analysis.plotting import require_matplotlib
        from fedlt.store.rundir import check_output_folder

        require_matplotlib()
        check_output_folder(args.plot, "--plot", "the figures")  # before the data is built
    scenario = load_scenario(args.scenario, args.overrides)
    raise_problems(preflight(scenario))  # what validate and run refuse, inspect refuses too
    data = build_data(scenario, "cpu")
    info = data.describe(with_indices=args.with_indices)
    if args.plot is not None:
        _inspect_plots(data, args.plot)
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"dataset {info['dataset']}: {info['num_classes']} classes, {info['n_train']} training samples "
        f"after the long-tail profile, {info['n_test']} test samples"
    )
    print("train class counts: " + " ".join(str(c) for c in info["train_class_counts"]))
    if "noise" in info:  # clients' class counts below are of their noisy labels
        nz = info["noise"]
        print(
            f"label noise {nz['kind']}: {nz['n_noisy']} noisy training labels ({nz['realised_rate']:.1%}); "
            "per clean class: " + " ".join(str(c) for c in nz["noisy_class_counts"])
        )
    width = max(len(str(c)) for cl in info["clients"] for c in cl["class_counts"]) if info["clients"] else 1
    print(f"{'client':>6} {'n':>7} {'view':>5}  class counts")
    for cl in info["clients"]:
        counts = " ".join(f"{c:>{width}}" for c in cl["class_counts"])
        print(f"{cl['id']:>6} {cl['n_samples']:>7} {cl['test_view_size']:>5}  {counts}")
    streams = [cl for cl in info["clients"] if "tasks" in cl]
    if streams:
        print("\nstreams (per task: classes, samples, blurry samples dealt in):")
        for cl in streams:
            tasks = "  |  ".join(f"{t['classes']} n={t['size']} b={t['n_blurry']}" for t in cl["tasks"])
            print(f"{cl['id']:>6}  {tasks}")
    return 0


def _inspect_plots(data: Any, out: Path) -> None:
    from fedlt.analysis.plotting import plot_client_class_counts, plot_stream_timeline, stream_labels

    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_client_class_counts(data.client_counts, out / "client_class_counts.png", data.class_names)]
    if data.streams is not None:
        labels, ends = stream_labels(data)
        paths.append(
            plot_stream_timeline(
                labels, out / "stream_timeline.png", ends, data.num_classes, list(data.class_names)
            )
        )
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from fedlt.hooks.discovery import discover_plugins

    plugins = discover_plugins()
    if args.names:
        for name in sorted(plugins):
            print(name)
        return 0
    rows = [
        {
            "name": i.name,
            "description": i.description,
            "distribution": i.distribution,
            "entry_point": i.value,
            "hooks": i.hooks,
            "parameters": i.parameters(),
            "error": i.error,
        }
        for i in sorted(plugins.values(), key=lambda i: i.name)
    ]
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    for r in rows:
        print(f"{r['name']}  ({r['distribution']}: {r['entry_point']})")
        if r["error"]:
            print(f"  unusable: {r['error']}")
            continue
        if r["description"]:
            print(f"  {r['description']}")
        print(f"  hooks: {', '.join(r['hooks'])}")
        if r["parameters"]:
            params = ", ".join(f"{p['name']}: {p['type']} = {p['default']!r}" for p in r["parameters"])
            print(f"  parameters: {params}")
    return 0


# --------------------------------------------------------------------------- research tools


def _cmd_plot(args: argparse.Namespace) -> int:
    from fedlt.analysis.compare import check_out_path
    from fedlt.analysis.plotting import plot_groups, plot_runs, require_matplotlib

    require_matplotlib()
    folders = [run for run in args.runs if not (run / "metrics.jsonl").is_file()]
    for run in folders:
        if not (run.is_dir() and next(run.rglob("metrics.jsonl"), None) is not None):
            raise FedltError(f"{run} is not a run folder (it holds no metrics.jsonl) nor a folder of runs")
    grouped = args.group or bool(folders)
    labels = args.labels.split(",") if args.labels else None
    if grouped and labels is not None:
        raise FedltError(
            "--labels names runs, but these runs are drawn by group (a folder of runs or --group); "
            "groups are labelled by the settings in which they differ"
        )
    if labels is not None and len(labels) != len(args.runs):
        raise FedltError(f"--labels gives {len(labels)} labels for {len(args.runs)} runs")
    if grouped:
        out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("plots"))
    else:
        out = args.out or (args.runs[0] if len(args.runs) == 1 else Path("plots"))
    check_out_path(out, "--out", folder=True)  # before anything is read or drawn
    if grouped:
        try:
            files = plot_groups(args.runs, out, args.fmt, args.dpi)
        except FileNotFoundError as exc:
            raise FedltError(str(exc)) from None
    else:
        files = plot_runs(args.runs, out, labels, args.dpi, args.fmt)
    for path in files:
        print(f"wrote {path}")
    for note in files.notes:
        print(note, file=sys.stderr)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedlt.analysis.compare import check_metrics, check_out_path, collect_runs, compare

    if args.out is not None:
        check_out_path(args.out, "--out", folder=False)
    try:
        runs = collect_runs(args.runs)
    except FileNotFoundError as exc:
        raise FedltError(str(exc)) from None
    if not runs:
        raise FedltError(f"no finished runs found under {', '.join(map(str, args.runs))}")
    metrics = check_metrics(runs, args.metrics.split(","), "--metrics") if args.metrics is not None else None
    try:
        table = compare(runs, metrics=metrics, baseline=args.baseline)
    except ValueError as exc:
        raise FedltError(str(exc)) from None
    text = getattr(table, f"to_{args.format}")()  # to_markdown, to_csv, to_json, to_latex
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        except OSError as exc:
            raise FedltError(f"cannot write --out {args.out}: {exc.strerror or exc}") from None
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedlt.analysis.sweep import Sweep, parse_grid, parse_seeds

    sweep = Sweep(
        args.scenario,
        args.out,
        grid=parse_grid(args.grid),
        seeds=parse_seeds(args.seeds),
        fixed=args.overrides,
    )

    def progress(line: str) -> None:  # one line per job as it finishes
        print(line, file=sys.stderr, flush=True)

    try:
        if args.ray is not None:
            done = sweep.run_ray(args.ray, args.cpus_per_run, args.gpus_per_run, progress=progress)
        else:
            done = sweep.run_local(args.jobs, progress=progress)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every process the sweep started is stopped
        print(f"interrupted; run the same command again to continue the sweep in {args.out}", file=sys.stderr)
        return 130
    failed = sum(line.startswith("failed ") for line in done)
    if failed < len(done):
        print(sweep.table(args.baseline).to_markdown())
    return 1 if failed else 0


def _cmd_export_flower(args: argparse.Namespace) -> int:
    from fedlt.flower.export import export_flower, flwr_run_command
    from fedlt.scenario.config import load_scenario

    app_dir = export_flower(args.scenario, args.dir, args.overrides, args.out)
    print(f"wrote Flower App project {app_dir}; run it with:")
    print(f"  {flwr_run_command(app_dir, load_scenario(app_dir / 'scenario.toml'))}")
    return 0


COMMANDS = {
    "run": _cmd_run,
    "resume": _cmd_resume,
    "validate": _cmd_validate,
    "config": _cmd_config,
    "inspect": _cmd_inspect,
    "plugins": _cmd_plugins,
    "plot": _cmd_plot,
    "compare": _cmd_compare,
    "sweep": _cmd_sweep,
    "export-flower": _cmd_export_flower,
}


def _warning(
    message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as one wrapped paragraph, without Python's source line."""
    return textwrap.fill(f"fedlt: warning: {message}", 100, break_on_hyphens=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlt`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the run's record of its command
    previous, warnings.formatwarning = warnings.formatwarning, _warning  # type: ignore[assignment]
    try:
        status = _dispatch(args)
        sys.stdout.flush()  # a pipe's buffered tail: a closed reader shows here, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`fedlt plugins | head`): stop quietly, as a Unix tool does, and point
        # stdout at /dev/null so the interpreter's final flush does not complain either.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the signal stopped
    finally:
        warnings.formatwarning = previous


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; a fedlt error becomes its message and exit status."""
    try:
        return COMMANDS[args.command](args)
    except NonFiniteLossError as exc:
        print(textwrap.fill(f"error: {exc}", 100, break_on_hyphens=False), file=sys.stderr)
        return 1
    except FedltError as exc:
        print(textwrap.fill(f"error: {exc}", 100, break_on_hyphens=False), file=sys.stderr)
        return exc.exit_status
    except ImportError as exc:
        if args.command in ("plot", "inspect") and "matplotlib" in str(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    except _Interrupted as exc:
        print(f"interrupted; continue with `fedlt resume {exc.run_dir}`", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
