"""Schema discovery: what a Label Studio label config asks the backend to fill.

``parse_label_config`` reads a project's XML label config and returns a ``ProjectSchema``:

- the ``<Image>`` tag (its name and the task-data key of its ``value="$key"``);
- the region tool whose regions the backend writes (``output_tool``): the first of BrushLabels,
  PolygonLabels, RectangleLabels, Brush, Polygon, Rectangle that points at the image;
- the click tools (KeyPointLabels/KeyPoint) whose ``smart="true"`` clicks drive interactive refinement,
  and any other region tools on the image (``extra_tools``, e.g. a smart RectangleLabels used as a box
  prompt next to a BrushLabels output);
- the fields: ``Choices``/``TextArea`` tags mapped to ``category``, ``part``, ``attributes``,
  ``caption`` and ``description``.

Field mapping rules (``FIELD_ALIASES``): a tag maps to a field when its name, or a trailing part of its
name split on ``_``, ``-``, ``.`` and camelCase, equals one of the field's aliases (longest suffix first,
case-insensitive): ``region_category`` and ``regionCategory`` map to ``category``,
``object_short_description`` maps to ``caption``. An explicit ``field_map`` ({tag name: field}, see
``parse_field_map``) overrides the defaults; the field ``none`` keeps a tag out of the mapping.

A per-region ``TextArea`` whose name maps to no field (``notes``, ``comment``) receives the region's
caption when no other tag does (``OSPREY_FIELD_MAP='notes=none'`` keeps it empty, or map it to another
field); ``ProjectSchema.tags`` says what every tag of the config receives, and why (``/setup`` answers
with it and ``osprey-label check-config`` prints it).

If no ``Choices`` maps to ``category`` and the output tool (``BrushLabels`` etc.) has two or more
labels, those labels are the closed category label set: the schema then holds a synthetic
``category`` field whose ``from_name`` is the output tool itself (the category is written into the
region's own label). A tool with a single label just names every region; it is not a field.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field

from backend.errors import InputError, RequestError

from .roles import TagRole, tag_roles

logger = logging.getLogger(__name__)

FIELDS = ("category", "part", "attributes", "caption", "description")
NO_FIELD = "none"
MAX_CONFIG_CHARS = 5_000_000

FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "category": ("category", "categories", "class", "label", "object"),
    "part": ("part", "parts", "subcategory", "subpart"),
    "attributes": ("attributes", "attribute", "attrs", "properties", "tags"),
    "caption": ("caption", "short_caption", "short_description", "summary"),
    "description": ("description", "detailed_description", "details", "long_description"),
}
_ALIAS_TO_FIELD = {alias: name for name, aliases in FIELD_ALIASES.items() for alias in aliases}

# Tag types (lower case) allowed per field: closed label sets need Choices, free text needs TextArea.
_FIELD_TAG_TYPES = {
    "category": {"choices"},
    "part": {"choices"},
    "attributes": {"choices", "textarea"},
    "caption": {"textarea"},
    "description": {"textarea"},
}
_SINGLE_LABEL_FIELDS = {"category", "part"}

# The result types that carry a region (an area), in order of preference as the output tool: masks
# first, then polygons, then boxes. Every module that asks "is this item a region?" uses this list.
REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels", "brush", "polygon", "rectangle")
CLICK_TYPES = ("keypointlabels", "keypoint")
_CANONICAL_TAG = {
    "brushlabels": "BrushLabels",
    "polygonlabels": "PolygonLabels",
    "rectanglelabels": "RectangleLabels",
    "keypointlabels": "KeyPointLabels",
    "brush": "Brush",
    "polygon": "Polygon",
    "rectangle": "Rectangle",
    "keypoint": "KeyPoint",
    "choices": "Choices",
    "textarea": "TextArea",
}


class SchemaError(InputError):
    """The label config cannot be served (answered 422); the message says why and how to fix the XML."""

    status = 422


@dataclass
class RegionTool:
    """A region control tag on the image.

    ``tag_type`` is the canonical tag name (``"BrushLabels"``); ``result_type`` is the lower-case
    ``type`` Label Studio uses in results (``"brushlabels"``). ``labels`` are the label values (the
    ``alias`` where one is set, as Label Studio stores them); empty for plain Brush/Polygon/...
    """

    from_name: str
    to_name: str
    tag_type: str
    labels: list[str]
    smart: bool

    @property
    def result_type(self) -> str:
        return self.tag_type.lower()


@dataclass
class FieldSpec:
    """One field the backend fills, and the tag whose result carries it.

    ``labels`` is the closed label set (Choice values) or empty for free text (TextArea);
    ``multiple`` is True for ``choice="multiple"``; ``per_region`` is False for whole-task tags.
    ``when_label_value`` copies ``whenLabelValue`` (Label Studio then shows the tag only for regions
    with that label). ``source`` says why the tag has this field (its name, the field map, ...).
    """

    field: str
    from_name: str
    to_name: str
    tag_type: str
    labels: list[str]
    multiple: bool
    per_region: bool
    when_label_value: str | None = None
    source: str = ""

    @property
    def result_type(self) -> str:
        return self.tag_type.lower()

    @property
    def is_closed_set(self) -> bool:
        return self.tag_type.lower() != "textarea"


@dataclass
class ProjectSchema:
    """What a project asks for: the image, the tools on it, and the fields to fill."""

    image_name: str
    image_data_key: str
    output_tool: RegionTool
    click_tools: list[RegionTool] = dataclass_field(default_factory=list)
    fields: list[FieldSpec] = dataclass_field(default_factory=list)
    warnings: list[str] = dataclass_field(default_factory=list)
    extra_tools: list[RegionTool] = dataclass_field(default_factory=list)
    tags: list[TagRole] = dataclass_field(default_factory=list)

    def field(self, name: str) -> FieldSpec | None:
        """The spec of field ``name`` (one of ``FIELDS``), or None when the config does not ask for it."""
        return next((spec for spec in self.fields if spec.field == name), None)

    @property
    def field_names(self) -> list[str]:
        return [spec.field for spec in self.fields]

    @property
    def interactive(self) -> bool:
        """True when some tool on the image has ``smart="true"`` (Label Studio then sends context)."""
        return any(tool.smart for tool in [self.output_tool, *self.click_tools, *self.extra_tools])

    def image_reference(self, task) -> str:
        """The task's image reference (URL, upload path or data URI) under the Image tag's value;
        RequestError naming the key when the task has none."""
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            raise RequestError("each task must be an object with a 'data' object")
        reference = data.get(self.image_data_key)
        if not isinstance(reference, str) or not reference:
            raise RequestError(
                f"task data has no image under '{self.image_data_key}' (the Image tag's value)"
            )
        return reference

    def to_dict(self) -> dict:
        return asdict(self)

    def tag_roles(self) -> list[dict]:
        """``[{"tag", "tag_type", "receives", "reason"}]`` for every control tag, in config order."""
        return [asdict(role) for role in self.tags]


def parse_field_map(text: str | None) -> dict[str, str]:
    """Parse ``"my_choices=category, notes=description"`` into ``{tag name: field}``.

    Fields are the names in ``FIELDS`` or ``none`` (keep the tag out of the mapping). Empty or None
    text gives an empty map. Raises SchemaError on malformed items, unknown fields or repeated tags.
    """
    mapping: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        tag, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not tag or not target:
            raise SchemaError(
                f"field map item {item!r} is not of the form TAG_NAME=FIELD, e.g. 'my_choices=category'"
            )
        target = target.lower()
        if target not in FIELDS and target != NO_FIELD:
            raise SchemaError(
                f"field map item {item!r}: unknown field {target!r}; expected one of {', '.join(FIELDS)} or 'none'"
            )
        if tag in mapping:
            raise SchemaError(f"field map names tag {tag!r} twice; give each tag one field")
        mapping[tag] = target
    return mapping


def default_field_for_name(tag_name: str) -> str | None:
    """The field a tag name maps to by default (longest matching name suffix), or None."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", tag_name)
    tokens = [token for token in re.split(r"[^0-9a-zA-Z]+", spaced.lower()) if token]
    for start in range(len(tokens)):
        found = _ALIAS_TO_FIELD.get("_".join(tokens[start:]))
        if found:
            return found
    return None


