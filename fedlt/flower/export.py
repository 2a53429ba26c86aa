"""``fedlt export-flower``: a scenario as a Flower App project that ``flwr run`` runs.

The project is small on purpose: the resolved scenario, a ``pyproject.toml`` naming the two
components, and a module that builds them with fedlt's factories
(:func:`fedlt.flower.server_app.make_server_app`, :func:`fedlt.flower.client_app.make_client_app`). The
ServerApp runs fedlt's whole run (rounds, evaluation, checkpoints, metrics) and writes the run
folder named by the run config's ``out-dir``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedlt.errors import ScenarioError
from fedlt.scenario.config import Scenario, load_scenario, scenario_to_toml

__all__ = ["export_flower", "flwr_run_command"]

APP_MODULE = "fedlt_app"

_MODULE = '''"""Flower App components for the fedlt scenario in scenario.toml (by `fedlt export-flower`)."""

from pathlib import Path

from fedlt.flower.client_app import make_client_app
from fedlt.flower.server_app import make_server_app

# Flower installs the app into $FLWR_HOME/apps/...; scenario.toml travels with it.
HERE = Path(__file__).resolve().parent

clientapp = make_client_app()
serverapp = make_server_app(app_dir=HERE)
'''


def _project_name(scenario_name: str) -> str:
    """A valid Flower app name: a letter first, then letters, digits, hyphens; at most 32."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", scenario_name).strip("-").lower()
    name = f"fedlt-{slug}" if slug else "fedlt-app"
    return name[:32].rstrip("-")


def flwr_run_command(app_dir: Path, scenario: Scenario) -> str:
    """The shell command that runs the exported app on a local simulation, one SuperNode per client."""
    cfg = scenario.engine
    federation = (
        f"num-supernodes={scenario.partition.n_clients} client-resources-num-cpus={cfg.num_cpus:g}"
        + (f" client-resources-num-gpus={cfg.num_gpus:g}" if cfg.num_gpus > 0 else "")
    )
    env = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
    return f'{env} flwr run {app_dir} --federation-config "{federation}" --stream'


def _pyproject(name: str, scenario: Scenario, run_dir: Path) -> str:
    import tomli_w

    from fedlt import __version__

    data: dict[str, Any] = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": name,
            "version": "1.0.0",
            "description": f"fedlt scenario {scenario.name!r} as a Flower App",
            "license": "Apache-2.0",
            "dependencies": [f"fedlt[flower]=={__version__}"],
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": "fedlt",
                    "components": {
                        "serverapp": f"{APP_MODULE}:serverapp",
                        "clientapp": f"{APP_MODULE}:clientapp",
                    },
                    "config": {"scenario": "scenario.toml", "out-dir": str(run_dir)},
                }
            },
        },
    }
    return tomli_w.dumps(data)


def _readme(scenario: Scenario, app_dir: Path, run_dir: Path) -> str:
    command = flwr_run_command(app_dir, scenario)
    return f"""# fedlt scenario `{scenario.name}` as a Flower App

Written by `fedlt export-flower`. Run it with Flower's Simulation Runtime (one SuperNode per
client; fedlt must be installed in the environment `flwr` runs from):

```sh
{command}
```

- The run folder (metrics.jsonl, summary.json, checkpoint.pt) is `{run_dir}`; change it with
  `--run-config "out-dir='/some/where'"`. Running again on a folder that holds a run continues it
  from its checkpoint.
- `flwr run` starts a local SuperLink in the background (configured in `$FLWR_HOME/config.toml`,
  default `~/.flwr`) and leaves it running. Stop it by its process id when done, e.g.
  `kill <pid>` with the pid `pgrep -f flower-superlink` shows for your user.
- `FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1` keeps Flower from creating a fresh environment
  (with `uv sync`) for the app; without it, fedlt must be installable from your package index.
"""


def export_flower(
    scenario: str | Path | Mapping[str, Any],
    app_dir: str | Path,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    run_dir: str | Path | None = None,
) -> Path:
    """Write ``app_dir`` as a Flower App project for ``scenario``; returns the folder.

    Parameters
    ----------
    scenario : path, built-in name or dict
        The scenario; it is validated (plugins included) before anything is written.
    app_dir : path
        A new or empty folder. Its name must be a valid Flower app name (a letter, then letters,
        digits and hyphens, at most 32 characters): ``flwr run`` checks it.
    overrides : ``key=value`` strings or a mapping
        Scenario overrides, as ``fedlt run --set``.
    run_dir : path, optional
        The run folder the ServerApp writes (default ``app_dir/runs/fedlt-<scenario name>``).
    """
    from fedlt.hooks.dispatch import build_hooks_spelled_out
    from fedlt.prepare import preflight, raise_problems

    resolved = load_scenario(scenario, overrides)
    resolved.engine.kind = "flower"
    raise_problems(preflight(resolved))  # what validate and run refuse: nothing is written
    build_hooks_spelled_out(resolved.plugins)  # the app's scenario.toml spells out every parameter
    app_dir = Path(app_dir).expanduser().resolve()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,31}", app_dir.name):
        raise ScenarioError(
            "DIR",
            app_dir.name,
            "a valid Flower app folder name (a letter, then letters, digits and hyphens; at most 32)",
            hint="flwr run refuses other names.",
        )
    if app_dir.exists() and (not app_dir.is_dir() or any(app_dir.iterdir())):
        raise ScenarioError("DIR", str(app_dir), "a new or empty folder")
    name = _project_name(resolved.name)
    run_path = app_dir / "runs" / name if run_dir is None else Path(run_dir).expanduser().resolve()
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "scenario.toml").write_text(scenario_to_toml(resolved))
    (app_dir / "pyproject.toml").write_text(_pyproject(name, resolved, run_path))
    (app_dir / f"{APP_MODULE}.py").write_text(_MODULE)
    (app_dir / "README.md").write_text(_readme(resolved, app_dir, run_path))
    # Keep run outputs out of the app bundle (flwr packs *.json/*.jsonl files it finds).
    (app_dir / ".gitignore").write_text("runs/\n__pycache__/\n")
    return app_dir
