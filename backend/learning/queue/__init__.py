"""The durable job queue: one interface, two back ends side by side (SQLite, the default; Redis + RQ
at scale).

May import ``backend.labelstudio`` (project ids) and third-party libraries only.
"""
