"""The manual (docs/, an mkdocs site): it builds without a warning, its configuration reference is
generated from every setting, and every shipped label config is documented."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.runtime.settings import Settings, settings_reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LABEL_CONFIGS = sorted((ROOT / "label_configs").glob("*.xml"))


def test_every_setting_has_a_variable_a_description_and_a_group():
    missing = [
        field.name
        for field in dataclasses.fields(Settings)
        if not (
            str(field.metadata.get("env") or "").strip()
            and str(field.metadata.get("help") or "").strip()
            and str(field.metadata.get("group") or "").strip()
        )
    ]
    assert not missing, f"settings without env, help or group (the docs are generated from them): {missing}"


def test_the_generated_reference_names_every_variable_once_under_a_group():
    reference = settings_reference()
    variables = [field.metadata["env"] for field in dataclasses.fields(Settings)]
    assert len(set(variables)) == len(variables), "two settings share an environment variable"
    for env in variables:
        assert reference.count(f"| `{env}` |") == 1, f"{env} is not a row of the configuration reference"
    groups = {field.metadata["group"] for field in dataclasses.fields(Settings)}
    assert {line[3:] for line in reference.splitlines() if line.startswith("## ")} == groups


def test_the_configuration_page_takes_the_generated_reference():
    page = (DOCS / "configuration.md").read_text()
    hook = (ROOT / "mkdocs.yml").read_text()
    assert page.count("<!-- settings-reference -->") == 1
    assert "docs/hooks/settings.py" in hook


def test_the_hook_puts_the_reference_in_place_and_keeps_angle_brackets_visible():
    spec = importlib.util.spec_from_file_location("docs_settings_hook", DOCS / "hooks" / "settings.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = type("Page", (), {"file": type("File", (), {"src_uri": "configuration.md"})()})()
    built = hook.on_page_markdown("intro\n\n<!-- settings-reference -->\n", page, None, None)
    assert "<!-- settings-reference -->" not in built and "| `MODEL_DIR` |" in built
    assert hook.shown_as_text("| `<a>` | MODEL_DIR/<file> |") == "| `<a>` | MODEL_DIR/&lt;file&gt; |"


@pytest.mark.parametrize("config", LABEL_CONFIGS, ids=lambda path: path.name)
def test_every_shipped_label_config_is_documented(config):
    assert f"`{config.name}`" in (DOCS / "guide" / "label-configs.md").read_text()
    assert f"`{config.name}`" in (ROOT / "label_configs" / "README.md").read_text()


def test_there_are_label_configs_to_document():
    assert LABEL_CONFIGS, "label_configs/*.xml: none found"


def test_the_site_builds_strictly(tmp_path):
    """mkdocs build --strict: every page in the nav, every link and anchor resolving, the hook working."""
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (pip install -r requirements-dev.txt)")
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    configuration = (site / "configuration" / "index.html").read_text()
    assert "OSPREY_PREDICT_BUDGET_S" in configuration and "settings-reference" not in configuration
    assert (site / "label-studio-prelabels.png").is_file()
    assert not (site / "hooks").exists(), "the hook is code, not a page of the site"
