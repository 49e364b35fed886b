"""Schema discovery on the shipped label configs and on configs that must be refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.schema import (
    SchemaError,
    default_field_for_name,
    describe_schema,
    parse_field_map,
    parse_label_config,
)

CONFIGS = Path(__file__).resolve().parents[3] / "label_configs"

EXPECTED = {
    "brush_full.xml": (
        "BrushLabels",
        {"category": "category", "part": "part", "attributes": "attributes", "caption": "caption"}
        | {"description": "description"},
    ),
    "polygon_full.xml": (
        "PolygonLabels",
        {"category": "category", "part": "part", "attributes": "attributes", "caption": "caption"}
        | {"description": "description"},
    ),
    "interactive_sam.xml": ("BrushLabels", {"category": "category", "caption": "caption"}),
    "captions_only.xml": ("BrushLabels", {"caption": "caption", "description": "description"}),
}


def view(body: str) -> str:
    return f'<View><Image name="img" value="$picture"/>{body}</View>'


BRUSH = '<BrushLabels name="mask" toName="img"><Label value="cat"/><Label value="dog"/></BrushLabels>'


def test_every_shipped_config_is_listed_and_readable_by_the_sdk():
    assert sorted(p.name for p in CONFIGS.glob("*.xml")) == sorted(EXPECTED)
    readme = (CONFIGS / "README.md").read_text()
    for name in EXPECTED:
        interface = LabelInterface((CONFIGS / name).read_text())
        interface.validate()
        assert name in readme
        assert [obj.tag for obj in interface.objects] == ["Image"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_config_mapping(name):
    schema = parse_label_config((CONFIGS / name).read_text())
    tool_type, mapping = EXPECTED[name]
    assert (schema.image_name, schema.image_data_key) == ("image", "image")
    assert schema.output_tool.tag_type == tool_type and schema.output_tool.smart
    assert {spec.field: spec.from_name for spec in schema.fields} == mapping
    assert all(spec.per_region and spec.to_name == "image" for spec in schema.fields)
    assert schema.interactive
    json.dumps(schema.to_dict())


def test_brush_full_label_sets_and_multiplicity():
    schema = parse_label_config((CONFIGS / "brush_full.xml").read_text())
    category, attributes, caption = (
        schema.field("category"),
        schema.field("attributes"),
        schema.field("caption"),
    )
    assert category.tag_type == "Choices" and not category.multiple and "traffic light" in category.labels
    assert attributes.multiple and {"red", "occluded"} <= set(attributes.labels)
    assert caption.tag_type == "TextArea" and caption.labels == [] and not caption.is_closed_set
    assert schema.output_tool.labels[:2] == ["person", "vehicle"]
    assert schema.click_tools == [] and schema.warnings == []


def test_interactive_config_has_click_tool():
    schema = parse_label_config((CONFIGS / "interactive_sam.xml").read_text())
    (click,) = schema.click_tools
    assert (click.from_name, click.tag_type, click.result_type, click.smart) == (
        "click",
        "KeyPointLabels",
        "keypointlabels",
        True,
    )
    assert schema.output_tool.from_name == "mask" and schema.field("part") is None


def test_tool_labels_become_the_category_when_no_choices_maps_to_it():
    schema = parse_label_config(view(BRUSH + '<TextArea name="notes" toName="img" perRegion="true"/>'))
    category = schema.field("category")
    assert (category.from_name, category.tag_type, category.labels) == ("mask", "BrushLabels", ["cat", "dog"])
    assert schema.field("caption").from_name == "notes"  # an unrecognised per-region TextArea
    assert any("interactive refinement is off" in warning for warning in schema.warnings)


def test_single_label_tool_is_not_a_category_field():
    schema = parse_label_config(
        view('<BrushLabels name="m" toName="img"><Label value="region"/></BrushLabels>')
    )
    assert schema.fields == [] and schema.output_tool.labels == ["region"]


def test_label_alias_is_the_stored_value():
    xml = view(
        '<RectangleLabels name="box" toName="img"><Label value="Car" alias="car"/><Label value="Bus"/></RectangleLabels>'
    )
    assert parse_label_config(xml).output_tool.labels == ["car", "Bus"]


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("category", "category"),
        ("region_category", "category"),
        ("regionCategory", "category"),
        ("Object-Class", "category"),
        ("object_part", "part"),
        ("subpart", "part"),
        ("attrs", "attributes"),
        ("region.tags", "attributes"),
        ("object_short_description", "caption"),
        ("summary", "caption"),
        ("long_description", "description"),
        ("region_details", "description"),
        ("notes", None),
        ("category_notes", None),
    ],
)
def test_default_name_matching(name, field):
    assert default_field_for_name(name) == field


def test_parse_field_map():
    assert parse_field_map(" my_choices = category , notes=Description,junk=none ") == {
        "my_choices": "category",
        "notes": "description",
        "junk": "none",
    }
    assert parse_field_map("") == {} and parse_field_map(None) == {}
    with pytest.raises(SchemaError, match="unknown field 'colour'"):
        parse_field_map("a=colour")
    with pytest.raises(SchemaError, match="TAG_NAME=FIELD"):
        parse_field_map("justaname")
    with pytest.raises(SchemaError, match="twice"):
        parse_field_map("a=caption,a=description")


def test_explicit_map_overrides_names():
    xml = view(
        BRUSH
        + '<Choices name="kind" toName="img" perRegion="true"><Choice value="tabby"/><Choice value="pug"/></Choices>'
        + '<TextArea name="notes" toName="img" perRegion="true"/>'
        + '<TextArea name="caption" toName="img" perRegion="true"/>'
    )
    schema = parse_label_config(xml, field_map={"kind": "category", "notes": "caption", "caption": "none"})
    assert schema.field("category").labels == ["tabby", "pug"]
    assert schema.field("caption").from_name == "notes"


def test_whole_task_tags_are_flagged_and_per_region_wins():
    xml = view(
        BRUSH
        + '<TextArea name="caption" toName="img"/>'
        + '<TextArea name="region_caption" toName="img" perRegion="true"/>'
        + '<TextArea name="description" toName="img"/>'
    )
    schema = parse_label_config(xml)
    assert (schema.field("caption").from_name, schema.field("caption").per_region) == ("region_caption", True)
    assert schema.field("description").per_region is False
    assert any("whole-task tag 'caption'" in warning for warning in schema.warnings)


def test_extra_smart_rectangle_is_a_prompt_tool():
    xml = view(
        BRUSH + '<RectangleLabels name="box" toName="img" smart="true"><Label value="cat"/></RectangleLabels>'
    )
    schema = parse_label_config(xml)
    assert schema.output_tool.from_name == "mask"
    assert [tool.from_name for tool in schema.extra_tools] == ["box"] and schema.interactive


@pytest.mark.parametrize(
    ("xml", "field_map", "message"),
    [
        ("<View><Text name='t' value='$text'/></View>", None, "no <Image> tag"),
        (view('<Choices name="category" toName="img"><Choice value="a"/></Choices>'), None, "no region tool"),
        (
            view('<KeyPointLabels name="kp" toName="img" smart="true"><Label value="a"/></KeyPointLabels>'),
            None,
            "nowhere to put the regions",
        ),
        (view('<Brush name="b" toName="img"/>'), None, "nothing to fill"),
        (view(BRUSH), {"missing": "caption"}, "not in the label config"),
        (
            view(
                BRUSH + '<TextArea name="caption" toName="img" perRegion="true"/><TextArea name="summary" '
                'toName="img" perRegion="true"/>'
            ),
            None,
            "two tags map to field 'caption'",
        ),
        (
            view(BRUSH + '<TextArea name="notes" toName="img" perRegion="true"/>'),
            {"notes": "category"},
            "needs a Choices",
        ),
        (view(BRUSH + '<TextArea name="category" toName="img" perRegion="true"/>'), None, "needs a Choices"),
        (
            view(
                BRUSH + '<Choices name="category" toName="img" perRegion="true" choice="multiple">'
                '<Choice value="a"/></Choices>'
            ),
            None,
            'choice="multiple"',
        ),
        (
            view(
                BRUSH + '<Choices name="caption" toName="img" perRegion="true"><Choice value="a"/></Choices>'
            ),
            None,
            "needs a TextArea",
        ),
        ('<View><Image name="img" value="http://x/a.png"/>' + BRUSH + "</View>", None, "task data reference"),
        ("<View><Image name='img' value='$a'>", None, "not well-formed"),
    ],
)
def test_unservable_configs_are_refused(xml, field_map, message):
    with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace("*", r"\*")):
        parse_label_config(xml, field_map=field_map)


@pytest.mark.parametrize(
    "xml",
    [
        '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><View>&b;</View>',
        '<!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><View><Header value="&x;"/></View>',
        '<!DOCTYPE View SYSTEM "http://example.com/x.dtd"><View/>',
    ],
)
def test_dtd_and_entities_are_refused(xml):
    with pytest.raises(SchemaError, match="DTD or entities"):
        parse_label_config(xml)


def test_describe_schema_lists_every_field():
    text = describe_schema(parse_label_config((CONFIGS / "interactive_sam.xml").read_text()))
    assert "Regions written as: BrushLabels 'mask' smart" in text
    assert "Clicks from: KeyPointLabels 'click' smart" in text
    lines = {
        line.split()[0]: line for line in text.splitlines() if line.startswith(("category ", "caption "))
    }
    assert "Choices" in lines["category"] and "one of: person" in lines["category"]
    assert "TextArea" in lines["caption"] and "free text" in lines["caption"]
    assert "Not asked for: part, attributes, description" in text


def test_smart_on_a_label_makes_the_tool_smart():
    xml = view(
        BRUSH + '<KeyPointLabels name="kp" toName="img"><Label value="cat" smart="true"/></KeyPointLabels>'
    )
    schema = parse_label_config(xml)
    assert schema.click_tools[0].smart and not schema.output_tool.smart and schema.interactive


def test_explicit_map_wins_over_names_and_is_checked():
    xml = view(
        BRUSH
        + '<TextArea name="category" toName="img" perRegion="true"/>'
        + '<Choices name="kind" toName="img" perRegion="true"><Choice value="tabby"/><Choice value="pug"/></Choices>'
    )
    schema = parse_label_config(xml, field_map={"kind": "category"})
    assert schema.field("category").from_name == "kind"
    assert any("'category' matches field 'category' by name" in warning for warning in schema.warnings)
    with pytest.raises(SchemaError, match="needs a Choices"):
        parse_label_config(xml, field_map={"category": "category"})
    twice = xml.replace(
        "</View>", '<Choices name="breed" toName="img" perRegion="true"><Choice value="x"/></Choices></View>'
    )
    with pytest.raises(SchemaError, match="maps both 'kind' and 'breed' to field 'category'"):
        parse_label_config(twice, field_map={"kind": "category", "breed": "category"})
    with pytest.raises(SchemaError, match="unknown field 'colour'"):
        parse_label_config(xml, field_map={"kind": "colour"})
    with pytest.raises(SchemaError, match="does not point at image"):
        parse_label_config(
            xml.replace("</View>", '<Text name="t" value="$t"/><TextArea name="tx" toName="t"/></View>'),
            field_map={"tx": "caption"},
        )


def test_generic_labels_tag_is_reported():
    xml = view('<Labels name="lbl" toName="img"><Label value="cat"/></Labels><Brush name="b" toName="img"/>')
    with pytest.raises(SchemaError, match="nothing to fill"):
        parse_label_config(xml)
    schema = parse_label_config(
        xml.replace("</View>", '<TextArea name="caption" toName="img" perRegion="true"/></View>')
    )
    assert any(
        "generic <Labels> tag on 'img' is not used" in w and "BrushLabels" in w for w in schema.warnings
    )
