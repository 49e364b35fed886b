"""What the backend writes into each control tag of a label config, and why.

``tag_roles`` is called by :func:`backend.labelstudio.schema.parse_label_config` once the tools and
fields are known; ``/setup`` answers with the result (``tags``) and ``osprey-label check-config``
prints it, so a user sees before labelling which tag gets the regions, which a field and which
nothing (with the way to change it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TagRole:
    """What the backend writes into one control tag: ``receives`` is ``"regions"``, a field name
    (``"caption"``, ...) or ``"nothing"``; ``reason`` says why, and how to change it."""

    tag: str
    tag_type: str
    receives: str
    reason: str


def tag_roles(
    controls, image_name: str, *, output, clicks, extra, fields, left_out: set[str], names: dict[str, str]
) -> list[TagRole]:
    """One ``TagRole`` per control tag of the config, in config order.

    ``controls`` are label-studio-sdk control tags; ``output``/``clicks``/``extra`` the schema's region
    tools; ``fields`` its ``FieldSpec`` list; ``left_out`` the tags the field map sets to ``none``;
    ``names`` maps lower-case tag types to their canonical names (``"textarea"`` -> ``"TextArea"``).
    """
    by_tag = {spec.from_name: spec for spec in fields if spec.from_name != output.from_name}
    category_in_tool = any(spec.from_name == output.from_name for spec in fields)
    clicks_by_name = {tool.from_name: tool for tool in clicks}
    extra_by_name = {tool.from_name: tool for tool in extra}
    roles = []
    for control in controls:
        name, tag_type = control.name, names.get((control.tag or "").lower(), control.tag or "")
        if name == output.from_name:
            roles.append(TagRole(name, tag_type, "regions", _region_reason(output, category_in_tool)))
        elif name in by_tag:
            spec = by_tag[name]
            scope = "per region" if spec.per_region else "whole task"
            roles.append(TagRole(name, tag_type, spec.field, f"{scope}; {spec.source}"))
        elif name in clicks_by_name:
            smart = clicks_by_name[name].smart
            why = (
                "its smart clicks are the prompt for SAM"
                if smart
                else 'not smart="true": its clicks are not sent'
            )
            roles.append(TagRole(name, tag_type, "nothing", why))
        elif name in extra_by_name:
            why = (
                "used as a prompt in interactive mode"
                if extra_by_name[name].smart
                else "regions go to the output tool"
            )
            roles.append(TagRole(name, tag_type, "nothing", f"{why} ({output.from_name!r})"))
        elif name in left_out:
            roles.append(TagRole(name, tag_type, "nothing", f"OSPREY_FIELD_MAP='{name}=none'"))
        elif image_name not in (control.to_name or []):
            roles.append(TagRole(name, tag_type, "nothing", f"does not point at image {image_name!r}"))
        else:
            reason = f"matches no field; map it with OSPREY_FIELD_MAP='{name}=<field>'"
            roles.append(TagRole(name, tag_type, "nothing", reason))
    return roles


def _region_reason(output, category_in_tool: bool) -> str:
    if category_in_tool:
        return "the backend's regions, with the predicted category as each region's label"
    if output.labels:
        return "the backend's regions, labelled with the annotator's or the tool's first label"
    return "the backend's regions, unlabelled"
