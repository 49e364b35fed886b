"""A LoRA job trains on the served model: one set of base weights in memory, clicks between its steps
answer exactly as before it began, and afterwards the project serves its new adapter while other
projects keep the base model or their own adapter."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from lsfakes import API_KEY
from test_retraining import CONFIG, accepted_result, learning_curve_module, png
from webhook_payloads import annotation_event, delivered

from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app
from osprey.inference.api import Osprey
from osprey.learning.lora import LoraSettings, LoraTrainer
from osprey.model.modeling import OspreyModel

BASE = "tiny+sam-tiny-untrained"
TRAINED, OWN_ADAPTER, PLAIN = 6, 8, 99  # projects: the one the job trains, one with an adapter, one without


def base_weights_alive(osprey) -> tuple[int, int]:
    """How many OspreyModels, and how many tensors the size of the token-embedding table (a base
    weight no adapter has), are alive."""
    table = osprey.model.llm.get_input_embeddings().weight.shape
    models = tables = 0
    for obj in gc.get_objects():
        if type(obj) is OspreyModel:  # type(), not isinstance(): no deprecated proxy is asked its class
            models += 1
        elif type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.shape == table:
            tables += 1
    return models, tables


def own_adapter(runtime, project: int) -> str:
    """A promoted ``lora`` version for ``project`` whose adapter visibly changes the answers."""
    osprey = runtime.models.region_model

    def write(folder):
        with runtime.sessions(None, 0):  # adding an adapter changes the served model: hold it
            trainer = LoraTrainer(osprey=osprey, settings=LoraSettings(rank=4), name="own")
            try:
                generator = torch.Generator().manual_seed(project)
                with torch.no_grad():
                    for param in trainer.trainable_parameters():
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
                trainer.save(folder / "lora")
            finally:
                trainer.close()
        return {"train_examples": 1}

    version = runtime.registry.create(str(project), kind="lora", base_model_version=BASE, write=write).version
    runtime.registry.promote(str(project), version, reason="a test's own adapter")
    return version


@pytest.fixture(scope="module")
def job(tiny_models, file_store, tmp_path_factory):
    """A runtime with accepted labels for project TRAINED, a promoted adapter for OWN_ADAPTER, and the
    answers to the same click for each project before the LoRA job, between its steps and after it."""
    scenes = learning_curve_module().make_scenes(6, seed=11)
    settings = Settings.from_env(
        {}, model_dir=tmp_path_factory.mktemp("models"), label_studio_url=file_store.url,
        label_studio_api_key=API_KEY, osprey_model="tiny", sam_model="tiny", train_every=0, lora="true",
    )  # fmt: skip
    runtime = build_runtime(settings, models=tiny_models)
    client = create_app(runtime).test_client()
    for i, scene in enumerate(scenes):
        path = file_store.add(f"/data/upload/{TRAINED}/l{i}.png", png(scene.image))
        event = annotation_event(accepted_result(scene, 700 + i), annotation_id=7700 + i, task_id=700 + i,
                                 project_id=TRAINED, label_config=CONFIG, image=path)  # fmt: skip
        assert delivered(client, runtime, event)["status"] == "stored"
    own_adapter(runtime, OWN_ADAPTER)
    task = {"id": 700, "data": {"image": f"/data/upload/{TRAINED}/l0.png"}}
    stroke = accepted_result(scenes[0], 700)[0]  # the annotator paints the first shape with the smart brush

    def click(project: int) -> dict:
        """The interactive answer, without the ids Label Studio gives each new region."""
        body = {"tasks": [task], "project": f"{project}.1", "label_config": CONFIG,
                "params": {"context": {"result": [stroke]}}}  # fmt: skip
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.json
        answer = response.json["results"][0]
        return {
            **answer,
            "result": [{k: v for k, v in item.items() if k != "id"} for item in answer["result"]],
        }

    projects = (TRAINED, OWN_ADAPTER, PLAIN)
    before = {p: click(p) for p in projects}
    osprey = runtime.models.region_model
    gc.collect()  # what other tests left behind is counted once here
    alone = base_weights_alive(osprey)
    lora = runtime.trainer.lora
    lora.settings = LoraSettings(rank=4, learning_rate=1e-2, epochs=1, grad_accum=1)
    serve_step = lora.step_session
    seen = {"steps": 0, "alive": set(), "between": {p: [] for p in projects}}

    @contextlib.contextmanager
    def step_then_clicks():
        with serve_step():
            seen["alive"].add(base_weights_alive(osprey))  # the adapter, its gradients and optimiser live
            yield
        seen["steps"] += 1
        seen["alive"].add(base_weights_alive(osprey))
        if seen["steps"] % 8 == 1:  # between two training steps: annotators click, in every project
            for p in projects:
                seen["between"][p].append(click(p))

    lora.step_session = step_then_clicks
    with pytest.MonkeyPatch.context() as patch:

        def no_second_model(*args, **kwargs):
            raise AssertionError("a LoRA job must not load another copy of the model")

        patch.setattr(Osprey, "from_pretrained", no_second_model)
        outcome = lora(str(TRAINED))
    lora.step_session = serve_step
    after = {p: click(p) for p in projects}
    return runtime, outcome, alone, seen, before, after


def test_a_lora_job_keeps_one_set_of_base_weights_in_memory(job):
    runtime, outcome, alone, seen, _, _ = job
    assert outcome["status"] == "promoted", outcome
    assert seen["steps"] > 8
    assert seen["alive"] == {alone}  # never a second OspreyModel, never a second copy of a base weight
    assert alone[0] >= 1


def test_clicks_between_lora_training_steps_answer_as_before_the_job(job):
    _, _, _, seen, before, _ = job
    for project, answers in seen["between"].items():
        assert len(answers) >= 2
        for answer in answers:
            assert answer == before[project], project  # same regions, labels, scores and model version


def test_after_the_job_the_project_serves_its_new_adapter_and_others_keep_theirs(job):
    runtime, outcome, _, _, before, after = job
    assert after[TRAINED]["model_version"] == f"{BASE}+p{TRAINED}-{outcome['version']}"
    assert after[TRAINED]["result"] != before[TRAINED]["result"]  # the new adapter answers
    assert after[OWN_ADAPTER] == before[OWN_ADAPTER]
    assert after[OWN_ADAPTER]["model_version"] == f"{BASE}+p{OWN_ADAPTER}-v0001"
    assert after[PLAIN] == before[PLAIN] and after[PLAIN]["model_version"] == BASE
    assert after[OWN_ADAPTER]["result"] != after[PLAIN]["result"]  # its own adapter, not the base model
    assert "lora-training" not in runtime.models.region_model.model.llm.peft_config  # the job's adapter freed
