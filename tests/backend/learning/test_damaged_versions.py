"""A promoted version whose folder is gone, whose meta.json cannot be read or that lacks a part its kind
names is not served: the project falls back to the last whole version it promoted before, else the base
model; the damage is logged once and shown in ``/metrics`` and ``models list``; CURRENT is left alone."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from lsfakes import API_KEY
from test_retraining import CONFIG, accepted_result, learning_curve_module, png
from webhook_payloads import annotation_event, delivered

from backend.learning.registry import KIND_PARTS, ModelRegistry, RegistryError
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app
from osprey.learning.head import HeadField, HeadTrainer
from osprey.learning.region_features import FeatureLayout

BASE = "tiny+sam-tiny-untrained"
LOGGER = "backend.learning.registry"


def new_version(registry: ModelRegistry, project: str, kind: str = "head", *, head_labels=None) -> str:
    """A version of ``kind`` with every part it names (a real fast head over ``head_labels`` when given)."""

    def write(folder):
        for part in KIND_PARTS[kind]:
            if part == "head" and head_labels:
                toy_head(head_labels).save(folder / "head")
            else:
                (folder / part).mkdir()
                (folder / part / "weights.json").write_text("{}")
        return {"train_examples": 4}

    return registry.create(project, kind=kind, base_model_version=BASE, write=write).version


def toy_head(labels: tuple[str, ...]):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 4)).astype(np.float32)
    layout = FeatureLayout(groups=(("a", 4),), backbone="test")
    trainer = HeadTrainer(fields=[HeadField(name="category", labels=labels)], layout=layout)
    return trainer.fit(features, {"category": [labels[i % len(labels)] for i in range(12)]})


def warnings_about(caplog, project: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and f"project {project}:" in r.getMessage()
    ]


# ---- the registry ----


def test_a_whole_promoted_version_is_served_as_before(tmp_path, caplog):
    registry = ModelRegistry(root=tmp_path)
    new_version(registry, "7")
    registry.promote("7", new_version(registry, "7", "head+lora"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        served = registry.served("7")
    assert (served.version, served.promoted, served.problem) == ("v0002", "v0002", None)
    assert served.part("head") == tmp_path / "7" / "v0002" / "head"
    assert served.part("lora") == tmp_path / "7" / "v0002" / "lora"
    assert warnings_about(caplog, "7") == [] and registry.damaged() == {}
    never = registry.served("8")  # never trained: the base model, nothing wrong
    assert (never.info, never.promoted, never.problem, never.part("head")) == (None, None, None, None)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda folder: shutil.rmtree(folder), "v0002: its folder is missing"),
        (lambda folder: (folder / "meta.json").write_text('{"project": "7", "vers'), "v0002: meta.json cannot"),
        (lambda folder: (folder / "meta.json").write_bytes(b"\xff\xfe\x00"), "v0002: meta.json cannot be read"),
        (lambda folder: (folder / "meta.json").write_text("[1, 2]"), "v0002: meta.json cannot be read"),
        (lambda folder: (folder / "meta.json").unlink(), "v0002: meta.json is missing"),
        (lambda folder: shutil.rmtree(folder / "lora"), "v0002: a head+lora version without its lora/ folder"),
        (lambda folder: shutil.rmtree(folder / "head"), "v0002: a head+lora version without its head/ folder"),
    ],
    ids=["folder-gone", "meta-truncated", "meta-not-utf8", "meta-not-an-object", "meta-gone", "lora-gone",
         "head-gone"],
)  # fmt: skip
def test_a_damaged_promoted_version_falls_back_to_the_last_good_one(tmp_path, caplog, damage, problem):
    registry = ModelRegistry(root=tmp_path)
    registry.promote("7", new_version(registry, "7", "lora"))
    registry.promote("7", new_version(registry, "7", "head+lora"))
    damage(tmp_path / "7" / "v0002")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(5):  # every request reads it; the log says it once
            served = registry.served("7")
    assert (served.version, served.promoted) == ("v0001", "v0002")
    assert served.problem.startswith(problem), served.problem
    assert served.part("lora") == tmp_path / "7" / "v0001" / "lora" and served.part("head") is None
    (warning,) = warnings_about(caplog, "7")
    assert "promoted version v0002 cannot be served" in warning and "serving v0001 instead" in warning
    assert "osprey-label models rollback 7" in warning
    assert (tmp_path / "7" / "CURRENT").read_text().strip() == "v0002"  # the user decides, not the fallback
    assert registry.damaged() == {"7": {"serving": "v0001", "promoted": "v0002", "problem": served.problem}}


def test_with_no_good_version_left_the_base_model_is_served(tmp_path, caplog):
    registry = ModelRegistry(root=tmp_path)
    registry.promote("7", new_version(registry, "7"))
    registry.promote("7", new_version(registry, "7"))
    shutil.rmtree(tmp_path / "7" / "v0002")
    shutil.rmtree(tmp_path / "7" / "v0001" / "head")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        served = registry.served("7")
        registry.served("7")
    assert served.info is None and served.folder is None and served.part("head") is None
    assert served.problem == "v0002: its folder is missing; v0001: a head version without its head/ folder"
    (warning,) = warnings_about(caplog, "7")
    assert "serving the base model instead" in warning
    # Only a promotion: a version never promoted is not a fallback.
    new_version(registry, "9")
    (tmp_path / "9" / "CURRENT").write_text("v0005\n")
    assert (
        registry.served("9").info is None and registry.served("9").problem == "v0005: its folder is missing"
    )


def test_a_version_rolled_back_is_never_the_fallback(tmp_path):
    registry = ModelRegistry(root=tmp_path)
    for _ in range(3):
        registry.promote("7", new_version(registry, "7"))
    registry.rollback("7")  # v0003 -> v0002: v0003 is out of force
    shutil.rmtree(tmp_path / "7" / "v0002")
    assert registry.served("7").version == "v0001"
    (tmp_path / "7" / "history.jsonl").write_text('{"action": "promote", "version": "v0001"}\n{"act')
    served = registry.served("7")  # a torn history: nothing to walk back to, and it says so
    assert served.info is None and "history.jsonl cannot be read" in served.problem
    (tmp_path / "7" / "history.jsonl").write_text('[1]\n{"action": "promote", "version": ["v0001"]}\n')
    assert "history.jsonl cannot be read" in registry.served("7").problem
    (tmp_path / "7" / "history.jsonl").write_text('{"action": "promote", "version": ["v0001"]}\n')
    assert registry.served("7").info is None  # a version that is not a name is skipped


def test_a_repaired_version_is_served_again_and_a_new_damage_is_logged_again(tmp_path, caplog):
    registry = ModelRegistry(root=tmp_path)
    registry.promote("7", new_version(registry, "7"))
    registry.promote("7", new_version(registry, "7"))
    head = tmp_path / "7" / "v0002" / "head"
    moved = tmp_path / "aside"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        head.rename(moved)
        assert registry.served("7").version == "v0001"
        moved.rename(head)
        assert registry.served("7").version == "v0002" and registry.damaged() == {}
        shutil.rmtree(head)
        assert registry.served("7").version == "v0001"
    assert len(warnings_about(caplog, "7")) == 2
    assert "project 7: the promoted version is served again" in caplog.text


def test_the_name_of_a_lost_version_is_never_given_to_a_new_one(tmp_path):
    registry = ModelRegistry(root=tmp_path)
    for _ in range(3):
        registry.promote("7", new_version(registry, "7"))
    registry.rollback("7")
    shutil.rmtree(tmp_path / "7" / "v0003")  # named only by the history now
    shutil.rmtree(tmp_path / "7" / "v0002")  # named by CURRENT and the history
    assert new_version(registry, "7") == "v0004"
    assert registry.served("7").version == "v0001"  # CURRENT's v0002 is still the lost one


def test_promoting_a_damaged_version_is_refused(tmp_path):
    registry = ModelRegistry(root=tmp_path)
    version = new_version(registry, "7", "head+lora")
    shutil.rmtree(tmp_path / "7" / version / "lora")
    with pytest.raises(RegistryError, match="cannot promote v0001: a head\\+lora version without its lora/"):
        registry.promote("7", version)
    (tmp_path / "7" / version / "meta.json").write_text("{")
    with pytest.raises(RegistryError, match="v0001's meta.json cannot be read"):
        registry.promote("7", version)
    assert registry.versions("7") == []  # not listed, and listing does not fail
    assert registry.current("7") is None


def test_models_list_shows_the_damage_and_what_is_served(tmp_path, capsys):
    from backend.cli import main

    registry = ModelRegistry(root=tmp_path)
    registry.promote("7", new_version(registry, "7"))
    registry.promote("7", new_version(registry, "7", "head+lora"))
    shutil.rmtree(tmp_path / "7" / "v0002" / "lora")
    assert main(["models", "list", "7", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "* v0001" in out and "! v0002" in out
    assert "damaged: the promoted version v0002: v0002: a head+lora version without its lora/ folder" in out
    assert f"current: {BASE}+p7-v0001 (falling back: CURRENT still names v0002;" in out
    assert main(["models", "rollback", "7", "--model-dir", str(tmp_path)]) == 0
    assert f"now serving {BASE}+p7-v0001\n" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "7" / "v0001")
    assert main(["models", "list", "7", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "damaged: the promoted version v0001: v0001: its folder is missing" in out
    assert "current: base model (falling back" in out


# ---- serving: /setup, /metrics, the head, the adapter, training ----


@pytest.fixture
def service(tiny_models, file_store, tmp_path):
    settings = Settings.from_env(
        {}, model_dir=tmp_path, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", train_every=0, lora="false",
    )  # fmt: skip
    runtime = build_runtime(settings, models=tiny_models)
    yield runtime, create_app(runtime).test_client()
    runtime.close()


def setup(client, project: str) -> str:
    response = client.post("/setup", json={"project": f"{project}.1700000000", "schema": CONFIG})
    assert response.status_code == 200, response.json
    return response.json["model_version"]


@pytest.mark.parametrize("damage", ["folder", "meta.json"])
def test_setup_serves_the_last_good_version_logs_once_and_metrics_show_it(service, tmp_path, caplog, damage):
    runtime, client = service
    registry = runtime.registry
    assert runtime.models.version == BASE
    registry.promote("7", new_version(registry, "7"))
    registry.promote("7", new_version(registry, "7"))
    registry.promote("8", new_version(registry, "8"))
    assert setup(client, "7") == f"{BASE}+p7-v0002"  # whole: served as before
    assert client.get("/metrics").json["versions"] == {}

    if damage == "folder":
        shutil.rmtree(tmp_path / "7" / "v0002")
        shutil.rmtree(tmp_path / "8" / "v0001")
    else:
        (tmp_path / "7" / "v0002" / "meta.json").write_text("{not json")
        (tmp_path / "8" / "v0001" / "meta.json").write_text("")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert setup(client, "7") == f"{BASE}+p7-v0001"
            assert setup(client, "8") == BASE  # nothing promoted before it: the base model
        metrics = client.get("/metrics").json["versions"]
    assert len(warnings_about(caplog, "7")) == 1 and len(warnings_about(caplog, "8")) == 1
    assert set(metrics) == {"7", "8"}
    assert metrics["7"]["serving"] == "v0001" and metrics["7"]["promoted"] == "v0002"
    assert metrics["8"] == {"serving": "base model", "promoted": "v0001", "problem": metrics["8"]["problem"]}
    assert metrics["7"]["problem"].startswith("v0002: ") and metrics["8"]["problem"].startswith("v0001: ")


def test_the_head_and_the_adapter_served_are_the_fallbacks(service, tmp_path):
    runtime, client = service
    registry = runtime.registry
    registry.promote("7", new_version(registry, "7", "lora"))
    registry.promote("7", new_version(registry, "7", "head", head_labels=("cat", "dog")))
    registry.promote("7", new_version(registry, "7", "head+lora", head_labels=("red", "blue")))

    class Adapters:  # records what the sessions make active (and drop) instead of loading LoRA weights
        active = None
        removed: list[str] = []

        def activate(self, name, folder):
            self.active = (name, folder)

        def remove(self, name):
            self.removed.append(name)

    runtime.sessions._adapters = Adapters()
    assert runtime.projects.head("7").fields["category"].labels == ("red", "blue")
    runtime.sessions.activate("7")
    assert runtime.sessions._adapters.active == ("p7-v0003", tmp_path / "7" / "v0003" / "lora")

    shutil.rmtree(tmp_path / "7" / "v0003" / "lora")  # a head+lora version without its adapter
    assert runtime.projects.head("7").fields["category"].labels == ("cat", "dog")  # v0002's head
    runtime.sessions.activate("7")
    assert runtime.sessions._adapters.active == (None, None)  # v0002 is a head: no adapter

    shutil.rmtree(tmp_path / "7" / "v0002")
    assert runtime.projects.head("7") is None  # v0001 is an adapter alone
    runtime.sessions.activate("7")
    assert runtime.sessions._adapters.active == ("p7-v0001", tmp_path / "7" / "v0001" / "lora")
    assert runtime.sessions._adapters.removed == ["p7-v0003"]  # the adapter no longer served is freed
    assert setup(client, "7") == f"{BASE}+p7-v0001"


def test_a_new_version_is_trained_from_what_is_served(service, file_store, tmp_path):
    runtime, client = service
    registry = runtime.registry
    project = 31
    setup(client, str(project))
    for i, scene in enumerate(learning_curve_module().make_scenes(8, seed=5)):
        task_id = project * 100 + i
        path = file_store.add(f"/data/upload/{project}/shapes{i}.png", png(scene.image))
        event = annotation_event(accepted_result(scene, task_id), annotation_id=project * 1000 + i, task_id=task_id,
                                 project_id=project, label_config=CONFIG, image=path)  # fmt: skip
        assert delivered(client, runtime, event)["status"] == "stored"
    for _ in range(2):
        registry.promote(str(project), new_version(registry, str(project), head_labels=("circle", "square")))
    shutil.rmtree(tmp_path / str(project) / "v0002")

    outcome = runtime.trainer(str(project), "train", {})
    assert outcome["version"] == "v0003", outcome  # the lost v0002's name is not given to another
    assert registry.info(str(project), "v0003").parent == "v0001"  # not the damaged v0002
