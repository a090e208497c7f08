"""README documents the run config the app really has: every key of pyproject.toml, with its value."""

from __future__ import annotations

import re
import tomllib

from simulations.harness import ROOT, base_run_config


def _documented() -> dict[str, str]:
    """``key -> default cell`` of README's run-config table."""
    section = (ROOT / "README.md").read_text().split("## Run config", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| `(.*?)` \|", section, flags=re.MULTILINE)
    return dict(rows)


def test_readme_lists_every_run_config_key_with_its_default() -> None:
    documented, config = _documented(), base_run_config()
    assert list(documented) == list(config), "README's table and pyproject.toml list different keys (or orders)"
    for key, cell in documented.items():
        assert tomllib.loads(f"v = {cell}")["v"] == config[key], f"README says {key} = {cell}, pyproject {config[key]!r}"
