"""fedlt's Flower ServerApp: its main runs fedlt's one round loop (``Run``) on the Grid it gets.

``flwr run`` on a project written by ``fedlt export-flower`` starts this ServerApp; the Flower
engine then trains each round's clients through the ServerApp's Grid. There is no second round
loop: selection, aggregation, evaluation and checkpoints are fedlt's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.serverapp import Grid, ServerApp

__all__ = ["make_server_app"]


def make_server_app(
    scenario: str | Path | None = None, out: str | Path | None = None, app_dir: str | Path | None = None
) -> ServerApp:
    """A ServerApp whose main runs fedlt's whole run (``Run``) on the Grid it is given.

    ``scenario`` and ``out`` default to the run config's ``scenario`` and ``out-dir`` (as written
    by ``fedlt export-flower``); relative paths are taken from ``app_dir``. An ``out`` folder
    that already holds a run is continued from its checkpoint, like ``fedlt resume``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        from fedlt.driver.runner import Run
        from fedlt.flower.simulation import attach_grid
        from fedlt.scenario.config import load_scenario

        base = Path(app_dir) if app_dir is not None else Path.cwd()
        cfg = context.run_config
        source = scenario if scenario is not None else cfg.get("scenario", "scenario.toml")
        out_dir = Path(out if out is not None else cfg.get("out-dir", "runs/flower"))
        out_dir = out_dir if out_dir.is_absolute() else base / out_dir
        if (out_dir / "scenario.toml").is_file():
            print(f"fedlt: continuing the run in {out_dir} from its checkpoint", flush=True)
            run = Run.open(out_dir)
        else:
            path = Path(str(source))
            resolved = load_scenario(path if path.is_absolute() else base / path)
            resolved.engine.kind = "flower"  # training goes through this Grid whatever the file says
            run = Run.create(resolved, out_dir)
        with attach_grid(grid):
            summary = run.execute()
        # print, not log: `flwr run --stream` shows the ServerApp's output.
        print(f"fedlt: run finished in {out_dir}; final metrics: {summary['final']}", flush=True)

    return app
