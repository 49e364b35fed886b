"""Everything that knows Label Studio's formats: label-config schemas, result items, brush RLE and
polygons, task image loading and Label Studio API tokens.

May import ``backend.errors`` and third-party libraries only.
"""
