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

Personalised masks: the authors' FedLoGe ``localtest`` masks the classes absent from a client's
test view (logit -1e10); their FedAvg ``localtest_villina`` has that mask commented out. Each
run's header states the mask fedlt used (``personalized_mask`` in its records:
``eval.personalized_mask``), a note says where it differs from the authors' for that method, and
when FedAvg and FedLoGe runs are given together a last table puts their personalised accuracy side
by side by mask, with FedLoGe's gap over the FedAvg run of the *same* mask (run FedAvg with
``--set eval.personalized_mask=test-classes`` for it).

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
#: The protocol scenarios by dataset and method (what a run's departures are listed against).
PROTOCOLS = {
    "cifar10": {
        "fedavg": HERE / "fedloge_cifar10_lt.toml",
        "fedloge": HERE / "fedloge_cifar10_lt_fedloge.toml",
    },
    "cifar100": {
        "fedavg": HERE / "fedloge_cifar100_lt.toml",
        "fedloge": HERE / "fedloge_cifar100_lt_fedloge.toml",
    },
}
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


#: The personalised mask of the authors' code, by method: FedAvg's ``localtest_villina`` has the
#: mask commented out; FedLoGe's ``localtest`` masks the classes absent from the client's test view.
AUTHORS_MASK = {"fedavg": "none", "fedloge": "test-classes"}

#: gla-fr's ``mask`` parameter as a personalised mask (runs made before the mask was recorded).
GLA_FR_MASKS = {"train": "train-classes", "test": "test-classes", "none": "none"}

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


def run_dataset(run: RunData) -> str:
    """``cifar100`` or ``cifar10``: which of the authors' datasets the run's data is."""
    data = run.scenario.get("data") or {}
    text = f"{data.get('dataset', '')} {data.get('root', '')}".lower()
    return "cifar100" if "cifar100" in text or "cifar-100" in text else "cifar10"


def run_setting(run: RunData) -> str:
    """The authors' curves.csv setting of the run's protocol: its dataset and imbalance factor,
    with the authors' split, clients, participation and network (``cifar100-lt IF50 dir0.5 N20
    frac0.2 resnet34``); a reduced run is compared with the full protocol's curves."""
    factor = (run.scenario.get("long_tail") or {}).get("imbalance_factor", 100)
    if run_dataset(run) == "cifar100":
        return f"cifar100-lt IF{factor:g} dir0.5 N20 frac0.2 resnet34"
    return f"cifar10-lt IF{factor:g} dir0.5 N40 frac0.2 resnet18"


def detect_method(run: RunData) -> str:
    """``fedloge`` when the run has sse-c and gla-fr, ``fedavg`` when it has no plugin."""
    names = set(run.plugins)
    if {"sse-c", "gla-fr"} <= names:
        return "fedloge"
    if not names:
        return "fedavg"
    raise SystemExit(f"{run.path}: plugins {sorted(names)} are neither FedAvg nor FedLoGe; pass --method")


def personal_mask(run: RunData) -> tuple[str, str]:
    """The run's personalised mask and where it came from: its records' ``personalized_mask``
    (and ``personalized_mask_source``); for a run made before fedlt recorded it, the mask that
    version applied (gla-fr's own ``mask``, default "train"; none without gla-fr), marked inferred."""
    for record in run.history.values():
        if record.get("personalized_mask"):
            return str(record["personalized_mask"]), str(record.get("personalized_mask_source") or "recorded")
    explicit = (run.scenario.get("eval") or {}).get("personalized_mask")
    if explicit and explicit != "auto":
        return str(explicit), "eval.personalized_mask"
    for spec in run.scenario.get("plugins", []):
        if isinstance(spec, Mapping) and spec.get("name") == "gla-fr":
            mask = (spec.get("params") or spec).get("mask", "train")
            return GLA_FR_MASKS.get(str(mask), str(mask)), "gla-fr, inferred (not recorded by the run)"
    return "none", "inferred (not recorded by the run)"


def mask_note(run: RunData, method: str) -> str:
    """One line: the run's personalised mask next to the authors' for ``method``."""
    mask, source = personal_mask(run)
    theirs = AUTHORS_MASK[method]
    code = "localtest_villina" if method == "fedavg" else "localtest"
    line = f"Personalised mask: fedlt `{mask}` ({source}); the authors' {method} `{theirs}` (`{code}`)."
    if mask != theirs:
        line += " The masks differ, so the personalised gap to the authors is not like for like."
    return line


