"""The HTTP layer only: the Flask app over a :class:`~backend.runtime.runtime.Runtime`, admission (basic
auth, the webhook bound), payload parsing, request timing, log redaction and the waitress server.

May import every other ``backend`` package and ``osprey``; nothing imports it. The installed ``osprey-label``
command is :mod:`backend.service.command`: :mod:`backend.cli`'s commands and ``serve``.
"""