def parse_label_config(xml: str, *, field_map: dict[str, str] | None = None) -> ProjectSchema:
    """Discover the image, region tools and fields of a label config (see the module docstring).

    Raises SchemaError when the backend cannot serve the config: XML that does not parse or that has
    a DTD/entities; no Image tag; no region tool for the image; nothing to fill (no field and no
    labels); a ``field_map`` tag that does not exist; two tags for one field; a tag type that cannot
    carry its field (a TextArea for ``category``, a multiple-choice ``category``).
    """
    interface = _load_interface(xml)
    controls = list(interface.controls or [])
    image_name, data_key = _find_image(interface, controls)
    tools = [_region_tool(control, image_name) for control in controls if _targets(control, image_name)]
    tools = [tool for tool in tools if tool is not None]
    warnings: list[str] = []
    output, clicks, extra = _split_tools(tools, image_name, warnings)
    if any((c.tag or "").lower() == "labels" and _targets(c, image_name) for c in controls):
        warnings.append(
            f"the generic <Labels> tag on {image_name!r} is not used; put the labels inside the "
            f"{output.tag_type.removesuffix('Labels')}Labels tag instead"
        )
    fields = _map_fields(controls, image_name, output, field_map or {}, warnings)
    if not fields and not output.labels:
        raise SchemaError(
            f"the label config gives the backend nothing to fill: the {output.tag_type} tag "
            f"{output.from_name!r} has no labels and no Choices/TextArea tag on image {image_name!r} maps to "
            f'a field; add <Label> values to the region tool or a per-region <Choices name="category" ...>'
        )
    for message in warnings:
        logger.info("label config: %s", message)
    return ProjectSchema(
        image_name=image_name,
        image_data_key=data_key,
        output_tool=output,
        click_tools=clicks,
        fields=fields,
        warnings=warnings,
        extra_tools=extra,
        tags=tag_roles(
            controls,
            image_name,
            output=output,
            clicks=clicks,
            extra=extra,
            fields=fields,
            left_out={tag for tag, field in (field_map or {}).items() if field == NO_FIELD},
            names=_CANONICAL_TAG,
        ),  # fmt: skip
    )


