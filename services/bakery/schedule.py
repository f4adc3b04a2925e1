"""When a recipe is due: pure functions of a cron expression, the last slot handled and the time.

Cron is evaluated in UTC with day-of-month AND day-of-week (croniter's `day_or=False`), not the
classic OR, because that is what lets one expression say "the day after the second Tuesday": the
only Wednesday between the 9th and the 15th. Slots missed while the service was down collapse into
one build (the latest slot), and a recipe seen for the first time starts counting from now rather
than building for every slot of the past.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from croniter import croniter

DEFAULT_SCHEDULE = "0 4 9-15 * WED"
"""04:00 UTC the day after Patch Tuesday, when Microsoft and most distributions have shipped."""


def check_cron(expression: str) -> None:
    """Raise ValueError saying what a valid expression looks like."""
    try:
        croniter(expression, day_or=False)
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"{expression!r} is not a cron expression (minute hour day-of-month month "
            f"day-of-week, e.g. {DEFAULT_SCHEDULE!r}): {exc}"
        ) from None


def next_slot(expression: str, after: datetime) -> datetime:
    """The first slot strictly after `after`."""
    result: datetime = croniter(expression, after, day_or=False).get_next(datetime)
    return result


def due_slot(expression: str, anchor: datetime, now: datetime) -> datetime | None:
    """The latest slot in (anchor, now], or None if no slot fell in it.

    `anchor` is the last slot already handled (or when the recipe was first seen).
    """
    if next_slot(expression, anchor) > now:
        return None
    # croniter's get_prev excludes its start, and slots fall on whole minutes
    latest: datetime = croniter(expression, now + timedelta(seconds=1), day_or=False).get_prev(
        datetime
    )
    return latest
