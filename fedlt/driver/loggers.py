"""Loggers of a run's metrics: a CSV file (always), TensorBoard and Weights & Biases (when asked).

They are plugins implementing ``server_log_metrics`` / ``server_end``, the hooks any user logger
implements too; fedlt adds them from the scenario's ``[log]`` table, next to the scenario's own
plugins. Each record is what metrics.jsonl holds; loggers take its scalar entries (numbers, with
``None`` for undefined) and flatten nested tables with dots.
"""

from __future__ import annotations

import csv
import io
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlt.hooks.context import LogContext, SetupContext
from fedlt.hooks.plugin import Plugin, hookimpl
from fedlt.store.checkpoint import read_metrics, write_file
from fedlt.store.safefile import refuse_link

__all__ = ["CSVLog", "TensorBoardLog", "WandbLog", "loggers_for", "scalars", "wandb_run_id"]

METRICS_CSV = "metrics.csv"


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | str | None]:
    """The scalar entries of a record, nested tables flattened as ``a.b``; lists are left out
    (per-class and per-client lists stay in metrics.jsonl)."""
    out: dict[str, float | int | str | None] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}."))
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


class CSVLog(Plugin):
    """Every evaluation's scalar metrics as a row of ``metrics.csv`` in the run folder.

    The header is the union of the keys seen so far (evaluations differ: anytime-only records
    lack the offline metrics), so the file is rewritten, atomically, when a record arrives; a
    resumed run starts from metrics.jsonl, which the runner has cut back to the checkpoint.
    """

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.rows: list[dict[str, Any]] | None = None

    @hookimpl
    def server_log_metrics(self, record: Mapping[str, Any], ctx: LogContext) -> None:
        if self.rows is None:  # the first record of this process: earlier ones are in metrics.jsonl
            earlier = [
                r for r in read_metrics(ctx.run_dir / "metrics.jsonl") if r.get("round", 0) < ctx.round
            ]
            self.rows = [scalars(r) for r in earlier]
        self.rows.append(scalars(record))
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in self.rows)
        # Atomic, 0644 like the checkpoint, and never through a link.
        write_file(ctx.run_dir / METRICS_CSV, buffer.getvalue())


class TensorBoardLog(Plugin):
    """Scalar metrics as TensorBoard event files in ``<run>/tensorboard`` (``tensorboard --logdir``)."""

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.writer: Any = None
        self.run_dir: Path | None = None

    @hookimpl
    def server_setup(self, ctx: SetupContext) -> None:
        self.run_dir = ctx.run_dir

    def _writer(self, first_round: int) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            assert self.run_dir is not None
            # purge_step drops events a killed run wrote after its last checkpoint.
            log_dir = refuse_link(self.run_dir / "tensorboard")
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_round)
        return self.writer

    @hookimpl
    def server_log_metrics(self, record: Mapping[str, Any], ctx: LogContext) -> None:
        writer = self._writer(int(record["round"]))
        for key, value in scalars(record).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "round":
                writer.add_scalar(key, value, global_step=int(record["round"]))
        writer.flush()

    @hookimpl
    def server_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLog(Plugin):
    """Scalar metrics to Weights & Biases; ``mode = "offline"`` writes a local run under
    ``<run>/wandb`` that ``wandb sync`` uploads later, with no network needed."""

    def __init__(
        self, project: str = "fedlt", mode: str = "offline", config: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(None)
        self.project, self.mode, self.config = project, mode, dict(config or {})
        self.run: Any = None

    @hookimpl
    def server_setup(self, ctx: SetupContext) -> None:
        import wandb

        assert ctx.run_dir is not None
        refuse_link(ctx.run_dir / "wandb")
        self.run = wandb.init(
            project=self.project,
            name=ctx.run_dir.name,
            id=wandb_run_id(ctx.run_dir),
            dir=str(ctx.run_dir),
            mode=self.mode,
            config=self.config,
            resume="allow",
        )

    @hookimpl
    def server_log_metrics(self, record: Mapping[str, Any]) -> None:
        values = {
            k: v for k, v in scalars(record).items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self.run.log(values, step=int(record["round"]))

    @hookimpl
    def server_end(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: drawn once, at random, and kept in ``<run>/wandb-id``, so a
    resumed run continues its own W&B run and two runs never share one (an id made from the path
    would be shared by two folders whose paths end alike, or by a folder reused after deletion)."""
    path = Path(run_dir) / "wandb-id"
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if kept and kept.replace("-", "").isalnum():
        return kept
    run_id = f"fedlt-{uuid.uuid4().hex[:16]}"
    write_file(path, run_id + "\n")
    return run_id


def loggers_for(log: Any, scenario_config: Mapping[str, Any]) -> list[Plugin]:
    """The loggers a scenario's ``[log]`` table asks for, CSV first."""
    found: list[Plugin] = [CSVLog()]
    if getattr(log, "tensorboard", False):
        found.append(TensorBoardLog())
    if getattr(log, "wandb", False):
        found.append(WandbLog(log.wandb_project, log.wandb_mode, scenario_config))
    names = ["csv-log"] + [n for n in ("tensorboard", "wandb") if getattr(log, n, False)]
    for plugin, name in zip(found, names, strict=True):
        plugin.name = name  # type: ignore[misc]
    return found
