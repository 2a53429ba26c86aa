"""Plugins for the grouping tests of ``fedlt compare``: one that only observes, one that also steers."""

from __future__ import annotations

import json

from fedlt import Plugin, hookimpl


class MirrorLogger(Plugin):
    """A logger: copies each evaluation's accuracy to ``mirror.jsonl`` (observer hooks only)."""

    @hookimpl
    def server_log_metrics(self, record, ctx):
        with open(ctx.run_dir / "mirror.jsonl", "a") as f:
            f.write(json.dumps({"round": ctx.round, "accuracy": record.get("accuracy")}) + "\n")

    @hookimpl
    def server_end(self, summary, ctx):
        (ctx.run_dir / "mirror-end.txt").write_text(str(summary["final"].get("accuracy")))


class LoggingRemedy(Plugin):
    """Logs like MirrorLogger but also scales the training loss: a remedy, whatever else it does."""

    @hookimpl
    def server_log_metrics(self, record, ctx):
        pass

    @hookimpl
    def client_loss(self, logits, y):
        import torch.nn.functional as F

        return 2.0 * F.cross_entropy(logits, y, reduction="none")
