"""Checkpoints that never run code, never half-write, and fail with a message instead of a traceback.

Every case works on real files in ``tmp_path``: checkpoints written by :func:`save_checkpoint` or
forged with ``torch.save``, truncated, emptied or overwritten with garbage. A full disk is
simulated by making the low-level writer raise ``ENOSPC`` part-way, after it really wrote part of
the temporary file, which is what the kernel does when the disk fills mid-write.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import fedlt
import fedlt.store.checkpoint as ckpt_mod
from fedlt.cli import main as cli_main
from fedlt.errors import FedltError
from fedlt.store.checkpoint import (
    CHECKPOINT,
    FORMAT,
    CheckpointError,
    DiskFullError,
    append_metrics,
    check_compatible,
    load_checkpoint,
    read_metrics,
    remove_stale_temps,
    save_checkpoint,
    truncate_metrics,
)

TEMP_NAME = re.compile(r"^checkpoint\.pt\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _payload(round: int = 1) -> dict[str, Any]:
    """A checkpoint shaped like the runner's, with every kind of plain value in plugin state."""
    model = torch.nn.Linear(4, 3)
    return {
        "round": round,
        "elapsed": 1.5 * round,
        "global": model.state_dict(),
        "plugins": {"gla": {"prior": torch.ones(3), "steps": 7, "name": "x", "flags": (True, None)}},
        "client_states": {
            0: {"replay": {"memory": [torch.zeros(2, 4), torch.ones(1)], "seen": b"\x00\x01"}},
            3: {"replay": {"memory": [], "loss": float("nan"), "best": float("inf")}},
        },
        "stream_pos": {0: 12, 3: 4},
    }


def _write_torch(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def _temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_every_plain_value_and_adds_the_format(tmp_path):
    payload = _payload(round=4)
    save_checkpoint(tmp_path, payload)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded["format"] == FORMAT
    assert loaded["round"] == 4 and loaded["elapsed"] == 6.0
    assert loaded["stream_pos"] == {0: 12, 3: 4}
    for key, tensor in payload["global"].items():
        assert torch.equal(loaded["global"][key], tensor)
    assert loaded["plugins"]["gla"]["flags"] == (True, None)
    assert loaded["client_states"][0]["replay"]["seen"] == b"\x00\x01"
    assert math.isnan(loaded["client_states"][3]["replay"]["loss"])  # a float in state is kept exactly
    assert _temps(tmp_path) == []


def test_no_checkpoint_yet_is_none(tmp_path):
    assert load_checkpoint(tmp_path) is None


def test_a_checkpoint_from_before_the_format_key_still_loads(tmp_path):
    legacy = _payload()
    _write_torch(tmp_path / CHECKPOINT, legacy)  # what fedlt wrote before "format" existed
    assert load_checkpoint(tmp_path)["round"] == 1


# --------------------------------------------------------------------------- refusing to save


def test_save_refuses_a_function_in_client_state_naming_where(tmp_path):
    save_checkpoint(tmp_path, _payload(round=1))
    bad = _payload(round=2)
    bad["client_states"][3]["replay"]["memory"] = lambda: 0
    with pytest.raises(TypeError, match=re.escape("client_states[3]['replay']['memory'] is a function")):
        save_checkpoint(tmp_path, bad)
    assert load_checkpoint(tmp_path)["round"] == 1  # the previous checkpoint is untouched
    assert _temps(tmp_path) == []


def test_save_refuses_foreign_objects_in_plugin_state(tmp_path):
    import numpy as np

    bad = _payload()
    bad["plugins"]["gla"]["prior"] = np.ones(3)
    with pytest.raises(TypeError, match=re.escape("plugins['gla']['prior'] is a numpy.ndarray")):
        save_checkpoint(tmp_path, bad)
    assert not (tmp_path / CHECKPOINT).exists()


# --------------------------------------------------------------------------- broken files


def _good_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **_payload()}, buffer)
    return buffer.getvalue()


