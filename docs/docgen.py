"""The scenario reference (docs/scenarios.md), generated from the typed models so it cannot drift.

Every key, type, default, constraint and description comes from :mod:`fedlt.config` (pydantic
``Field`` metadata) and every built-in plugin's parameters from its ``Params`` model, found
through the ``fedlt.plugins`` entry points. ``tests/test_docs.py`` fails when the committed
file differs from :func:`scenario_reference`.

Usage::

    python -m fedlt.docgen            # print the reference
    python -m fedlt.docgen --write    # rewrite docs/scenarios.md and the generated blocks of
                                      # docs/plugins.md (hook table) and docs/architecture.md
                                      # (module tables, round protocol)
    python -m fedlt.docgen --check    # exit 1 if any of them is stale
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import inspect
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedlt import hookspecs
from fedlt.config import PluginSpec, Scenario, scenario_to_toml
from fedlt.pluginmanager import ENTRY_POINT_GROUP, Plugin, PluginInfo, discover_plugins, type_name

__all__ = [
    "BLOCKS",
    "HOOKS",
    "builtin_plugins",
    "engine_modules",
    "generated_files",
    "hook_table",
    "main",
    "plugin_modules",
    "round_protocol",
    "scenario_reference",
]

#: The distribution whose plugins the reference lists. Third-party plugins are left out on
#: purpose: the committed file must not depend on what happens to be installed.
BUILTIN_DISTRIBUTION = "fedlt"

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: When and where each hook runs, and what its combine rule means for it. Keys must equal
#: ``hookspecs.COMBINE`` (tests/test_docs.py checks), so a new hook cannot go undocumented.
HOOKS: dict[str, tuple[str, str, str]] = {
    "configure_model": (
        "once per model build, right after construction",
        "driver and every worker",
        "every implementation runs; return ignored",
    ),
    "server_setup": (
        "once per process start, before the first round (on resume: before plugin state is loaded)",
        "driver",
        "every implementation runs; return ignored",
    ),
    "server_configure_round": (
        "once per round, after client selection",
        "driver",
        "mappings merged into the round config in order; later plugins win on equal keys",
    ),
    "server_make_aggregator": (
        "once per round, before clients train",
        "driver",
        "first non-`None` aggregator; default: streaming FedAvg",
    ),
    "server_after_aggregate": (
        "once per round, after the aggregated weights are loaded",
        "driver",
        "every implementation runs, each with its own `client_end` payloads",
    ),
    "client_start": (
        "once per client-round, model holds the global weights",
        "where the client trains",
        "every implementation runs; return ignored",
    ),
    "client_trainable_parameters": (
        "once per client-round, before the optimizer is built",
        "where the client trains",
        "tensors concatenated in order",
    ),
    "client_select_indices": (
        "once per client-round, offline scenarios: the sample order",
        "where the client trains",
        "first non-`None` index tensor; default: a permutation per epoch",
    ),
    "client_replay_indices": (
        "per optimizer step, continual (`[stream]`) scenarios only",
        "where the client trains",
        "index tensors concatenated in order, appended to the stream batch",
    ),
    "client_update_memory": (
        "once per stream batch, after its `online_iter` steps; continual scenarios only",
        "where the client trains",
        "every implementation runs; return ignored",
    ),
    "client_forward": (
        "per batch",
        "where the client trains",
        "first non-`None` `(features, logits)`; default: `model.features` then `model.head`",
    ),
    "client_transform_logits": (
        "per batch, after the forward pass",
        "where the client trains",
        "each receives the previous output; must not return `None`",
    ),
    "client_loss": (
        "per batch",
        "where the client trains",
        "first non-`None` per-sample loss; default: cross-entropy",
    ),
    "client_sample_weights": (
        "per batch",
        "where the client trains",
        "product of the non-`None` weight tensors",
    ),
    "client_extra_losses": (
        "per batch",
        "where the client trains",
        "sum of the non-`None` scalars, added to the mean loss",
    ),
    "client_after_backward": (
        "per batch, after `backward()`, before clipping and the optimizer step",
        "where the client trains",
        "every implementation runs; return ignored",
    ),
    "client_end": (
        "once per client-round, after the last step",
        "where the client trains",
        "each plugin's non-`None` payload kept apart, for its own `server_after_aggregate`",
    ),
    "client_personalize": (
        "per client per evaluation, when `eval.personalized` is on",
        "driver (on a scratch copy of the model)",
        "every implementation runs, in order, on the same copy",
    ),
    "eval_logits": (
        "per evaluation: the global test set, then each client's local view",
        "driver",
        "each receives the previous output; must not return `None`",
    ),
}


# --------------------------------------------------------------------------- cell rendering


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def _literal(value: Any) -> str:
    """A value as it is written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    return _code(_literal(value))


