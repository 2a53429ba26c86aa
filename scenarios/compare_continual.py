"""Compare continual-learning remedies on one ``[stream]`` scenario, same seeds, and tabulate them.

The continual counterpart of ``compare_remedies.py`` (whose helpers it reuses): each method is a
list of ``[[plugins]]`` tables (plus, for MVP, a ViT model), run through ``fedlt.run`` per seed.
Writes a Markdown table of A_auc / A_last / A_avg / F_last (and their personalised versions) and
a plot of anytime accuracy against the round, one line per method::

    python scenarios/compare_continual.py scenarios/siblurry_quick.toml --seeds 0 1 2 --out docs/results
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
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

#: Columns of the continual table: (summary["final"] key, header, higher is better).
CONTINUAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("a_auc", "A_auc"),
    ("a_last", "A_last"),
    ("a_avg", "A_avg"),
    ("f_last", "F_last ↓"),
    ("a_auc_personalized", "A_auc pers."),
    ("a_last_personalized", "A_last pers."),
    ("balanced_accuracy", "final bal. acc"),
)


def continual_methods(memory_size: int | None = None) -> dict[str, Any]:
    """The continual methods by the name users see, in table order.

    ``memory_size`` sets the replay memory K of every replay method (unset: the plugin's default).
    ``mvp`` swaps the scenario's model for fedlt's ViT (no pretrained weights here, so its
    backbone is trained too: ``freeze_backbone = false``).
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
            [
                {"name": "mvp-prompts", "freeze_backbone": False},
                {"name": "mvp-mask"},
                {"name": "gsf"},
                {"name": "afs"},
            ],
            {"model": {"name": "vit"}},
        ),
    }


DEFAULT_METHODS = ("finetune", "er", "er-cbrs", "er-invfreq", "gsf-afs-mask", "er+gsf-afs-mask", "mvp")


def continual_table(results: Sequence[Any]) -> list[str]:
    """The continual comparison as Markdown table lines (accuracies in %)."""
    head = ["method", *[h for _, h in CONTINUAL_COLUMNS], "seeds", "s/run", "plugins"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if not r.summaries:
            continue
        row = [r.name, *[common.fmt_stat(r.values(key)) for key, _ in CONTINUAL_COLUMNS]]
        row += [
            str(len(r.summaries)),
            f"{statistics.fmean(r.wall_seconds):.0f}",
            f"`{common.plugin_label(r.plugins)}`",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def mean_history(summaries: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and std (over seeds) of the anytime accuracy, on the rounds all seeds share."""
    per_seed = [
        {int(r): float(a) for r, a in s["final"].get("anytime_history") or [] if a is not None}
        for s in summaries
    ]
    if not per_seed:
        return [], [], []
    rounds = sorted(set.intersection(*(set(h) for h in per_seed)))
    means = [statistics.fmean(h[r] for h in per_seed) for r in rounds]
    stds = [statistics.stdev(h[r] for h in per_seed) if len(per_seed) > 1 else 0.0 for r in rounds]
    return rounds, means, stds


def anytime_plot(results: Sequence[Any], path: Path, title: str) -> None:
    """Anytime accuracy (%) against the round, one line per method (band: ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for r in results:
        rounds, means, stds = mean_history(r.summaries)
        if not rounds:
            continue
        m = [100 * v for v in means]
        (line,) = ax.plot(rounds, m, marker=".", label=r.name)
        if any(stds):
            lo = [100 * (a - s) for a, s in zip(means, stds, strict=True)]
            hi = [100 * (a + s) for a, s in zip(means, stds, strict=True)]
            ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.12)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
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
    sets, resolved, seeds, runs = common.prepare(args, {"federation.rounds": 3}, "continual")
    if resolved.stream.kind == "none":
        parser.error(f"{args.scenario} has no [stream] table; use compare_remedies.py for offline scenarios")
    names = args.methods or list(DEFAULT_METHODS)
    methods = {n: m for n, m in continual_methods(args.memory_size).items() if n in names}
    methods = common.with_params(methods, args.params)
    print(
        f"{len(methods)} methods x {len(seeds)} seed(s) on {resolved.name}; run folders in {runs}", flush=True
    )
    machine = common.machine_info()
    start = time.perf_counter()
    results = common.run_methods(args.scenario, methods, seeds, sets, runs, args.reuse)
    total = time.perf_counter() - start

    stem = f"continual-{resolved.name}" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    table_path, plot_path = args.out / f"{stem}.md", args.out / f"{stem}.png"
    st = resolved.stream
    desc = (
        f"{common.describe(resolved)}; stream {st.kind} T={st.n_tasks} N={st.disjoint_percent:g}% "
        f"M={st.blurry_percent:g}%, {st.samples_per_round} samples per client-round, "
        f"{st.online_iter} step(s) per batch, anytime evaluation every {st.eval_period} round(s)"
    )
    mem = args.memory_size if args.memory_size is not None else "plugin default (500)"
    lines = common.markdown_header(
        f"Continual remedies on {resolved.name}", argv, "scenarios/compare_continual.py", desc, machine
    )
    lines += [
        f"Seeds: {' '.join(map(str, seeds))}. Replay memory K = {mem} per client. Accuracies in %, "
        "mean ± sample std over seeds: anytime accuracy on the classes exposed so far "
        "(A_auc: its mean over evaluations, A_last: the last, A_avg: the mean at task ends), "
        "F_last: forgetting (lower is better); 'pers.': the same on each client's local view. "
        + common.wall_note(results, total, runs),
        "",
        *continual_table(results),
        "",
        f"![anytime accuracy per round]({plot_path.name})",
        "",
        *common.notes(results),
    ]
    table_path.write_text("\n".join(lines))
    anytime_plot(results, plot_path, f"{resolved.name}: anytime accuracy, {len(seeds)} seed(s)")
    common.save_raw(results, runs / "results.json")
    print(f"wrote {table_path} and {plot_path} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
