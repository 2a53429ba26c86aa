"""How much does asynchrony cost the tail, and what recovers it? Sync, deadline, FedAsync, FedBuff
and the asynchronous remedies on one scenario, with and without tail-slow clients, several seeds.

Every method does the same client work: the scenario's ``federation.rounds`` asynchronous updates
with ``concurrency`` clients in flight (``R`` client trainings); sync and deadline runs make
``R / concurrency`` rounds of ``concurrency`` clients, FedBuff ``R / 4`` updates of 4 arrivals.
Each (setting, method, seed) is one run folder ``RUNS/<setting>/<method>/seed<seed>``; runs that
finished there are reused. The tables are ``fedlt compare``'s (:mod:`fedlt.analysis.compare`):
mean, sample std, Student-t 95% interval, and per-seed paired differences from sync::

    python scenarios/compare_async.py                                   # async_digits_lt, seeds 0 1 2
    python scenarios/compare_async.py scenarios/async_cifar10_lt.toml --seeds 0 --methods sync fedasync

Options: ``--seeds``, ``--methods`` (default: all), ``--settings`` (``intertwined``: the
scenario's ``[system]``; ``independent``: the same with ``tail_slowdown = 0``), ``--runs DIR``
(default under /tmp), ``--out DIR`` (default docs/results: ``async-<scenario>.md`` and the figures
of the first seed), ``--no-plot``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Keys of the asynchronous modes, dropped when a method runs in rounds.
ASYNC_KEYS = (
    "concurrency",
    "async_alpha",
    "staleness",
    "staleness_a",
    "staleness_b",
    "buffer_size",
    "server_lr",
)
#: The refreshing remedy as the study runs it: 1 simulated step and 100 iterations (digits, CPU).
INVERSION = {"name": "stale-inversion", "steps": 1, "iterations": 100}


def _rounds(s: dict[str, Any], mode: str, **extra: Any) -> dict[str, Any]:
    """``s`` as ``R / concurrency`` rounds of ``concurrency`` clients (the same client work)."""
    f = s["federation"]
    c, n = f.get("concurrency") or 1, s["partition"]["n_clients"]
    rounds = max(1, f["rounds"] // c)
    every = max(1, f.get("eval_every", 1) * rounds // f["rounds"])
    s["federation"] = {
        "mode": mode,
        "rounds": rounds,
        "fraction_clients": c / n,
        "eval_every": every,
        **extra,
    }
    return s


def _buffered(s: dict[str, Any], k: int = 4) -> dict[str, Any]:
    f = s["federation"]
    f.pop("async_alpha", None)
    f.update(mode="buffered", buffer_size=k, rounds=max(1, f["rounds"] // k))
    f["eval_every"] = max(1, f.get("eval_every", 1) // k)
    return s


def _plugins(*tables: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def add(s: dict[str, Any]) -> dict[str, Any]:
        s["plugins"] = [dict(t) for t in tables]
        return s

    return add


#: Method name: (what it is, how it changes the scenario; None: built by :func:`build`).
METHODS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]] | None]] = {
    "sync": ("FedAvg rounds of `concurrency` clients", lambda s: _rounds(s, "sync")),
    "deadline": ("rounds keeping the first k of 1.3k before a deadline (1.5x the median round)", None),
    "fedasync": ("FedAsync, polynomial staleness weight (the scenario)", lambda s: s),
    "fedbuff": ("FedBuff, 4 arrivals an update", _buffered),
    "direct": ("stale deltas added as they are (Wang & Gao's direct aggregation)",
               _plugins({"name": "staleness-fedavg", "weight": "constant"})),
    "weighted": ("stale deltas x 2^(-staleness/20) (Wang & Gao's weighted baseline)",
                 _plugins({"name": "staleness-fedavg", "weight": "exponential"})),
    "stale-inversion": ("direct aggregation of updates refreshed by gradient inversion (Wang & Gao)",
                        _plugins(INVERSION, {"name": "staleness-fedavg", "weight": "constant"})),
    "fedasync+balanced-softmax": ("FedAsync with a tail-aware loss", _plugins({"name": "balanced-softmax"})),
    "weighted+balanced-softmax": ("the weighted baseline with a tail-aware loss",
                                  _plugins({"name": "staleness-fedavg", "weight": "exponential"},
                                           {"name": "balanced-softmax"})),
    "fedasync+tail-aware-select": ("FedAsync starting tail holders more often",
                                   _plugins({"name": "tail-aware-select"})),
}  # fmt: skip

SETTINGS = {"intertwined": None, "independent": 0.0}
COLUMNS = (
    ("accuracy", "acc"),
    ("balanced_accuracy", "bal. acc"),
    ("head_accuracy", "head"),
    ("medium_accuracy", "medium"),
    ("tail_accuracy", "tail"),
)


def median_round(s: dict[str, Any]) -> float:
    """The median client's round (download, compute, upload) in virtual seconds, from the data."""
    import fedlt
    from fedlt.prepare import prepare
    from fedlt.prepare.build import planned_samples

    p = prepare(fedlt.load_scenario(s), "cpu")
    assert p.devices is not None
    return float(statistics.median(p.devices.expected_durations(planned_samples(p.scenario, p.data))))