# annotated-types constraint objects (Gt, Ge, ..., MinLen) carry one of these attributes each.
_BOUNDS: tuple[tuple[str, str], ...] = (
    ("gt", "> {}"),
    ("ge", "≥ {}"),
    ("lt", "< {}"),
    ("le", "≤ {}"),
    ("multiple_of", "multiple of {}"),
    ("min_length", "length ≥ {}"),
    ("max_length", "length ≤ {}"),
    ("pattern", "matches `{}`"),
)


def _constraints(field: FieldInfo) -> str:
    """The Field metadata as text: ``> 0, < 1``; ``length ≥ 2, length ≤ 2``."""
    parts = []
    for meta in field.metadata:
        for attr, template in _BOUNDS:
            if (bound := getattr(meta, attr, None)) is not None:
                parts.append(template.format(bound))
    return _cell(", ".join(parts))


def _summary(obj: Any) -> str:
    """First paragraph of an object's docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _field_rows(fields: Sequence[tuple[str, FieldInfo]]) -> list[str]:
    rows = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for key, field in fields:
        rows.append(
            f"| `{key}` | {_code(type_name(field.annotation))} | {_default(field)} | {_constraints(field)} "
            f"| {_cell(field.description or '')} |"
        )
    return rows


def _is_section(field: FieldInfo) -> bool:
    ann = field.annotation
    return isinstance(ann, type) and issubclass(ann, BaseModel)


# --------------------------------------------------------------------------- sections


def _intro() -> list[str]:
    return [
        "# Scenario reference",
        "",
        "<!-- Generated from fedlt/config.py by `python -m fedlt.docgen --write`; do not edit by hand. -->",
        "",
        "A scenario is a TOML file (or a dict in Python) validated into typed models when it is loaded; "
        "plugin parameters are validated next, before any data is read. Every key except a plugin's "
        "`name` is optional: a missing key takes the default below. An unknown key, a value of the wrong "
        "type or out of range, or an unknown plugin stops the run before training with one message "
        "naming the key, the value and what is allowed (the `fedlt` command exits with status 2). "
        "`fedlt validate SCENARIO` checks a file, its plugins and its data without training.",
        "",
        "A run folder's `scenario.toml` holds the fully resolved scenario, every default spelled out "
        "([full default scenario](#full-default-scenario) below). Relative `data.root` and "
        "`data.cache_dir` are resolved against the scenario file's folder.",
        "",
        "Constraints: `>`/`≥`/`<`/`≤` bound a number, `length` bounds a list or string. A type such as "
        "`'none' | 'step'` lists the allowed strings.",
        "",
    ]


def _top_level() -> list[str]:
    fields = [(k, f) for k, f in Scenario.model_fields.items() if not _is_section(f)]
    return ["## Top-level keys", "", _summary(Scenario), "", *_field_rows(fields), ""]


def _section(key: str, model: type[BaseModel]) -> list[str]:
    return [f"## `[{key}]`", "", _summary(model), "", *_field_rows(list(model.model_fields.items())), ""]


def _plugins_section() -> list[str]:
    name_field = PluginSpec.model_fields["name"]
    return [
        "## `[[plugins]]`",
        "",
        _summary(PluginSpec) + " Plugins apply in the order they are listed; each may be listed once. "
        "Every key other than `name` is a parameter of that plugin, validated against the plugin's "
        "typed parameters when the scenario is loaded.",
        "",
        "| key | type | default | constraints | description |",
        "|---|---|---|---|---|",
        f"| `name` | {_code(type_name(name_field.annotation))} | {_default(name_field)} | "
        f"an installed plugin | {_cell(name_field.description or '')} |",
        "| *any other key* | per plugin | per plugin | per plugin | A parameter of the plugin "
        "(see [Built-in plugins](#built-in-plugins)). |",
        "",
        "```toml",
        "[[plugins]]",
        'name = "focal"',
        "gamma = 1.0",
        "",
        "[[plugins]]",
        'name = "balanced-softmax"',
        'prior = "global"',
        "```",
        "",
        "A bad parameter names the plugin table by position, e.g. `The 'plugins[0].gamma' value must be "
        "greater than or equal to 0 (parameter 'gamma' of plugin 'focal'). Got -1 instead.`",
        "",
    ]


def _plugin_rows(info: PluginInfo) -> list[str]:
    fields = info.cls.Params.model_fields
    rows = ["| parameter | type | default | constraints | description |", "|---|---|---|---|---|"]
    for p in info.parameters():
        field = fields[p["name"]]
        default = (
            "required"
            if p["required"]
            else ("unset" if p["default"] is None else _code(_literal(p["default"])))
        )
        rows.append(
            f"| `{p['name']}` | {_code(p['type'])} | {default} | {_constraints(field)} "
            f"| {_cell(p['description'])} |"
        )
    return rows


def _builtin_plugins(plugins: dict[str, PluginInfo]) -> list[str]:
    out = [
        "## Built-in plugins",
        "",
        "The remedies shipped with fedlt, registered in the `fedlt.plugins` entry-point group exactly as a "
        "third-party plugin is. `fedlt plugins` lists every installed plugin, third-party ones included; "
        "[plugins.md](plugins.md) shows how to write one.",
        "",
    ]
    usable = (i for i in plugins.values() if i.distribution == BUILTIN_DISTRIBUTION and i.error is None)
    builtins = sorted(usable, key=lambda i: i.name)
    shared = {
        m for m in (i.cls.__module__ for i in builtins) if sum(j.cls.__module__ == m for j in builtins) > 1
    }
    for info in builtins:
        # A module's docstring names the paper; a module holding several plugins gets the class's.
        module = sys.modules.get(info.cls.__module__)
        own = module is not None and info.cls.__module__ not in shared and _summary(module)
        out += [
            f"### `{info.name}`",
            "",
            own or _summary(info.cls),
            "",
            f"Entry point `{info.name} = {info.value}`; hooks: {', '.join(f'`{h}`' for h in info.hooks)}.",
            "",
        ]
        out += [*_plugin_rows(info), ""] if info.cls.Params.model_fields else ["No parameters.", ""]
    return out


def _overrides() -> list[str]:
    return [
        "## Overriding keys: `--set` and keyword arguments",
        "",
        "`fedlt run`, `validate` and `inspect` take `--set KEY=VALUE`, repeatable. `KEY` is a dotted path "
        "(`section.key`); a plugin table is addressed by its position in `[[plugins]]`, so "
        "`plugins.0.gamma=1` sets `gamma` of the first plugin. `VALUE` is read as a TOML literal "
        '(`3`, `0.5`, `true`, `[3, 32, 32]`, `"text"`); anything that is not a valid literal is taken as '
        "a plain string, so `data.augment=crop-flip` needs no quotes. Overrides apply before validation, so "
        "an overridden value is checked like any other.",
        "",
        "```sh",
        "fedlt run quickstart --set federation.rounds=5 --set partition.alpha=0.1",
        "fedlt run quickstart --set plugins.0.name=focal --set plugins.0.gamma=1",
        "fedlt validate quickstart --set 'eval.shot_thresholds=[100, 20]' --set data.augment=crop-flip",
        "```",
        "",
        "In Python, `fedlt.run` takes the same overrides as keyword arguments, with `__` for `.`:",
        "",
        "```python",
        "import fedlt",
        "",
        'summary = fedlt.run("quickstart", federation__rounds=3, partition__alpha=0.1)',
        'summary = fedlt.run("quickstart", **{"plugins.0.name": "focal", "plugins.0.gamma": 1.0})',
        "```",
        "",
        "The index one past the last plugin table appends a new table: on `quickstart`, which lists no "
        "plugins, `plugins.0.name=focal` adds one (a new table needs its `name`).",
        "",
    ]


def _every_default() -> list[str]:
    return [
        "## Full default scenario",
        "",
        "`Scenario()` with nothing set, as `scenario.toml` in a run folder would spell it out "
        "(unset optional keys are omitted):",
        "",
        "```toml",
        scenario_to_toml(Scenario()).rstrip("\n"),
        "```",
        "",
    ]


def builtin_plugins() -> dict[str, PluginInfo]:
    """The plugins fedlt itself registers, that load.

    In a source checkout they are read from the entry points declared in ``pyproject.toml``, so
    the reference does not depend on how recently the package was (re)installed; otherwise from
    the installed ``fedlt`` distribution. Entry points that fail to load are left out (``fedlt
    plugins`` reports them).
    """
    pyproject = ROOT / "pyproject.toml"
    project = {}
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    if project.get("name") != BUILTIN_DISTRIBUTION:
        return {
            name: info
            for name, info in discover_plugins().items()
            if info.distribution == BUILTIN_DISTRIBUTION and info.error is None
        }
    found = {}
    for name, value in project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {}).items():
        try:
            cls = md.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP).load()
        except Exception:
            continue
        if isinstance(cls, type) and issubclass(cls, Plugin):
            found[name] = PluginInfo(name, value, BUILTIN_DISTRIBUTION, cls)
    return found


def scenario_reference(plugins: dict[str, PluginInfo] | None = None) -> str:
    """The scenario reference as Markdown (the content of docs/scenarios.md).

    Parameters
    ----------
    plugins : mapping of str to PluginInfo, optional
        The plugins to list (default: :func:`builtin_plugins`); only those of the ``fedlt``
        distribution that loaded are listed.
    """
    plugins = builtin_plugins() if plugins is None else plugins
    lines = [*_intro(), *_top_level()]
    for key, field in Scenario.model_fields.items():
        if _is_section(field):
            lines += _section(key, field.annotation)
    lines += _plugins_section()
    lines += _builtin_plugins(plugins)
    lines += _overrides()
    lines += _every_default()
    return "\n".join(lines).rstrip("\n") + "\n"


def hook_table() -> str:
    """The table of every hook (when, where, combine rule) embedded in docs/plugins.md."""
    rows = ["| hook | when | where | combine | meaning |", "|---|---|---|---|---|"]
    for name, rule in hookspecs.COMBINE.items():
        # A hook not yet described in HOOKS still gets a row (tests/test_docs.py flags it).
        fallback = (_summary(getattr(hookspecs, name, None)), "see `fedlt/hookspecs.py`", "")
        when, where, meaning = HOOKS.get(name, fallback)
        rows.append(f"| `{name}` | {_cell(when)} | {_cell(where)} | {rule} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def round_protocol() -> str:
    """The round protocol from the hookspecs' module docstring, embedded in docs/architecture.md."""
    doc = hookspecs.__doc__ or ""
    start = doc.index("The protocol of one run")
    body = doc[start:].split("\n", 2)[2]  # below the title and its underline
    body = body[: body.index("\nCalling convention")].strip("\n")
    return "```text\n" + body.replace("``", "") + "\n```\n"


