"""Bad scenario input through the real command line: exit 2, one message naming the key, no traceback.

Every case runs ``fedlt validate`` and ``fedlt run`` in-process on the embedded quickstart (or on a
file built under tmp_path) with one piece of bad input: a scenario key, a model, data, partition,
long-tail, stream or evaluation parameter, a ``--set`` into a single value, a file that is not
UTF-8, sizes that cannot fit in memory, shot thresholds against their rule, more tasks than
samples, image folders that are files, missing, single-class or truncated, a cache folder that is
a file. ``run`` must stop before anything is trained: no checkpoint, metrics or summary appear.

The runner-side cases (:data:`RUNNER_CASES`) give ``fedlt run`` a bad ``--out`` folder and
``fedlt resume`` a bad run folder: missing, a file, held by a live run, or holding a broken,
foreign or forged checkpoint, or a ``--set`` that resume cannot honour. Each exits 2 naming the
folder, file or key, and leaves every file as it was (a forged checkpoint runs none of its code).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import socket
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from support.runs import interrupt_run
from support.scenarios import TINY

import fedlt
from fedlt.cli import main


def S(*overrides: str) -> list[str]:
    """``--set`` arguments, one per override."""
    return [arg for o in overrides for arg in ("--set", o)]


Q = "quickstart"
IMAGES = S("data.dataset=imagefolder", "data.cache_dir={tmp}/cache")
SYNTH = S("data.dataset=synthetic")
STREAM = S("stream.kind=si-blurry")

# (scenario, extra arguments, the key the message must name). "{tmp}" is the test's tmp_path;
# scenario "@name" is the file name.toml that _files builds there.
CASES = [
    (Q, S("data.colour=1"), "data.colour"),
    (Q, S("trian.lr=0.1"), "trian"),
    (Q, S("seed.x=1"), "seed.x"),
    (Q, S("name.x=1"), "name.x"),
    (Q, S("federation.rounds"), "--set"),
    (Q, S("plugins.5.name=focal"), "plugins.5.name"),
    (Q, S("seed=-1"), "seed"),
    (Q, S("federation.rounds=ten"), "federation.rounds"),
    (Q, S("train.lr=inf"), "train.lr"),
    (Q, S("engine.device=tpu"), "engine.device"),
    (Q, S("model.name=vgg"), "model.name"),
    (Q, S("model.name=resnet18", "model.hidden=[64]"), "model.hidden"),
    (Q, S("model.hidden=[64, 0]"), "model.hidden"),
    (Q, S("model.name=cnn"), "model.name"),  # digits are flat, not images
    (Q, S("model.name=cnn", "model.widths=[]"), "model.widths"),
    (Q, S("model.name=resnet8", "model.width=0"), "model.width"),
    (Q, S("model.name=resnet8", "model.width=true"), "model.width"),
    (Q, S("model.name=vit", "model.dim=30", "model.heads=4"), "model.heads"),
    (Q, S("model.name=vit", "model.patch_size=3"), "model.patch_size"),  # digits are 8 x 8
    (Q, S("model.name=vit", "model.pretrained={tmp}/no.pt"), "model.pretrained"),
    (Q, S("data.dataset=imagenet"), "data.dataset"),
    (Q, S("data.dataset=cifar10"), "data.root"),
    (Q, S("data.dataset=cifar10", "data.root={tmp}/absent"), "data.root"),
    (Q, S("data.test_fraction=1.5"), "data.test_fraction"),
    (Q, S("data.n_train=100"), "data.n_train"),  # digits have a fixed size
    (Q, SYNTH + S("data.shape=[3, 0]"), "data.shape"),
    (Q, SYNTH + S("data.num_classes=1"), "data.num_classes"),
    (Q, SYNTH + S("data.separation=-1"), "data.separation"),
    (Q, SYNTH + S("data.n_train=10000000000000"), "data.n_train"),  # 1.5 PiB
    (Q, SYNTH + S("data.shape=[3, 100000, 100000]"), "data.n_train"),
    (Q, S("data.augment=mixup"), "data.augment"),
    (Q, S("partition.alpha=0"), "partition.alpha"),
    (Q, S("partition.kind=iid", "partition.alpha=0.1"), "partition.alpha"),
    (Q, S("partition.kind=ring"), "partition.kind"),
    (Q, S("partition.n_clients=0"), "partition.n_clients"),
    (Q, S("partition.n_clients=100000"), "partition.n_clients"),
    (Q, S("partition.min_client_size=1000"), "partition.min_client_size"),
    (Q, S("partition.kind=shards", "partition.shards_per_client=1000"), "partition.shards_per_client"),
    (Q, S("long_tail.imbalance_factor=0.5"), "long_tail.imbalance_factor"),
    (Q, S("long_tail.profile=linear"), "long_tail.profile"),
    (Q, S("long_tail.profile=step", "long_tail.fraction_minority=1"), "long_tail.fraction_minority"),
    (Q, S("long_tail.n_max=0"), "long_tail.n_max"),
    (Q, S("stream.kind=x"), "stream.kind"),
    (Q, STREAM + S("stream.schedule=global"), "stream.schedule"),
    (Q, STREAM + S("stream.n_tasks=100000"), "stream.n_tasks"),  # more tasks than samples
    (Q, STREAM + S("stream.disjoint_percent=150"), "stream.disjoint_percent"),
    (Q, STREAM + S("stream.n_tasks=0"), "stream.n_tasks"),
    (Q, S("eval.shot_thresholds=[20, 100]"), "eval.shot_thresholds"),  # many < few
    (Q, S("eval.shot_rule=cumulative"), "eval.shot_thresholds"),  # quickstart's [60, 20] are not fractions
    (Q, S("eval.shot_thresholds=[20]"), "eval.shot_thresholds"),
    (Q, S("eval.shot_rule=thirds"), "eval.shot_rule"),
    ("@latin1", [], "scenario"),
    ("@broken-toml", [], "scenario"),
    ("@missing", [], "scenario"),
    (Q, IMAGES + S("data.root={tmp}/file.txt"), "data.root"),
    (Q, IMAGES + S("data.root={tmp}/nowhere"), "data.root"),
    (Q, IMAGES + S("data.root={tmp}/one-class"), "data.root"),
    (Q, IMAGES + S("data.root={tmp}/cut.tar.gz"), "data.root"),
    (Q, IMAGES + S("data.root={tmp}/set.tar", "data.max_image_bytes=10"), "data.max_image_bytes"),
    (Q, IMAGES + S("data.root={tmp}/set", "data.image_size=0"), "data.image_size"),
    (
        Q,
        S("data.dataset=imagefolder", "data.root={tmp}/set", "data.cache_dir={tmp}/file.txt"),
        "data.cache_dir",
    ),
    (Q, S("engine.threads=0"), "engine.threads"),
    # the serial engine's vectorized mode means nothing to Ray and Flower workers
    (Q, S("engine.kind=ray", "engine.vectorize=on"), "engine.vectorize"),
    (Q, S("engine.kind=flower", "engine.vectorize=off"), "engine.vectorize"),
    (Q, S("engine.kind=ray", "engine.group_size=4"), "engine.group_size"),
    # a key the chosen kind does not use would be ignored: refused, one rule for every section
    (Q, S("stream.eval_period=5"), "stream.eval_period"),
    (Q, S("engine.num_workers=3"), "engine.num_workers"),
    # a long-tail profile that leaves a class without a training sample
    (
        Q,
        S("long_tail.profile=exponential", "long_tail.n_max=4", "long_tail.imbalance_factor=5"),
        "long_tail.imbalance_factor",
    ),
    (Q, IMAGES + S("data.root={tmp}/set.tar", "data.max_members=3"), "data.max_members"),
]

# Runner-side bad input: (arguments, what the message must contain). "{tmp}" is the test's
# tmp_path, "{pid}" this process's id; the folders are made by _runner_files: "stopped" is a real
# run stopped after round 1 (so a resume would train), the others are copies of it with one
# thing broken.
RUNNER_CASES = [
    (["run", Q, "--out", "{tmp}/file.txt"], "The --out folder {tmp}/file.txt is a file"),
    (["run", Q, "--out", "{tmp}/file.txt/run"], "{tmp}/file.txt is a file, not a folder"),
    (
        ["run", Q, "--out", "{tmp}/used"],
        "The --out folder {tmp}/used already holds a fedlt run (metrics.jsonl)",
    ),
    (["run", Q, "--out", "{tmp}/stopped"], "fedlt resume {tmp}/stopped"),
    (["run", Q, "--out", "{tmp}/held"], "The run folder {tmp}/held is in use: held by pid {pid}"),
    (["resume", "{tmp}/held-run"], "The run folder {tmp}/held-run is in use: held by pid {pid}"),
    (["resume", "{tmp}/empty"], "'RUN_DIR' value must be a run folder holding scenario.toml"),
    (["resume", "{tmp}/lock-only"], "There is nothing to resume in {tmp}/lock-only"),
    (["resume", "{tmp}/nowhere"], "Got '{tmp}/nowhere'"),
    (["resume", "{tmp}/file.txt"], "Got '{tmp}/file.txt'"),
    (["resume", "{tmp}/ckpt-truncated"], "{tmp}/ckpt-truncated/checkpoint.pt: the file is truncated"),
    (["resume", "{tmp}/ckpt-garbage"], "{tmp}/ckpt-garbage/checkpoint.pt: the file is not a PyTorch"),
    (["resume", "{tmp}/ckpt-empty"], "{tmp}/ckpt-empty/checkpoint.pt: the file is empty"),
    (["resume", "{tmp}/ckpt-tensor"], "{tmp}/ckpt-tensor/checkpoint.pt: it holds a torch.Tensor"),
    (["resume", "{tmp}/ckpt-foreign"], "{tmp}/ckpt-foreign/checkpoint.pt: it was written for another model"),
    (["resume", "{tmp}/ckpt-forged"], "{tmp}/ckpt-forged/checkpoint.pt: refused to load"),
    (["resume", "{tmp}/ckpt-forged-zip"], "{tmp}/ckpt-forged-zip/checkpoint.pt: refused to load"),
    (["resume", "{tmp}/ckpt-folder"], "{tmp}/ckpt-folder/checkpoint.pt: it is not a regular file"),
    (["resume", "{tmp}/ckpt-keys"], "{tmp}/ckpt-keys/checkpoint.pt: it is not a fedlt checkpoint"),
    (["resume", "{tmp}/stopped", *S("seed=5")], "'seed'"),
    (["resume", "{tmp}/stopped", *S("model.hidden=[8]")], "'model.hidden'"),
    (["resume", "{tmp}/stopped", *S("trian.lr=1")], "'trian'"),
    (["resume", "{tmp}/stopped", *S("train.lr=-1")], "'train.lr'"),
    (["resume", "{tmp}/stopped", *S("train.lr.x=1")], "'train.lr.x'"),
    (["run", Q, *S("name=../evil")], "'name'"),
    (["run", Q, *S("name=a/b")], "'name'"),
    (["run", Q, *S("train.lr.x=1")], "'train.lr' holds a single value"),
    (["run", Q, *S("plugins.0.name=nope")], "'plugins[0].name'"),
    (["run", Q, *S("plugins.0.name=focal", "plugins.0.gamma=-1")], "'plugins[0].gamma'"),
    (["run", Q, *S("plugins.0.name=focal", "plugins.0.x=1")], "'plugins[0].x'"),
    (["run", Q, *S("plugins.0.name=focal", "plugins.1.name=focal")], "'plugins[1].name'"),
    (["run", Q, *S("engine.kind=ray", "engine.num_workers=0")], "'engine.num_workers'"),
    (["run", Q, *S("checkpoint.every=0")], "'checkpoint.every'"),
    (["run", Q, *S("log.wandb_mode=cloud")], "'log.wandb_mode'"),
]


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _files(tmp: Path) -> None:
    """Every file a case names: scenarios, image folders, archives."""
    (tmp / "latin1.toml").write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    (tmp / "broken-toml.toml").write_text("name = [\n")
    (tmp / "file.txt").write_text("not a folder")
    for cls in ("a", "b"):
        for i in range(6):
            (tmp / "set" / cls).mkdir(parents=True, exist_ok=True)
            (tmp / "set" / cls / f"{i}.png").write_bytes(_png(40 * i + (cls == "b")))
    (tmp / "one-class" / "a").mkdir(parents=True)
    for i in range(4):
        (tmp / "one-class" / "a" / f"{i}.png").write_bytes(_png(i))
    with tarfile.open(tmp / "set.tar", "w") as tar:
        tar.add(tmp / "set", arcname="set")
    with tarfile.open(tmp / "full.tar.gz", "w:gz") as tar:
        tar.add(tmp / "set", arcname="set")
    whole = (tmp / "full.tar.gz").read_bytes()
    (tmp / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])


def _argv(command: str, scenario: str, extra: list[str], tmp: Path) -> list[str]:
    source = str(tmp / f"{scenario[1:]}.toml") if scenario.startswith("@") else scenario
    args = [command, source, *(a.replace("{tmp}", str(tmp)) for a in extra)]
    if command == "run":
        args += ["--out", str(tmp / "run"), "--quiet"]
    return args


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(("scenario", "extra", "key"), CASES)
def test_bad_input_exits_2_naming_the_key(
    command: str, scenario: str, extra: list[str], key: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _files(tmp_path)
    code = main(_argv(command, scenario, extra, tmp_path))
    out, err = capsys.readouterr()
    message = " ".join(err.split())
    assert code == 2, message
    assert "Traceback" not in out + err
    assert err.startswith("error: ")
    assert re.search(rf"'{re.escape(key)}(\[\d+\])?'", message), message  # hidden[1] names hidden
    trained = [p.name for p in (tmp_path / "run").glob("*") if p.name in ("checkpoint.pt", "metrics.jsonl")]
    assert not trained and not (tmp_path / "run" / "summary.json").exists()


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


# --------------------------------------------------------------------------- runner side


class _Forged:
    """Unpickling it would create the file it names: what a forged checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after round 1 (``stopped``) and a finished run of another model (``other``)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    scenario = {**TINY, "federation": {**TINY["federation"], "rounds": 2}}
    try:
        interrupt_run(scenario, root / "stopped", after=1)
        fedlt.run({**scenario, "model": {"name": "mlp", "hidden": [16]}}, out=root / "other")
    finally:
        torch.set_num_threads(threads)
    return root


