"""Bad input to ``fedlt compare`` and ``fedlt plot``: exit 2, one message naming the option or the
file and what is wrong, no traceback, and nothing written.

Each case starts from a copy of one real finished run (a tiny scenario, two rounds) and breaks one
thing: a corrupt ``summary.json`` or ``scenario.toml``, a binary or foreign ``metrics.jsonl``, an
``--out`` that is a file or lies under one, a metric no run has.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

import pytest
from support.scenarios import TINY

import fedlt
from fedlt.analysis.compare import available_metrics, check_metrics, check_out_path, load_run
from fedlt.cli import main
from fedlt.errors import ScenarioError


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=2, eval_every=1)
    out = tmp_path_factory.mktemp("finished") / "run"
    fedlt.run(s, out=out)
    return out


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run, to break."""
    return Path(shutil.copytree(finished, tmp_path / "runs" / "run"))


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), " ".join(err.getvalue().split())


def _refused(argv: list[str], *named: str) -> str:
    """Runs ``fedlt ARGV``: asserts exit 2, nothing on stdout, no traceback, every word of ``named``
    in the message; returns the message."""
    code, stdout, message = _cli(argv)
    assert code == 2, message
    assert stdout == "" and message.startswith("error: ") and "Traceback" not in message, message
    for word in named:
        assert word in message, (word, message)
    return message


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- fedlt compare


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"final": {"accuracy": 0.5', "not valid JSON"),  # cut short
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not"),  # binary
        (b"[0.5, 0.6]", "JSON list, not an object"),
    ],
    ids=["cut-short", "binary", "a-list"],
)
def test_compare_refuses_a_corrupt_summary(run: Path, tmp_path: Path, content: bytes, why: str) -> None:
    (run / "summary.json").write_bytes(content)
    table = tmp_path / "table.md"
    _refused(["compare", str(run), "--out", str(table)], f"{run / 'summary.json'}", why)
    # found while searching a folder of runs, too
    _refused(["compare", str(run.parent), "--out", str(table)], f"{run / 'summary.json'}")
    assert not table.exists()


def test_compare_refuses_a_corrupt_scenario(run: Path) -> None:
    (run / "scenario.toml").write_bytes(b"[train\nlr = ")
    _refused(["compare", str(run)], f"{run / 'scenario.toml'}", "not a scenario fedlt wrote")


def test_compare_out_under_a_file_or_onto_a_folder_is_refused_first(run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    (run / "summary.json").write_bytes(b"broken")  # never read: --out is checked first
    _refused(["compare", str(run), "--out", str(blocker / "t.md")], "'--out'", f"{blocker} is a file")
    _refused(["compare", str(run), "--out", str(blocker / "a" / "t.md")], "'--out'", f"{blocker} is a file")
    _refused(["compare", str(run), "--out", str(tmp_path)], "'--out'", f"{tmp_path} is a folder")
    assert blocker.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "runs"]


def test_compare_out_creates_missing_folders(run: Path, tmp_path: Path) -> None:
    table = tmp_path / "tables" / "paper" / "t.csv"
    code, _, message = _cli(["compare", str(run), "--format", "csv", "--out", str(table)])
    assert code == 0, message
    assert table.read_text().startswith("group,metric,")


def test_compare_refuses_a_metric_no_run_has_and_lists_those_they_have(run: Path) -> None:
    final = json.loads((run / "summary.json").read_text())["final"]
    have = sorted(k for k, v in final.items() if v is None or type(v) in (int, float))
    assert "balanced_accuracy" in have
    message = _refused(
        ["compare", str(run), "--metrics", "accuracy,nosuchmetric"], "'--metrics'", "Got 'nosuchmetric'"
    )
    assert f"metrics the runs have: {', '.join(have)}." in message
    _refused(["compare", str(run), "--metrics", ","], "'--metrics'", "Got ','")
    code, stdout, _ = _cli(["compare", str(run), "--metrics", "tail_accuracy,accuracy"])
    assert code == 0 and "### tail_accuracy" in stdout and "### accuracy" in stdout


def test_check_metrics_from_python(run: Path) -> None:
    runs = [load_run(run)]
    assert "accuracy" in available_metrics(runs) and "confusion_matrix" not in available_metrics(runs)
    assert check_metrics(runs, [" accuracy"]) == ["accuracy"]
    with pytest.raises(ScenarioError, match=r"The 'metrics' value .* Got 'acuracy'"):
        check_metrics(runs, ["acuracy"])


# --------------------------------------------------------------------------- fedlt plot


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 8, b"PK\x03\x04 not json\nat all\n", b"[1, 2]\n[3]\n"],
    ids=["binary", "text", "not-records"],
)
def test_plot_refuses_a_metrics_file_none_of_which_reads(run: Path, tmp_path: Path, content: bytes) -> None:
    pytest.importorskip("matplotlib")
    (run / "metrics.jsonl").write_bytes(content)
    before = _files(run)
    figs = tmp_path / "figs"
    metrics = f"{run / 'metrics.jsonl'}"
    _refused(["plot", str(run), "--out", str(figs)], metrics, "not a metrics.jsonl fedlt wrote")
    _refused(["plot", str(run), "--group", "--out", str(figs)], f"{run / 'metrics.jsonl'}")
    _refused(["plot", str(run)], f"{run / 'metrics.jsonl'}")  # default --out: the run folder
    assert not figs.exists() and _files(run) == before


def test_plot_skips_a_foreign_line_with_a_warning(run: Path, tmp_path: Path) -> None:
    """One garbage line among records (not the last, which a kill may cut) is skipped and named."""
    pytest.importorskip("matplotlib")
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(lines[0] + b"\x00\xff garbage\n" + b"".join(lines[1:]))
    with pytest.warns(UserWarning, match=f"{run / 'metrics.jsonl'}: skipped 1 lines"):
        history = load_run(run).history()
    assert len(history) == len(lines)


def test_plot_out_that_is_a_file_or_under_one_is_refused(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "figs.png"
    blocker.write_bytes(b"a picture")
    _refused(["plot", str(run), "--out", str(blocker)], "'--out'", f"{blocker} is a file")
    _refused(["plot", str(run), "--out", str(blocker / "sub")], "'--out'", f"{blocker} is a file, not a")
    _refused(["plot", str(run), "--group", "--out", str(blocker)], "'--out'")
    assert blocker.read_bytes() == b"a picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs.png", "runs"]


def test_plot_functions_check_their_folder_first(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from fedlt.analysis.plotting import plot_groups, plot_runs

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for plot in (lambda: plot_runs([run], blocker), lambda: plot_groups([run], blocker / "x")):
        with pytest.raises(ScenarioError, match="The 'out_dir' value"):
            plot()
    assert check_out_path(tmp_path / "new" / "deeper", "out_dir", folder=True) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
