"""What each tag of a label config receives: an unrecognised per-region TextArea gets the region caption
(unless the field map says otherwise), and ``/setup`` and ``osprey-label check-config`` say what every
tag gets, on real XML configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from http_app import served
from lsfakes import API_KEY, scene_png

from backend.cli import main
from backend.labelstudio.schema import parse_label_config
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings
from backend.service.app import create_app

CONFIGS = Path(__file__).resolve().parents[3] / "label_configs"

NOTES = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="label" toName="image" smart="true">
    <Label value="person"/><Label value="vehicle"/><Label value="animal"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="object"/></KeyPointLabels>
  <TextArea name="notes" toName="image" perRegion="true" editable="true" maxSubmissions="1"/>
  <TextArea name="remarks" toName="image" editable="true"/>
  <Choices name="quality" toName="image" perRegion="true"><Choice value="good"/><Choice value="poor"/></Choices>
</View>"""


def roles(xml: str, **kwargs) -> dict[str, tuple[str, str]]:
    schema = parse_label_config(xml, **kwargs)
    return {role["tag"]: (role["receives"], role["reason"]) for role in schema.tag_roles()}


def test_an_unrecognised_per_region_textarea_receives_the_caption():
    got = roles(NOTES)
    assert got["notes"][0] == "caption" and "by default" in got["notes"][1]
    assert got["label"][0] == "regions" and "predicted category" in got["label"][1]
    assert got["click"] == ("nothing", "its smart clicks are the prompt for SAM")
    assert got["remarks"][0] == "nothing" and "OSPREY_FIELD_MAP='remarks=<field>'" in got["remarks"][1]
    assert got["quality"][0] == "nothing"
    assert list(got) == ["label", "click", "notes", "remarks", "quality"]  # every control tag, in order


def test_an_explicit_field_map_wins():
    assert roles(NOTES, field_map={"notes": "description"})["notes"][0] == "description"
    assert roles(NOTES, field_map={"notes": "none"})["notes"] == ("nothing", "OSPREY_FIELD_MAP='notes=none'")
    schema = parse_label_config(NOTES, field_map={"notes": "none"})
    assert schema.field("caption") is None


def test_a_named_caption_keeps_the_caption_and_the_other_textarea_is_left_empty():
    xml = NOTES.replace(
        '<TextArea name="remarks"',
        '<TextArea name="caption" toName="image" perRegion="true"/><TextArea name="r"',
    )
    got = roles(xml)
    assert got["caption"][0] == "caption" and got["notes"][0] == "nothing"
    warnings = parse_label_config(xml).warnings
    assert any("'notes' is not mapped to any field and the caption goes to 'caption'" in w for w in warnings)


@pytest.mark.parametrize(
    "name", ["brush_full.xml", "polygon_full.xml", "interactive_sam.xml", "captions_only.xml"]
)
def test_shipped_configs_say_what_every_tag_receives(name):
    schema = parse_label_config((CONFIGS / name).read_text())
    got = {role["tag"]: role["receives"] for role in schema.tag_roles()}
    assert got[schema.output_tool.from_name] == "regions"
    for spec in schema.fields:
        if spec.from_name != schema.output_tool.from_name:
            assert got[spec.from_name] == spec.field


def test_check_config_prints_each_tag(tmp_path, capsys):
    path = tmp_path / "notes.xml"
    path.write_text(NOTES)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Each tag receives:" in out
    assert any(line.split()[:3] == ["notes", "TextArea", "caption:"] for line in out.splitlines())
    assert any(line.split()[:3] == ["remarks", "TextArea", "nothing:"] for line in out.splitlines())


@pytest.fixture(scope="module")
def url(tiny_models, file_store, tmp_path_factory):
    settings = Settings.from_env(
        {}, model_dir=tmp_path_factory.mktemp("models"), label_studio_url=file_store.url,
        label_studio_api_key=API_KEY, osprey_model="tiny", sam_model="tiny", points_per_side=4, max_masks=2,
        pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0,
    )  # fmt: skip
    file_store.add("/data/upload/5/scene.png", scene_png(seed=2))
    with served(create_app(build_runtime(settings, models=tiny_models))) as base:
        yield base


def test_setup_answers_with_what_each_tag_receives(url):
    response = requests.post(f"{url}/setup", json={"project": "5.1731000000", "schema": NOTES}, timeout=3)
    assert response.status_code == 200, response.text
    tags = {tag["tag"]: tag for tag in response.json()["tags"]}
    assert tags["notes"]["receives"] == "caption" and tags["notes"]["tag_type"] == "TextArea"
    assert tags["remarks"]["receives"] == "nothing"
    assert response.json()["model_version"]


def test_predictions_fill_the_unrecognised_textarea_with_the_caption(url):
    body = {"tasks": [{"id": 51, "data": {"image": "/data/upload/5/scene.png"}}], "project": "5.1731000000",
            "label_config": NOTES, "params": {"context": None}}  # fmt: skip
    response = requests.post(f"{url}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    items = response.json()["results"][0]["result"]
    regions = {item["id"] for item in items if item["type"] == "brushlabels"}
    notes = [item for item in items if item["from_name"] == "notes"]
    assert regions and notes
    assert {item["id"] for item in notes} <= regions and all(item["value"]["text"][0] for item in notes)
    assert not [item for item in items if item["from_name"] in ("remarks", "quality")]
