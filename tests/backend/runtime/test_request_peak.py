"""One request's peak counts labelling (keys/values, scoring chunks, decode groups for the configured
maximum tokens) and a LoRA job beside serving, and the labelling work is sized to the free memory."""

from __future__ import annotations

import pytest

from backend.runtime.budgets import OSPREY_SHARE, derive_budgets, fit_request, request_peak
from backend.runtime.settings import Settings
from osprey.inference.memory import encoding_bytes

GiB = 2**30


@pytest.fixture
def osprey(tiny_models):
    """The shared tiny region model, its fast path's sizes put back after the test."""
    model = tiny_models.region_model
    sizes = model.fast.max_batch_tokens, model.fast.max_decode_rows
    yield model
    model.fast.max_batch_tokens, model.fast.max_decode_rows = sizes


def settings(**overrides) -> Settings:
    return Settings.from_env(
        {}, osprey_model="tiny", sam_model="tiny", device_spare_bytes="1MiB", **overrides
    )


def test_the_peak_grows_with_the_answers_decoded_together_and_their_tokens_and_counts_lora(osprey):
    base = request_peak(settings(), osprey, chunk_tokens=256, decode_rows=4, lora=False)
    wider = request_peak(settings(), osprey, chunk_tokens=256, decode_rows=16, lora=False)
    longer = request_peak(settings(max_description_tokens=1024), osprey, chunk_tokens=256, decode_rows=4,
                          lora=False)  # fmt: skip
    assert wider.labelling > base.labelling and longer.labelling > base.labelling
    trained = request_peak(settings(), osprey, chunk_tokens=256, decode_rows=4, lora=True)
    assert base.lora_state == base.lora_step == 0 < trained.lora_state < trained.lora_step
    assert (
        trained.peak
        == max(trained.sam, trained.vision, trained.labelling, trained.lora_step) + trained.lora_state
    )


@pytest.mark.parametrize("spare_for_work", [0, 3, 30])
def test_labelling_is_sized_so_the_peak_and_the_clicked_images_caches_fit(osprey, spare_for_work):
    s = settings(max_regions=20)
    tight = request_peak(s, osprey, chunk_tokens=256, decode_rows=1, lora=True)
    whole = encoding_bytes(osprey).whole
    free = 2**20 + int(whole / OSPREY_SHARE) + 2**20 + tight.peak + spare_for_work * tight.labelling // 10
    fitted = fit_request(s, osprey, device_free=free, lora=True)
    assert (osprey.fast.max_batch_tokens, osprey.fast.max_decode_rows) == (
        fitted.chunk_tokens,
        fitted.decode_rows,
    )
    assert 1 <= fitted.decode_rows <= 20  # OSPREY_MAX_REGIONS caps the group
    if fitted.sam <= fitted.labelling:  # SAM's own peak is sized elsewhere
        budgets = derive_budgets(s, device_kind="cuda", device_free=free, host_total=8 * GiB,
                                 host_available=4 * GiB, request_peak=fitted.peak)  # fmt: skip
        assert budgets.osprey_device >= whole  # the clicked image keeps its whole encoding
