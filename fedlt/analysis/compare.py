"""Compare finished runs: group runs that differ only in seed, summarise each metric, pair by seed.

A single seed says little about a remedy on a long tail: the tail holds few samples and its accuracy
moves a lot from seed to seed. This module turns a set of run folders into a table of mean, sample
standard deviation and a Student-t 95% confidence interval per group and metric, and, against a named
baseline group, the paired per-seed differences (pairing removes the variance that the two groups
share through the seed: same long tail, same split, same initial weights).

Runs belong to the same group when their resolved scenarios are equal once ``seed``, ``name`` and the
settings that do not change results (:data:`IGNORED_KEYS`: engine, checkpointing, evaluation batch
size, data locations) are removed. A group is labelled by the settings in which the groups differ,
e.g. ``plugins=[focal]`` or ``train.lr=0.1``.

Nothing here imports matplotlib; ``fedlt.analysis.plotting`` reuses :func:`load_run` to read run folders.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tomllib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_METRICS",
    "IGNORED_KEYS",
    "ComparisonTable",
    "Group",
    "RunRecord",
    "Stat",
    "collect_runs",
    "compare",
    "load_run",
    "summarize",
    "t_quantile_975",
]

SUMMARY = "summary.json"
SCENARIO = "scenario.toml"
METRICS = "metrics.jsonl"

#: Metrics compared by default, in this order, when at least one run's ``summary["final"]`` has them.
DEFAULT_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "head_accuracy",
    "medium_accuracy",
    "tail_accuracy",
    "auroc_macro",
    "personalized_accuracy",
    "a_auc",
    "a_last",
    "a_avg",
    "f_last",
)

#: Scenario keys (dotted; a key also covers everything below it) that do not define the experiment:
#: where and how fast it ran, how often it was saved or evaluated along the way, where the data
#: files live.
IGNORED_KEYS: tuple[str, ...] = (
    "name",
    "seed",
    "engine",
    "checkpoint",
    "federation.eval_every",
    "eval.batch_size",
    "data.root",
    "data.cache_dir",
    "data.download",
)

#: Two-sided 95% Student t quantiles t_{0.975, df}, used when scipy is not installed.
_T975: dict[int, float] = {
    1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624,
    8: 2.306004, 9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787,
    15: 2.131450, 16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614,
    22: 2.073873, 23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407,
    29: 2.045230, 30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.979930,
}  # fmt: skip
_Z975 = 1.959964


# --------------------------------------------------------------------------- statistics


def _t975_table(df: int) -> float:
    """t_{0.975, df} from the table, interpolated linearly in 1/df between tabulated rows.

    Linear interpolation in 1/df is the textbook rule for t tables; between 30 and infinity it is
    within 5e-4 of the exact quantile.
    """
    if df in _T975:
        return _T975[df]
    rows = sorted(_T975)
    lower = max(d for d in rows if d < df)
    upper = min((d for d in rows if d > df), default=None)
    t_low, t_up = _T975[lower], (_Z975 if upper is None else _T975[upper])
    inv_up = 0.0 if upper is None else 1.0 / upper
    w = (1.0 / lower - 1.0 / df) / (1.0 / lower - inv_up)
    return t_low + w * (t_up - t_low)


def t_quantile_975(df: int, use_scipy: bool = True) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (half-width factor of a 95% CI).

    Parameters
    ----------
    df : int
        Degrees of freedom, >= 1 (n - 1 for a mean of n values).
    use_scipy : bool, default=True
        Use ``scipy.stats.t.ppf`` when scipy is importable; otherwise (or when False) the table of
        :data:`_T975`, exact to 6 decimals at tabulated df, interpolated in 1/df elsewhere.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if use_scipy:
        try:
            from scipy import stats
        except ImportError:
            pass
        else:
            return float(stats.t.ppf(0.975, df))
    return _t975_table(int(df))


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (ddof=1) and 95% Student-t confidence interval of some values.

    ``std`` and the interval are ``None`` for fewer than two values; every field but ``n`` and
    ``values`` is ``None`` for none.
    """

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...] = ()

    @property
    def half_width(self) -> float | None:
        """Half the width of the 95% interval (what a "mean ± x" cell shows)."""
        if self.ci_high is None or self.mean is None:
            return None
        return self.ci_high - self.mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "values": list(self.values),
        }


