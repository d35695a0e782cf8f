"""Cost emulation on known inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm.cost import SECONDS_PER_MONTH, Prices, cost_table, local_cost_per_request, monthly_tco
from edgelm.errors import ConfigError


def prices() -> Prices:
    return Prices.model_validate(
        {
            "local": {
                "energy_price_per_kwh": 0.36,
                "active_watts": 100,
                "idle_watts": 10,
                "hardware_price": 3600,
                "hardware_lifetime_months": 10,
                "hardware_share": 1,
            },
            "cloud": [{"name": "c", "input_per_million": 1.0, "output_per_million": 2.0}],
        }
    )


def test_local_cost_from_estimated_and_measured_energy() -> None:
    p = prices()
    est = local_cost_per_request(p, busy_s=36.0)
    assert est["joules"] == 3600 and est["energy"] == pytest.approx(0.00036)
    assert est["hardware"] == pytest.approx(3600 / (10 * SECONDS_PER_MONTH) * 36)
    measured = local_cost_per_request(p, busy_s=36.0, energy_j=7200)
    assert measured["energy"] == pytest.approx(0.00072)
    shared = local_cost_per_request(p, busy_s=36.0, concurrency=4)
    assert shared["total"] == pytest.approx(est["total"] / 4)


def test_cost_table_and_month() -> None:
    p = prices()
    table = cost_table(p, prompt_tokens=1000, completion_tokens=500, busy_s=1.0)
    assert table["cloud_per_1k"]["c"] == pytest.approx((1000 * 1 + 500 * 2) / 1e6 * 1000)
    month = monthly_tco(
        p, requests_per_day=86400, prompt_tokens=0, completion_tokens=1000, busy_s=0.5
    )
    assert month["machine_utilisation"] == pytest.approx(0.5)
    assert month["fits_on_one_machine"]
    assert month["local_hardware"] == pytest.approx(360.0)
    expected_kwh = (100 * 0.5 + 10 * 0.5) * SECONDS_PER_MONTH / 3.6e6
    assert month["local_energy_kwh"] == pytest.approx(expected_kwh, rel=1e-3)
    overloaded = monthly_tco(p, 86400 * 3, 0, 10, busy_s=1.0)
    assert not overloaded["fits_on_one_machine"]


def test_prices_file(isolated_home: Path) -> None:
    shipped = Prices.load(isolated_home)
    assert shipped.cloud and "example" in shipped.cloud[0].name
    isolated_home.mkdir(parents=True)
    (isolated_home / "prices.toml").write_text("[local]\nenergy_price_per_kwh = -1\n")
    with pytest.raises(ConfigError, match="prices"):
        Prices.load(isolated_home)
    (isolated_home / "prices.toml").write_text(
        '[local]\ncurrency = "EUR"\n[[cloud]]\nname = "mine"\ninput_per_million = 1\n'
        "output_per_million = 1\n"
    )
    mine = Prices.load(isolated_home)
    assert mine.local.currency == "EUR" and [c.name for c in mine.cloud] == ["mine"]
