"""The Flask app served on a loopback port in this process (werkzeug's threaded server), so tests send
real HTTP requests and can still look inside: patch a function, count allocations."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from werkzeug.serving import make_server


@contextmanager
def served(app):
    """Yield the base URL of ``app`` served on 127.0.0.1; the server stops on exit."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
