"""``osprey-label eval acceptance EXPORT.json``: the pre-label acceptance of a Label Studio export, printed
as tables and written as JSON and a chart. Registered by :mod:`backend.cli`; the report itself is :mod:`backend.acceptance`."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from backend.acceptance.output import evaluate_export, format_table, save_chart
from backend.acceptance.report import ANNOTATION_CHOICES
from backend.labelstudio.schema import parse_field_map
from backend.runtime.settings import Settings


def _when(text: str, *, end: bool = False) -> float:
    """A --since/--until value (a date ``2025-06-01`` or an ISO time) as POSIX seconds; a date given to
    --until means the end of that day."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a date like 2025-06-01 or an ISO time like 2025-06-01T12:00:00Z, got {text!r}"
        ) from None
    if end and len(text.strip()) == 10:
        moment += timedelta(days=1)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _until(text: str) -> float:
    return _when(text, end=True)


def run(args: argparse.Namespace) -> int:
    """``osprey-label eval acceptance``: print the table, write ``--json`` and ``--chart`` when asked.

    Returns 0, or 1 when no annotation could be compared. Raises ValueError for unusable input.
    """
    field_map = parse_field_map(
        args.field_map if args.field_map is not None else Settings.from_env().field_map
    )
    report = evaluate_export(
        args.export, label_config=args.label_config, field_map=field_map, annotation=args.annotation,
        since=args.since, until=args.until,
    )  # fmt: skip
    print(format_table(report))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {out}")
    if args.chart:
        print(f"chart written to {save_chart(report, args.chart)}")
    return 0 if report["tasks"]["annotations_compared"] else 1


def add_acceptance_command(eval_subparsers) -> argparse.ArgumentParser:
    """Register ``acceptance`` on the ``osprey-label eval`` sub-command's subparsers; returns its parser.

    Its ``func`` is ``run``; ``command`` is set to ``"eval acceptance"`` so ``cli.main`` names it in errors.
    """
    parser = eval_subparsers.add_parser(
        "acceptance",
        help="how often annotators kept the pre-labels, from a Label Studio JSON export",
        description="Per field and model version: pre-labels kept, edited, removed (and regions or values "
        "added), the acceptance rate kept / (kept + edited + removed), and the mask IoU of matched regions. "
        "Counted by the same code as the backend's live statistics.",
    )
    parser.add_argument("export", metavar="EXPORT.json", help="Label Studio export in the 'JSON' format")
    parser.add_argument(
        "--label-config", metavar="FILE.xml",
        help="the project's label config (default: inferred from the export's result items)",
    )  # fmt: skip
    parser.add_argument(
        "--field-map", metavar="TAG=FIELD,...",
        help="tag=field overrides, e.g. 'notes=description' (OSPREY_FIELD_MAP)",
    )  # fmt: skip
    parser.add_argument(
        "--annotation", choices=ANNOTATION_CHOICES, default="latest",
        help="compare the latest non-cancelled annotation of each task (default) or all of them",
    )  # fmt: skip
    parser.add_argument(
        "--since",
        type=_when,
        metavar="DATE",
        help="only annotations updated at or after this date/time (UTC)",
    )
    parser.add_argument(
        "--until", type=_until, metavar="DATE",
        help="only annotations updated before this time, or up to the end of this date (UTC)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="OUT.json", help="write the full report as JSON")
    parser.add_argument("--chart", metavar="OUT.png", help="write a PNG chart (needs matplotlib)")
    parser.set_defaults(func=run, command="eval acceptance")
    return parser