def mask_table(runs: Sequence[tuple[RunData, str]], rounds: Sequence[int] | None) -> list[str]:
    """Personalised accuracy of every FedAvg and FedLoGe run side by side, each column headed by
    its mask, and for each FedLoGe run its gap over the FedAvg run of the same mask (``[]``
    unless both methods are given)."""
    methods = {m for _, m in runs}
    if not {"fedavg", "fedloge"} <= methods:
        return []
    masks = [personal_mask(run)[0] for run, _ in runs]
    wanted = DEFAULT_ROUNDS if rounds is None else rounds
    chosen = [r for r in wanted if any(r in run.history for run, _ in runs)]
    head = ["round"] + [
        f"{m} (mask {k}): `{'/'.join(run.path.parts[-2:])}`" for (run, m), k in zip(runs, masks, strict=True)
    ]
    kinds = [(m, k) for (_, m), k in zip(runs, masks, strict=True)]
    pairs = []  # (FedLoGe column, FedAvg column of the same mask)
    for i, (m, k) in enumerate(kinds):
        if m == "fedloge" and ("fedavg", k) in kinds:
            pairs.append((i, kinds.index(("fedavg", k))))
            head.append(f"fedloge - fedavg, both mask {k}")
    lines = [
        "### Personalised accuracy by mask",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]
    for r in chosen:
        values = [_num(run.history.get(r, {}).get("personalized_accuracy")) for run, _ in runs]
        row = [str(r)] + [_pct(v) for v in values] + [_gap(values[i], values[j]) for i, j in pairs]
        lines.append("| " + " | ".join(row) + " |")
    missing = sorted({k for m, k in kinds if m == "fedloge"} - {k for m, k in kinds if m == "fedavg"})
    for k in missing:
        lines += [
            "",
            f"No FedAvg run with FedLoGe's mask `{k}` was given: the FedAvg / FedLoGe personalised "
            f"comparison above mixes masks. Run FedAvg with `--set eval.personalized_mask={k}`.",
        ]
    return [*lines, ""]


def protocol_departures(run: RunData, method: str) -> list[str]:
    """The settings in which the run differs from the protocol scenario of ``method``
    (``key=value`` in the run, as ``fedlt compare`` labels groups), or ``[]``."""
    file = PROTOCOLS[run_dataset(run)][method]
    if not run.scenario or not file.is_file():
        return []
    from fedlt.analysis.compare import RunRecord, compare, load_run
    from fedlt.hooks.dispatch import build_hooks_spelled_out
    from fedlt.scenario.config import load_scenario

    resolved = load_scenario(file)
    build_hooks_spelled_out(resolved.plugins)  # plugin defaults written out, as in a run's scenario.toml
    protocol = RunRecord(file, scenario=resolved.model_dump(mode="json"))
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
    run: RunData, curves_path: Path, setting: str | None, method: str | None, rounds: Sequence[int] | None
) -> list[str]:
    """The Markdown section of one run."""
    method = method or detect_method(run)
    setting = setting or run_setting(run)
    curves = read_curves(curves_path, setting, method)
    chosen = matched_rounds(run, curves, rounds)
    mask, source = personal_mask(run)
    lines = [f"### {method}: `{run.path}` (personalised mask: {mask}, {source}) against {setting}", ""]
    if not chosen:
        return [*lines, "No evaluation of this run falls on a matched round.", ""]
    lines += matched_table(run, curves, method, chosen)
    lines += ["", mask_note(run, method), "", wall_line(run)]
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


# --------------------------------------------------------------------------- several seeds


def _stat_cell(values: Sequence[float]) -> str:
    """Mean [95% t interval] in %, clipped to [0, 100] (``fedlt compare``'s interval), and n."""
    from fedlt.analysis.compare import summarize

    st = summarize(values, (0.0, 1.0))
    if st.mean is None:
        return "–"
    if st.ci_low is None or st.ci_high is None:
        return f"{100 * st.mean:.1f} (n={st.n})"
    return f"{100 * st.mean:.1f} [{100 * st.ci_low:.1f}, {100 * st.ci_high:.1f}]"


