"""Cards and headroom (recompute_lab.predict.devices): presets, the reserve, "fits" after it, the
margin, and the largest peak a card leaves a step."""

from __future__ import annotations

import pytest

from recompute_lab.config import ConfigError, LayoutConfig
from recompute_lab.predict import devices as D


def test_presets_are_below_the_marketed_sizes_and_cite_a_source():
    """torch reports less than the marketed size (HBM in GiB; the driver and ECC keep some): every
    preset sits between 95% and 100% of its HBM size in GiB and says where its figure comes from.
    B200 is sold as "192 GB" but ships with 180 GiB of HBM3e enabled (DGX B200: 1,440 GB for 8)."""
    marketed = {"a100_40gb": 40, "a100_80gb": 80, "h100_80gb": 80, "h200": 141, "b200": 180}
    for name, gb in marketed.items():
        card = D.card(name)
        assert 0.95 * gb * 2**30 < card.total_bytes < gb * 2**30, name
        assert card.source
    assert D.card("mi300x").total_bytes < 192 * 2**30 and D.card("H100_80GB") is D.card("h100_80gb")


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ConfigError, match="valid: a100_40gb, a100_80gb, b200, h100_80gb, h200"):
        D.device_of(LayoutConfig(gpu="h100"))


def test_one_way_to_give_the_card():
    with pytest.raises(ConfigError, match="one of gpu, device_gib and device_gb"):
        D.device_of(LayoutConfig(gpu="h200", device_gb=141))
    with pytest.raises(ConfigError, match="device_gib must be a positive number"):
        D.device_of(LayoutConfig(device_gib=-1))
    with pytest.raises(ConfigError, match="fragmentation"):
        D.device_of(LayoutConfig(gpu="h200", reserve_fragmentation=1.5))
    assert D.device_of(LayoutConfig()) is None
    assert D.device_of(LayoutConfig(device_gib=80)).total_bytes == 80 * 2**30
    assert D.device_of(LayoutConfig(device_gb=80)).total_bytes == 80 * 10**9


def test_fit_subtracts_every_part_of_the_reserve_and_shows_the_margin():
    lay = LayoutConfig(
        dp_shard=8,
        tp=2,
        device_gib=80,
        reserve_context_gib=1,
        reserve_comm_gib=0.5,
        reserve_fragmentation=0.1,
    )
    dev = D.device_of(lay)
    groups = D.communicators(lay)
    assert groups == 2  # tp and dp_shard
    peak = 60 * 2**30
    fit = dev.fit(peak, groups)
    assert fit["reserve"] == {
        "cuda_context": 2**30,
        "communication": 2**30,
        "fragmentation": 6 * 2**30,
        "total": 8 * 2**30,
    }
    assert fit["margin_bytes"] == 12 * 2**30 and fit["fits"]
    assert not dev.fit(73 * 2**30, groups)["fits"]  # 73 + 2 + 7.3 > 80


def test_budget_is_the_largest_peak_that_fits():
    for lay in (LayoutConfig(gpu="h100_80gb", dp_shard=8), LayoutConfig(gpu="a100_40gb")):
        dev, groups = D.device_of(lay), D.communicators(lay)
        b = dev.budget(groups)
        assert dev.fit(b, groups)["fits"] and not dev.fit(b + 1, groups)["fits"]
        assert dev.fit(b, groups)["margin_bytes"] >= 0


def test_no_reserve_means_the_whole_card():
    dev = D.Device(1000, "x", D.Reserve(0, 0, 0.0))
    assert dev.budget(3) == 1000 and dev.fit(1000, 3)["fits"] and not dev.fit(1001, 3)["fits"]
