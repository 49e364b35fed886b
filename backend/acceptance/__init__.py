"""Pre-label acceptance: comparing accepted annotations with the predictions they came from (the live
intake and the export report count the same way), the report over an export, and its outputs.

May import ``backend.labelstudio`` and ``backend.errors``; never ``backend.learning`` or above.
"""