def _runner_files(tmp: Path, runs: Path) -> None:
    (tmp / "file.txt").write_text("not a folder")
    (tmp / "empty").mkdir()
    (tmp / "used").mkdir()
    (tmp / "used" / "metrics.jsonl").write_text('{"round": 1}\n')
    lock = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "x"})
    (tmp / "held").mkdir()
    (tmp / "held" / "fedlt.lock").write_text(lock)
    (tmp / "lock-only").mkdir()  # a run killed while its data was built, long ago
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "then", "command": "x"}
    (tmp / "lock-only" / "fedlt.lock").write_text(json.dumps(dead))
    shutil.copytree(runs / "stopped", tmp / "stopped")
    shutil.copytree(runs / "stopped", tmp / "held-run")
    (tmp / "held-run" / "fedlt.lock").write_text(lock)
    good = (runs / "stopped" / "checkpoint.pt").read_bytes()

    def broken(name: str, data: bytes | None = None) -> Path:
        shutil.copytree(runs / "stopped", tmp / name)
        if data is not None:
            (tmp / name / "checkpoint.pt").write_bytes(data)
        return tmp / name / "checkpoint.pt"

    broken("ckpt-truncated", good[: len(good) // 2])
    broken("ckpt-garbage", bytes(range(7, 256)) * 20)
    broken("ckpt-empty", b"")
    torch.save(torch.zeros(3), broken("ckpt-tensor"))
    shutil.copy(runs / "other" / "checkpoint.pt", broken("ckpt-foreign"))
    broken("ckpt-forged", pickle.dumps({"format": 1, "round": _Forged(tmp / "pwned")}, protocol=2))
    torch.save({"format": 1, "round": _Forged(tmp / "pwned")}, broken("ckpt-forged-zip"))
    path = broken("ckpt-folder")
    path.unlink()
    path.mkdir()
    torch.save({"format": 1, "weights": torch.zeros(2)}, broken("ckpt-keys"))


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder below ``folder``, with the files' bytes."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize(("argv", "fragment"), RUNNER_CASES)
def test_runner_bad_input_exits_2_naming_the_folder_or_key(
    argv: list[str], fragment: str, run_folders: Path, tmp_path: Path, capsys, restore_threads
) -> None:
    _runner_files(tmp_path, run_folders)
    before = _tree(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if args[0] == "run" and "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    code = main([*args, "--quiet"])
    out, err = capsys.readouterr()
    message = " ".join(err.split())
    assert code == 2, message
    assert "Traceback" not in out + err
    assert err.startswith("error: ")
    assert fragment.replace("{tmp}", str(tmp_path)).replace("{pid}", str(os.getpid())) in message, message
    assert _tree(tmp_path) == before, "nothing may be trained, written or removed"
    assert not (tmp_path / "pwned").exists(), "a forged checkpoint ran code"


def test_there_are_at_least_eighty_cases_in_all() -> None:
    assert len(CASES) + len(RUNNER_CASES) >= 80