def _module_summary(path: Path) -> str:
    """First paragraph of a module's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")


def _module_rows(folder: str, registers: dict[str, list[str]] | None = None) -> str:
    """A table of every module under ``ROOT / folder`` with its docstring's first paragraph."""
    paths = sorted((ROOT / folder).rglob("*.py"), key=lambda p: p.relative_to(ROOT).as_posix())
    if registers is None:
        rows = ["| module | its one job |", "|---|---|"]
        for path in paths:
            rows.append(f"| `{path.relative_to(ROOT).as_posix()}` | {_cell(_module_summary(path))} |")
    else:
        rows = ["| module | registers | its one job |", "|---|---|---|"]
        for path in paths:
            names = ", ".join(f"`{n}`" for n in registers.get(path.relative_to(ROOT).as_posix(), []))
            rows.append(
                f"| `{path.relative_to(ROOT).as_posix()}` | {names} | {_cell(_module_summary(path))} |"
            )
    return "\n".join(rows) + "\n"


def engine_modules() -> str:
    """The table of fedlt's own modules embedded in docs/architecture.md."""
    return _module_rows("fedlt")


def plugin_modules() -> str:
    """The table of the built-in plugin modules, with the entry points each registers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_dirs = project.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    registers: dict[str, list[str]] = {}
    for name, value in project["project"].get("entry-points", {}).get(ENTRY_POINT_GROUP, {}).items():
        package, _, module = value.partition(":")[0].partition(".")
        path = f"{package_dirs.get(package, package)}/{module.replace('.', '/')}.py"
        registers.setdefault(path, []).append(name)
    return _module_rows("plugins", registers)


#: Generated blocks inside hand-written pages: (file in docs/, block name, generator).
BLOCKS: tuple[tuple[str, str, Callable[[], str]], ...] = (
    ("plugins.md", "hook table", hook_table),
    ("architecture.md", "engine modules", engine_modules),
    ("architecture.md", "plugin modules", plugin_modules),
    ("architecture.md", "round protocol", round_protocol),
)


def markers(name: str) -> tuple[str, str]:
    """The comment lines that delimit generated block ``name``."""
    return (
        f"<!-- BEGIN GENERATED: {name} (python -m fedlt.docgen --write) -->",
        f"<!-- END GENERATED: {name} -->",
    )


def fill_block(text: str, name: str, content: str) -> str:
    """``text`` with the generated block ``name`` replaced by ``content``."""
    begin, end = markers(name)
    head, sep, rest = text.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise ValueError(f"the page lacks the markers {begin!r} / {end!r}")
    return f"{head}{begin}\n{content}{end}{tail}"


def generated_files(docs: Path = DOCS) -> dict[Path, str]:
    """Every generated file, or page with generated blocks, with the content it should have."""
    targets = {docs / "scenarios.md": scenario_reference()}
    for filename, name, generate in BLOCKS:
        path = docs / filename
        text = targets.get(path) or path.read_text(encoding="utf-8")
        targets[path] = fill_block(text, name, generate())
    return targets


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt.docgen", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--write",
        action="store_true",
        help="rewrite docs/scenarios.md and the generated blocks of other pages",
    )
    group.add_argument("--check", action="store_true", help="exit 1 if a generated file or block is stale")
    parser.add_argument("--docs", type=Path, default=DOCS, help="docs folder (default: the repository's)")
    args = parser.parse_args(argv)

    if not (args.write or args.check):
        sys.stdout.write(scenario_reference())
        return 0
    targets = generated_files(args.docs)
    stale = [p for p, text in targets.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for p in stale:
            print(f"{p} is out of date: run `python -m fedlt.docgen --write`", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(targets[p], encoding="utf-8")
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