def _load_interface(xml: str):
    """Parse with label-studio-sdk's LabelInterface after refusing DTDs and entities (XXE, billion laughs)."""
    import defusedxml.ElementTree as safe_et
    from defusedxml import DefusedXmlException

    if not isinstance(xml, str) or not xml.strip():
        raise SchemaError(f"the label config must be a non-empty XML string, got {type(xml).__name__}")
    if len(xml) > MAX_CONFIG_CHARS:
        raise SchemaError(
            f"the label config has {len(xml)} characters; at most {MAX_CONFIG_CHARS} are accepted"
        )
    try:
        safe_et.fromstring(xml, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as error:
        raise SchemaError(
            f"the label config declares a DTD or entities ({type(error).__name__}); remove the <!DOCTYPE>/"
            f"<!ENTITY> lines, Label Studio configs do not need them"
        ) from None
    except safe_et.ParseError as error:
        raise SchemaError(f"the label config is not well-formed XML: {error}") from None
    from label_studio_sdk.label_interface import LabelInterface

    try:
        return LabelInterface(xml)
    except Exception as error:  # the SDK raises bare Exception subclasses of its own
        raise SchemaError(f"label-studio-sdk could not read the label config: {error}") from None


def _targets(control, image_name: str) -> bool:
    return image_name in (control.to_name or [])


def _find_image(interface, controls) -> tuple[str, str]:
    images = [obj for obj in (interface.objects or []) if (obj.tag or "").lower() == "image"]
    if not images:
        raise SchemaError(
            "the label config has no <Image> tag; the backend labels image regions, add "
            '<Image name="image" value="$image"/>'
        )
    region_types = set(REGION_TYPES) | set(CLICK_TYPES)
    used = [
        image
        for image in images
        if any((c.tag or "").lower() in region_types and _targets(c, image.name) for c in controls)
    ]
    if not used:
        names = ", ".join(repr(image.name) for image in images)
        raise SchemaError(
            f"no region tool points at the image ({names}); add e.g. "
            f'<BrushLabels name="label" toName="{images[0].name}"> with <Label> values'
        )
    image = used[0]
    value = image.attr.get("valueList") or image.attr.get("value") or ""
    if image.attr.get("valueList"):
        raise SchemaError(
            f'<Image name={image.name!r}> uses valueList (several images per task); use value="$image"'
        )
    if not value.startswith("$") or len(value) < 2:
        raise SchemaError(
            f'<Image name={image.name!r}> has value={value!r}; expected a task data reference like value="$image"'
        )
    return image.name, value[1:]


def _region_tool(control, image_name: str) -> RegionTool | None:
    tag = (control.tag or "").lower()
    if tag not in REGION_TYPES and tag not in CLICK_TYPES:
        return None
    return RegionTool(
        from_name=control.name,
        to_name=image_name,
        tag_type=_CANONICAL_TAG[tag],
        labels=list(control.labels or []),
        smart=_is_smart(control),
    )


def _is_smart(control) -> bool:
    """``smart="true"`` on the tag, or on one of its ``<Label>`` children (both enable smart mode)."""
    labels = (control.labels_attrs or {}).values()
    attrs = [control.attr, *(getattr(label, "attr", None) or {} for label in labels)]
    return any(str(attr.get("smart", "")).lower() == "true" for attr in attrs)


def _split_tools(tools: list[RegionTool], image_name: str, warnings: list[str]):
    clicks = [tool for tool in tools if tool.result_type in CLICK_TYPES]
    outputs = sorted(
        (tool for tool in tools if tool.result_type in REGION_TYPES),
        key=lambda tool: REGION_TYPES.index(tool.result_type),
    )
    if not outputs:
        raise SchemaError(
            f"the label config has no Brush/Polygon/Rectangle(Labels) tag on image {image_name!r}, so the "
            f'backend has nowhere to put the regions it returns; add e.g. <BrushLabels name="label" '
            f'toName="{image_name}" smart="true"> next to the KeyPointLabels'
        )
    output, extra = outputs[0], outputs[1:]
    for tool in extra:
        role = "used as a prompt in interactive mode" if tool.smart else "not written by the backend"
        warnings.append(
            f"{tool.tag_type} {tool.from_name!r} is {role}; regions are returned as "
            f"{output.tag_type} {output.from_name!r}"
        )
    if not output.smart and not any(tool.smart for tool in clicks + extra):
        warnings.append(
            'no tool has smart="true": interactive refinement is off (batch pre-labelling still works)'
        )
    return output, clicks, extra


def _map_fields(controls, image_name, output: RegionTool, field_map: dict[str, str], warnings):
    by_name = {control.name: control for control in controls}
    for tag_name, target in field_map.items():
        if tag_name not in by_name:
            raise SchemaError(
                f"field map names tag {tag_name!r}, which is not in the label config; "
                f"tags: {', '.join(sorted(by_name)) or '(none)'}"
            )
        if target not in FIELDS and target != NO_FIELD:
            raise SchemaError(
                f"field map gives tag {tag_name!r} the unknown field {target!r}; expected one of "
                f"{', '.join(FIELDS)} or 'none'"
            )
        if target != NO_FIELD and not _targets(by_name[tag_name], image_name):
            raise SchemaError(f"field map tag {tag_name!r} does not point at image {image_name!r} (toName)")
    chosen: dict[str, FieldSpec] = {}
    explicit_fields: set[str] = set()
    unnamed_texts = []  # per-region TextAreas no name matches: the first gets the caption if free
    for control in controls:  # explicit mappings first: they win over names
        target = field_map.get(control.name, NO_FIELD)
        if target != NO_FIELD:
            spec = _field_spec(control, target, image_name, explicit=True)
            if target in chosen:
                raise SchemaError(
                    f"OSPREY_FIELD_MAP maps both {chosen[target].from_name!r} and {control.name!r} to field "
                    f"{target!r}; map each field once"
                )
            chosen[target] = spec
            explicit_fields.add(target)
    for control in controls:
        tag = (control.tag or "").lower()
        if (
            control.name in field_map
            or tag not in ("choices", "textarea")
            or not _targets(control, image_name)
        ):
            continue
        target = default_field_for_name(control.name)
        if target is None and tag == "textarea" and _per_region(control):
            unnamed_texts.append(control)
        elif target is None:
            warnings.append(
                f"{_CANONICAL_TAG[tag]} {control.name!r} is not mapped to any field; rename it or map it "
                f"with OSPREY_FIELD_MAP='{control.name}=<field>'"
            )
        elif target in explicit_fields:
            warnings.append(
                f"{control.name!r} matches field {target!r} by name, but OSPREY_FIELD_MAP gives that field to "
                f"{chosen[target].from_name!r}; {control.name!r} is not filled"
            )
        else:
            _add_field(chosen, _field_spec(control, target, image_name, explicit=False), warnings)
    for control in unnamed_texts:
        if "caption" not in chosen:
            spec = _field_spec(control, "caption", image_name, explicit=False)
            spec.source = (
                f"a per-region TextArea whose name matches no field gets the caption by default "
                f"(OSPREY_FIELD_MAP='{control.name}=none' leaves it empty)"
            )
            chosen["caption"] = spec
        else:
            warnings.append(
                f"TextArea {control.name!r} is not mapped to any field and the caption goes to "
                f"{chosen['caption'].from_name!r}; it is left empty (map it with "
                f"OSPREY_FIELD_MAP='{control.name}=<field>')"
            )
    if "category" not in chosen and len(output.labels) > 1:
        chosen["category"] = FieldSpec(
            field="category",
            from_name=output.from_name,
            to_name=image_name,
            tag_type=output.tag_type,
            labels=list(output.labels),
            multiple=False,
            per_region=True,
            source=f"the {output.tag_type} labels are the category label set (no Choices maps to category)",
        )
    return [chosen[name] for name in FIELDS if name in chosen]


def _per_region(control) -> bool:
    return str(control.attr.get("perRegion", "")).lower() == "true"


def _field_spec(control, target: str, image_name: str, explicit: bool) -> FieldSpec:
    tag = (control.tag or "").lower()
    how = "mapped by OSPREY_FIELD_MAP" if explicit else "mapped by its name"
    source = f"OSPREY_FIELD_MAP='{control.name}={target}'" if explicit else "its name"
    fix = f"rename the tag or set OSPREY_FIELD_MAP='{control.name}=<field or none>'"
    if tag not in _FIELD_TAG_TYPES[target]:
        allowed = " or ".join(_CANONICAL_TAG[t] for t in sorted(_FIELD_TAG_TYPES[target]))
        raise SchemaError(
            f"{control.tag} {control.name!r} is {how} to field {target!r}, which needs a {allowed} tag; {fix}"
        )
    multiple = str(control.attr.get("choice", "")).lower() == "multiple"
    if target in _SINGLE_LABEL_FIELDS and multiple:
        raise SchemaError(
            f'Choices {control.name!r} has choice="multiple" but is {how} to field {target!r}, which takes '
            f'one label; remove choice="multiple" or map it to attributes; {fix}'
        )
    labels = list(control.labels or []) if tag == "choices" else []
    if tag == "choices" and not labels:
        raise SchemaError(
            f"Choices {control.name!r} ({target}) has no <Choice> values (dynamic choices are not supported); "
            f"list the label set in the XML"
        )
    return FieldSpec(
        field=target,
        from_name=control.name,
        to_name=image_name,
        tag_type=_CANONICAL_TAG[tag],
        labels=labels,
        multiple=multiple,
        per_region=_per_region(control),
        when_label_value=control.attr.get("whenLabelValue") or None,
        source=source,
    )


def _add_field(chosen: dict[str, FieldSpec], spec: FieldSpec, warnings: list[str]) -> None:
    previous = chosen.get(spec.field)
    if previous is None:
        chosen[spec.field] = spec
        return
    if previous.per_region != spec.per_region:
        keep, drop = (previous, spec) if previous.per_region else (spec, previous)
        chosen[spec.field] = keep
        warnings.append(
            f"whole-task tag {drop.from_name!r} also matches field {spec.field!r}; the per-region tag "
            f"{keep.from_name!r} is used"
        )
        return
    raise SchemaError(
        f"two tags map to field {spec.field!r} by name: {previous.from_name!r} and {spec.from_name!r}; "
        f"rename one, or set OSPREY_FIELD_MAP='{spec.from_name}=none' (or another field)"
    )


def describe_schema(schema: ProjectSchema) -> str:
    """A human-readable table of the mapping (``osprey-label check-config FILE.xml`` prints it)."""
    out = [f"Image: {schema.image_name!r} (task data key {schema.image_data_key!r})"]

    def tool_line(role: str, tool: RegionTool) -> str:
        labels = ", ".join(tool.labels) if tool.labels else "(no labels)"
        return f"{role}: {tool.tag_type} {tool.from_name!r}{' smart' if tool.smart else ''} - {labels}"

    out.append(tool_line("Regions written as", schema.output_tool))
    out.extend(tool_line("Clicks from", tool) for tool in schema.click_tools)
    out.extend(tool_line("Other region tool", tool) for tool in schema.extra_tools)
    out.append(f"Interactive (smart tools): {'yes' if schema.interactive else 'no'}")
    rows = [("field", "tag", "type", "scope", "labels")]
    for spec in schema.fields:
        if spec.labels:
            shown = ", ".join(spec.labels[:8]) + (
                f", ... ({len(spec.labels)} in all)" if len(spec.labels) > 8 else ""
            )
            labels = ("any of: " if spec.multiple else "one of: ") + shown
        else:
            labels = "free text"
        scope = "per region" if spec.per_region else "whole task"
        rows.append((spec.field, spec.from_name, spec.tag_type, scope, labels))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        out.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        )
    missing = [name for name in FIELDS if schema.field(name) is None]
    if missing:
        out.append(f"Not asked for: {', '.join(missing)}")
    if schema.tags:
        out.append("Each tag receives:")
        width = max(len(role.tag) for role in schema.tags)
        kinds = max(len(role.tag_type) for role in schema.tags)
        out.extend(
            f"  {role.tag.ljust(width)}  {role.tag_type.ljust(kinds)}  {role.receives}: {role.reason}"
            for role in schema.tags
        )
    out.extend(f"Warning: {message}" for message in schema.warnings)
    return "\n".join(out)
