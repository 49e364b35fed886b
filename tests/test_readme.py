"""The README is the user's manual: every setting and every shipped label config is documented."""

from pathlib import Path

from backend.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [env for env, _ in Settings.documented() if f"`{env}`" not in readme]
    assert not missing, f"README does not document {missing}"


def test_every_label_config_is_documented():
    readme = (ROOT / "README.md").read_text()
    configs_readme = (ROOT / "label_configs" / "README.md").read_text()
    for path in sorted((ROOT / "label_configs").glob("*.xml")):
        assert f"`{path.name}`" in readme and f"`{path.name}`" in configs_readme, path.name


def test_ci_runs_the_readme_test_command():
    """The quick start's second command is what .ci/run runs, step for step."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    [command] = [
        line.strip()
        for line in readme.splitlines()
        if line.startswith("python3 -m venv") and "pytest" in line
    ]
    for step in command.split("&&"):
        step = step.strip()
        assert step == "python3 -m venv .venv" or step in ci, f"{step!r} is not in .ci/run"
    assert "python3 -m venv .venv" in ci
