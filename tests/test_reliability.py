"""Reliability round 2: nothing written through a link, no dead-end folders, clear errors.

Run folders are input someone else may have made: every file fedlt writes there is replaced by a
link to a victim file outside, and the run or resume must exit 2 naming the link and leave the
victim's bytes as they were. Folders holding only a stale lock must be reusable; overwriting a
live run's folder must delete nothing. Each case checks the exit status, the message, that no
traceback is printed and that nothing was trained (the checkpoint's bytes are unchanged).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from support.runs import interrupt_run
from support.scenarios import TINY

import fedlt
import fedlt.store.rundir as rundir_mod
from fedlt.cli import main
from fedlt.driver.runner import Run
from fedlt.store.checkpoint import write_file
from fedlt.store.rundir import LOCK, RunDirError, claim
from fedlt.store.safefile import LinkError, open_nofollow, refuse_link
from fedlt.version import __version__

REPO = Path(__file__).resolve().parents[1]
VICTIM = b"the user's own file: must survive\n"
TWO_ROUNDS = {**TINY, "federation": {**TINY["federation"], "rounds": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``stopped``: a 2-round run cut off after round 1; ``done``: the same run finished; both with
    every file a run can write (csv, rounds, starts, events, TensorBoard off)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    scenario = {**TWO_ROUNDS, "log": {"events": True}}
    try:
        interrupt_run(scenario, root / "stopped", after=1)
        fedlt.run(scenario, out=root / "done")
    finally:
        torch.set_num_threads(threads)
    return root


def _tree(folder: Path) -> dict[str, bytes | str | None]:
    """Every entry below ``folder``: a file's bytes, a link's target, None for a folder."""
    out: dict[str, bytes | str | None] = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
    return out


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main([*argv, "--quiet"] if argv[0] in ("run", "resume") else argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, " ".join(err.split())


# --------------------------------------------------------------------------- symlinks

# Every file or folder fedlt writes in a run folder; each is replaced by a link to a victim.
WRITTEN = [
    "fedlt.lock",
    "summary.json",
    "scenario.toml",
    "metrics.jsonl",
    "metrics.csv",
    "rounds.jsonl",
    "starts.json",
    "events.jsonl",
    "system.npz",
    "checkpoint.pt",
    "wandb-id",
    "tensorboard",
    "wandb",
]


@pytest.mark.parametrize("name", WRITTEN)
@pytest.mark.parametrize("how", ["resume", "resume --set", "run --out", "fedlt.run overwrite"])
def test_a_linked_file_in_a_run_folder_is_refused_and_its_target_untouched(
    name: str, how: str, runs: Path, tmp_path: Path, capsys, restore_threads
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(runs / "stopped", folder)
    victim = tmp_path / "victim"
    if name in ("tensorboard", "wandb"):
        victim.mkdir()
        (victim / "keep.txt").write_bytes(VICTIM)
    elif name == "scenario.toml":  # a user's scenario file, linked from the run folder
        victim.write_bytes((folder / name).read_bytes())
    else:
        victim.write_bytes(VICTIM)
    link = folder / name
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.symlink_to(victim)
    before = _tree(folder)
    victim_before = _tree(victim) if victim.is_dir() else victim.read_bytes()
    if how == "fedlt.run overwrite":
        with pytest.raises(LinkError) as info:
            fedlt.run(TWO_ROUNDS, out=folder, if_exists="overwrite")
        message = str(info.value)
        assert info.value.exit_status == 2
    else:
        argv = {
            "resume": ["resume", str(folder)],
            "resume --set": ["resume", str(folder), "--set", "federation.rounds=3"],
            "run --out": ["run", "quickstart", "--out", str(folder)],
        }[how]
        code, message = _cli(argv, capsys)
        assert code == 2, message
    if how == "run --out":
        assert f"The --out folder {folder} already holds a fedlt run" in message
    else:
        assert f"{link} is a symbolic link (to {victim})" in message, message
    assert (_tree(victim) if victim.is_dir() else victim.read_bytes()) == victim_before
    assert link.is_symlink()
    if how != "fedlt.run overwrite":
        assert _tree(folder) == before, "nothing may be trained, written or removed"
    else:  # the overwrite claims and checks before deleting anything
        assert _tree(folder) == before


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    return victim


def test_every_writer_refuses_a_link_even_one_made_after_the_claim(tmp_path: Path) -> None:
    # The claim looks at the folder first; each writer checks again (O_NOFOLLOW for appends).
    from fedlt.driver.loggers import CSVLog, wandb_run_id
    from fedlt.store.checkpoint import append_metrics, save_checkpoint, truncate_metrics
    from fedlt.store.events import EventLog
    from fedlt.store.starts import record_start

    victim = _victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()

    def linked(name: str) -> Path:
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
        return run / name

    writers = {
        "metrics.jsonl": lambda: append_metrics(linked("metrics.jsonl"), {"round": 1}),
        "rounds.jsonl": lambda: truncate_metrics(linked("rounds.jsonl"), 0),
        "checkpoint.pt": lambda: save_checkpoint(linked("checkpoint.pt") and run, {"round": 1}),
        "starts.json": lambda: record_start(linked("starts.json") and run),
        "summary.json": lambda: write_file(linked("summary.json"), "{}"),
        "wandb-id": lambda: wandb_run_id(linked("wandb-id") and run),
        "events.jsonl": lambda: EventLog(linked("events.jsonl") and run)("start", 0.0, client=1),
        "events.jsonl restart": lambda: EventLog(linked("events.jsonl") and run).restart(3),
        "metrics.csv": lambda: CSVLog().server_log_metrics(
            {"round": 1, "accuracy": 0.5}, _log_context(linked("metrics.csv").parent)
        ),
    }
    for what, write in writers.items():
        with pytest.raises(LinkError, match="is a symbolic link") as info:
            write()
        assert str(run) in str(info.value), what
        assert victim.read_bytes() == VICTIM, what


def _log_context(run_dir: Path) -> Any:
    from fedlt.hooks.context import LogContext

    return LogContext(run_dir=run_dir, scenario="tiny", round=1, n_rounds=1)


def test_open_nofollow_refuses_a_dangling_link_and_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LinkError):
        open_nofollow(tmp_path / "link", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    assert not (tmp_path / "nowhere").exists()
    assert refuse_link(tmp_path / "plain") == tmp_path / "plain"


def test_files_a_run_writes_are_world_readable_like_the_checkpoint(runs: Path) -> None:
    for name in ("metrics.csv", "checkpoint.pt", "summary.json", "scenario.toml", "starts.json"):
        mode = (runs / "done" / name).stat().st_mode & 0o777
        assert mode == 0o644, (name, oct(mode))


# --------------------------------------------------------------------------- no dead ends


def _stale_lock(folder: Path) -> None:
    """A lock left by a run that died: a pid that cannot exist on this host."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "then", "command": "x"}
    (folder / LOCK).write_text(json.dumps(info))


