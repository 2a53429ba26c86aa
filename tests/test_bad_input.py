"""Bad scenario input through the real command line: exit 2, one message naming the key, no traceback.

Every case runs ``fedlt validate`` and ``fedlt run`` in-process on the embedded quickstart (or on a
file built under tmp_path) with one piece of bad input: a scenario key, a model, data, partition,
long-tail, stream or evaluation parameter, a ``--set`` into a single value, a file that is not
UTF-8, sizes that cannot fit in memory, shot thresholds against their rule, more tasks than
samples, image folders that are files, missing, single-class or truncated, a cache folder that is
a file. ``run`` must stop before anything is trained: no checkpoint, metrics or summary appear.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
