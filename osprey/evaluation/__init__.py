"""Osprey's region benchmarks: referring object classification (LVIS, PACO) and region captioning
(RefCOCOg), run on the fast path.

- :mod:`.data`: evaluation files (LVIS/PACO region lists, COCO-style caption files), mask decoding;
- :mod:`.metrics`: normalisation, semantic IoU, caption metrics (BLEU, ROUGE-L, CIDEr, METEOR);
- :mod:`.embedder`: sentence embeddings (all-MiniLM-L6-v2) for semantic similarity;
- :mod:`.run`: running a predictor over a file and aggregating the scores;
- :mod:`.predictors`: Osprey as a predictor.

The ``osprey-label eval`` commands (:mod:`osprey.evaluation.cli`) wrap these. Nothing heavy is imported here.
May import ``osprey.model`` and ``osprey.inference``; never ``backend``.
"""
