"""Training skips stored regions that went bad (image gone, image of another size, unreadable mask),
reports them by reason in the job result and ``/metrics``, and trains on the rest."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from lsfakes import API_KEY
from test_retraining import CONFIG, accepted_result, learning_curve_module, png
from webhook_payloads import annotation_event, delivered

from backend.labelstudio.rle import encode_brush_rle
from backend.learning.examples import SKIP_REASONS, SkipReport, usable_regions
from backend.learning.store import AnnotationRecord, RegionRecord
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app

ROOT = Path(__file__).resolve().parents[3]
GONE, RESIZED, GOOD = 1, 2, 0  # scene indices: image deleted (404), image replaced by a 96x128 one


def make_scenes(n: int, seed: int):
    return learning_curve_module().make_scenes(n, seed=seed)


def stored_region(region_id: str, rle: list[int], width: int = 128, height: int = 128) -> RegionRecord:
    return RegionRecord(region_id=region_id, tool_type="brushlabels", labels=["circle"], rle=rle, width=width,
                        height=height, area=1, fields={"category": "circle", "attributes": ["red"]},
                        content_hash=f"h-{region_id}")  # fmt: skip


def broken_project(tiny_models, file_store, model_dir: Path, project: int, *, lora: str, images: int = 14):
    """A project of ``images`` annotated images whose stored regions then go bad in every way training meets.

    Returns the runtime, its test client, the task ids per scene, and the expected skips by reason.
    """
    settings = Settings.from_env(
        {}, model_dir=model_dir, label_studio_url=file_store.url, label_studio_api_key=API_KEY,
        osprey_model="tiny", sam_model="tiny", train_every=0, lora=lora,
    )  # fmt: skip
    runtime = build_runtime(settings, models=tiny_models)
    client = create_app(runtime).test_client()
    assert (
        client.post("/setup", json={"project": f"{project}.1700000000", "schema": CONFIG}).status_code == 200
    )
    scenes = make_scenes(images, seed=21)
    tasks, paths = [], []
    for i, scene in enumerate(scenes):
        task_id = project * 100 + i
        path = file_store.add(f"/data/upload/{project}/shapes{i}.png", png(scene.image))
        event = annotation_event(accepted_result(scene, task_id), annotation_id=project * 1000 + i, task_id=task_id,
                                 project_id=project, label_config=CONFIG, image=path)  # fmt: skip
        assert delivered(client, runtime, event)["status"] == "stored"
        tasks.append(task_id)
        paths.append(path)
    # Regions written to the store as an older backend, a disk fault or an import could leave them.
    good = paths[GOOD]
    for n, (image_ref, region) in enumerate(
        [
            (good, stored_region("corrupt", [3, 1, 4, 1, 5, 9, 2, 6])),  # not brush RLE of a 128x128 mask
            (good, stored_region("empty", encode_brush_rle(np.zeros((128, 128), bool)))),
            (None, stored_region("nowhere", encode_brush_rle(scenes[GOOD].masks[0]))),
        ]
    ):
        record = AnnotationRecord(project_id=str(project), annotation_id=project * 1000 + 90 + n,
                                  task_id=project * 100 + 90 + n, state="accepted", updated_ts=time.time(),
                                  content_hash=f"c{n}", image_ref=image_ref, regions=[region])  # fmt: skip
        assert runtime.store.write_annotation(record).status == "stored"
    del file_store.files[paths[GONE]]  # deleted in Label Studio: HTTP 404 from now on
    file_store.add(paths[RESIZED], png(np.full((96, 128, 3), 90, np.uint8)))  # replaced by another size
    expected = {
        "image_gone": len(scenes[GONE].masks),
        "size_mismatch": len(scenes[RESIZED].masks),
        "mask_undecodable": 1,
        "mask_empty": 1,
        "no_image": 1,
    }
    usable = sum(len(s.masks) for s in scenes) - expected["image_gone"] - expected["size_mismatch"]
    return runtime, client, tasks, paths, scenes, expected, usable


def run(runtime, job_id: str):
    job = runtime.workers["training"].run_once()
    assert job is not None and job.job_id == job_id
    done = runtime.queue.job(job_id)
    assert done.status == "done", done.error
    return done.result


def test_the_head_job_skips_bad_regions_reports_them_and_trains_on_the_rest(
    tiny_models, file_store, tmp_path
):
    runtime, client, tasks, paths, scenes, expected, usable = broken_project(
        tiny_models, file_store, tmp_path, 41, lora="false"
    )
    queued = delivered(client, runtime, {"action": "START_TRAINING", "project": {"id": 41}})
    outcome = run(runtime, queued["job_id"])

    assert outcome["status"] in ("promoted", "not promoted"), outcome
    skipped = outcome["skipped_examples"]
    assert skipped["by_reason"] == expected and skipped["total"] == sum(expected.values())
    info = runtime.registry.info("41", outcome["version"])
    assert info.train_examples + info.heldout_examples == usable and info.heldout_examples > 0
    named = {(e["reason"], e["task_id"]): e["detail"] for e in skipped["examples"]}
    assert "HTTP 404" in named[("image_gone", tasks[GONE])]
    assert "128x128 image, the image is 128x96" in named[("size_mismatch", tasks[RESIZED])]
    assert "brush rle" in named[("mask_undecodable", 4190)]
    assert ("mask_empty", 4191) in named and ("no_image", 4192) in named
    assert all(e["reason"] in SKIP_REASONS for e in skipped["examples"])

    metrics = client.get("/metrics").json["training"]["skipped_examples"]["41"]
    assert metrics == {
        "train": {"job_id": queued["job_id"], "finished_at": metrics["train"]["finished_at"],
                  "total": skipped["total"], "by_reason": expected},
    }  # fmt: skip

    # Nothing was removed from the store: once the image is back, the next job uses its regions again.
    file_store.add(paths[GONE], png(scenes[GONE].image))
    again = delivered(client, runtime, {"action": "START_TRAINING", "project": {"id": 41}})
    outcome = run(runtime, again["job_id"])
    assert "image_gone" not in outcome["skipped_examples"]["by_reason"]
    info = runtime.registry.info("41", outcome["version"])
    assert info.train_examples + info.heldout_examples == usable + expected["image_gone"]
    assert (
        "image_gone"
        not in client.get("/metrics").json["training"]["skipped_examples"]["41"]["train"]["by_reason"]
    )


def test_the_lora_job_skips_bad_regions_and_trains_on_the_rest(tiny_models, file_store, tmp_path):
    runtime, client, _, _, _, expected, _ = broken_project(
        tiny_models, file_store, tmp_path, 42, lora="true", images=7
    )
    job_id = runtime.queue.enqueue("42", "lora", {"reason": "test"})
    outcome = run(runtime, job_id)

    assert outcome["status"] in ("promoted", "not promoted"), outcome
    assert outcome["skipped_examples"]["by_reason"] == expected
    assert (runtime.registry.path("42", outcome["version"]) / "lora" / "adapter.safetensors").is_file()
    info = runtime.registry.info("42", outcome["version"])
    assert info.train_examples > 0 and info.heldout_examples > 0
    metrics = client.get("/metrics").json["training"]["skipped_examples"]["42"]
    assert metrics["lora"]["by_reason"] == expected and metrics["lora"]["job_id"] == job_id


def test_a_project_whose_regions_all_went_bad_is_skipped_with_the_reasons(tiny_models, file_store, tmp_path):
    runtime, client, tasks, paths, scenes, expected, usable = broken_project(
        tiny_models, file_store, tmp_path, 43, lora="false"
    )
    for path in paths:
        file_store.files.pop(path, None)
    queued = delivered(client, runtime, {"action": "START_TRAINING", "project": {"id": 43}})
    outcome = run(runtime, queued["job_id"])
    assert outcome["status"] == "skipped" and "0 usable accepted regions" in outcome["reason"]
    by_reason = outcome["skipped_examples"]["by_reason"]
    assert by_reason == {"image_gone": sum(len(s.masks) for s in scenes) + 2, "no_image": 1}
    assert runtime.registry.versions("43") == []


def test_skip_reports_name_a_few_regions_per_reason_and_refuse_unknown_reasons(
    tiny_models, file_store, tmp_path
):
    runtime, *_ = broken_project(tiny_models, file_store, tmp_path, 44, lora="false")
    report = SkipReport(max_named=1)
    groups = list(usable_regions(runtime.store.accepted_regions("44"), runtime.loader, report))
    assert sum(len(g.regions) for g in groups) + report.total == runtime.store.count_accepted("44")
    assert all(m.shape == g.rgb.shape[:2] and m.any() for g in groups for m in g.masks)
    assert len(report.as_dict()["examples"]) == len(report.counts)  # one named per reason
    with pytest.raises(ValueError, match="unknown skip reason 'gone'"):
        report.skip(runtime.store.accepted_regions("44")[0], "gone", "")
