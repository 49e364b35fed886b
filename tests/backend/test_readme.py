"""The README is the user's manual: every setting and every shipped label config is documented."""

from pathlib import Path

from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [env for env, _ in Settings.documented() if f"`{env}`" not in readme]
    assert not missing, f"README does not document {missing}"


def test_every_label_config_is_documented():
    readme = (ROOT / "README.md").read_text()
    configs_readme = (ROOT / "label_configs" / "README.md").read_text()
    for path in sorted((ROOT / "label_configs").glob("*.xml")):
        assert f"`{path.name}`" in readme and f"`{path.name}`" in configs_readme, path.name