def _forge(kind: str, path: Path) -> None:
    """Write a broken checkpoint of the given kind at ``path``."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = _good_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-head":
        path.write_bytes(_good_bytes()[:40])
    elif kind == "garbage":
        path.write_bytes(random.Random(7).randbytes(5000))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "bare-tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "state-dict-only":
        torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    elif kind == "bad-round":
        torch.save({**_payload(), "round": "three"}, path)
    elif kind == "bad-client-keys":
        torch.save({**_payload(), "client_states": {"zero": {}}}, path)
    elif kind == "newer-format":
        torch.save({**_payload(), "format": FORMAT + 1}, path)
    elif kind == "forged":
        torch.save({**_payload(), "plugins": {"x": _Harmless()}}, path)
    else:  # pragma: no cover
        raise AssertionError(kind)


class _Harmless:
    """Any class instance: ``weights_only`` must refuse it, as it would any non-plain object."""

    def __init__(self) -> None:
        self.value = 1


BROKEN = {
    "empty": "is empty (0 bytes)",
    "truncated": "is truncated or damaged",
    "truncated-head": "is truncated or damaged",
    "garbage": "is not a PyTorch checkpoint",
    "text": "is not a PyTorch checkpoint",
    "bare-tensor": "holds a torch.Tensor, not a fedlt checkpoint",
    "state-dict-only": "is not a fedlt checkpoint: it lacks the keys",
    "bad-round": "'round' is 'three'",
    "bad-client-keys": "'client_states' is not a dict from client id",
    "newer-format": f"was written by a newer fedlt (checkpoint format {FORMAT + 1}",
    "forged": "refused to load: it contains objects other than tensors and plain data "
    "(forged or from an incompatible version)",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_checkpoint_raises_checkpoint_error_naming_file_and_problem(tmp_path, kind):
    _forge(kind, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert str(tmp_path / CHECKPOINT) in message
    assert BROKEN[kind] in message
    assert "\n" not in message and "Traceback" not in message
    assert isinstance(info.value, FedltError) and info.value.exit_status == 2
    # No torch/pickle exception chained on: its traceback would be printed after ours.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_a_forged_checkpoint_does_not_run_its_code(tmp_path):
    victim = tmp_path / "created-by-unpickling"

    class Payload:
        def __reduce__(self):
            return (open, (str(victim), "w"))

    forged = tmp_path / "run" / CHECKPOINT
    _write_torch(forged, {**_payload(), "plugins": {"evil": Payload()}})
    # Control: the forgery is real; loading a copy the old way (weights_only=False) creates the file.
    control = tmp_path / "control" / CHECKPOINT
    control.parent.mkdir()
    control.write_bytes(forged.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(control, weights_only=False)["plugins"]["evil"].close()
    assert victim.exists()
    victim.unlink()

    with pytest.raises(CheckpointError, match="refused to load") as info:
        load_checkpoint(forged.parent)
    assert not victim.exists()
    assert str(forged) in str(info.value)


def test_a_folder_named_checkpoint_is_an_error_not_a_missing_checkpoint(tmp_path):
    (tmp_path / CHECKPOINT).mkdir()
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_checkpoint(tmp_path)


def test_fedlt_resume_on_a_broken_checkpoint_exits_2_with_one_message(tiny, tmp_path, capsys):
    tiny["federation"].update(rounds=1)
    fedlt.run(tiny, out=tmp_path / "r")
    (tmp_path / "r" / "summary.json").unlink()  # as if killed before it finished
    path = tmp_path / "r" / CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])
    assert cli_main(["resume", str(tmp_path / "r")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps lines at 100 columns
    assert err.startswith(f"error: Cannot resume from {path}: the file is truncated")
    assert "truncated" in err and "Traceback" not in err


# --------------------------------------------------------------------------- another model


def test_check_compatible_accepts_the_same_model():
    state = torch.nn.Linear(4, 3).state_dict()
    check_compatible({"global": torch.nn.Linear(4, 3).state_dict()}, state)


def test_check_compatible_names_the_first_mismatching_shape(tmp_path):
    saved = {"global": torch.nn.Linear(5, 3).state_dict()}
    with pytest.raises(CheckpointError) as info:
        check_compatible(saved, torch.nn.Linear(4, 3).state_dict(), tmp_path / CHECKPOINT)
    message = str(info.value)
    assert "'weight' has shape (3, 5) there but (3, 4) in this run's model" in message
    assert str(tmp_path / CHECKPOINT) in message and info.value.exit_status == 2


def test_check_compatible_names_missing_and_extra_keys():
    two_layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)).state_dict()
    one_layer = torch.nn.Sequential(torch.nn.Linear(4, 4)).state_dict()
    with pytest.raises(CheckpointError, match=r"lacks weights for '1\.weight'"):
        check_compatible({"global": one_layer}, two_layers)
    with pytest.raises(CheckpointError, match=r"has weights '1\.weight' this run's model lacks"):
        check_compatible({"global": two_layers}, one_layer)


def test_a_real_checkpoint_of_another_model_is_refused(tiny, tmp_path):
    """A checkpoint written by one run checked against a wider model, as the runner does on resume."""
    tiny["federation"].update(rounds=1)
    fedlt.run(tiny, out=tmp_path / "r")
    ckpt = load_checkpoint(tmp_path / "r")
    wider = {
        k: torch.zeros(64, *v.shape[1:]) if k.endswith("0.weight") else v for k, v in ckpt["global"].items()
    }
    key = next(k for k in wider if k.endswith("0.weight"))
    check_compatible(ckpt, ckpt["global"])
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        check_compatible(ckpt, wider)


# --------------------------------------------------------------------------- full disk


def _fail_midway(monkeypatch: pytest.MonkeyPatch, err: int, calls: list[int] | None = None) -> None:
    """Make the low-level writer write half of its data for real, then fail as a full disk does."""
    real = ckpt_mod._write_all

    def half_then_full(fd: int, data: bytes | memoryview) -> None:
        real(fd, memoryview(data)[: len(data) // 2])
        if calls is not None:
            calls.append(len(data) // 2)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(ckpt_mod, "_write_all", half_then_full)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_mid_write_keeps_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch, err):
    save_checkpoint(tmp_path, _payload(round=1))
    written: list[int] = []
    _fail_midway(monkeypatch, err, written)
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(tmp_path, _payload(round=2))
    assert written and written[0] > 0, "the writer was reached and wrote part of a temporary file"
    message = str(info.value)
    assert str(tmp_path) in message and "needs" in message and "fedlt resume" in message
    assert info.value.needed > 0 and info.value.exit_status == 1
    assert _temps(tmp_path) == []
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["round"] == 1


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _payload(round=1))
    size = (tmp_path / CHECKPOINT).stat().st_size
    real_usage = ckpt_mod.shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real_usage(path)
        return type(usage)(usage.total, usage.total - 100, 100)

    def must_not_write(fd: int, data: Any) -> None:
        raise AssertionError("wrote despite knowing the disk is too full")

    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", nearly_full)
    monkeypatch.setattr(ckpt_mod, "_write_all", must_not_write)
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(tmp_path, _payload(round=2))
    assert info.value.free == 100 and info.value.needed >= size * 0.9
    assert "100 B is free" in str(info.value)
    assert _temps(tmp_path) == []
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["round"] == 1


def test_other_write_errors_propagate_and_clean_up(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _payload(round=1))
    _fail_midway(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path, _payload(round=2))
    assert not isinstance(info.value, DiskFullError) and info.value.errno == errno.EIO
    assert _temps(tmp_path) == []


def test_temporary_files_are_unique_per_writer(tmp_path, monkeypatch):
    seen: list[str] = []
    real = ckpt_mod._write_all

    def spy(fd: int, data: Any) -> None:
        seen.extend(_temps(tmp_path))
        real(fd, data)

    monkeypatch.setattr(ckpt_mod, "_write_all", spy)
    save_checkpoint(tmp_path, _payload(round=1))
    save_checkpoint(tmp_path, _payload(round=2))
    assert len(seen) == 2 and seen[0] != seen[1]
    for name in seen:
        match = TEMP_NAME.match(name)
        assert match and int(match.group(1)) == os.getpid(), name


def test_two_concurrent_writers_never_tear_a_checkpoint(tmp_path):
    """With one shared temp name, one writer's rename steals the other's half-written file."""
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(25):
                save_checkpoint(tmp_path, _payload(round=offset + i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * 100,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert load_checkpoint(tmp_path)["round"] in (124, 224)
    assert _temps(tmp_path) == []


def test_remove_stale_temps_removes_only_debris(tmp_path):
    save_checkpoint(tmp_path, _payload())
    for name in ("checkpoint.pt.999.abc.tmp", "checkpoint.pt.tmp", "metrics.jsonl.999.x.tmp", "notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert removed == ["checkpoint.pt.999.abc.tmp", "checkpoint.pt.tmp", "metrics.jsonl.999.x.tmp"]
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT, "notes.tmp"]


# --------------------------------------------------------------------------- metrics


def _strict(text: str) -> list[dict[str, Any]]:
    """Parse JSON lines as a strict reader does: NaN/Infinity are errors."""

    def reject(name: str) -> None:
        raise ValueError(f"non-JSON constant {name}")

    return [json.loads(line, parse_constant=reject) for line in text.splitlines()]


def test_append_metrics_writes_strict_json_with_null_for_nan_and_inf(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"round": 1, "train_loss": float("nan"), "auroc_macro": 0.5})
    append_metrics(
        path,
        {
            "round": 2,
            "train_loss": float("inf"),
            "per_class_accuracy": [0.5, float("-inf"), float("nan")],
            "shot_rule": {"thresholds": (60.0, float("nan"))},
        },
    )
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    lines = _strict(text)
    assert lines[0] == {"round": 1, "train_loss": None, "auroc_macro": 0.5}
    assert lines[1]["per_class_accuracy"] == [0.5, None, None]
    assert lines[1]["shot_rule"] == {"thresholds": [60.0, None]}
    assert read_metrics(path) == lines


def test_truncate_metrics_keeps_earlier_rounds_and_repairs_old_nan_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # What an older fedlt wrote: bare NaN, plus a torn last line from a kill.
    path.write_text('{"round": 1, "loss": NaN}\n{"round": 2, "loss": 0.5}\n{"round": 3, "loss": 0.4}\n{"rou')
    kept = truncate_metrics(path, 2)
    assert kept == [{"round": 1, "loss": None}, {"round": 2, "loss": 0.5}]
    assert _strict(path.read_text()) == kept
    assert _temps(tmp_path) == []


def test_truncate_metrics_on_a_full_disk_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    for r in (1, 2, 3):
        append_metrics(path, {"round": r})
    before = path.read_bytes()
    _fail_midway(monkeypatch, errno.ENOSPC)
    with pytest.raises(DiskFullError, match=r"metrics\.jsonl"):
        truncate_metrics(path, 1)
    assert path.read_bytes() == before and _temps(tmp_path) == []


def test_append_metrics_on_a_full_disk_leaves_only_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"round": 1, "accuracy": 0.25})
    before = path.read_bytes()
    _fail_midway(monkeypatch, errno.ENOSPC)
    with pytest.raises(DiskFullError) as info:
        append_metrics(path, {"round": 2, "accuracy": 0.5, "note": "x" * 500})
    assert path.read_bytes() == before  # the half-written line was cut off again
    assert str(tmp_path) in str(info.value)
    monkeypatch.undo()
    append_metrics(path, {"round": 2, "accuracy": 0.5})
    assert [r["round"] for r in _strict(path.read_text())] == [1, 2]


def test_the_background_writer_runs_jobs_in_order_and_hands_a_failure_to_the_caller() -> None:
    done: list[int] = []
    writer = ckpt_mod.BackgroundWriter()
    for i in range(5):
        writer.submit(lambda i=i: done.append(i))
    writer.wait()
    assert done == [0, 1, 2, 3, 4]

    def fail() -> None:
        raise ckpt_mod.DiskFullError(Path("/x"), 10, 0, "the checkpoint")

    writer.submit(fail)
    with pytest.raises(ckpt_mod.DiskFullError):
        writer.submit(lambda: done.append(5))  # the next write waits for the failed one and raises
    assert done == [0, 1, 2, 3, 4]
    writer.submit(fail)
    writer.wait(raise_error=False)  # a caller unwinding from another error keeps that one
    writer.wait()  # nothing left to raise
    writer.submit(lambda: done.append(6))
    writer.close()  # finishes the pending job and stops the thread
    assert done == [0, 1, 2, 3, 4, 6]
    assert not any(t.name == "fedlt-checkpoint-writer" for t in threading.enumerate())


def test_a_run_that_cannot_write_its_checkpoint_fails_with_the_previous_one_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's disk work runs on a background thread; its failure still stops the run."""
    from support.scenarios import TINY

    real = ckpt_mod._atomic_write
    calls = {"n": 0}

    def full_after_two(path: Path, data: Any, what: str) -> None:
        if path.name == CHECKPOINT:
            calls["n"] += 1
            if calls["n"] > 2:
                raise ckpt_mod.DiskFullError(path.parent, len(data), 0, what)
        real(path, data, what)

    monkeypatch.setattr(ckpt_mod, "_atomic_write", full_after_two)
    s = {**TINY, "federation": {**TINY["federation"], "rounds": 5}}
    with pytest.raises(ckpt_mod.DiskFullError):
        fedlt.run(s, out=tmp_path / "r")
    assert torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)["round"] == 2