def _setting(base: dict[str, Any], setting: str) -> dict[str, Any]:
    s = copy.deepcopy(base)
    s["engine"] = {"threads": 1}
    if SETTINGS[setting] is not None:
        s.setdefault("system", {})["tail_slowdown"] = SETTINGS[setting]
    return s


def build(
    base: dict[str, Any], setting: str, method: str, seed: int, deadline: float | None = None
) -> dict[str, Any]:
    """The run of ``method`` with ``seed`` in ``setting``; ``deadline`` (virtual seconds) for the
    deadline method: 1.5x the median client's round of the scenario's own seed, the same for all seeds."""
    s = _setting(base, setting)
    s["seed"] = seed
    change = METHODS[method][1]
    if change is None:
        assert deadline is not None
        return _rounds(s, "deadline", deadline=deadline, over_selection=1.3)
    return change(s)


def run_one(s: dict[str, Any], out: Path) -> dict[str, Any]:
    """The run's summary: reused when ``out`` finished with the same scenario, else (re)run."""
    import fedlt

    summary = out / "summary.json"
    want = json.dumps(s, sort_keys=True)
    if summary.is_file() and (out / "study.json").is_file() and (out / "study.json").read_text() == want:
        return json.loads(summary.read_text())
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = fedlt.run(s, out=out)
    (out / "study.json").write_text(want)
    print(f"  {out.relative_to(out.parents[2])}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return result


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    return (
        f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{100 * mean:.1f}"
    )


def table(runs: dict[str, list[Path]], targets: list[float]) -> list[str]:
    """The compact table of one setting: mean ± std per metric, time to accuracy, staleness."""
    head = "| method | " + " | ".join(h for _, h in COLUMNS) + " | Δtail vs sync (paired) | "
    head += " | ".join(f"time to {t:g}" for t in targets) + " | staleness (mean) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + len(targets) + 3)]
    sync_tail = {}
    summaries = {
        m: [json.loads((p / "summary.json").read_text()) for p in paths] for m, paths in runs.items()
    }
    for s in summaries.get("sync", []):
        sync_tail[s["seed"]] = s["final"]["tail_accuracy"]
    for method, group in summaries.items():
        cells = [_fmt([s["final"][k] for s in group if s["final"].get(k) is not None]) for k, _ in COLUMNS]
        diffs = [s["final"]["tail_accuracy"] - sync_tail[s["seed"]] for s in group if s["seed"] in sync_tail]
        cells.append("–" if method == "sync" or not diffs else f"{100 * statistics.mean(diffs):+.1f}")
        for t in targets:
            hits = [(s.get("time_to_accuracy") or {}).get(f"{t:g}") for s in group]
            reached = [h["virtual_time"] for h in hits if h]
            cells.append(
                f"{statistics.mean(reached):.1f} s ({len(reached)}/{len(group)})" if reached else "never"
            )
        stale = [
            s["federation"]["staleness_mean"] for s in group if s["federation"]["staleness_mean"] is not None
        ]
        cells.append(f"{statistics.mean(stale):.1f}" if stale else "0")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenario", nargs="?", default=str(HERE / "async_digits_lt.toml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--runs", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    path = Path(args.scenario)
    base = tomllib.loads(path.read_text())
    if "mode" not in base.get("federation", {}) or base["federation"]["mode"] != "async":
        p.error(f"{path}: expected an asynchronous scenario (federation.mode = 'async')")
    if "data" in base and "root" in base["data"] and not Path(base["data"]["root"]).is_absolute():
        base["data"]["root"] = str((path.parent / base["data"]["root"]).resolve())
    if "sync" not in args.methods:
        args.methods.insert(0, "sync")  # the baseline of every paired difference
    runs_dir = args.runs or Path(tempfile.gettempdir()) / f"fedlt-async-{base['name']}"
    targets = base.get("eval", {}).get("time_to_accuracy") or []
    out_lines = [
        f"## {base['name']}: asynchrony and the tail",
        "",
        f"- Command (repo root): `python scenarios/compare_async.py {args.scenario if argv else ''}"
        f"--seeds {' '.join(map(str, args.seeds))}`; seeds {args.seeds}; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.",
        f"- Every method trains {base['federation']['rounds']} clients "
        f"({base['federation'].get('concurrency')} in flight or per round).",
        "",
        "| method | what |",
        "|---|---|",
        *(f"| {m} | {METHODS[m][0]} |" for m in args.methods),
    ]
    full_tables = []
    for setting in args.settings:
        runs: dict[str, list[Path]] = {}
        deadline = (
            round(1.5 * median_round(_setting(base, setting)), 6) if "deadline" in args.methods else None
        )
        for method in args.methods:
            for seed in args.seeds:
                out = runs_dir / setting / method / f"seed{seed}"
                run_one(build(base, setting, method, seed, deadline), out)
                runs.setdefault(method, []).append(out)
        slow = (
            base.get("system", {}).get("tail_slowdown", 0) if SETTINGS[setting] is None else SETTINGS[setting]
        )
        out_lines += ["", f"### {setting} (`system.tail_slowdown = {slow}`)", "", *table(runs, targets)]
        from fedlt.analysis.compare import collect_runs, compare

        cmp = compare(collect_runs([q for paths in runs.values() for q in paths]), [k for k, _ in COLUMNS],
                      baseline=None)  # fmt: skip
        by_path = {q.resolve(): m for m, paths in runs.items() for q in paths}
        names = {g.label: by_path[g.runs[0].path.resolve()] for g in cmp.groups}
        base_label = next(lbl for lbl, m in names.items() if m == "sync")
        cmp = compare(collect_runs([q for paths in runs.values() for q in paths]), [k for k, _ in COLUMNS],
                      baseline=base_label)  # fmt: skip
        for g in cmp.groups:
            g.label = names.get(g.label, g.label)
        for row in cmp.rows:
            row.group = names.get(row.group, row.group)
        cmp.baseline = "sync"
        full_tables += [f"### {setting}: `fedlt compare` (baseline sync)", "", cmp.to_markdown(digits=3)]
        if not args.no_plot and args.seeds:
            from fedlt.analysis.plotting import build_figures

            shown = [m for m in ("sync", "fedasync", "fedbuff", "weighted", "stale-inversion") if m in runs]
            figures, _ = build_figures([runs[m][0] for m in shown], shown)
            args.out.mkdir(parents=True, exist_ok=True)
            for name in ("virtual_time_accuracy", "staleness"):
                if name in figures:
                    figures[name].savefig(args.out / f"async-{base['name']}-{setting}-{name}.png", dpi=80)
            timeline = build_figures([runs["fedasync"][0]], ["fedasync"])[0].get("client_timeline")
            if timeline is not None:
                timeline.savefig(args.out / f"async-{base['name']}-{setting}-timeline.png", dpi=80)
    compute = sum(
        json.loads((q / "summary.json").read_text())["wall_seconds"]
        for q in runs_dir.glob("*/*/seed*")
        if (q / "summary.json").is_file()
        and q.parent.name in args.methods
        and q.parent.parent.name in args.settings
    )
    out_lines += [
        "",
        f"Compute: {compute / 60:.0f} min of runs on one thread (summed `wall_seconds`).",
        "",
        *full_tables,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"async-{base['name']}.md"
    report.write_text("\n".join(out_lines) + "\n")
    print("\n".join(out_lines))
    print(f"wrote {report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