def test_a_lock_only_folder_is_reusable_by_run_and_refused_clearly_by_resume(
    tmp_path: Path, capsys, restore_threads
) -> None:
    folder = tmp_path / "killed"
    _stale_lock(folder)
    code, message = _cli(["resume", str(folder)], capsys)
    assert code == 2
    assert f"There is nothing to resume in {folder}" in message
    assert f"fedlt run SCENARIO --out {folder}" in message
    assert os.listdir(folder) == [LOCK]
    with pytest.warns(RuntimeWarning, match="stale lock"):
        summary = fedlt.run(TINY, out=folder)
    assert summary["finished"] and (folder / "checkpoint.pt").is_file()
    assert not (folder / LOCK).exists()


def test_a_lock_only_folder_is_reusable_by_the_cli_run(tmp_path: Path, capsys, restore_threads) -> None:
    folder = tmp_path / "killed"
    _stale_lock(folder)
    with pytest.warns(RuntimeWarning, match="stale lock"):
        code = main(["run", "quickstart", "--out", str(folder), "--quiet", "--set", "federation.rounds=1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (folder / "summary.json").is_file() and not (folder / LOCK).exists()


def test_a_full_disk_when_the_lock_is_written_leaves_a_usable_folder(
    tmp_path: Path, monkeypatch, restore_threads
) -> None:
    def full(fd: int, info: Any) -> None:
        os.write(fd, b'{"pid": ')  # part of it, as a filling disk does
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(rundir_mod, "_write_info", full)
        with pytest.raises(RunDirError, match=f"Cannot write the lock file {tmp_path / 'run' / LOCK}"):
            claim(tmp_path / "run")
    assert not (tmp_path / "run").exists(), "the folder the claim made is gone again"
    _stale_lock(tmp_path / "run2")
    with monkeypatch.context() as m, pytest.warns(RuntimeWarning):
        m.setattr(rundir_mod, "_write_info", full)
        with pytest.raises(RunDirError, match="No space left on device"):
            claim(tmp_path / "run2")
    with pytest.warns(RuntimeWarning, match="Taking over the stale lock"):
        assert fedlt.run(TINY, out=tmp_path / "run2")["finished"]  # taken over next time


def test_overwrite_refuses_a_live_run_before_deleting_anything(runs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "live"
    shutil.copytree(runs / "stopped", folder)
    before = _tree(folder)
    with claim(folder):  # a live run holds it
        before = _tree(folder)
        held = f"The run folder {folder} is in use: held by pid {os.getpid()}"
        with pytest.raises(RunDirError, match=held):
            fedlt.run(TWO_ROUNDS, out=folder, if_exists="overwrite")
        assert _tree(folder) == before
    assert fedlt.resume(folder)["rounds_run"] == 2, "the run can still be resumed"


def test_overwrite_with_a_stale_lock_starts_again(runs: Path, tmp_path: Path, restore_threads) -> None:
    folder = tmp_path / "stale"
    shutil.copytree(runs / "stopped", folder)
    _stale_lock(folder)
    (folder / "notes.txt").write_text("mine")
    with pytest.warns(RuntimeWarning, match="stale lock"):
        summary = fedlt.run(TWO_ROUNDS, out=folder, if_exists="overwrite")
    assert summary["rounds_run"] == 2 and summary["resumes"] == []
    assert (folder / "notes.txt").read_text() == "mine" and not (folder / LOCK).exists()


def test_if_exists_resume_applies_its_keywords_as_a_resume_would(runs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "done"
    shutil.copytree(runs / "done", folder)
    starts = (folder / "starts.json").read_bytes()
    # the same settings: the finished run's summary at once, nothing recorded
    again = fedlt.run(TWO_ROUNDS, out=folder, if_exists="resume", federation__rounds=2)
    assert again == json.loads((folder / "summary.json").read_text())
    assert (folder / "starts.json").read_bytes() == starts
    # a setting a resume cannot change: refused, naming it
    with pytest.raises(fedlt.ScenarioError, match="'seed'"):
        fedlt.run(TWO_ROUNDS, out=folder, if_exists="resume", seed=5)
    assert (folder / "starts.json").read_bytes() == starts
    # more rounds: the finished run continues
    more = fedlt.run(TWO_ROUNDS, out=folder, if_exists="resume", federation__rounds=3)
    assert more["rounds_run"] == 3
    assert [r["overrides"] for r in more["resumes"]] == [{"federation.rounds": 3}]


def test_run_names_scenario_for_a_wrong_type_and_explains_overrides() -> None:
    with pytest.raises(TypeError, match=r"fedlt.run's 'scenario' must be .* Got 42 \(int\)"):
        fedlt.run(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"keyword arguments.*federation__rounds=3"):
        fedlt.run("quickstart", overrides=["federation.rounds=3"])
    with pytest.raises(TypeError, match=r"fedlt.resume takes overrides as keyword arguments"):
        fedlt.resume("nowhere", overrides=["federation.rounds=3"])


# --------------------------------------------------------------------------- adoption


def test_license_and_citation_agree_with_the_package() -> None:
    import tomllib

    text = (REPO / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 the fedlt authors")
    assert "Apache License\n" in text and "Version 2.0, January 2004" in text
    assert text.rstrip().endswith("END OF TERMS AND CONDITIONS")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "Apache-2.0"}
    cff = (REPO / "CITATION.cff").read_text()
    fields = dict(re.findall(r"^([a-z-]+): (.+)$", cff, flags=re.M))
    assert fields["cff-version"] == "1.2.0"
    assert fields["title"] == "fedlt" and fields["license"] == "Apache-2.0"
    assert fields["version"] == __version__
    assert fields["date-released"] == '"2026-12-05"'
    assert re.search(r"^authors:\n  - name: the fedlt authors$", cff, flags=re.M)
    ignored = (REPO / ".gitignore").read_text().split()
    assert {"figs/", "plots/", "runs/"} <= set(ignored)


def test_the_gitignore_covers_the_folders_the_readme_tour_creates() -> None:
    tour = (REPO / "README.md").read_text().partition("## Tour")[2].partition("## ")[0]
    made = set(re.findall(r"--plot (\w+)", tour))
    made |= {p.split("/")[0] for p in re.findall(r"--out (\S+)", tour)}
    ignored = {line.strip().rstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()}
    assert made and made <= ignored, made - ignored


# --------------------------------------------------------------------------- plugin state on resume

REPLAY = {
    **TINY,
    "stream": {"kind": "si-blurry", "n_tasks": 3, "samples_per_round": 48, "online_iter": 2},
    "federation": {**TINY["federation"], "rounds": 3, "eval_every": 3},
    "plugins": [{"name": "replay", "memory_size": 24, "policy": "cbrs"}],
}


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replay run cut off after round 2, its clients' memories filled."""
    folder = tmp_path_factory.mktemp("replay") / "cut"
    threads = torch.get_num_threads()
    try:
        interrupt_run(REPLAY, folder, after=2)
    finally:
        torch.set_num_threads(threads)
    return folder


def _forge(folder: Path, change: Any) -> dict[str, Any]:
    """Rewrite the folder's checkpoint with ``change(ckpt)`` applied; returns client 0's memory."""
    from fedlt.store.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(folder)
    assert ckpt is not None
    change(ckpt)
    save_checkpoint(folder, ckpt)
    return ckpt


def _own_and_other(folder: Path) -> tuple[list[int], int, list[int]]:
    """Client 0's samples, one sample of client 1 that is not client 0's, and the train labels."""
    data = Run.open(folder).data  # claims and releases: the run object is dropped at once
    own = set(data.client_indices[0].tolist())
    other = next(i for i in data.client_indices[1].tolist() if i not in own)
    return sorted(own), other, data.y_train_np.tolist()


def _set(key: str, value: Any, client: int = 0) -> Any:
    def change(ckpt: dict[str, Any]) -> None:
        ckpt["client_states"][client]["replay"][key] = value

    return change


@pytest.mark.parametrize(
    ("case", "key", "allowed"),
    [
        ("huge index", "indices[0]", "one of client 0's own"),
        ("negative index", "indices[0]", "one of client 0's own"),
        ("another client's sample", "indices[0]", "one of client 0's own"),
        ("index as a float", "indices[0]", "one of client 0's own"),
        ("wrong label", "labels[0]", "the label of sample"),
        ("label out of range", "labels[0]", "a class label, an int in [0, 9]"),
        ("more than memory_size", "indices", "a list of at most 24 items (the plugin's memory_size)"),
        ("labels shorter", "labels", "as long as 'indices'"),
        ("negative counter", "n_seen", "an int >= 0"),
        ("unknown key", "evil", "one of the declared keys"),
    ],
)
def test_a_forged_replay_memory_is_refused_on_resume_naming_plugin_key_and_value(
    case: str, key: str, allowed: str, replay_run: Path, tmp_path: Path, capsys, restore_threads
) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(replay_run, folder)
    own, other, labels = _own_and_other(folder)
    first = {"indices": None}

    def keep_first(ckpt: dict[str, Any]) -> None:
        first["indices"] = list(ckpt["client_states"][0]["replay"]["indices"])

    _forge(folder, keep_first)
    indices = first["indices"]
    assert indices, "client 0 remembered something"
    bad_value: Any
    change: Any
    if case == "huge index":
        bad_value, change = 10**9, _set("indices", [10**9, *indices[1:]])
    elif case == "negative index":
        bad_value, change = -1, _set("indices", [-1, *indices[1:]])
    elif case == "another client's sample":
        bad_value, change = other, _set("indices", [other, *indices[1:]])
    elif case == "index as a float":
        bad_value, change = float(indices[0]), _set("indices", [float(indices[0]), *indices[1:]])
    elif case == "wrong label":
        wrong = (labels[indices[0]] + 1) % 10
        bad_value = wrong

        def change(ckpt: dict[str, Any]) -> None:
            mem = ckpt["client_states"][0]["replay"]
            mem["labels"] = [wrong, *mem["labels"][1:]]
    elif case == "label out of range":
        bad_value = 10

        def change(ckpt: dict[str, Any]) -> None:
            mem = ckpt["client_states"][0]["replay"]
            mem["labels"] = [10, *mem["labels"][1:]]
    elif case == "more than memory_size":
        bad_value = "a list of 25 items"
        change = _set("indices", (own * 25)[:25])
    elif case == "labels shorter":
        bad_value = f"a list of {len(indices) - 1} items"

        def change(ckpt: dict[str, Any]) -> None:
            mem = ckpt["client_states"][0]["replay"]
            mem["labels"] = mem["labels"][:-1]
    elif case == "negative counter":
        bad_value, change = -5, _set("n_seen", -5)
    else:
        bad_value, change = 1, _set("evil", 1)
    _forge(folder, change)
    before = _tree(folder)
    code, message = _cli(["resume", str(folder)], capsys)
    assert code == 2, message
    assert "Plugin 'replay'" in message and "state of client 0" in message, message
    assert f"{key!r} must be {allowed}" in message, message
    assert f"Got {bad_value!r} instead" in message, message
    assert _tree(folder) == before, "nothing may be trained, written or removed"


def test_client_state_for_a_client_the_run_does_not_have_is_refused(
    replay_run: Path, tmp_path: Path, capsys, restore_threads
) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(replay_run, folder)

    def add(ckpt: dict[str, Any]) -> None:
        ckpt["client_states"][99] = ckpt["client_states"][0]

    _forge(folder, add)
    before = _tree(folder)
    code, message = _cli(["resume", str(folder)], capsys)
    assert code == 2 and "state for client 99, but the run's clients are 0..3" in message, message
    assert _tree(folder) == before


def test_an_untouched_replay_checkpoint_passes_its_declaration_and_resumes(
    replay_run: Path, tmp_path: Path, restore_threads
) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(replay_run, folder)
    assert fedlt.resume(folder)["rounds_run"] == 3


def test_state_rules_on_hand_made_values() -> None:
    import numpy as np

    from fedlt.hooks.state import Float, Int, LabelOf, ListOf, MapOf, Owner, OwnSample, Str, check_state

    owner = Owner(2, np.array([3, 5, 8]), np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1]), 2, {"k": 2})
    assert Int(0, 3).problem(3, owner, {}) is None and Int(0, 3).problem(4, owner, {}) == "an int in [0, 3]"
    assert Int().problem(True, owner, {}) == "an int"
    assert Float(0, 1).problem(float("nan"), owner, {}) == "a finite number in [0, 1]"
    assert Str(("a",)).problem("b", owner, {}) == "one of ['a']"
    assert OwnSample().problem(5, owner, {}) is None
    assert OwnSample().problem(4, owner, {}) == "one of client 2's own 3 training-sample indices"
    rule = ListOf(LabelOf("i"), max_len="k", same_length_as="i")
    assert rule.where([1, 0], owner, {"i": [5, 8]}) is None  # labels of samples 5 and 8
    assert rule.where([1, 1], owner, {"i": [5, 8]}) == ("[1]", 1, "the label of sample 8 (i[1]), 0")
    assert rule.where([1, 0, 1], owner, {"i": [5, 8, 3]})[2] == "a list of at most 2 items (the plugin's k)"
    assert MapOf(Int(0), Int(0)).where({1: -2}, owner, {}) == ("[1]", -2, "an int >= 0")
    with pytest.raises(fedlt.PluginError, match=r"Plugin 'p': .* 'x\[0\]' must be one of client 2's"):
        check_state("p", {"x": ListOf(OwnSample())}, {"x": [7]}, owner, "state of client 2")


def test_a_malformed_state_declaration_is_refused_when_the_plugin_registers() -> None:
    from fedlt.hooks.plugin import Plugin, implementations

    class Bad(Plugin):
        client_state: ClassVar[Any] = {"indices": list}

    with pytest.raises(fedlt.PluginError, match=r"Plugin 'bad': client_state\['indices'\] must be a rule"):
        implementations(Bad, "bad")


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_inspect_plot_into_a_file_is_refused_before_the_data_is_built(
    where: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    import fedlt.prepare

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was built before --plot was checked")

    monkeypatch.setattr(fedlt.prepare, "build_data", never)
    (tmp_path / "figs").write_text("a file")
    target = tmp_path / "figs" if where == "file" else tmp_path / "figs" / "sub"
    code, message = _cli(["inspect", "quickstart", "--plot", str(target)], capsys)
    assert code == 2, message
    if where == "file":
        assert f"The --plot folder {target} is a file, not a folder" in message
    else:
        assert f"The --plot folder {target} cannot be created: {tmp_path / 'figs'} is a file" in message
    assert (tmp_path / "figs").read_text() == "a file"


def test_plugins_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    # `fedlt plugins | head`: the reader leaves early; no BrokenPipeError traceback. `true` reads
    # nothing and is gone before fedlt (a second of imports) writes, so the pipe is always closed.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fedlt_cli = Path(sys.executable).with_name("fedlt")
    proc = subprocess.run(
        f"set -o pipefail; {fedlt_cli} plugins | true",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, documented in docs/research.md


@pytest.mark.parametrize(
    ("overrides", "key", "kind"),
    [
        (["stream.eval_period=5"], "stream.eval_period", "stream.kind = 'none'"),
        (["stream.n_tasks=3"], "stream.n_tasks", "stream.kind = 'none'"),
        (["engine.num_workers=3"], "engine.num_workers", "engine.kind = 'serial'"),
        (["engine.address=auto"], "engine.address", "engine.kind = 'serial'"),
        (["federation.buffer_size=3"], "federation.buffer_size", "federation.mode = 'sync'"),
    ],
)
def test_a_key_the_chosen_kind_does_not_use_is_refused_in_every_section(
    overrides: list[str], key: str, kind: str, tmp_path: Path, capsys
) -> None:
    argv = ["validate", "quickstart"] + [a for o in overrides for a in ("--set", o)]
    code, message = _cli(argv, capsys)
    assert code == 2
    assert f"The '{key}' value must be unset with {kind}" in message, message
    assert "It applies to" in message


def test_an_override_switching_the_kind_drops_the_other_kinds_keys() -> None:
    ray = {**TINY, "engine": {"kind": "ray", "num_workers": 4, "address": "auto"}}
    serial = fedlt.load_scenario(ray, ["engine.kind=serial"])
    assert serial.engine.num_workers == 2 and serial.engine.address is None  # the defaults
    stream = {**TINY, "stream": {"kind": "si-blurry", "n_tasks": 3, "eval_period": 7}}
    offline = fedlt.load_scenario(stream, {"stream.kind": "none"})
    assert offline.stream.n_tasks == 5 and offline.stream.eval_period == "auto"
    with pytest.raises(fedlt.ScenarioError, match=r"'engine\.num_workers'"):  # unless set with it
        fedlt.load_scenario(ray, ["engine.kind=serial", "engine.num_workers=4"])


@pytest.mark.parametrize("nan_round", [1, 2])
def test_the_nan_message_promises_a_checkpoint_only_when_there_is_one(
    nan_round: int, install_plugins, tmp_path: Path, restore_threads
) -> None:
    from fedlt.hooks.plugin import Plugin, hookimpl

    class NanInRound(Plugin):
        @hookimpl
        def client_sample_weights(self, y, ctx):
            return torch.full(y.shape, float("nan") if ctx.round == nan_round else 1.0)

    install_plugins(**{"nan-in-round": NanInRound})
    scenario = {**TINY, "plugins": [{"name": "nan-in-round"}]}
    with pytest.raises(fedlt.NonFiniteLossError) as info:
        fedlt.run(scenario, out=tmp_path / "r")
    message = str(info.value)
    if nan_round == 1:
        assert not (tmp_path / "r" / "checkpoint.pt").exists()
        assert "stopped before its first checkpoint, so no round is kept" in message
        assert "last good checkpoint" not in message
    else:
        assert "the last good checkpoint (round 1) is kept" in message


def test_usage_and_errors_both_say_run_dir(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["resume", "--help"])
    usage = capsys.readouterr().out
    assert "RUN_DIR" in usage.splitlines()[0] and "run_dir" not in usage
    code, message = _cli(["resume", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "'RUN_DIR'" in message


def test_a_warning_from_the_api_names_the_callers_line(tmp_path: Path, restore_threads) -> None:
    _stale_lock(tmp_path / "r")
    with pytest.warns(RuntimeWarning, match="stale lock") as record:
        fedlt.run(TINY, out=tmp_path / "r")
    assert record[0].filename == __file__, record[0].filename  # this test, not a line of fedlt's


def test_a_warning_on_the_command_line_prints_no_source_line(tmp_path: Path) -> None:
    _stale_lock(tmp_path / "r")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fedlt_cli = Path(sys.executable).with_name("fedlt")
    argv = [str(fedlt_cli), "run", "quickstart", "--out", str(tmp_path / "r"), "--quiet"]
    proc = subprocess.run(
        [*argv, "--set", "federation.rounds=1"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("fedlt: warning: Taking over the stale lock"), proc.stderr
    assert ".py:" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_plugin_descriptions_are_whole_sentences() -> None:
    from fedlt.hooks.discovery import discover_plugins

    plugins = discover_plugins()
    replay = plugins["replay"].description
    whole = "Experience replay from a per-client index memory (reservoir, CBRS, GDumb, balanced or "
    assert replay == whole + "evict-largest)."
    ends = (".", ")")
    cut = {n: i.description for n, i in plugins.items() if not i.error and not i.description.endswith(ends)}
    assert not cut, cut


def test_a_long_tail_profile_that_empties_a_class_is_refused(tmp_path: Path, capsys) -> None:
    import math

    expected = [math.floor(4 * 5 ** (-i / 9) * (1 + 1e-9)) for i in range(10)]  # n_max 4, IF 5
    assert expected[-1] == 0
    argv = ["validate", "quickstart", "--set", "long_tail.profile=exponential"]
    argv += ["--set", "long_tail.n_max=4", "--set", "long_tail.imbalance_factor=5"]
    code, message = _cli(argv, capsys)
    assert code == 2
    assert "The 'long_tail.imbalance_factor' value must be at most n_max = 4" in message
    assert f"train_class_counts {expected}" in message and "Got 5.0 instead" in message
    argv[-1] = "long_tail.imbalance_factor=4"  # IF = n_max: the tail keeps one sample
    assert main(argv) == 0


def test_a_folder_holding_only_a_linked_lock_is_refused_by_run_and_the_target_kept(
    tmp_path: Path, capsys
) -> None:
    victim = _victim(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).symlink_to(victim)
    code, message = _cli(["run", "quickstart", "--out", str(folder)], capsys)
    assert code == 2 and f"{folder / LOCK} is a symbolic link (to {victim})" in message, message
    assert victim.read_bytes() == VICTIM and os.listdir(folder) == [LOCK]
