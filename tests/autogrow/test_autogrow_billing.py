"""Billing math shared by the power policy and the simulator's cost."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.autogrow.billing import BillingRules, billed_seconds, paid_seconds
from shared.events import BillingModel

PER_SECOND, HOURLY = BillingModel.PER_SECOND, BillingModel.HOURLY


@pytest.mark.parametrize(
    ("model", "run", "billed"),
    [
        (PER_SECOND, 0, 60),
        (PER_SECOND, 59.2, 60),
        (PER_SECOND, 60, 60),
        (PER_SECOND, 60.2, 61),  # whole seconds, rounded up
        (PER_SECOND, 3725, 3725),
        (PER_SECOND, -5, 60),
        (HOURLY, 0, 3600),
        (HOURLY, 1, 3600),
        (HOURLY, 3600, 3600),
        (HOURLY, 3601, 7200),
        (HOURLY, 10_000, 10_800),
    ],
)
def test_billed_seconds(model: BillingModel, run: float, billed: float) -> None:
    assert billed_seconds(model, run) == billed


@pytest.mark.parametrize(
    ("model", "elapsed", "paid"),
    [
        (PER_SECOND, 10, 60),  # the minimum is paid at the start
        (PER_SECOND, 75.5, 75.5),  # afterwards every second is paid as it passes
        (HOURLY, 0, 3600),
        (HOURLY, 3300, 3600),  # minute 55: five paid minutes left
        (HOURLY, 3600, 3600),
        (HOURLY, 3600.5, 7200),  # a new hour has started and is paid in full
    ],
)
def test_paid_seconds(model: BillingModel, elapsed: float, paid: float) -> None:
    assert paid_seconds(model, elapsed) == paid


def test_rules_are_parameters_not_constants() -> None:
    rules = BillingRules(per_second_minimum=120, hour=1800)
    assert billed_seconds(PER_SECOND, 30, rules) == 120
    assert billed_seconds(HOURLY, 2000, rules) == 3600


@given(st.sampled_from(list(BillingModel)), st.floats(min_value=0, max_value=1e7))
def test_keeping_a_node_until_its_paid_time_costs_nothing_more(
    model: BillingModel, elapsed: float
) -> None:
    paid = paid_seconds(model, elapsed)
    assert paid >= elapsed
    assert billed_seconds(model, paid) == billed_seconds(model, elapsed)
