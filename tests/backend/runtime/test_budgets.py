"""Cache budgets in bytes: parsed settings, derived defaults, and the 7B + ViT-H set-up on a 24 GB GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from backend.runtime.budgets import GiB, derive_budgets, parse_bytes
from backend.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * 2**30),
        ("512MB", 512 * 10**6),
        ("1073741824", 2**30),
        ("1.5 gib", int(1.5 * 2**30)),
        ("0", 0),
    ],
)
def test_sizes_parse_in_si_and_binary_units(text, expected):
    assert parse_bytes(text, setting="X") == expected


def test_bad_sizes_name_the_setting_and_auto_only_where_allowed():
    with pytest.raises(ValueError, match="OSPREY_CACHE_HOST_BYTES='lots'"):
        Settings.from_env({"OSPREY_CACHE_HOST_BYTES": "lots"})
    with pytest.raises(ValueError, match="OSPREY_CACHE_DISK_BYTES"):
        Settings.from_env({"OSPREY_CACHE_DISK_BYTES": "auto"})
    assert parse_bytes("auto", setting="X", auto=True) is None


def test_auto_device_budget_leaves_the_request_peak_and_the_spare_free():
    settings = Settings.from_env({})
    budgets = derive_budgets(settings, device_kind="cuda", device_free=10 * GiB, host_total=64 * GiB,
                             host_available=40 * GiB, request_peak=3 * GiB)  # fmt: skip
    assert budgets.osprey_device + budgets.sam_device == 10 * GiB - 3 * GiB - 2 * GiB
    assert budgets.osprey_device == int(0.8 * 5 * GiB)
    assert budgets.osprey_host + budgets.sam_host == 4 * GiB  # 1/10 of RAM, at most 4 GiB
    assert budgets.osprey_disk + budgets.sam_disk == 4 * GiB
    tight = derive_budgets(settings, device_kind="cuda", device_free=4 * GiB, host_total=8 * GiB,
                           host_available=4 * GiB, request_peak=3 * GiB)  # fmt: skip
    assert (
        tight.osprey_device == tight.sam_device == 0
    )  # no room: nothing cached on the device, nothing fails


def test_explicit_budgets_win_over_auto():
    settings = Settings.from_env({"OSPREY_CACHE_DEVICE_BYTES": "1GiB", "OSPREY_CACHE_HOST_BYTES": "0"})
    budgets = derive_budgets(settings, device_kind="cuda", device_free=100 * GiB, host_total=64 * GiB,
                             host_available=40 * GiB, request_peak=0)  # fmt: skip
    assert budgets.osprey_device + budgets.sam_device == GiB and budgets.osprey_host == 0


def test_the_default_setup_fits_osprey_7b_and_vit_h_on_a_24_gb_gpu_with_2_gb_spare():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.row_for("osprey-7b", int(24e9))  # from shapes on the meta device: nothing allocated
    assert row["figures"] == "computed" and row["spare_gib"] >= 2.0
    assert row["device_cache_images"]["osprey"] >= 1  # the image being clicked keeps its prefix cache
    assert row["osprey_disk_mib_per_image"] < row["osprey_device_mib_per_image"] / 20  # no prefix KV on disk
    assert not row["disk_holds_prefix_kv"]
    fitted = row["request_breakdown"]["fitted to 24 GB"]  # segment everything's batch sized to the rest
    assert 1 <= fitted["points_per_batch"] <= 64
    assert fitted["sam"] <= max(fitted["labelling"], fitted["vision"], fitted["lora_step"])
