"""The composition root: settings, the loaded models, the model scheduler, cache budgets and
per-project state, built once by ``build_runtime`` and closed by ``Runtime.close``.

May import every ``backend`` package below the HTTP layer and ``osprey``; never ``backend.service``.
"""
