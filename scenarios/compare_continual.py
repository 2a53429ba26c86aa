"""Compare continual-learning remedies on one ``[stream]`` scenario, same seeds, and tabulate them.

The continual counterpart of ``compare_remedies.py``, with the same command line and outputs
(its docstring lists them): each method is a list of ``[[plugins]]`` tables (plus, for MVP, a ViT
model), run for every seed as a :class:`fedlt.analysis.sweep.Sweep` in ``RUNS/<method>/seed<seed>``; the
table is ``fedlt compare``'s (mean, std, 95% interval per method, paired differences by seed
from ``finetune``) of A_auc / A_last / A_avg / F_last, their personalised versions and the final
balanced accuracy; the plot shows anytime accuracy against the stream samples the federation has
read, one line per method (mean over seeds, band: ± std)::

    python scenarios/compare_continual.py scenarios/siblurry_quick.toml --seeds 0 1 2 --out docs/results

Outputs: ``DIR/continual-<scenario>[-T].md`` / ``.csv`` / ``.json`` / ``.png`` and
``RUNS/results.json``. ``--memory-size K`` sets the replay memory of every replay method.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


def _load_common() -> ModuleType:
    """``compare_remedies.py`` from this script's folder (the scripts are not a package)."""
    name = "compare_remedies"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


common = _load_common()

#: Columns of the continual table: (summary["final"] key, header).
CONTINUAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("a_auc", "A_auc"),
    ("a_last", "A_last"),
    ("a_avg", "A_avg"),
    ("f_last", "F_last ↓"),
    ("a_auc_personalized", "A_auc pers."),
    ("a_last_personalized", "A_last pers."),
    ("balanced_accuracy", "final bal. acc"),
)
#: Paired differences from the baseline (finetune).
CONTINUAL_DELTAS: tuple[tuple[str, str], ...] = (
    ("a_auc", "ΔA_auc"),
    ("a_last", "ΔA_last"),
    ("f_last", "ΔF_last"),
)
BASELINE = "finetune"


def continual_methods(memory_size: int | None = None) -> dict[str, Any]:
    """The continual methods by the name users see, in table order.

    ``memory_size`` sets the replay memory K of every replay method (unset: the plugin's default).
    ``mvp`` swaps the scenario's model for fedlt's ViT (no pretrained weights here, so its
    backbone is trained too: ``freeze_backbone = false``) and, as official MVP always does, masks
    the classes the client has not seen yet (``seen-class-mask``).
    """
    mem = {} if memory_size is None else {"memory_size": memory_size}
    mvp_losses = [{"name": "gsf"}, {"name": "afs"}, {"name": "seen-class-mask"}]
    return {
        "finetune": ([], {}),
        "er": ([{"name": "replay", "policy": "reservoir", **mem}], {}),
        "er-cbrs": ([{"name": "replay", "policy": "cbrs", **mem}], {}),
        "er-invfreq": (
            [{"name": "replay", "policy": "reservoir", "reweight": "inverse-frequency", **mem}],
            {},
        ),
        "gsf-afs-mask": (mvp_losses, {}),
        "er+gsf-afs-mask": ([{"name": "replay", "policy": "reservoir", **mem}, *mvp_losses], {}),
        "mvp": (
            [{"name": "mvp-prompts", "freeze_backbone": False}, {"name": "mvp-mask"}, *mvp_losses],
            {"model": {"name": "vit"}},
        ),
    }


DEFAULT_METHODS = ("finetune", "er", "er-cbrs", "er-invfreq", "gsf-afs-mask", "er+gsf-afs-mask", "mvp")


