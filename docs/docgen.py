"""The generated docs: scenario reference, hook and context reference, module tables.

Documentation tooling, not part of the runtime package. Every key, type, default, constraint and
description comes from :mod:`fedlt.scenario.config` (pydantic ``Field`` metadata), every built-in plugin's
parameters from its ``Params`` model, every hook from its declaration in :mod:`fedlt.hooks.hookspecs`,
every context field from its class docstring. ``tests/test_docs.py`` fails when a committed page
differs from what this generates.

Usage (from the repository root)::

    python docs/docgen.py            # print the scenario reference
    python docs/docgen.py --write    # rewrite docs/scenarios.md and the generated blocks of
                                     # docs/plugins.md (hooks, contexts) and docs/architecture.md
                                     # (module tables, round protocol)
    python docs/docgen.py --check    # exit 1 if any of them is stale
    python docs/docgen.py --outside  # the reference of the models and datasets installed packages
                                     # register (docs/extending.md); never written to a file
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import inspect
import re
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedlt.hooks import context, hookspecs
from fedlt.hooks.discovery import ENTRY_POINT_GROUP, PluginInfo, discover_plugins, type_name
from fedlt.hooks.plugin import Plugin
from fedlt.hooks.spec import CHECK_RULES, COMBINE_RULES, SIDES
from fedlt.scenario.config import PluginSpec, RegistrySection, Scenario, scenario_to_toml

__all__ = [
    "BLOCKS",
    "CONTEXTS",
    "builtin_plugins",
    "context_reference",
    "engine_modules",
    "generated_files",
    "hook_table",
    "main",
    "outside_reference",
    "plugin_modules",
    "round_protocol",
    "scenario_reference",
]

#: The distribution whose plugins the reference lists. Third-party plugins are left out on
#: purpose: the committed file must not depend on what happens to be installed.
BUILTIN_DISTRIBUTION = "fedlt"

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

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


def _type(annotation: Any) -> str:
    """A field's type as a reader writes it: ``list[int]``, not ``list[Annotated[int, Gt(gt=0)]]``.

    Constraints inside a type (positive list items) are left to the description.
    """
    return re.sub(r"Annotated\[([^,\[\]]+), [^\[\]]*\]", r"\1", type_name(annotation))


def _field_rows(fields: Sequence[tuple[str, FieldInfo]]) -> list[str]:
    rows = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for key, field in fields:
        rows.append(
            f"| `{key}` | {_code(_type(field.annotation))} | {_default(field)} | {_constraints(field)} "
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
        "<!-- Generated from fedlt/scenario/config.py by `python docs/docgen.py --write`; "
        "do not edit by hand. -->",
        "",
        "A scenario is a TOML file (or a dict in Python) validated into typed models when it is loaded; "
        "plugin parameters are validated next, before any data is read. Every key except a plugin's "
        "`name` is optional: a missing key takes the default below. An unknown key, a value of the wrong "
        "type or out of range, or an unknown plugin stops the run before training with one message "
        "naming the key, the value and what is allowed (the `fedlt` command exits with status 2). "
        "`fedlt validate SCENARIO` checks a file, its plugins and its data without training.",
        "",
        "A run folder's `scenario.toml` holds the fully resolved scenario, every default spelled out "
        "([full default scenario](#full-default-scenario) below). Relative `data.root`, "
        "`data.cache_dir` and `model.pretrained` are resolved against the scenario file's folder.",
        "",
        "Constraints: `>`/`≥`/`<`/`≤` bound a number, `length` bounds a list or string. A type such as "
        "`'none' | 'step'` lists the allowed strings.",
        "",
        "`[data]`, `[long_tail]`, `[partition]` and `[model]` each choose an entry of a registry (a dataset, "
        "a long-tail profile, a partitioner, a model) with one key; the section's other keys are the "
        "entries' parameters. Only the chosen entry's parameters may be set (any other is an error naming "
        "the key), each is listed under its entry with its own default and constraints, and the resolved "
        "`scenario.toml` spells out every one of them. A `--set` that switches the entry drops the "
        "parameters the new entry does not take.",
        "",
    ]


def _top_level() -> list[str]:
    fields = [(k, f) for k, f in Scenario.model_fields.items() if not _is_section(f)]
    return ["## Top-level keys", "", _summary(Scenario), "", *_field_rows(fields), ""]


def _section(key: str, model: type[BaseModel]) -> list[str]:
    """A section's keys, then each of its nested tables (``[eval.attack]``) as a section of its own."""
    if issubclass(model, RegistrySection):
        return _registry_section(key, model)
    fields = list(model.model_fields.items())
    rows = _field_rows(fields)
    for i, (sub, field) in enumerate(fields, start=2):  # a nested table's row points to its section
        if _is_section(field):
            rows[i] = f"| `{sub}` | table | see `[{key}.{sub}]` |  | {_cell(field.description or '')} |"
    out = [f"## `[{key}]`", "", _summary(model), "", *rows, ""]
    for sub, field in fields:
        if _is_section(field):
            out += _section(f"{key}.{sub}", field.annotation)
    return out


