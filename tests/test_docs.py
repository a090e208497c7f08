"""README.md and docs/ promise only what holds: links and anchors resolve, named modules and scripts exist,
the configuration tables equal the code, and the text speaks of the current code only."""

from __future__ import annotations

import importlib.util
import inspect
import re
import tomllib
from pathlib import Path

import pytest

from fedcca.app.task import TaskConfig
from fedcca.flower.strategy import CCAMerge
from simulations.harness import ROOT, base_run_config

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = CODE_BLOCK.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path) -> list[str]:
    text = CODE_BLOCK.sub("", page.read_text())
    return [a or b for a, b in LINK.findall(text)]


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file or ``#anchor`` does not exist."""
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(target)
    return broken


def named_in_code(page: Path) -> tuple[list[str], list[str]]:
    """``python -m`` modules and ``scripts/``, ``simulations/`` paths named in the code blocks of ``page``."""
    blocks = "\n".join(CODE_BLOCK.findall(page.read_text()))
    modules = re.findall(r"python -m ([\w.]+)", blocks)
    paths = re.findall(r"\b((?:scripts|simulations|server|clients|examples)/[\w./-]+)", blocks)
    return [m for m in modules if m not in ("build", "venv", "pip", "pytest", "cProfile")], paths


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_module_and_script_named_in_a_code_block_exists(page: Path) -> None:
    modules, paths = named_in_code(page)
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    missing += [p for p in paths if not (ROOT / p).exists() and not (ROOT / p.rstrip(".")).exists()]
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_docs_speak_of_the_current_code_only(page: Path) -> None:
    found = re.findall(r"issue [0-9]+|measured before|not re-run", page.read_text(), flags=re.IGNORECASE)
    assert found == []


def _table(section: str) -> dict[str, list[str]]:
    """``first cell -> cells`` of the first table under ``## section`` of docs/configuration.md."""
    text = (ROOT / "docs" / "configuration.md").read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return {cells[0].strip("` "): [c.strip() for c in cells[1:]]
            for cells in (row.strip("|").split(" | ") for row in rows)}


def test_run_config_keys_and_defaults_are_the_same_in_pyproject_docs_and_code() -> None:
    documented, config = _table("Run config"), base_run_config()
    fields = [name.replace("_", "-") for name in TaskConfig.__dataclass_fields__]
    assert list(documented) == list(config) and sorted(fields) == sorted(config)
    for key, cells in documented.items():
        assert tomllib.loads(f"v = {cells[0].strip('`')}")["v"] == config[key], key
    TaskConfig.from_run_config(config)  # the documented defaults are valid


def test_ccamerge_keywords_are_documented_with_their_defaults() -> None:
    documented = _table("`CCAMerge` keywords")
    parameters = {name: p for name, p in inspect.signature(CCAMerge.__init__).parameters.items()
                  if name not in ("self", "kwargs")}
    assert list(documented) == list(parameters)
    for name, parameter in parameters.items():
        default = documented[name][1].strip("`")
        value = parameter.default
        expected = "required" if value is inspect.Parameter.empty else f'"{value}"' if isinstance(value, str) \
            else repr(value)
        assert default == expected, name


def test_the_checks_fail_on_a_broken_link_key_and_path(tmp_path: Path) -> None:
    """The checks above are not vacuous: a broken link, anchor, module and script are each reported."""
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](other.md#a-heading) [gone](missing.md) [bad](other.md#nope) [self](#title)\n"
                    "```bash\npython -m simulations.nothing_here\nbash scripts/nothing.sh\npython -m simulations.stress\n```\n")
    assert broken_links(page) == ["missing.md", "other.md#nope"]
    modules, paths = named_in_code(page)
    assert [m for m in modules if importlib.util.find_spec(m) is None] == ["simulations.nothing_here"]
    assert [p for p in paths if not (ROOT / p).exists()] == ["scripts/nothing.sh"]
