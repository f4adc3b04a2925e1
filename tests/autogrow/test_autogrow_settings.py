"""The policy's knobs are declared once (`PolicySettings`, and `BillingOverride` for the billing
override): the environment names, the per-pool API's JSON and the descriptions all follow."""

from __future__ import annotations

import pytest

from services.autogrow.policy import PolicySettings
from services.autogrow.policy_store import PoolPolicy, default_policy
from services.autogrow.settings import AutogrowSettings
from shared.events import BillingModel

# a value unlike the default, per knob, as the environment spells it
ENV_VALUES = {
    "min_running": ("2", 2),
    "max_running": ("7", 7),
    "cores_per_node": ("4", 4),
    "idle_seconds": ("600", 600.0),
    "hourly_window_seconds": ("120", 120.0),
    "warm_window_seconds": ("600", 600.0),
    "warm_max_nodes": ("3", 3),
    "warm_idle_seconds": ("1200", 1200.0),
    "warm_starts": ("true", True),
    "boot_timeout_seconds": ("900", 900.0),
    "partitions": ('["batch"]', frozenset({"batch"})),
}


@pytest.mark.parametrize("knob", sorted(ENV_VALUES))
def test_every_knob_is_read_from_its_environment_name(
    knob: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, value = ENV_VALUES[knob]
    monkeypatch.setenv(f"HPCFLEET_AUTOGROW_POLICY__{knob.upper()}", text)
    settings = AutogrowSettings()
    assert getattr(settings.policy, knob) == value
    assert getattr(default_policy(settings), knob) == value


def test_the_api_and_the_settings_describe_each_knob_alike() -> None:
    for name, field in PolicySettings.model_fields.items():
        api = PoolPolicy.model_fields[name]
        assert (api.default, api.description) == (field.default, field.description), name
    service, pool = AutogrowSettings.model_fields["billing"], PoolPolicy.model_fields["billing"]
    assert service.description == pool.description and service.default is pool.default is None


def test_the_billing_override_keeps_its_environment_name_and_json_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HPCFLEET_AUTOGROW_BILLING", "hourly")
    settings = AutogrowSettings()
    assert settings.billing is BillingModel.HOURLY
    assert default_policy(settings).model_dump(mode="json")["billing"] == "hourly"
    assert PoolPolicy.model_validate({"billing": "per-second"}).billing is BillingModel.PER_SECOND
