"""``osprey-label serve``: the service under gunicorn.

Weights are checked before any worker starts, so a missing file stops the command with a message
naming it; each worker then loads the models once (no fork after CUDA initialisation).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .settings import Settings

logger = logging.getLogger(__name__)


def check_weights(settings: Settings) -> None:
    """Raise FileNotFoundError naming every missing weight file and the command that fetches it."""
    from osprey.model.checkpoint import resolve_checkpoint, weight_files
    from osprey.model.config import load_preset, preset_names
    from osprey.sam.build import SAM_ARCHITECTURES

    missing = []
    model = settings.osprey_model
    if not (model in preset_names() and load_preset(model).untrained):
        try:
            weight_files(resolve_checkpoint(model))
        except FileNotFoundError as error:
            missing.append(str(error))
    arch = SAM_ARCHITECTURES.get(settings.sam_model)
    if arch is None:
        raise ValueError(
            f"SAM_MODEL={settings.sam_model!r} is unknown; use one of {', '.join(SAM_ARCHITECTURES)}"
        )
    if arch.checkpoint_file is not None:
        path = Path(settings.sam_checkpoint or settings.model_dir / arch.checkpoint_file)
        if not path.is_file():
            missing.append(
                f"SAM checkpoint {path} is missing; run `osprey-label download --sam {settings.sam_model}` "
                f"(saves {arch.checkpoint_file} under MODEL_DIR) or set SAM_CHECKPOINT"
            )
    if missing:
        raise FileNotFoundError("cannot start, weights are missing:\n  " + "\n  ".join(missing))


def build_app(settings: Settings):
    """The WSGI app with its models loaded (one worker's worth)."""
    from .app import create_app
    from .service import OspreyService, load_models

    models = load_models(settings)
    logger.info("models loaded: %s", models.version)
    service = OspreyService(settings=settings, models=models)
    service.start_training_worker()
    return create_app(settings, service)


def serve(settings: Settings) -> None:
    from gunicorn.app.base import BaseApplication

    check_weights(settings)

    class Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 600)  # model loading; requests themselves are bounded by Label Studio
            self.cfg.set("graceful_timeout", 30)
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("accesslog", None)

        def load(self):
            return build_app(settings)

    logger.info(
        "serving on %s:%d (%d workers x %d threads)",
        settings.host,
        settings.port,
        settings.workers,
        settings.threads,
    )
    Server().run()
