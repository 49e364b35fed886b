"""OSPREY_COMPILE and OSPREY_SYNC_EVERY reach the region model's decoder, and the start says which."""

from __future__ import annotations

import logging

import pytest

from backend.errors import SettingsError
from backend.runtime.models import load_models
from backend.runtime.settings import Settings

TINY = {"OSPREY_MODEL": "tiny", "SAM_MODEL": "tiny", "OSPREY_DEVICE": "cpu"}


def test_the_decoder_runs_as_the_environment_says_and_the_log_names_it(caplog):
    settings = Settings.from_env({**TINY, "OSPREY_COMPILE": "on", "OSPREY_SYNC_EVERY": "3"})
    with caplog.at_level(logging.INFO, logger="backend.runtime.models"):
        models = load_models(settings, device="cpu")
    decoder = models.region_model.fast.decoder
    assert (decoder.compile, decoder.sync_every) == ("on", 3)
    assert decoder.compiled_for(models.region_model.device)
    assert "decoding compiled, finished answers read every 3 steps" in caplog.text


def test_by_default_the_cpu_decodes_eagerly_reading_every_8_steps():
    models = load_models(Settings.from_env(TINY), device="cpu")
    decoder = models.region_model.fast.decoder
    assert (decoder.compile, decoder.sync_every) == ("auto", 8)
    assert not decoder.compiled_for(models.region_model.device)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OSPREY_COMPILE": "yes"}, "OSPREY_COMPILE must be auto, on or off, got 'yes'"),
        ({"OSPREY_SYNC_EVERY": "0"}, "OSPREY_SYNC_EVERY must be >= 1"),
    ],
)
def test_bad_decoding_settings_are_refused_by_name(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**TINY, **env})