def mean_curve(
    histories: Sequence[Sequence[Sequence[float]]],
) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over seeds of anytime-accuracy curves ``[[samples seen, accuracy], ...]``.

    Seeds read their streams at different sample counts, so each curve is interpolated linearly on
    the first one's sample counts, over the range every curve covers. For the plot only.
    """
    import numpy as np

    curves = []
    for h in histories:
        pts = [(float(x), float(y)) for x, y in h if x is not None and y is not None]
        if pts:
            curves.append(np.array(sorted(pts)))
    if not curves:
        return [], [], []
    lo, hi = max(c[0, 0] for c in curves), min(c[-1, 0] for c in curves)
    xs = curves[0][:, 0]
    xs = xs[(xs >= lo) & (xs <= hi)]
    if len(curves) == 1 or len(xs) == 0:
        xs = curves[0][:, 0]
        return xs.tolist(), curves[0][:, 1].tolist(), [0.0] * len(xs)
    ys = np.stack([np.interp(xs, c[:, 0], c[:, 1]) for c in curves])
    return xs.tolist(), ys.mean(0).tolist(), ys.std(0, ddof=1).tolist()


def anytime_plot(table: Any, path: Path, title: str) -> None:
    """Anytime accuracy (%) against stream samples read, one line per method (band: ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for g in table.groups:
        xs, means, stds = mean_curve([run.final.get("anytime_history") or [] for run in g.runs])
        if not xs:
            continue
        (line,) = ax.plot(xs, [100 * m for m in means], marker=".", label=g.label)
        if any(stds):
            lo = [100 * (m - s) for m, s in zip(means, stds, strict=True)]
            hi = [100 * (m + s) for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("stream samples read by the federation")
    ax.set_ylabel("anytime accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the continual comparison; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common.build_parser(__doc__.splitlines()[0], list(continual_methods()), 3)
    parser.add_argument(
        "--memory-size", type=int, default=None, help="replay memory K per client (default: the plugin's)"
    )
    args = parser.parse_args(argv)
    sets, resolved, seeds, runs = common.prepare(args, 3, "continual")
    if resolved.stream.kind == "none":
        parser.error(f"{args.scenario} has no [stream] table; use compare_remedies.py for offline scenarios")
    names = args.methods or list(DEFAULT_METHODS)
    methods = {n: m for n, m in continual_methods(args.memory_size).items() if n in names}
    methods = common.with_params(methods, args.params)
    machine = common.machine_info()
    results, total = common.run_study(args, args.scenario, methods, seeds, sets, runs)

    metrics = [key for key, _ in CONTINUAL_COLUMNS]
    table = common.comparison(results, metrics, BASELINE) if any(r.finished for r in results) else None
    stem = f"continual-{resolved.name}" + (f"-{args.tag}" if args.tag else "")
    plot_path = args.out / f"{stem}.png"
    st = resolved.stream
    period = (
        "at every multiple of ceil(stream length / 50) stream samples read by the federation"
        if st.eval_period == "auto"
        else f"at every multiple of {st.eval_period} stream samples read by the federation"
    )
    desc = (
        f"{common.describe(resolved)}; stream {st.kind} ({st.schedule}, {st.pacing} pacing) T={st.n_tasks} "
        f"N={st.disjoint_percent:g}% M={st.blurry_percent:g}%, {st.samples_per_round} samples per "
        f"client-round, {st.online_iter} step(s) per batch, anytime evaluation {period}"
    )
    mem = args.memory_size if args.memory_size is not None else "plugin default (500)"
    lines = common.markdown_header(
        f"Continual remedies on {resolved.name}", argv, "scenarios/compare_continual.py", desc, machine
    )
    lines += [
        f"Seeds: {' '.join(map(str, seeds))}. Replay memory K = {mem} per client. Accuracies in %, "
        "mean ± sample std over seeds: anytime accuracy on the classes exposed so far "
        "(A_auc: its mean over the fixed-period points, A_last: the final one, A_avg: the mean at "
        "the federation's task ends), F_last: forgetting (lower is better); 'pers.': the same on "
        f"each client's local view. Δ: per-seed paired differences from {BASELINE}, mean [95% t "
        "interval]. " + common.wall_note(results, total, runs),
        "",
    ]
    if table is not None:
        lines += [*common.summary_table(table, results, CONTINUAL_COLUMNS, CONTINUAL_DELTAS), ""]
        if not args.no_plot:
            lines += [f"![anytime accuracy against samples read]({plot_path.name})", ""]
    lines += common.notes(results)
    if table is not None:
        lines += common.stats_section(table)
    runs.mkdir(parents=True, exist_ok=True)
    common.save_results(results, table, runs / "results.json")
    md, _, _ = common.write_outputs(table, lines, args.out, stem)
    print(f"wrote {md} (+ .csv, .json) and {runs / 'results.json'} ({total / 60:.1f} min)")
    if table is None or args.no_plot:
        return 0 if table is not None else 1
    title = f"{resolved.name}: anytime accuracy, {len(seeds)} seed(s)"
    ok = common.try_plot(lambda: anytime_plot(table, plot_path, title), plot_path)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