def _registry_section(key: str, model: type[RegistrySection]) -> list[str]:
    """A registry-derived section: its selector and shared keys, then each entry's parameters."""
    registry, selector = model.__registry__, model.__selector__
    union = registry.parameters()
    own = [(k, f) for k, f in model.model_fields.items() if k not in union]
    out = [f"## `[{key}]`", "", _summary(model), "", *_field_rows(own), ""]
    out += [
        f"Each {registry.kind}'s parameters, with its defaults; set only those of the chosen `{selector}`.",
        "",
    ]
    for entry in registry.entries():
        out += _entry_rows(selector, entry)
    return out


def _entry_rows(selector: str, entry: Any, origin: str | None = None) -> list[str]:
    """One entry's heading, summary (and where it comes from) and parameter table."""
    out = [f"### `{selector} = {_literal(entry.name)}`", "", entry.summary, ""]
    if origin:
        out += [f"From {origin}.", ""]
    fields = list(entry.params.model_fields.items())
    return out + ([*_field_rows(fields), ""] if fields else ["No parameters.", ""])


def outside_reference() -> str:
    """The models and datasets installed packages register, as the scenario reference lists the
    built-in ones; an entry that cannot be used is listed with the reason.

    Not part of docs/scenarios.md, which must not depend on what is installed.
    """
    lines = ["# Installed outside entries", ""]
    for key, field in Scenario.model_fields.items():
        model = field.annotation
        if not (_is_section(field) and issubclass(model, RegistrySection) and model.__registry__.group):
            continue
        registry, selector = model.__registry__, model.__selector__
        lines += [f"## `[{key}]` (entry-point group `{registry.group}`)", ""]
        outside = registry.outside()
        if not outside:
            lines += [f"No installed package registers a {registry.kind}.", ""]
        for name, item in outside.items():
            if item.error is not None:
                reason = f"From {item.origin}: {_cell(item.error)}."
                lines += [f"### `{selector} = {_literal(name)}`: unusable", "", reason, ""]
            else:
                lines += _entry_rows(selector, item.load(), item.origin)
    return "\n".join(lines).rstrip("\n") + "\n"


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


def _spec_notes(spec: Any) -> str:
    """What else a declaration says: its result check, stream-only, vectorized, routed arguments."""
    notes = []
    if spec.check:
        notes.append(f"checked: {spec.check}")
    if spec.stream_only:
        notes.append("streams only")
    if spec.vmap:
        notes.append("vectorized")
    if spec.serial:
        notes.append("trains clients one by one")
    if spec.by_plugin:
        notes.append("own " + ", ".join(f"`{a}`" for a in spec.by_plugin))
    return "; ".join(notes)