def aggregate(
    runs: Sequence[RunData],
    curves_path: Path,
    setting: str | None,
    method: str | None,
    rounds: Sequence[int] | None,
) -> list[str]:
    """One table per (setting, method, personalised mask) over the runs (seeds) given: at each
    matched round every run evaluated, the mean over runs with its 95% t interval, the authors'
    value and the gap of the mean; then FedLoGe minus FedAvg of the same mask, paired by seed."""
    groups: dict[tuple[str, str, str], list[RunData]] = {}
    for run in runs:
        key = (setting or run_setting(run), method or detect_method(run), personal_mask(run)[0])
        groups.setdefault(key, []).append(run)
    lines: list[str] = []
    for (sett, meth, mask), members in groups.items():
        curves = read_curves(curves_path, sett, meth)
        wanted = DEFAULT_ROUNDS if rounds is None else rounds
        chosen = [r for r in wanted if all(r in run.history for run in members)]
        seeds = ", ".join(str(run.summary.get("seed", (run.scenario or {}).get("seed"))) for run in members)
        lines += [f"### {meth}, personalised mask {mask} ({sett}): {len(members)} runs, seeds {seeds}", ""]
        cols = columns(meth)
        head = ["round"]
        for c in cols:
            head += [f"{c.label}: fedlt mean [95% CI]"] + (["authors", "gap"] if c.theirs else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for r in chosen:
            row = [str(r)]
            for c in cols:
                values = [v for run in members if (v := _num(run.history[r].get(c.ours))) is not None]
                row.append(_stat_cell(values))
                if c.theirs:
                    theirs = curves.get(r, {}).get(c.theirs)
                    mean = sum(values) / len(values) if values else None
                    row += [_pct(theirs), _gap(mean, theirs)]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", mask_note(members[0], meth)]
        departures = sorted(
            {d for run in members for d in protocol_departures(run, meth) if not d.startswith("seed=")}
        )
        if departures:
            lines += [
                "",
                "Departs from the protocol scenario in: " + ", ".join(f"`{d}`" for d in departures) + ".",
            ]
        walls = [
            run.summary["wall_seconds"] / run.summary["rounds_run"]
            for run in members
            if run.summary.get("rounds_run")
        ]
        if walls:
            lines += ["", f"Wall time per round: {min(walls):.0f}-{max(walls):.0f} s over the runs."]
        lines.append("")
    lines += _paired_gaps(groups, rounds)
    return lines


def _paired_gaps(
    groups: Mapping[tuple[str, str, str], Sequence[RunData]], rounds: Sequence[int] | None
) -> list[str]:
    """FedLoGe minus FedAvg of the same setting and mask, per seed, then mean [95% CI] (points)."""
    from fedlt.analysis.compare import summarize

    lines: list[str] = []
    for (sett, meth, mask), fedloge in groups.items():
        fedavg = groups.get((sett, "fedavg", mask))
        if meth != "fedloge" or not fedavg:
            continue
        by_seed = {run.summary.get("seed"): run for run in fedavg}
        pairs = [
            (run, by_seed[run.summary.get("seed")]) for run in fedloge if run.summary.get("seed") in by_seed
        ]
        if not pairs:
            continue
        wanted = DEFAULT_ROUNDS if rounds is None else rounds
        chosen = [r for r in wanted if all(r in a.history and r in b.history for a, b in pairs)]
        metrics = [
            ("global (SSE-C head vs FedAvg)", "gla-fr.sse_c_accuracy", "accuracy"),
            ("personalised", "personalized_accuracy", "personalized_accuracy"),
        ]
        lines += [
            f"### FedLoGe - FedAvg, both personalised mask {mask} ({sett}), paired by seed "
            f"({len(pairs)} seeds)",
            "",
            "| round | " + " | ".join(f"{label}: mean [95% CI], points" for label, _, _ in metrics) + " |",
            "|" + "---:|" * (1 + len(metrics)),
        ]
        for r in chosen:
            row = [str(r)]
            for _, ours, base in metrics:
                diffs = [
                    100 * (x - y)
                    for a, b in pairs
                    if (x := _num(a.history[r].get(ours))) is not None
                    and (y := _num(b.history[r].get(base))) is not None
                ]
                st = summarize(diffs)
                if st.mean is None:
                    row.append("–")
                elif st.ci_low is None or st.ci_high is None:
                    row.append(f"{st.mean:+.1f}")
                else:
                    row.append(f"{st.mean:+.1f} [{st.ci_low:+.1f}, {st.ci_high:+.1f}]")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="fedlt run folders")
    p.add_argument(
        "--method", choices=["fedavg", "fedloge"], default=None, help="default: from the run's plugins"
    )
    p.add_argument("--curves", type=Path, default=DEFAULT_CURVES, help=f"default: {DEFAULT_CURVES}")
    p.add_argument(
        "--setting",
        default=None,
        help="curves.csv setting (default: each run's protocol, e.g. "
        f"{DEFAULT_SETTING!r}, from its dataset and imbalance factor)",
    )
    p.add_argument(
        "--seeds",
        action="store_true",
        help="one table per method and mask over the runs given (several seeds): mean and 95%% interval",
    )
    p.add_argument("--rounds", type=int, nargs="+", default=None, help="fedlt rounds to show")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    lines = [
        f"`python scenarios/fedloge_matched.py {shlex.join(argv)}`",
        "",
        "fedlt against the FedLoGe authors' curves, at matched rounds (fedlt round n = the authors' "
        "logged round n - 1). Accuracies in %; gap = fedlt - authors, in points.",
        "",
    ]
    runs = [read_run(path) for path in args.runs]
    if args.seeds:
        lines += aggregate(runs, args.curves, args.setting, args.method, args.rounds)
    else:
        for run in runs:
            lines += report(run, args.curves, args.setting, args.method, args.rounds)
        lines += mask_table([(run, args.method or detect_method(run)) for run in runs], args.rounds)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
