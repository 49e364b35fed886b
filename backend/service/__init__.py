"""The HTTP service: the Flask app and its routes, settings, the per-process service state, request
handling for the three prediction modes, admission (basic auth, webhook bound), log redaction, the
waitress server and the precompute command.

May import every other ``backend`` package and ``osprey``; nothing imports it except ``backend.cli``.
"""
