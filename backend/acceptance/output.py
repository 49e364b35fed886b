"""What ``osprey-label eval acceptance`` (:mod:`backend.cli.acceptance`) shows of the acceptance report of
:mod:`backend.acceptance.report`: the schema of an export, the report built from a file
(``evaluate_export``), its tables (``format_table``) and a PNG chart (``save_chart``, matplotlib).

A JSON export does not include the label config. Without ``--label-config`` the schema is inferred:
a label config is written from the tags the results use (``from_name``, ``to_name``, ``type`` and
the label values seen; a Choices/TextArea tag is per-region when its items share a region's ``id``)
and read with ``parse_label_config``, so the usual name rules and ``--field-map`` apply. The report
says when it was inferred.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from backend.errors import InputError
from backend.labelstudio.schema import REGION_TYPES, ProjectSchema, SchemaError, parse_label_config

from .report import (
    IOU_THRESHOLDS,
    NO_VERSION,
    acceptance_report,
    load_export,
    schema_summary,
)

_TEXT_TYPES = ("choices", "textarea")


# ---- schema inference ----------------------------------------------------------------------------


def _results(tasks: list) -> Iterable[list]:
    """Every annotation and prediction result list of the export."""
    for task in tasks:
        if not isinstance(task, dict):
            continue
        for key in ("annotations", "predictions"):
            entries = task.get(key)
            for entry in entries if isinstance(entries, list) else []:
                result = entry.get("result") if isinstance(entry, dict) else None
                if isinstance(result, list):
                    yield [item for item in result if isinstance(item, dict)]


def infer_label_config(tasks: list) -> str:
    """A label config XML written from the tags the export's results use (see the module docstring).

    Raises ValueError when no result is a brush, polygon or rectangle region.
    """
    tags: dict[str, dict] = {}
    for result in _results(tasks):
        region_ids = {str(i.get("id")) for i in result if str(i.get("type", "")).lower() in REGION_TYPES}
        for item in result:
            kind, name, target = str(item.get("type", "")).lower(), item.get("from_name"), item.get("to_name")
            if (
                kind not in REGION_TYPES + _TEXT_TYPES
                or not isinstance(name, str)
                or not isinstance(target, str)
            ):
                continue
            tag = tags.setdefault(
                name, {"type": kind, "to_name": target, "labels": {}, "multiple": False, "per_region": False}
            )
            if tag["type"] != kind:
                continue  # one name, two types: the first seen wins
            value = item.get("value") if isinstance(item.get("value"), dict) else {}
            labels = value.get(kind) if kind != "textarea" else None
            labels = [labels] if isinstance(labels, str) else labels if isinstance(labels, list) else []
            tag["labels"].update(dict.fromkeys(str(label) for label in labels if isinstance(label, str)))
            tag["multiple"] |= kind == "choices" and len(labels) > 1
            tag["per_region"] |= str(item.get("id")) in region_ids and kind in _TEXT_TYPES
    tools = {name: tag for name, tag in tags.items() if tag["type"] in REGION_TYPES}
    if not tools:
        raise InputError(
            "the export has no brush, polygon or rectangle results, so there are no regions to compare; "
            "check that it is the right project, or pass --label-config FILE.xml"
        )
    image = Counter(tag["to_name"] for tag in tools.values()).most_common(1)[0][0]
    key = _image_key(tasks)
    lines = ["<View>", f"  <Image name={quoteattr(image)} value={quoteattr('$' + key)}/>"]
    for name, tag in tags.items():
        if tag["to_name"] != image:
            continue
        kind = tag["type"]
        tag_name = {"textarea": "TextArea", "choices": "Choices"}.get(kind) or (
            kind[:-6].capitalize() + "Labels" if kind.endswith("labels") else kind.capitalize()
        )
        attrs = f"name={quoteattr(name)} toName={quoteattr(image)}"
        if kind in _TEXT_TYPES and tag["per_region"]:
            attrs += ' perRegion="true"'
        if kind == "choices" and tag["multiple"]:
            attrs += ' choice="multiple"'
        child = "Choice" if kind == "choices" else "Label"
        children = [f"    <{child} value={quoteattr(label)}/>" for label in tag["labels"]]
        if kind == "textarea" or not children:
            lines.append(f"  <{tag_name} {attrs}/>")
        else:
            lines += [f"  <{tag_name} {attrs}>", *children, f"  </{tag_name}>"]
    lines.append("</View>")
    return "\n".join(lines)


def _image_key(tasks: list) -> str:
    for task in tasks:
        data = task.get("data") if isinstance(task, dict) else None
        if isinstance(data, dict) and data:
            strings = [k for k, v in data.items() if isinstance(v, str)]
            return "image" if "image" in strings else (strings or list(data))[0]
    return "image"


def resolve_schema(
    tasks: list, *, label_config: str | None = None, field_map: dict[str, str] | None = None
) -> tuple[ProjectSchema, str | None]:
    """The schema to compare with: from ``label_config`` when given, else inferred from the results.

    Returns ``(schema, inferred_xml)``; ``inferred_xml`` is None when ``label_config`` was given.
    """
    if label_config is not None:
        try:
            return parse_label_config(label_config, field_map=field_map), None
        except SchemaError as error:
            raise InputError(f"the label config cannot be used: {error}") from None
    xml = infer_label_config(tasks)
    try:
        return parse_label_config(xml, field_map=field_map), xml
    except SchemaError as error:
        raise InputError(
            f"the label config inferred from the export's results cannot be used: {error}. Pass the project's "
            f"config with --label-config FILE.xml (Settings > Labeling Interface > Code) or fix the mapping "
            f"with --field-map TAG=FIELD"
        ) from None


def evaluate_export(
    export: str | Path,
    *,
    label_config: str | Path | None = None,
    field_map: dict[str, str] | None = None,
    annotation: str = "latest",
    since: float | None = None,
    until: float | None = None,
) -> dict:
    """Read an export file (and a label config file, else infer it) and build the acceptance report."""
    tasks = load_export(export)
    xml = Path(label_config).read_text() if label_config is not None else None
    schema, inferred = resolve_schema(tasks, label_config=xml, field_map=field_map)
    source = f"label config {label_config}" if xml is not None else "inferred from the export's result items"
    report = acceptance_report(tasks, schema, annotation=annotation, since=since, until=until)
    return {"export": str(export), "schema": schema_summary(schema, source, inferred), **report}


# ---- output ----------------------------------------------------------------------------------------


def _rate(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(rows: list[tuple], right_from: int) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            str(cell).rjust(width) if i >= right_from else str(cell).ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def format_table(report: dict) -> str:
    """The report as plain-text tables (what the command prints)."""
    schema, tasks = report.get("schema") or {}, report["tasks"]
    which = (
        "latest non-cancelled annotation per task" if report["annotation"] == "latest" else "all annotations"
    )
    out = [f"Pre-label acceptance: {report.get('export', 'export')}"]
    if schema:
        tool = schema["output_tool"]
        out.append(
            f"schema: {schema['source']} - regions {tool['type']} {tool['from_name']!r}; fields "
            + (", ".join(f"{name} ({f['tag']})" for name, f in schema["fields"].items()) or "none")
        )
    out.append(
        f"compared: {tasks['annotations_compared']} annotations of {tasks['compared']} tasks ({which}); "
        f"{tasks['in_export']} tasks in the export; {tasks['without_predictions']} compared tasks had no prediction"
    )
    if report["skipped_counts"]:
        out.append(
            "skipped: " + ", ".join(f"{reason}: {n}" for reason, n in report["skipped_counts"].items())
        )
    rows = [("model version", "field", "kept", "edited", "removed", "added", "acceptance")]
    for version, table in (("all", report["fields"]), *report["by_model_version"].items()):
        label = "(no pre-label)" if version == NO_VERSION else version
        for name, c in table.items():
            rows.append(
                (label, name, c["kept"], c["edited"], c["removed"], c["added"], _rate(c["acceptance_rate"]))
            )
    out += ["", *_table(rows, right_from=2)] + (
        ["(no pre-label or region to count)"] if len(rows) == 1 else []
    )
    out.append("acceptance = kept / (kept + edited + removed); 'region' is the mask, kept when IoU >= 0.99")
    iou = report["iou"]
    rows = [("model version", "matched", "by id", "by IoU", "mean IoU", "median", ">=0.5", ">=0.9", ">=0.99")]
    for version, s in (("all", iou["all"]), *iou["by_model_version"].items()):
        rows.append(
            (version, s["by_id"] + s["by_iou"], s["by_id"], s["by_iou"], _rate(s["mean"]), _rate(s["median"]),
             *(_rate(s[f"share_ge_{t}"]) for t in IOU_THRESHOLDS))
        )  # fmt: skip
    out += ["", "Mask IoU of accepted regions matched to a pre-label", *_table(rows, right_from=1)]
    out.append(f"regions with no pre-label (added): {iou['unmatched_regions']}")
    if schema.get("inferred"):
        out.append("note: no --label-config given; the schema was inferred from the export's result items")
    return "\n".join(out)


def save_chart(report: dict, path: str | Path) -> Path:
    """A PNG: stacked kept/edited/removed shares per field and model version, and the mask-IoU histogram."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise InputError("--chart needs matplotlib: pip install matplotlib (or leave out --chart)") from None
    path = Path(path)
    versions = [v for v in report["by_model_version"] if v != NO_VERSION]
    field_names = list(dict.fromkeys(n for v in versions for n in report["by_model_version"][v]))
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    bars, hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colours = {"kept": "#3cb44b", "edited": "#f58231", "removed": "#e6194b"}
    hatches = ["", "//", "..", "xx", "\\\\", "++"]
    width, handles = 0.8 / max(len(versions), 1), []
    for v_index, version in enumerate(versions):
        table = report["by_model_version"][version]
        xs = np.arange(len(field_names)) + (v_index - (len(versions) - 1) / 2) * width
        judged = np.array(
            [sum(table.get(n, {}).get(o, 0) for o in colours) for n in field_names], dtype=float
        )
        bottom = np.zeros(len(field_names))
        for outcome, colour in colours.items():
            counts = np.array([table.get(n, {}).get(outcome, 0) for n in field_names], dtype=float)
            share = np.divide(counts, judged, out=np.zeros_like(counts), where=judged > 0)
            bars.bar(xs, share, width * 0.95, bottom=bottom, color=colour, edgecolor="black", linewidth=0.4,
                     hatch=hatches[v_index % len(hatches)])  # fmt: skip
            bottom += share
        for x, n in zip(xs, judged, strict=True):
            bars.text(x, 1.01, f"n={int(n)}", ha="center", va="bottom", fontsize=7)
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=hatches[v_index % len(hatches)]))
    bars.set_xticks(np.arange(len(field_names)), field_names)
    bars.set(ylim=(0, 1.1), ylabel="share of pre-labels", title="pre-labels per field and model version")
    outcome_handles = [Patch(facecolor=colour, edgecolor="black") for colour in colours.values()]
    fig.legend(outcome_handles + handles, [*colours, *versions], loc="lower center", ncol=3 + len(versions),
               fontsize=8, frameon=False)  # fmt: skip
    edges = np.linspace(0, 1, 21)
    regions = [r for r in report["regions"] if r["match"] is not None and r["iou"] is not None]
    series = [[r["iou"] for r in regions if r["model_version"] == v] for v in versions]
    if any(series):
        hatched = hist.hist(
            series, bins=edges, stacked=True, color="#4363d8", edgecolor="black", linewidth=0.4
        )
        for v_index, patches in enumerate(hatched[2] if len(series) > 1 else [hatched[2]]):
            for patch in patches:
                patch.set_hatch(hatches[v_index % len(hatches)])
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    for threshold in (0.5, 0.9):
        hist.axvline(threshold, color="grey", linestyle="--", linewidth=0.8)
    hist.set(xlim=(0, 1), xlabel="mask IoU (annotation vs pre-label)", ylabel="regions",
             title=f"mask IoU of {len(regions)} matched regions")  # fmt: skip
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path
