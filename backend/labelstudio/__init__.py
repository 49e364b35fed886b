"""Everything that knows Label Studio's formats and API: label-config schemas, result items, brush RLE
and polygons, task image loading, tokens, and the one API client (tasks, predictions, webhooks).

May import ``backend.errors``, ``osprey.sam.masks`` (the polygon rule) and third-party libraries only.
"""
