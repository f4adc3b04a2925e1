"""How EC2 bills a node's running time, by the image's billing model.

One rule for the power policy (when is an idle node's paid time used up) and for the simulator's
cost (billed seconds of a run), so the benchmark prices exactly what the policy optimises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.events import BillingModel


@dataclass(frozen=True, slots=True)
class BillingRules:
    """EC2's numbers: per-second billing has a minimum per start, hourly bills started hours."""

    per_second_minimum: float = 60.0
    hour: float = 3600.0


DEFAULT_RULES = BillingRules()


def billed_seconds(
    model: BillingModel, run_seconds: float, rules: BillingRules = DEFAULT_RULES
) -> float:
    """Seconds billed for one start-to-stop run of `run_seconds`."""
    run = max(0.0, run_seconds)
    if model is BillingModel.PER_SECOND:
        return max(float(math.ceil(run)), rules.per_second_minimum)
    return max(1, math.ceil(run / rules.hour)) * rules.hour


def paid_seconds(model: BillingModel, elapsed: float, rules: BillingRules = DEFAULT_RULES) -> float:
    """How much of a run is already paid for once it has run `elapsed` seconds.

    Keeping an idle node up until then costs nothing extra, so the policy never powers a node off
    before it (per second: the minimum; hourly: the end of the started hour).
    """
    if model is BillingModel.PER_SECOND:
        return max(elapsed, rules.per_second_minimum)
    return max(1, math.ceil(elapsed / rules.hour)) * rules.hour
