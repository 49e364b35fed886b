"""The Label Studio ML backend built on the ``osprey`` library: ``cli`` -> ``service`` (HTTP) -> ``runtime``
(the composition root) -> ``predict``, ``prelabel``, ``learning``, ``jobs``, ``acceptance`` -> ``labelstudio``."""
