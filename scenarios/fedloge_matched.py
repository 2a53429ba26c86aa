"""fedlt's FedAvg / FedLoGe runs next to the FedLoGe authors' logged curves, at matched rounds.

Reads the authors' per-round curves (``curves.csv``, parsed from the logs published with the
FedLoGe code; ``/work/shared/reference/fedloge-logs/``) and one or more fedlt run folders
(``metrics.jsonl``, ``summary.json``, ``scenario.toml``), and writes one Markdown table per run:
at each matched round, fedlt's value, the authors' and the gap (fedlt - authors, in percentage
points) for

- global accuracy on the balanced test set. For FedLoGe both heads: the frozen SSE-C head
  (``gla-fr.sse_c_accuracy``, what the authors log as "global test acc") against theirs, and the
  realigned auxiliary head (fedlt's main ``accuracy``; the authors did not log it);
- personalised accuracy (the mean over clients of the accuracy on each client's local test view;
  the authors' "local average test acc");
- global head / medium / tail accuracy (the authors' "global 3shot acc"; for FedLoGe the SSE-C
  head's, ``gla-fr.sse_c_{head,medium,tail}_accuracy``).

Rounds are matched by the number of rounds trained: the authors' loop logs ``round r`` after
training round r + 1 (``for rnd in range(args.rounds)``: train, aggregate, test, print), so their
row ``round = r`` is fedlt's round r + 1. Below each table: the run's wall time per round
(``summary.json``: wall time / rounds run, evaluations included) next to the authors' (about
190 s per round on their GPU, evaluating every round), and the settings in which the run departs
from the protocol scenario (``scenarios/fedloge_cifar10_lt.toml``, or ``..._fedloge.toml`` for
FedLoGe), so a reduced run is labelled as such::

    python scenarios/fedloge_matched.py RUN [RUN ...] [--method fedavg|fedloge] [--out FILE.md]
        [--curves curves.csv] [--setting "cifar10-lt IF100 dir0.5 N40 frac0.2 resnet18"]
        [--rounds 5 10 20 30]

The method is read from the run's plugins (``sse-c`` + ``gla-fr``: fedloge; none: fedavg) unless
``--method`` says. Default rounds: 5, 10, 20, 30, 40, 50, then every 50th, those the run evaluated.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_CURVES = HERE.parents[1] / "shared" / "reference" / "fedloge-logs" / "curves.csv"
DEFAULT_SETTING = "cifar10-lt IF100 dir0.5 N40 frac0.2 resnet18"
PROTOCOL = {"fedavg": HERE / "fedloge_cifar10_lt.toml", "fedloge": HERE / "fedloge_cifar10_lt_fedloge.toml"}
#: Seconds per round in the authors' logs (tqdm: 190-194 s/it over the first rounds, b_fedavg.log).
AUTHORS_SECONDS_PER_ROUND = 190.0
DEFAULT_ROUNDS = (5, 10, 20, 30, 40, *range(50, 1001, 50))


@dataclass(frozen=True)
class Column:
    """One compared quantity: its label, fedlt's metrics.jsonl key and the authors' curves.csv
    column (``None``: the authors did not log it)."""

    label: str
    ours: str
    theirs: str | None


#: Personalised head / medium / tail: each client split by its own view's counts, mean over clients.
PERSONAL_SHOTS = [
    Column(f"personalised {g}", f"personalized_{g}_accuracy", f"personalized_{g}")
    for g in ("head", "medium", "tail")
]


def columns(method: str) -> list[Column]:
    """What is compared for ``method`` (``"fedavg"`` or ``"fedloge"``), in table order."""
    if method == "fedloge":
        return [
            Column("global, SSE-C head", "gla-fr.sse_c_accuracy", "global"),
            Column("global, realigned head", "accuracy", None),
            Column("personalised", "personalized_accuracy", "personalized"),
            Column("head (SSE-C)", "gla-fr.sse_c_head_accuracy", "global_head"),
            Column("medium (SSE-C)", "gla-fr.sse_c_medium_accuracy", "global_medium"),
            Column("tail (SSE-C)", "gla-fr.sse_c_tail_accuracy", "global_tail"),
            *PERSONAL_SHOTS,
        ]
    if method == "fedavg":
        return [
            Column("global", "accuracy", "global"),
            Column("personalised", "personalized_accuracy", "personalized"),
            Column("head", "head_accuracy", "global_head"),
            Column("medium", "medium_accuracy", "global_medium"),
            Column("tail", "tail_accuracy", "global_tail"),
            *PERSONAL_SHOTS,
        ]
    raise ValueError(f"unknown method {method!r}: fedavg or fedloge")


# --------------------------------------------------------------------------- inputs


def read_curves(path: Path, setting: str, method: str) -> dict[int, dict[str, float]]:
    """The authors' rows of ``setting`` and ``method``, keyed by *fedlt's* round (their round + 1)."""
    out: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["setting"] != setting or row["method"] != method:
                continue
            values = {}
            for k, v in row.items():
                if k in ("setting", "method", "round") or v in ("", None):
                    continue
                try:
                    values[k] = float(v)
                except ValueError:
                    continue
            out[int(row["round"]) + 1] = values
    if not out:
        raise SystemExit(f"{path}: no rows for setting {setting!r} and method {method!r}")
    return out


@dataclass
class RunData:
    """What the table needs from a run folder."""

    path: Path
    history: dict[int, dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    scenario: dict[str, Any] = field(default_factory=dict)

    @property
    def plugins(self) -> list[str]:
        return [str(p.get("name")) for p in self.scenario.get("plugins", []) if isinstance(p, Mapping)]


def read_run(path: Path) -> RunData:
    """metrics.jsonl (evaluations with ``accuracy``, by round), summary.json and scenario.toml."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{path} is not a run folder: no metrics.jsonl")
    history: dict[int, dict[str, Any]] = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a killed run
        if isinstance(record, dict) and "accuracy" in record and isinstance(record.get("round"), int):
            history[record["round"]] = record
    summary, scenario = {}, {}
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
    if (path / "scenario.toml").is_file():
        scenario = tomllib.loads((path / "scenario.toml").read_text())
    return RunData(path, history, summary, scenario)


