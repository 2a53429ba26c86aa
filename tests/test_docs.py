"""The documentation matches the code: generated reference, hook table, README commands, links."""

from __future__ import annotations

import dataclasses
import re
import sys
import tomllib
from pathlib import Path

from pydantic import BaseModel

from fedlt.cli import _parser
from fedlt.hooks import context, hookspecs
from fedlt.scenario.config import Scenario, builtin_scenario_path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REGENERATE = "Run `python docs/docgen.py --write` and commit the result."

sys.path.insert(0, str(DOCS))
import docgen  # noqa: E402  (documentation tooling lives in docs/, outside the runtime package)

README_COMMANDS = [
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/fedlt run",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest",
]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of a ``## heading`` up to the next ``## `` heading."""
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


# --------------------------------------------------------------------------- generated files


def test_scenario_reference_is_up_to_date() -> None:
    assert _read(DOCS / "scenarios.md") == docgen.scenario_reference(), (
        f"docs/scenarios.md differs from the scenario models. {REGENERATE}"
    )


def test_generated_blocks_are_up_to_date() -> None:
    for filename, name, generate in docgen.BLOCKS:
        begin, end = docgen.markers(name)
        page = _read(DOCS / filename)
        assert f"{begin}\n{generate()}{end}" in page, (
            f"The generated {name!r} block in docs/{filename} is out of date. {REGENERATE}"
        )


def test_every_hook_is_in_the_generated_table() -> None:
    table = docgen.hook_table()
    missing = [name for name in hookspecs.SPECS if f"| `{name}` |" not in table]
    assert not missing, missing


def test_every_context_field_is_documented() -> None:
    """Each field of every context object has an entry in its class's Attributes section, so the
    generated reference covers the whole contract a plugin sees."""
    for cls in docgen.CONTEXTS:
        documented = {n for names, _, text in docgen._attributes(cls) if text for n in names}
        fields = set(cls._fields) if hasattr(cls, "_fields") else {f.name for f in dataclasses.fields(cls)}
        assert fields <= documented, f"{cls.__name__}: undocumented fields {sorted(fields - documented)}"
    assert context.ClientContext in docgen.CONTEXTS


def test_every_scenario_field_is_documented() -> None:
    reference = docgen.scenario_reference()
    for key, field in Scenario.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            body = _section(reference, f"## `[{key}]`")
            missing = [k for k in ann.model_fields if f"| `{k}` |" not in body]
            assert not missing, f"[{key}] keys missing from the reference: {missing}"
        else:
            assert f"| `{key}` |" in _section(reference, "## Top-level keys"), key
    assert "| `name` |" in _section(reference, "## `[[plugins]]`")


def test_every_example_plugin_is_registered_and_listed() -> None:
    """The example distribution registers each of its plugins, and the guide's table names them."""
    project = tomllib.loads(_read(DOCS / "example-plugin" / "pyproject.toml"))["project"]
    names = set(project["entry-points"]["fedlt.plugins"])
    assert len(names) == 7
    guide = _read(DOCS / "plugins.md")
    assert all(f"| `{n}` |" in guide for n in names)


def test_worked_example_is_quoted_verbatim() -> None:
    guide = _read(DOCS / "plugins.md")
    example = DOCS / "example-plugin"
    for path in (example / "pyproject.toml", example / "fedlt_example_remedies" / "label_smoothing.py"):
        assert _read(path) in guide, f"docs/plugins.md must quote {path.relative_to(ROOT)} verbatim"


# --------------------------------------------------------------------------- README


def _fenced_blocks(text: str) -> list[tuple[int, int, str]]:
    """(start, end, body) of every ``` fenced block."""
    return [
        (m.start(), m.end(), m.group(1)) for m in re.finditer(r"^```[^\n]*\n(.*?)^```$", text, re.M | re.S)
    ]


def test_readme_starts_with_the_two_commands() -> None:
    text = _read(ROOT / "README.md")
    blocks = _fenced_blocks(text)
    assert blocks, "README.md has no fenced block"

    # Only a one-line title and one short paragraph come before the commands.
    head = text[: blocks[0][0]].strip().split("\n\n")
    assert head[0].startswith("# ") and "\n" not in head[0], "README.md must open with a one-line title"
    assert len(head) == 2, "only a 1-2 sentence description may sit between the title and the commands"

    commands: list[str] = []
    previous_end = blocks[0][0]
    for start, end, body in blocks:
        if len(commands) >= 2:
            break
        assert not text[previous_end:start].strip(), "the two commands must come first, in one or two blocks"
        commands += [line.strip() for line in body.splitlines() if line.strip()]
        previous_end = end
    assert commands == README_COMMANDS


def test_readme_commands_match_the_project() -> None:
    project = tomllib.loads(_read(ROOT / "pyproject.toml"))["project"]
    assert project["readme"] == "README.md"
    assert project["scripts"]["fedlt"] == "fedlt.cli:main"
    assert any(dep.startswith("pytest") for dep in project["optional-dependencies"]["dev"])
    # `fedlt run` with no argument runs the embedded default scenario.
    assert _parser().parse_args(["run"]).scenario == "quickstart"
    assert builtin_scenario_path("quickstart").is_file()


# --------------------------------------------------------------------------- cross-references


def test_relative_links_resolve() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(page)):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_architecture_lists_every_seed_stream() -> None:
    text = _read(DOCS / "architecture.md")
    call = re.compile(
        r"(?:numpy_rng|torch_generator|seed_torch|derive_seed|hash_uniforms?)\([^,()]+,\s*\"([^\"]+)\""
    )
    # fedlt's own streams; plugins name theirs after themselves and document them in their modules.
    tags = {tag for p in (ROOT / "fedlt").rglob("*.py") for tag in call.findall(_read(p))}
    missing = sorted(tag for tag in tags if f'`"{tag}"' not in text)
    assert not missing, f"the determinism table in docs/architecture.md lacks the seed streams {missing}"
