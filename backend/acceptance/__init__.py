"""Pre-label acceptance: comparing accepted annotations with the predictions they came from, the
report over a Label Studio export, and its table, JSON and chart.

May import ``backend.labelstudio`` and ``backend.errors``; never ``backend.learning`` or the service.
"""