def detect_method(run: RunData) -> str:
    """``fedloge`` when the run has sse-c and gla-fr, ``fedavg`` when it has no plugin."""
    names = set(run.plugins)
    if {"sse-c", "gla-fr"} <= names:
        return "fedloge"
    if not names:
        return "fedavg"
    raise SystemExit(f"{run.path}: plugins {sorted(names)} are neither FedAvg nor FedLoGe; pass --method")


def protocol_departures(run: RunData, method: str) -> list[str]:
    """The settings in which the run differs from the protocol scenario of ``method``
    (``key=value`` in the run, as ``fedlt compare`` labels groups), or ``[]``."""
    if not run.scenario or not PROTOCOL[method].is_file():
        return []
    from fedlt.analysis.compare import RunRecord, compare, load_run
    from fedlt.hooks.dispatch import build_hooks_spelled_out
    from fedlt.scenario.config import load_scenario

    resolved = load_scenario(PROTOCOL[method])
    build_hooks_spelled_out(resolved.plugins)  # plugin defaults written out, as in a run's scenario.toml
    protocol = RunRecord(PROTOCOL[method], scenario=resolved.model_dump(mode="json"))
    groups = compare([load_run(run.path, require_summary=False), protocol], metrics=[]).groups
    if len(groups) < 2:
        return []
    return [f"{k}={_setting(k, v)}" for k, v in groups[0].settings.items()]


def _setting(key: str, value: Any) -> str:
    """A scenario value as in a ``--set`` (plugins as ``name(k=v, ...)``)."""
    if key == "plugins" and isinstance(value, list):
        parts = []
        for spec in value:
            params = ", ".join(f"{k}={v}" for k, v in (spec.get("params") or {}).items())
            parts.append(f"{spec.get('name')}({params})" if params else str(spec.get("name")))
        return "[" + ", ".join(parts) + "]"
    return "unset" if value is None else str(value)