def summarize(values: Iterable[float]) -> Stat:
    """:class:`Stat` of ``values``: mean, std with ddof=1 and mean ± t_{0.975, n-1} · std / sqrt(n)."""
    xs = tuple(float(v) for v in values)
    n = len(xs)
    if n == 0:
        return Stat(0, None, None, None, None, ())
    mean = math.fsum(xs) / n
    if n == 1:
        return Stat(1, mean, None, None, None, xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Stat(n, mean, std, mean - half, mean + half, xs)


# --------------------------------------------------------------------------- run folders


@dataclass
class RunRecord:
    """What a run folder holds, read defensively (missing files give empty values).

    Attributes
    ----------
    path : Path
        The run folder.
    summary : dict
        ``summary.json`` (``{}`` if absent, e.g. a run still in progress).
    scenario : dict
        The resolved scenario from ``scenario.toml`` (``{}`` if absent), defaults filled in when it
        still validates, so runs written by older versions compare equal to newer ones.
    """

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    scenario: dict[str, Any] = field(default_factory=dict)
    _history: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The folder name (the default label in tables and plots)."""
        return self.path.name

    @property
    def final(self) -> dict[str, Any]:
        """``summary["final"]``: the last full evaluation plus continual summaries."""
        final = self.summary.get("final")
        return final if isinstance(final, dict) else {}

    @property
    def seed(self) -> int | None:
        seed = self.scenario.get("seed", self.summary.get("seed"))
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def metric(self, key: str) -> float | None:
        """A final metric as a float, or ``None`` when absent, not a number, or not finite."""
        return _number(self.final.get(key))

    def history(self) -> list[dict[str, Any]]:
        """The evaluation records of ``metrics.jsonl`` in file order (read once, then cached).

        Lines that do not parse (a run killed mid-write) are skipped.
        """
        if self._history is None:
            records: list[dict[str, Any]] = []
            path = self.path / METRICS
            if path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict):
                        records.append(record)
            self._history = records
        return self._history


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _normalise_scenario(raw: dict[str, Any]) -> dict[str, Any]:
    """The scenario with every default filled in (plugins as ``{"name", "params"}``), or ``raw``
    itself (plugins brought to the same shape) when it no longer validates."""
    from fedlt.errors import FedltError
    from fedlt.scenario.config import scenario_from_dict

    try:
        return scenario_from_dict(raw).model_dump(mode="json")
    except (FedltError, ValueError, TypeError):
        out = dict(raw)
        plugins = []
        for spec in raw.get("plugins", []) or []:
            if isinstance(spec, dict):
                params = spec.get("params", {k: v for k, v in spec.items() if k != "name"})
                plugins.append({"name": spec.get("name"), "params": params})
        out["plugins"] = plugins
        return out


def load_run(path: str | Path, require_summary: bool = True) -> RunRecord:
    """Read one run folder.

    Parameters
    ----------
    path : path
        A folder written by ``fedlt run``.
    require_summary : bool, default=True
        Raise when ``summary.json`` is missing (a comparison needs final metrics); plots of a run
        in progress pass False and use ``metrics.jsonl``.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a folder, or holds none of ``summary.json``, ``scenario.toml`` and
        ``metrics.jsonl`` (or no ``summary.json`` when required).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run folder (no such directory)")
    present = [n for n in (SUMMARY, SCENARIO, METRICS) if (path / n).is_file()]
    if not present or (require_summary and SUMMARY not in present):
        need = SUMMARY if require_summary else f"{SUMMARY}, {SCENARIO} or {METRICS}"
        raise FileNotFoundError(f"{path} is not a finished run folder: it holds no {need}")
    summary: dict[str, Any] = {}
    if SUMMARY in present:
        loaded = json.loads((path / SUMMARY).read_text())
        summary = loaded if isinstance(loaded, dict) else {}
    scenario: dict[str, Any] = {}
    if SCENARIO in present:
        scenario = _normalise_scenario(tomllib.loads((path / SCENARIO).read_text()))
    return RunRecord(path=path, summary=summary, scenario=scenario)


def collect_runs(paths: str | Path | Iterable[str | Path]) -> list[RunRecord]:
    """Every finished run under ``paths``: run folders themselves, or folders holding run folders.

    A path holding ``summary.json`` is a run; any other folder is searched (recursively) for run
    folders, in sorted order. Unfinished runs found while searching (``scenario.toml`` but no
    ``summary.json``) are skipped with a warning; a run named directly must be finished. Each run
    appears once even if reached twice.

    Raises
    ------
    FileNotFoundError
        For a path that does not exist, or when no run is found at all.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs: list[RunRecord] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if (p / SUMMARY).is_file() or (p / SCENARIO).is_file():
            folders = [p]
        else:
            folders = sorted({f.parent for n in (SUMMARY, SCENARIO) for f in p.rglob(n)})
            unfinished = [f for f in folders if not (f / SUMMARY).is_file()]
            if unfinished:
                names = ", ".join(str(f) for f in unfinished)
                warnings.warn(f"skipped unfinished runs (no {SUMMARY}): {names}", stacklevel=2)
            folders = [f for f in folders if f not in unfinished]
        for folder in folders:
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(load_run(folder))
    if not runs:
        raise FileNotFoundError(f"no run folders (holding {SUMMARY}) under {', '.join(map(str, paths))}")
    return runs


# --------------------------------------------------------------------------- grouping


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys; lists and plugin lists stay whole values."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and key != "plugins":
                out.update(_flatten(v, key))
            else:
                out[key] = v
        return out
    return {prefix: value}


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)


def _setting_key(run: RunRecord, ignore: Sequence[str]) -> dict[str, Any]:
    """The run's experiment identity: the flattened scenario without the ignored keys."""
    scenario = run.scenario or {
        # No scenario.toml: all that is known is in summary.json.
        "scenario": run.summary.get("scenario"),
        "plugins": [{"name": n, "params": {}} for n in run.summary.get("plugins", []) or []],
    }
    flat = _flatten(scenario)
    flat.setdefault("plugins", [])
    return {k: v for k, v in flat.items() if not _ignored(k, ignore)}


def _fmt_value(key: str, value: Any) -> str:
    if value is None:
        return "unset"
    if key == "plugins" and isinstance(value, list):
        parts = []
        for spec in value:
            if not isinstance(spec, Mapping):
                parts.append(str(spec))
                continue
            params = spec.get("params") or {}
            inner = ",".join(f"{k}={_fmt_value(k, v)}" for k, v in sorted(params.items()))
            parts.append(f"{spec.get('name')}({inner})" if inner else str(spec.get("name")))
        return "[" + ", ".join(parts) + "]"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt_value("", v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass
class Group:
    """Runs of one experiment that differ only in seed.

    Attributes
    ----------
    label : str
        The settings in which this group differs from the others (``key=value, ...``), or the
        scenario name when there is one group.
    settings : dict
        Those differing settings as dotted key → value.
    runs : list of RunRecord
        Its runs, in the order given.
    """

    label: str
    settings: dict[str, Any]
    runs: list[RunRecord]

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def values_by_seed(self, metric: str) -> dict[int, float]:
        """Per seed, the metric (the mean over runs sharing that seed); runs without it are left out."""
        by_seed: dict[int, list[float]] = {}
        for run in self.runs:
            value = run.metric(metric)
            if run.seed is not None and value is not None:
                by_seed.setdefault(run.seed, []).append(value)
        return {s: math.fsum(v) / len(v) for s, v in by_seed.items()}


def group_runs(runs: Sequence[RunRecord], ignore: Sequence[str] = IGNORED_KEYS) -> list[Group]:
    """Group runs whose scenarios agree outside ``ignore``; groups in order of first appearance."""
    keyed: dict[str, tuple[dict[str, Any], list[RunRecord]]] = {}
    for run in runs:
        setting = _setting_key(run, ignore)
        keyed.setdefault(_canonical(setting), (setting, []))[1].append(run)
    settings = [s for s, _ in keyed.values()]
    all_keys = sorted({k for s in settings for k in s}, key=lambda k: (k != "plugins", k))
    differing = [k for k in all_keys if len({_canonical(s.get(k)) for s in settings}) > 1]
    groups = []
    for setting, members in keyed.values():
        diff = {k: setting.get(k) for k in differing}
        if diff:
            label = ", ".join(f"{k}={_fmt_value(k, v)}" for k, v in diff.items())
        else:
            names = sorted(
                {str(r.summary.get("scenario") or r.scenario.get("name") or "runs") for r in members}
            )
            label = "/".join(names)
        groups.append(Group(label=label, settings=diff, runs=members))
    return groups


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One group and metric: its statistics and, unless it is the baseline, the paired difference."""

    group: str
    metric: str
    stat: Stat
    diff: Stat | None = None
    diff_seeds: tuple[int, ...] = ()


@dataclass
class ComparisonTable:
    """Statistics per group and metric, with paired differences against a baseline group.

    Attributes
    ----------
    groups : list of Group
        The groups, baseline first when there is one.
    metrics : list of str
        The metrics compared, in column order.
    rows : list of Row
        One per (metric, group), metric-major.
    baseline : str or None
        Label of the baseline group.
    notes : list of str
        What the reader should know (missing metrics, unpaired seeds, repeated seeds).
    """

    groups: list[Group]
    metrics: list[str]
    rows: list[Row]
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, group: str, metric: str) -> Row:
        """The row of ``group`` (its label) and ``metric``."""
        for r in self.rows:
            if r.group == group and r.metric == metric:
                return r
        raise KeyError((group, metric))

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready values (what :meth:`to_json` writes)."""
        return {
            "baseline": self.baseline,
            "metrics": list(self.metrics),
            "groups": [
                {
                    "label": g.label,
                    "settings": g.settings,
                    "runs": [str(r.path) for r in g.runs],
                    "seeds": g.seeds,
                }
                for g in self.groups
            ],
            "rows": [
                {
                    "group": r.group,
                    "metric": r.metric,
                    **r.stat.to_dict(),
                    "diff": None if r.diff is None else {**r.diff.to_dict(), "seeds": list(r.diff_seeds)},
                }
                for r in self.rows
            ],
            "notes": list(self.notes),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def to_csv(self) -> str:
        """Long format, one line per (group, metric): statistics then the paired difference."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        cols = ["n", "mean", "std", "ci_low", "ci_high"]
        writer.writerow(["group", "metric", *cols, *(f"diff_{c}" for c in cols)])
        for r in self.rows:
            cells: list[Any] = [r.stat.n, r.stat.mean, r.stat.std, r.stat.ci_low, r.stat.ci_high]
            d = r.diff
            cells += [None] * 5 if d is None else [d.n, d.mean, d.std, d.ci_low, d.ci_high]
            writer.writerow([r.group, r.metric, *("" if c is None else repr(c) for c in cells)])
        return buf.getvalue()

    def to_markdown(self, digits: int = 4) -> str:
        """One table per metric: n, mean, std, 95% CI and the paired difference to the baseline."""

        def f(x: float | None, signed: bool = False) -> str:
            if x is None:
                return "–"
            return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"

        def ci(s: Stat, signed: bool = False) -> str:
            return "–" if s.ci_low is None else f"[{f(s.ci_low, signed)}, {f(s.ci_high, signed)}]"

        lines = ["| group | runs | seeds |", "|---|---:|---|"]
        for g in self.groups:
            mark = " (baseline)" if g.label == self.baseline else ""
            seeds = ", ".join("?" if s is None else str(s) for s in g.seeds)
            lines.append(f"| {_md(g.label)}{mark} | {len(g.runs)} | {seeds} |")
        for metric in self.metrics:
            lines += ["", f"### {metric}", ""]
            head = "| group | n | mean | std | 95% CI |"
            rule = "|---|---:|---:|---:|---|"
            if self.baseline is not None:
                head += " Δ vs baseline (paired) | Δ std | Δ 95% CI | pairs |"
                rule += "---:|---:|---|---:|"
            lines += [head, rule]
            for r in (r for r in self.rows if r.metric == metric):
                s = r.stat
                line = f"| {_md(r.group)} | {s.n} | {f(s.mean)} | {f(s.std)} | {ci(s)} |"
                if self.baseline is not None:
                    if r.diff is None:
                        line += " baseline | | | |"
                    else:
                        d = r.diff
                        line += f" {f(d.mean, True)} | {f(d.std)} | {ci(d, True)} | {d.n} |"
                lines.append(line)
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _find_baseline(groups: Sequence[Group], baseline: str) -> Group:
    exact = [g for g in groups if g.label == baseline]
    if exact:
        return exact[0]
    partial = [g for g in groups if baseline in g.label]
    if len(partial) == 1:
        return partial[0]
    labels = "; ".join(g.label for g in groups)
    what = "matches several groups" if partial else "matches no group"
    raise ValueError(f"baseline {baseline!r} {what}; the groups are: {labels}")


def compare(
    runs: Sequence[RunRecord],
    metrics: Sequence[str] | None = None,
    baseline: str | None = None,
    ignore: Sequence[str] = IGNORED_KEYS,
) -> ComparisonTable:
    """Group ``runs`` by experiment and summarise each metric, paired against ``baseline``.

    Parameters
    ----------
    runs : sequence of RunRecord
        From :func:`collect_runs`.
    metrics : sequence of str, optional
        Keys of ``summary["final"]``; default: those of :data:`DEFAULT_METRICS` that some run has.
    baseline : str, optional
        The baseline group: its exact label, or a substring of exactly one label (``"plugins=[]"``).
        Each other group then gets, per metric, the differences group - baseline over the seeds
        both have (runs sharing a seed within a group are averaged first): their mean, std
        (ddof=1), 95% t interval and number of pairs.
    ignore : sequence of str
        Scenario keys that do not separate groups (default :data:`IGNORED_KEYS`).

    Returns
    -------
    ComparisonTable
    """
    if not runs:
        raise ValueError("no runs to compare")
    groups = group_runs(runs, ignore)
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if any(r.metric(m) is not None for r in runs)]
    metrics = list(metrics)
    notes: list[str] = []
    base: Group | None = None
    if baseline is not None:
        base = _find_baseline(groups, baseline)
        groups = [base, *(g for g in groups if g is not base)]
    for g in groups:
        seeds = [s for s in g.seeds if s is not None]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            notes.append(f"{g.label}: seeds {repeated} occur in several runs; paired values use their mean.")
    rows: list[Row] = []
    for metric in metrics:
        for g in groups:
            values = [v for v in (r.metric(metric) for r in g.runs) if v is not None]
            missing = len(g.runs) - len(values)
            if missing:
                notes.append(f"{g.label}: {missing} of {len(g.runs)} runs have no {metric}.")
            row = Row(g.label, metric, summarize(values))
            if base is not None and g is not base:
                mine, theirs = g.values_by_seed(metric), base.values_by_seed(metric)
                common = tuple(sorted(set(mine) & set(theirs)))
                row.diff = summarize(mine[s] - theirs[s] for s in common)
                row.diff_seeds = common
                if not common and values:
                    notes.append(
                        f"{g.label}: no seed shared with the baseline for {metric}; no paired difference."
                    )
            rows.append(row)
    return ComparisonTable(groups, metrics, rows, None if base is None else base.label, notes)
