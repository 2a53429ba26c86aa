"""The ``fedlt`` command: run, resume, validate, inspect, plugins, export-flower.

Bad input (a scenario key, a plugin, a missing data root) exits with status 2 and one paragraph
naming the key, the value and what is allowed, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key, e.g. --set federation.rounds=5 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlt", description="Federated learning under class imbalance.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a scenario")
    _add_scenario(p, optional=True)
    p.add_argument("--out", type=Path, help="run folder (default runs/<name>-<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("resume", help="continue a run folder from its last checkpoint")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("validate", help="check a scenario without running it")
    _add_scenario(p)

    p = sub.add_parser("inspect", help="show the data as the scenario will use it")
    _add_scenario(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("plugins", help="list discovered plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("export-flower", help="write the scenario as a Flower App project for `flwr run`")
    _add_scenario(p)
    p.add_argument("dir", type=Path, help="new or empty folder for the project (a valid Flower app name)")
    p.add_argument("--out", type=Path, help="run folder the app writes (default DIR/runs/fedlt-<name>)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from fedlt.config import load_scenario
    from fedlt.runner import Run

    scenario = load_scenario(args.scenario, args.overrides)
    run = Run.create(scenario, args.out, progress=not args.quiet)
    print(f"run folder: {run.run_dir}", file=sys.stderr)
    summary = run.execute()
    _print_final(summary)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from fedlt.runner import Run

    summary = Run.open(args.run_dir, progress=not args.quiet).execute()
    _print_final(summary)
    return 0


def _print_final(summary: dict[str, Any]) -> None:
    f = summary["final"]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    keys = [
        "accuracy",
        "balanced_accuracy",
        "head_accuracy",
        "medium_accuracy",
        "tail_accuracy",
        "auroc_macro",
        "personalized_accuracy",
    ]
    print(f"{summary['scenario']}: {summary['rounds']} rounds in {summary['wall_seconds']:.1f}s")
    for k in keys:
        if k in f:
            print(f"  {k:24s} {fmt(f[k])}")


def _cmd_validate(args: argparse.Namespace) -> int:
    import torch

    from fedlt.config import load_scenario
    from fedlt.data.federated import build_federated_data
    from fedlt.engines import check_engine_available
    from fedlt.pluginmanager import build_hooks
    from fedlt.runner import check_requirements, resolve_device
    from fedlt.worker import build_run_model

    scenario = load_scenario(args.scenario, args.overrides)
    resolve_device(scenario.engine.device)
    check_engine_available(scenario.engine.kind)
    hooks = build_hooks(scenario.plugins)
    data = build_federated_data(scenario, "cpu")
    check_requirements(scenario, hooks, build_run_model(scenario, data, hooks, torch.device("cpu")))
    print(
        f"{args.scenario}: valid ({data.n_clients} clients, {int(data.train_class_counts.sum())} training "
        f"samples, {data.num_classes} classes, plugins: {', '.join(hooks.names) or 'none'})"
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fedlt.config import load_scenario
    from fedlt.data.federated import build_federated_data

    scenario = load_scenario(args.scenario, args.overrides)
    info = build_federated_data(scenario, "cpu").describe()
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"dataset {info['dataset']}: {info['num_classes']} classes, {info['n_train']} training samples "
        f"after the long-tail profile, {info['n_test']} test samples"
    )
    print("train class counts: " + " ".join(str(c) for c in info["train_class_counts"]))
    width = max(len(str(c)) for cl in info["clients"] for c in cl["class_counts"]) if info["clients"] else 1
    print(f"{'client':>6} {'n':>7} {'view':>5}  class counts")
    for cl in info["clients"]:
        counts = " ".join(f"{c:>{width}}" for c in cl["class_counts"])
        print(f"{cl['id']:>6} {cl['n_samples']:>7} {cl['test_view_size']:>5}  {counts}")
    streams = [cl for cl in info["clients"] if "tasks" in cl]
    if streams:
        print("\nstreams (per task: classes, samples, blurry samples dealt in):")
        for cl in streams:
            tasks = "  |  ".join(f"{t['classes']} n={t['size']} b={t['blurry']}" for t in cl["tasks"])
            print(f"{cl['id']:>6}  {tasks}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from fedlt.pluginmanager import discover_plugins

    plugins = discover_plugins()
    rows = [
        {
            "name": i.name,
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
        print(f"  hooks: {', '.join(r['hooks'])}")
        if r["parameters"]:
            params = ", ".join(f"{p['name']}: {p['type']} = {p['default']!r}" for p in r["parameters"])
            print(f"  parameters: {params}")
    return 0


def _cmd_export_flower(args: argparse.Namespace) -> int:
    from fedlt.config import load_scenario
    from fedlt.export import export_flower, flwr_run_command

    app_dir = export_flower(args.scenario, args.dir, args.overrides, args.out)
    print(f"wrote Flower App project {app_dir}; run it with:")
    print(f"  {flwr_run_command(app_dir, load_scenario(app_dir / 'scenario.toml'))}")
    return 0


COMMANDS = {
    "run": _cmd_run,
    "resume": _cmd_resume,
    "validate": _cmd_validate,
    "inspect": _cmd_inspect,
    "plugins": _cmd_plugins,
    "export-flower": _cmd_export_flower,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlt`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except NonFiniteLossError as exc:
        print(textwrap.fill(f"error: {exc}", 100, break_on_hyphens=False), file=sys.stderr)
        return 1
    except FedltError as exc:
        print(textwrap.fill(f"error: {exc}", 100, break_on_hyphens=False), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted; continue with `fedlt resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