def hook_table() -> str:
    """Every hook from its declaration (arguments, when, where, combine rule, check, ...), for
    docs/plugins.md."""
    rows = [
        "| hook | arguments | when | side | combine | also | what it is for | since |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, spec in hookspecs.SPECS.items():
        args = ", ".join(f"`{a}`" for a in spec.params)
        rows.append(
            f"| `{name}` | {args} | {_cell(spec.when)} | {spec.side} | {spec.combine} | "
            f"{_spec_notes(spec)} | {_cell(spec.summary)} | {spec.since} |"
        )
    rows += ["", "Sides (where a hook runs, on which plugin instance):", ""]
    rows += [f"- **{side}**: {text}." for side, text in SIDES.items()]
    rows += ["", "Combine rules:", ""]
    rows += [f"- **{rule}**: {text}." for rule, text in COMBINE_RULES.items()]
    rows += [
        "",
        "Result checks (a result that fails one is a `PluginError` naming plugin, hook, client, round):",
        "",
    ]
    rows += [f"- **{rule}**: {text}." for rule, text in CHECK_RULES.items()]
    rows += [
        "",
        "*streams only*: called only in continual scenarios (offline, not even bound). *vectorized*: "
        "runs inside the vectorized step for plugins declaring `vectorized = True`. *own `x`*: each "
        "plugin receives its own `x` (fedlt passes them by plugin).",
    ]
    return "\n".join(rows) + "\n"


#: The context objects hooks receive, documented field by field from their docstrings.
CONTEXTS = (
    context.SetupContext,
    context.RoundContext,
    context.ClientContext,
    context.EvalContext,
    context.LogContext,
    context.Forward,
)


def _attributes(cls: type) -> list[tuple[list[str], str, str]]:
    """(names, type, description) of each entry in a NumPy-style ``Attributes`` section."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes\n----------" not in doc:
        return []
    body = doc.split("Attributes\n----------\n", 1)[1]
    entries: list[tuple[list[str], str, str]] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            names, _, kind = line.partition(" : ")
            entries.append(([n.strip() for n in names.split(",")], kind.strip(), ""))
        elif entries:
            names, kind, text = entries[-1]
            entries[-1] = (names, kind, f"{text} {line.strip()}".strip())
    return entries


def context_reference() -> str:
    """Every field of every context object, for docs/plugins.md."""
    out: list[str] = []
    for cls in CONTEXTS:
        summary = (inspect.getdoc(cls) or "").split("\n")[0]
        out += [f"#### `{cls.__name__}`", "", summary, "", "| field | type | meaning |", "|---|---|---|"]
        for names, kind, text in _attributes(cls):
            out.append(f"| {', '.join(f'`{n}`' for n in names)} | {_cell(kind)} | {_cell(text)} |")
        methods = [
            (n, f)
            for n, f in vars(cls).items()
            if not n.startswith("_") and (inspect.isfunction(f) or isinstance(f, property))
        ]
        for n, f in methods:
            doc = inspect.getdoc(f) or ""
            call = (
                ""
                if isinstance(f, property)
                else "(" + ", ".join(list(inspect.signature(f).parameters)[1:]) + ")"
            )
            kind = "property" if isinstance(f, property) else "method"
            out.append(f"| `{n}{call}` | {kind} | {_cell(' '.join(doc.split()))} |")
        out.append("")
    return "\n".join(out)


def round_protocol() -> str:
    """The round protocol from the hookspecs' module docstring, embedded in docs/architecture.md."""
    doc = hookspecs.__doc__ or ""
    start = doc.index("The protocol of one run")
    body = doc[start:].split("\n", 2)[2]  # below the title and its underline
    body = body[: body.index("\nInstances")].strip("\n")
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
    ("plugins.md", "round protocol", lambda: round_protocol()),
    ("plugins.md", "hook table", hook_table),
    ("plugins.md", "context reference", context_reference),
    ("architecture.md", "engine modules", engine_modules),
    ("architecture.md", "plugin modules", plugin_modules),
    ("architecture.md", "round protocol", round_protocol),
)


def markers(name: str) -> tuple[str, str]:
    """The comment lines that delimit generated block ``name``."""
    return (
        f"<!-- BEGIN GENERATED: {name} (python docs/docgen.py --write) -->",
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
    parser = argparse.ArgumentParser(prog="python docs/docgen.py", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--write",
        action="store_true",
        help="rewrite docs/scenarios.md and the generated blocks of other pages",
    )
    group.add_argument("--check", action="store_true", help="exit 1 if a generated file or block is stale")
    group.add_argument(
        "--outside",
        action="store_true",
        help="print the reference of the models and datasets installed packages register",
    )
    parser.add_argument("--docs", type=Path, default=DOCS, help="docs folder (default: the repository's)")
    args = parser.parse_args(argv)

    if args.outside:
        sys.stdout.write(outside_reference())
        return 0

    if not (args.write or args.check):
        sys.stdout.write(scenario_reference())
        return 0
    targets = generated_files(args.docs)
    stale = [p for p, text in targets.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for p in stale:
            print(f"{p} is out of date: run `python docs/docgen.py --write`", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(targets[p], encoding="utf-8")
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
