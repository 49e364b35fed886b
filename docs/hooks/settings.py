"""mkdocs hook: the configuration reference, generated from the code at build time.

``docs/configuration.md`` holds the marker below; it is replaced by
:func:`backend.runtime.settings.settings_reference`, one table per settings group built from the
``Settings`` fields' ``env``, ``help`` and ``group`` metadata. So the reference never drifts from the
code, and a build of a page that lost its marker fails instead of publishing a page without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- settings-reference -->"
REFERENCE_PAGE = "configuration.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Put the generated reference where the marker stands (only the configuration page has one)."""
    if MARKER not in markdown:
        if page.file.src_uri == REFERENCE_PAGE:
            raise PluginError(
                f"{REFERENCE_PAGE} lost its {MARKER} marker: the settings reference has no place"
            )
        return markdown
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the checkout's backend/, installed or not
    from backend.runtime.settings import settings_reference

    return markdown.replace(MARKER, shown_as_text(settings_reference()))


def shown_as_text(reference: str) -> str:
    """``reference`` with ``<`` and ``>`` outside code spans escaped: a default such as
    ``MODEL_DIR/<released file name>`` is text to show, not an HTML tag for the browser to hide."""
    lines = []
    for line in reference.splitlines():
        parts = line.split("`")
        for i in range(0, len(parts), 2):  # even parts are outside code spans
            parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
        lines.append("`".join(parts))
    return "\n".join(lines)
