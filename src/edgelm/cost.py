"""Cost emulation: what a workload costs locally (energy plus written-off hardware) and what
the same tokens would cost at per-token cloud prices.

Prices live in a data file the user edits (``$EDGELM_HOME/prices.toml`` over the shipped
example); none of them are presented as current market prices.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgelm.errors import ConfigError

SECONDS_PER_MONTH = 30.44 * 86400


class LocalPrices(BaseModel):
    model_config = ConfigDict(extra="forbid")
    currency: str = "USD"
    energy_price_per_kwh: float = Field(0.30, ge=0)
    active_watts: float = Field(45.0, ge=0)
    idle_watts: float = Field(8.0, ge=0)
    hardware_price: float = Field(1200.0, ge=0)
    hardware_lifetime_months: float = Field(36.0, gt=0)
    hardware_share: float = Field(1.0, ge=0, le=1)

    @property
    def hardware_per_second(self) -> float:
        return (
            self.hardware_price
            * self.hardware_share
            / (self.hardware_lifetime_months * SECONDS_PER_MONTH)
        )


class CloudPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)

    def per_request(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / 1e6


class Prices(BaseModel):
    model_config = ConfigDict(extra="forbid")
    local: LocalPrices = Field(default_factory=LocalPrices)
    cloud: list[CloudPrice] = Field(default_factory=list)
    source: str = ""

    @classmethod
    def load(cls, home: Path | None = None) -> Prices:
        """The user's prices file if it exists, else the shipped example."""
        user = home / "prices.toml" if home else None
        if user is not None and user.exists():
            text, origin = user.read_text("utf-8"), str(user)
        else:
            text = resources.files("edgelm").joinpath("data/prices.toml").read_text("utf-8")
            origin = "shipped example prices"
        try:
            return cls.model_validate({**tomllib.loads(text), "source": origin})
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ConfigError(f"{origin} is not a valid prices file: {exc}") from None


def local_cost_per_request(
    prices: Prices, busy_s: float, energy_j: float | None = None, concurrency: int = 1
) -> dict[str, float]:
    """Energy (measured joules, else active watts × time) plus the hardware written off over
    the time the request held the machine. With ``concurrency`` requests sharing the machine,
    each is charged its share."""
    local = prices.local
    joules = energy_j if energy_j is not None else local.active_watts * busy_s
    joules /= max(1, concurrency)
    energy = joules / 3.6e6 * local.energy_price_per_kwh
    hardware = local.hardware_per_second * busy_s / max(1, concurrency)
    return {"energy": energy, "hardware": hardware, "total": energy + hardware, "joules": joules}


def cost_table(
    prices: Prices,
    prompt_tokens: float,
    completion_tokens: float,
    busy_s: float,
    energy_j: float | None = None,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Cost per 1,000 requests: local, and for each cloud price in the file."""
    local = local_cost_per_request(prices, busy_s, energy_j, concurrency)
    return {
        "currency": prices.local.currency,
        "local_per_1k": round(local["total"] * 1000, 4),
        "local_energy_per_1k": round(local["energy"] * 1000, 4),
        "local_hardware_per_1k": round(local["hardware"] * 1000, 4),
        "energy_measured": energy_j is not None,
        "cloud_per_1k": {
            c.name: round(c.per_request(prompt_tokens, completion_tokens) * 1000, 4)
            for c in prices.cloud
        },
    }


def monthly_tco(
    prices: Prices,
    requests_per_day: float,
    prompt_tokens: float,
    completion_tokens: float,
    busy_s: float,
    concurrency: int = 1,
) -> dict[str, Any]:
    """A month at a steady request rate: local machine (hardware + idle and busy energy)
    against each cloud price. Busy time beyond the month's capacity is flagged, not hidden."""
    local = prices.local
    month_requests = requests_per_day * SECONDS_PER_MONTH / 86400
    busy_total = month_requests * busy_s / max(1, concurrency)
    capacity_used = busy_total / SECONDS_PER_MONTH
    idle_total = max(0.0, SECONDS_PER_MONTH - busy_total)
    kwh = (local.active_watts * busy_total + local.idle_watts * idle_total) / 3.6e6
    hardware = local.hardware_per_second * SECONDS_PER_MONTH
    return {
        "currency": local.currency,
        "requests": round(month_requests),
        "machine_utilisation": round(capacity_used, 4),
        "fits_on_one_machine": capacity_used <= 1.0,
        "local_total": round(hardware + kwh * local.energy_price_per_kwh, 2),
        "local_hardware": round(hardware, 2),
        "local_energy_kwh": round(kwh, 2),
        "cloud_total": {
            c.name: round(c.per_request(prompt_tokens, completion_tokens) * month_requests, 2)
            for c in prices.cloud
        },
    }
