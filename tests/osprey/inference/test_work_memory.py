"""The labelling work's byte formulas (osprey.inference.memory) against what the fast path really
allocates on the tiny and small presets (LiveBytes), and the budget fit that sizes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osprey.inference.answering import answer_fast
from osprey.inference.api import Osprey
from osprey.inference.fields import LabelRequest
from osprey.inference.memory import fit_work, kv_buffer_bytes, work_bytes
from osprey.inference.plan import Planner
from osprey.model.preprocess import stack_masks
from osprey.runtime.memory import LiveBytes

REGIONS, TOKENS, CHUNK = 8, 24, 256
REQUESTS = {
    "generating": LabelRequest(description=True, max_description_tokens=TOKENS),
    "scoring": LabelRequest(categories=tuple(f"label {i}" for i in range(40))),
}


@pytest.fixture(scope="module", params=["tiny", "small"])
def labelled(request):
    """Per request kind: the bytes a real call held at its peak (its image encoded and its shared
    question text run before), the KV buffer it left in the pool, and the formula for its shapes."""
    osprey = Osprey.from_pretrained(request.param, device="cpu")
    osprey.fast.max_batch_tokens = CHUNK  # full chunks: the formula's case
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    masks = [np.zeros((120, 160), bool) for _ in range(REGIONS)]
    for i, mask in enumerate(masks):
        mask[10 * i : 10 * i + 20, 5:60] = True
    encoded = osprey.encode_image(rgb)
    regions = osprey.model.region_tokens(encoded.features, stack_masks(masks, image_hw=rgb.shape[:2]))
    out = {}
    for kind, label_request in REQUESTS.items():
        planner = Planner(tokenizer=osprey.tokenizer, request=label_request)
        answer_fast(planner, osprey.fast, encoded, regions, [0] * REGIONS)  # the shared text, run once
        osprey.fast.pool.clear()
        with torch.no_grad(), LiveBytes() as live:
            answer_fast(planner, osprey.fast, encoded, regions, [0] * REGIONS)
        formula = work_bytes(
            osprey.model.llm.config, osprey.model.dtype, context_tokens=encoded.state.segment.shape[1],
            chunk_tokens=CHUNK, decode_rows=REGIONS, max_new_tokens=TOKENS, keep=1,
        )  # fmt: skip
        out[kind] = (live.peak, osprey.fast.pool.held_bytes(), formula)
    return osprey, out


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_the_work_formula_bounds_what_labelling_really_holds(labelled, kind):
    _, out = labelled
    measured, _, formula = out[kind]
    counted = getattr(formula, kind)
    assert measured <= counted <= 3 * measured, (measured, counted)  # an upper bound, not a wild one


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_the_kv_buffer_a_call_keeps_is_the_one_the_formula_counts(labelled, kind):
    _, out = labelled
    _, pooled, formula = out[kind]
    buffer = formula.score_buffer if kind == "scoring" else formula.generate_buffer
    assert pooled <= buffer  # the formula rounds region prompts up; the pool's capacity is the same grid
    assert buffer - pooled <= kv_buffer_bytes(
        labelled[0].model.llm.config, labelled[0].model.dtype, rows=1, columns=256
    )  # within one 256-column step


def test_the_fit_sizes_chunks_and_decode_groups_to_the_budget(tiny_osprey):
    model = tiny_osprey.model
    config, dtype = model.llm.config, model.dtype

    def peak(chunk, rows):
        return work_bytes(config, dtype, context_tokens=600, chunk_tokens=chunk, decode_rows=rows,
                          max_new_tokens=256).peak  # fmt: skip

    roomy = fit_work(model, 10**12, max_new_tokens=256, max_rows=32, context_tokens=600)
    assert roomy == (2048, 32)
    budget = peak(512, 5) + 1
    chunk, rows = fit_work(model, budget, max_new_tokens=256, max_rows=32, context_tokens=600)
    assert peak(chunk, rows) <= budget and peak(chunk, rows + 1) > budget
    assert fit_work(model, 0, max_new_tokens=256, context_tokens=600) == (256, 1)  # never below one answer
