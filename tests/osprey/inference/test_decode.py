"""The host out of the decoding loop: the same answers, few reads back, a step that compiles whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osprey.inference.fields import LabelRequest
from osprey.model.kv import KVBuffer, KVState
from osprey.model.llm import decoder_parts, forward_on_state
from osprey.runtime import transfer

FIELDS = LabelRequest(
    categories=("cat", "dog", "red bird"),
    parts=("head", "tail"),
    attributes=("red", "round"),
    caption=True,
    description=True,
    max_caption_tokens=5,
    max_description_tokens=14,
)


def answers(regions) -> list[tuple]:
    return [(r.caption, r.description, r.category.label, r.part.label) for r in regions]


def close(a, b, tol=1e-5) -> bool:
    for x, y in zip(a, b, strict=True):
        if x.category.scores != pytest.approx(y.category.scores, abs=tol):
            return False
        if x.attributes != pytest.approx(y.attributes, abs=tol):
            return False
        if x.text_scores != pytest.approx(y.text_scores, abs=tol):
            return False
    return True


@pytest.fixture(scope="module")
def reference(tiny_osprey, scene):
    return tiny_osprey.label(scene["image"], scene["masks"], FIELDS)


def test_the_decoder_layers_give_transformers_logits_bit_for_bit(tiny_osprey):
    """fp32 on the CPU: the fast path's own layer loop equals the transformers model's forward exactly."""
    llm = tiny_osprey.model.llm
    embeds = torch.randn(1, 23, llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = llm(inputs_embeds=embeds).logits[0].float()
        logits, state = forward_on_state(
            llm, KVState.empty(torch.device("cpu")), embeds=embeds,
            segment=torch.zeros(1, 23, dtype=torch.long), position=torch.arange(23)[None],
            visible=torch.ones(1, 1, 1, dtype=torch.bool),
            logits_at=(torch.zeros(23, dtype=torch.long), torch.arange(23)),
        )  # fmt: skip
    assert torch.equal(logits, expected)
    assert state.length == 23 and state.layers[0][0].shape == (1, 4, 23, 16)


def test_a_buffer_is_written_in_place_and_kept_states_stay_untouched(tiny_osprey):
    parts = decoder_parts(tiny_osprey.model.llm)
    layout = parts.layout()
    state = KVState.stack([_random_state(layout, 5, seed=1), _random_state(layout, 3, seed=2)])
    assert state.segment[1, 3:].tolist() == [-1, -1]  # the shorter row is padded
    before = [k.clone() for k, _ in state.layers]
    buffer = KVBuffer.from_state(state, capacity=12, layout=layout)
    buffer.keys[0][:, 5:].fill_(7.0)
    assert all(torch.equal(a, k) for a, (k, _) in zip(before, state.layers, strict=True))
    assert torch.equal(buffer.state(5).layers[0][0], state.layers[0][0])
    keys, values = buffer.window(9)
    assert keys[0].shape == (2, layout.kv_heads, 9, layout.head_dim)
    assert keys[0].untyped_storage().data_ptr() == buffer.keys[0].untyped_storage().data_ptr()


def _random_state(layout, length: int, seed: int) -> KVState:
    g = torch.Generator().manual_seed(seed)
    shape = (1, layout.kv_heads, length, layout.head_dim)
    layers = [
        (torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(layout.layers)
    ]
    return KVState(layers, torch.zeros(1, length, dtype=torch.long), torch.arange(length)[None])


def test_reads_back_per_image_do_not_grow_with_regions_or_candidates(tiny_osprey, scene, monkeypatch):
    reads = []
    original = transfer.read_back
    monkeypatch.setattr(transfer, "read_back", lambda *t: reads.append(len(t)) or original(*t))

    def count(masks, categories) -> int:
        reads.clear()
        request = LabelRequest(categories=categories, caption=True, max_caption_tokens=9)
        tiny_osprey.label(scene["image"], masks, request)
        return len(reads)

    few = count(scene["masks"][:1], ("cat", "dog"))
    many = count(scene["masks"], tuple(f"label {i}" for i in range(24)))
    # one read per scoring call, one per `sync_every` decoding steps, one at the end
    assert few == many == 1 + (9 - 2) // tiny_osprey.fast.decoder.sync_every + 1


def test_the_sync_interval_and_decoding_groups_do_not_change_answers(tiny_osprey, scene, reference):
    decoder, fast = tiny_osprey.fast.decoder, tiny_osprey.fast
    try:
        decoder.sync_every, fast.max_decode_rows = 1, 3  # compacts early, decodes in groups of 3
        again = tiny_osprey.label(scene["image"], scene["masks"], FIELDS)
    finally:
        decoder.sync_every, fast.max_decode_rows = 8, None
    assert answers(again) == answers(reference) and close(again, reference)


def test_answers_that_stop_early_are_moved_out_of_the_way(tiny_osprey, scene):
    """Finished answers give their columns up: the running ones keep their keys/values and answers."""
    request = LabelRequest(caption=True, description=True, max_caption_tokens=3, max_description_tokens=20)
    decoder = tiny_osprey.fast.decoder
    try:
        decoder.sync_every = 20
        alone = tiny_osprey.label(scene["image"], scene["masks"], request)  # never compacts
        decoder.sync_every = 2
        compacted = tiny_osprey.label(scene["image"], scene["masks"], request)  # from step 2 on
    finally:
        decoder.sync_every = 8
    assert [(r.caption, r.description) for r in compacted] == [(r.caption, r.description) for r in alone]
    for a, b in zip(compacted, alone, strict=True):
        assert a.text_scores == pytest.approx(b.text_scores, abs=1e-6)


def test_the_decode_step_compiles_whole(tiny_osprey, scene, reference):
    """fullgraph=True: no graph break. The aot_eager backend traces exactly what inductor would get
    (dynamo, functionalisation of the in-place writes) without generating code, so this stays quick."""
    from osprey.inference import decode

    original = decode.torch.compile
    seen = []

    def compile_checked(fn, **kwargs):
        assert kwargs["fullgraph"] is True
        seen.append(fn)
        return original(fn, **{**kwargs, "backend": "aot_eager"})

    decoder = tiny_osprey.fast.decoder
    torch._dynamo.reset()
    try:
        decode.torch.compile = compile_checked
        decoder.compile, decoder._compiled = "on", None
        compiled = tiny_osprey.label(scene["image"], scene["masks"], FIELDS)
    finally:
        decode.torch.compile = original
        decoder.compile, decoder._compiled = "auto", None
    assert seen == [decode.decode_step] and not decoder._failed
    assert answers(compiled) == answers(reference) and close(compiled, reference)


@pytest.mark.slow
def test_inductor_compiled_decoding_gives_the_same_answers(tiny_osprey, scene, reference):
    """Compiled for real (inductor, C++ on the CPU): the same greedy text, scores within fp32 round-off."""
    decoder = tiny_osprey.fast.decoder
    torch._dynamo.reset()
    try:
        decoder.compile, decoder._compiled = "on", None
        compiled = tiny_osprey.label(scene["image"], scene["masks"], FIELDS)
    finally:
        decoder.compile, decoder._compiled = "auto", None
    assert not decoder._failed
    assert answers(compiled) == answers(reference) and close(compiled, reference, tol=1e-5)


def test_a_repetition_penalty_applies_to_each_answers_own_tokens(tiny_osprey, scene):
    """transformers' penalty, on the device: the same as picking by hand with the penalised logits."""
    from osprey.inference.decode import _pick

    logits = torch.tensor([[2.0, -1.0, 1.5], [0.5, 3.0, -2.0]])
    seen = torch.tensor([[True, False, False], [False, True, True], [False, False, False]])
    best, logprob = _pick(logits, seen, torch.tensor([0, 1]), 2.0)
    assert best.tolist() == [2, 1]  # 2.0 -> 1.0 under the penalty, 3.0 -> 1.5 still the best
    assert logprob.tolist() == pytest.approx(logits.log_softmax(-1)[[0, 1], [2, 1]].tolist())
    fast = tiny_osprey.fast
    try:
        fast.decoder.repetition_penalty = 1.3
        penalised = tiny_osprey.label(scene["image"], scene["masks"][:2], FIELDS)
    finally:
        fast.decoder.repetition_penalty = 1.0
    assert all(np.isfinite(list(r.text_scores.values())).all() for r in penalised)
