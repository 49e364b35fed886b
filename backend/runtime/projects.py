"""Per-project state, in one place: the label config Label Studio last sent, its parsed schema (one
cache for the whole process), the project's own settings from its ML backend connection's extra params
(automatic pre-labelling), the ``model_version`` Label Studio sees, and the promoted fast head.

Project ids arrive normalised (``"7"``, see :func:`backend.labelstudio.ids.request_project`). Label
configs are kept in memory and in the training store, so training jobs and a restarted process find
them; a write happens only when the config changed, because ``/setup`` (3 s) comes on every connect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections import OrderedDict

from backend.errors import UnprocessableError
from backend.labelstudio.schema import ProjectSchema, SchemaError, parse_label_config

from .settings import parse_bool

logger = logging.getLogger(__name__)

SCHEMAS_KEPT = 64  # parsed label configs kept (a config is a few KB; parsing one takes milliseconds)
EXTRA_PARAMS = ("auto_prelabel",)  # what a project may set in its ML backend connection's extra params


def project_options(extra_params) -> dict:
    """A project's own settings from the ``extra_params`` Label Studio sends at ``/setup`` (the ML backend
    connection's *extra params*: an object, or its JSON text): ``{"auto_prelabel": True | False | None}``
    (None: not set there, so ``OSPREY_AUTO_PRELABEL`` decides). Raises :class:`UnprocessableError` naming
    a value that is not understood; keys meant for something else are left alone."""
    if extra_params in (None, "", {}):
        return {"auto_prelabel": None}
    if isinstance(extra_params, str):
        try:
            extra_params = json.loads(extra_params)
        except ValueError:
            raise UnprocessableError(
                'the ML backend\'s extra params must be a JSON object, e.g. {"auto_prelabel": true}'
            ) from None
    if not isinstance(extra_params, dict):
        raise UnprocessableError(
            f"the ML backend's extra params must be a JSON object, got {type(extra_params).__name__}"
        )
    choice = extra_params.get("auto_prelabel")
    if choice is None or isinstance(choice, bool):
        return {"auto_prelabel": choice}
    if isinstance(choice, int) and choice in (0, 1):
        return {"auto_prelabel": bool(choice)}
    if isinstance(choice, str):
        try:
            return {"auto_prelabel": parse_bool(choice)}  # as the settings read it
        except ValueError:
            pass
    raise UnprocessableError(
        f"extra params: 'auto_prelabel' must be true or false, got {json.dumps(choice)[:40]}"
    )


class Projects:
    """Label configs, schemas, versions and heads of the projects this process serves.

    ``store`` keeps label configs across restarts (``remember_label_config`` / ``label_config``),
    ``registry`` holds each project's versions, ``field_map`` the ``OSPREY_FIELD_MAP`` overrides and
    ``base_version`` the loaded models' ``model_version``."""

    def __init__(self, *, store, registry, field_map: dict[str, str], base_version: str) -> None:
        self.store = store
        self.registry = registry
        self.field_map = dict(field_map)
        self.base_version = base_version
        self._lock = threading.Lock()
        self._configs: dict[str, str] = {}
        self._auto: dict[str, bool | None] = {}
        self._schemas: OrderedDict[str, ProjectSchema] = OrderedDict()
        self._heads: dict[str, tuple[float, object]] = {}

    # ---- label configs and schemas ----
    def schema_for(self, label_config: str) -> ProjectSchema:
        """The parsed ``label_config`` (cached by content); UnprocessableError (422) saying why when
        it cannot be served."""
        key = hashlib.sha256(label_config.encode()).hexdigest()
        with self._lock:
            if key in self._schemas:
                self._schemas.move_to_end(key)
                return self._schemas[key]
        try:
            schema = parse_label_config(label_config, field_map=self.field_map)
        except SchemaError as error:
            raise UnprocessableError(f"this label config cannot be served: {error}") from None
        with self._lock:
            self._schemas[key] = schema
            while len(self._schemas) > SCHEMAS_KEPT:
                self._schemas.popitem(last=False)
        for warning in schema.warnings:
            logger.warning("label config: %s", warning)
        return schema

    def label_config(self, project: str) -> str | None:
        """The label config Label Studio last sent for ``project`` (memory, then the store), or None."""
        with self._lock:
            known = self._configs.get(project)
        if known is not None:
            return known
        try:
            stored = self.store.label_config(project)
        except sqlite3.Error as error:
            logger.warning("project %s: cannot read its stored label config: %s", project, error)
            return None
        if stored is not None:
            with self._lock:
                self._configs[project] = stored
        return stored

    def remember(self, project: str | None, label_config: str | None) -> None:
        """Keep ``label_config`` as ``project``'s (written to the store only when it changed)."""
        if not (project and label_config):
            return
        with self._lock:
            changed = self._configs.get(project) != label_config
            self._configs[project] = label_config
        if changed:
            try:
                self.store.remember_label_config(project, label_config)
            except sqlite3.Error as error:
                logger.warning("project %s: label config kept in memory only: %s", project, error)

    # ---- the project's own settings ----
    def remember_options(self, project: str | None, options: dict) -> None:
        """Keep the settings of :func:`project_options` for ``project`` (after its label config)."""
        if not project:
            return
        choice = options.get("auto_prelabel")
        with self._lock:
            changed = project not in self._auto or self._auto[project] != choice
            self._auto[project] = choice
        if changed:
            try:
                self.store.remember_auto_prelabel(project, choice)
            except sqlite3.Error as error:
                logger.warning("project %s: its auto_prelabel choice kept in memory only: %s", project, error)
            if choice is not None:
                logger.info("project %s: automatic pre-labelling %s (its extra params)", project,
                            "on" if choice else "off")  # fmt: skip

    def auto_prelabel(self, project: str) -> bool | None:
        """The project's own choice of automatic pre-labelling (memory, then the store); None: none."""
        with self._lock:
            if project in self._auto:
                return self._auto[project]
        try:
            choice = self.store.auto_prelabel(project)
        except sqlite3.Error as error:
            logger.warning("project %s: cannot read its auto_prelabel choice: %s", project, error)
            return None
        with self._lock:
            self._auto.setdefault(project, choice)
        return choice

    def schema(self, project: str) -> ProjectSchema:
        """The schema of ``project``'s last label config; RuntimeError when none is known (a job that
        runs before Label Studio ever called ``/setup`` for it)."""
        label_config = self.label_config(project)
        if label_config is None:
            raise RuntimeError(
                f"project {project}: no label config known yet (Label Studio sends it at /setup)"
            )
        return self.schema_for(label_config)

    def known(self) -> list[str]:
        """Every project seen by this process or stored, in id order."""
        with self._lock:
            known = set(self._configs)
        try:
            known.update(self.store.known_projects())
        except sqlite3.Error:
            pass
        return sorted(known, key=lambda p: (len(p), p))

    # ---- versions ----
    def version(self, project: str | None) -> str:
        """The ``model_version`` Label Studio sees for ``project``: base models plus the version it serves
        (the promoted one, or what the registry falls back to when that one is damaged)."""
        info = self.registry.served(project).info if project else None
        return info.model_version() if info is not None else self.base_version

    def head(self, project: str | None):
        """The fast head of the version ``project`` serves (reloaded when another process promotes, or
        when the registry falls back from a damaged version), or None. A head that fails to load is
        logged and the model serves alone."""
        if not project:
            return None
        stamp = self.registry.current_stamp(project)  # read first: a promotion after it reloads next time
        served = self.registry.served(project)
        key = (stamp, served.version)
        with self._lock:
            cached = self._heads.get(project)
        if cached is not None and cached[0] == key:
            return cached[1]
        from osprey.learning.head import FastHead

        head = None
        folder = served.part("head")
        if folder is not None and folder.is_dir():
            try:
                head = FastHead.load(folder)
            except (ValueError, OSError) as error:
                logger.error(
                    "project %s: cannot load head %s, serving the model alone: %s",
                    project,
                    served.version,
                    error,
                )
        with self._lock:
            self._heads[project] = (key, head)
        return head