# --------------------------------------------------------------------------- the table


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _gap(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None:
        return "–"
    gap = round(100 * (ours - theirs), 1)
    return f"{gap + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def matched_rounds(run: RunData, curves: Mapping[int, Any], wanted: Sequence[int] | None) -> list[int]:
    """The rounds of the table: ``wanted`` (default :data:`DEFAULT_ROUNDS`) the run evaluated."""
    rounds = DEFAULT_ROUNDS if wanted is None else wanted
    return [r for r in rounds if r in run.history]


def matched_table(
    run: RunData, curves: Mapping[int, Mapping[str, float]], method: str, rounds: Sequence[int]
) -> list[str]:
    """Markdown lines: one row per round; per quantity fedlt, authors and gap (points)."""
    cols = columns(method)
    head = ["round"]
    for c in cols:
        head += [f"{c.label}: fedlt"] + (["authors", "gap"] if c.theirs else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rounds:
        record, theirs = run.history.get(r, {}), curves.get(r, {})
        row = [str(r)]
        for c in cols:
            ours = _num(record.get(c.ours))
            row.append(_pct(ours))
            if c.theirs:
                value = theirs.get(c.theirs)
                row += [_pct(value), _gap(ours, value)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def wall_line(run: RunData) -> str:
    """fedlt's wall time per round next to the authors'."""
    wall, rounds = _num(run.summary.get("wall_seconds")), run.summary.get("rounds_run")
    prov = run.summary.get("provenance") or {}
    threads = f"{prov['threads']} thread(s)" if prov.get("threads") else None
    where = ", ".join(str(x) for x in (prov.get("device"), prov.get("gpu") or prov.get("cpu"), threads) if x)
    authors = f"the authors' about {AUTHORS_SECONDS_PER_ROUND:.0f} s (one GPU, evaluating every round)"
    if wall is None or not rounds:
        return f"Wall time per round: fedlt unknown (no summary.json); {authors}."
    every = (run.scenario.get("federation") or {}).get("eval_every")
    evals = {None: "", 0: ", evaluating after the last round only", 1: ", evaluating every round"}.get(
        every, f", evaluating every {every} rounds"
    )
    return (
        f"Wall time per round: fedlt {wall / rounds:.1f} s ({wall / 60:.1f} min for {rounds} rounds"
        f"{evals}{'; ' + where if where else ''}); {authors}."
    )


def report(
    run: RunData, curves_path: Path, setting: str, method: str | None, rounds: Sequence[int] | None
) -> list[str]:
    """The Markdown section of one run."""
    method = method or detect_method(run)
    curves = read_curves(curves_path, setting, method)
    chosen = matched_rounds(run, curves, rounds)
    lines = [f"### {method}: `{run.path}`", ""]
    if not chosen:
        return [*lines, "No evaluation of this run falls on a matched round.", ""]
    lines += matched_table(run, curves, method, chosen)
    lines += ["", wall_line(run)]
    departures = protocol_departures(run, method)
    if departures:
        listed = ", ".join(f"`{d}`" for d in departures)
        lines += ["", f"Departs from the protocol scenario in: {listed}."]
    split = next((h.get("shot_rule") for h in run.history.values() if h.get("shot_rule")), None)
    if isinstance(split, Mapping):
        groups = ", ".join(f"{g} = {split.get(g)}" for g in ("head", "medium", "tail"))
        lines += [
            "",
            f"fedlt's global head/medium/tail classes ({split.get('rule')} rule): {groups}; the "
            "personalised groups split each client by its own local view's counts, as the authors' code.",
        ]
    return [*lines, ""]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="fedlt run folders")
    p.add_argument(
        "--method", choices=["fedavg", "fedloge"], default=None, help="default: from the run's plugins"
    )
    p.add_argument("--curves", type=Path, default=DEFAULT_CURVES, help=f"default: {DEFAULT_CURVES}")
    p.add_argument(
        "--setting", default=DEFAULT_SETTING, help=f"curves.csv setting (default: {DEFAULT_SETTING!r})"
    )
    p.add_argument("--rounds", type=int, nargs="+", default=None, help="fedlt rounds to show")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    lines = [
        f"`python scenarios/fedloge_matched.py {shlex.join(argv)}`",
        "",
        f"fedlt against the FedLoGe authors' curves ({args.setting}), at matched rounds (fedlt round n = "
        "the authors' logged round n - 1). Accuracies in %; gap = fedlt - authors, in points.",
        "",
    ]
    for path in args.runs:
        lines += report(read_run(path), args.curves, args.setting, args.method, args.rounds)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
