"""Bulk cancel and bulk retry of runs picked on the runs list (or by the API).

The dashboard and the API share this: the ids checked, the lifecycle's batch
functions (one transaction and a handful of statements for the whole
selection, not one per run), one audit entry per request listing the runs,
and the answer per run. Runs that cannot be (already final for a cancel,
not final for a retry) are skipped and said so; ids of no run are reported
as not found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db import transaction

from tasks_app import audit, lifecycle
from tasks_app.exceptions import BadSelection, RunNotRetryable
from tasks_app.history import InvalidFilter, parse_id
from tasks_app.models import Run

# Runs one request may act on: ten pages of the list at its largest page size,
# and few enough that a cancel's or retry's one transaction stays short.
MAX_RUNS = 500
CANCELLED, RETRIED, SKIPPED, NOT_FOUND = "cancelled", "retried", "skipped", "not_found"


@dataclass
class Outcome:
    """What a bulk action did to each run, in the order the ids were given."""

    verb: str  # "cancel" or "retry"
    ids: list[int]
    done: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # run id -> why
    missing: list[int] = field(default_factory=list)
    retries: dict[int, int] = field(default_factory=dict)  # run id -> its new run's id

    def results(self) -> list[dict]:
        """Per run: {"id", "result", "reason", "retry"} (the API's answer)."""
        rows = []
        for pk in self.ids:
            if pk in self.skipped:
                result, reason = SKIPPED, self.skipped[pk]
            elif pk in self.missing:
                result, reason = NOT_FOUND, f"no run with id {pk}"
            else:
                result, reason = (CANCELLED if self.verb == "cancel" else RETRIED), ""
            rows.append(
                {"id": pk, "result": result, "reason": reason, "retry": self.retries.get(pk)}
            )
        return rows

    def message(self) -> str:
        """For people: "Cancelled 5; 2 were already finished."."""
        done = "Cancelled" if self.verb == "cancel" else "Retried"
        parts = [f"{done} {_runs(len(self.done))}"]
        if self.verb == "retry" and self.done:
            new = sorted(self.retries.values())
            parts[0] += f" (new {_ids(new)})"
        why: dict[str, int] = {}
        for reason in self.skipped.values():
            key = _kind(self.verb, reason)
            why[key] = why.get(key, 0) + 1
        for kind, count in why.items():
            parts.append(f"{count} {'was' if count == 1 else 'were'} {kind}")
        if self.missing:
            count = len(self.missing)
            parts.append(f"{count} {'was' if count == 1 else 'were'} not found")
        return "; ".join(parts) + "."


def _runs(count: int) -> str:
    return f"{count} run{'' if count == 1 else 's'}"


def _ids(ids: list[int]) -> str:
    shown = ", ".join(f"#{pk}" for pk in ids[:5])
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def _kind(verb: str, reason: str) -> str:
    if verb == "cancel":
        return "already finished"
    return "not finished yet" if "only a finished run" in reason else "not retryable (secrets)"


def parse_ids(values) -> list[int]:
    """Run ids from a form's or a body's list, distinct, in order; BadSelection
    when there are none, more than MAX_RUNS, or one is not an id."""
    values = list(values)
    if not values:
        raise BadSelection("no runs selected")
    if len(values) > MAX_RUNS:
        raise BadSelection(f"at most {MAX_RUNS} runs at once, not {len(values)}")
    ids: list[int] = []
    for value in values:
        try:
            pk = parse_id("ids", str(value))
        except InvalidFilter as exc:
            raise BadSelection(str(exc)) from None
        if pk not in ids:
            ids.append(pk)
    return ids


def cancel(request, ids: list[int]) -> Outcome:
    """Cancel the runs, in one transaction with the request's audit entry."""
    outcome = Outcome("cancel", ids)
    with transaction.atomic():
        found = lifecycle.cancel_runs(ids, by=request.user.get_username())
        for pk in ids:
            if pk not in found:
                outcome.missing.append(pk)
            elif found[pk]:
                outcome.skipped[pk] = f"already {found[pk]}"
            else:
                outcome.done.append(pk)
        _record(request, "run.cancel_many", outcome)
    return outcome


def retry(request, ids: list[int]) -> Outcome:
    """Retry the runs, in one transaction with the request's audit entry."""
    outcome = Outcome("retry", ids)
    runs = Run.objects.in_bulk(ids)
    with transaction.atomic():
        found = lifecycle.retry_runs([runs[pk] for pk in ids if pk in runs], user=request.user)
        for pk in ids:
            result = found.get(pk)
            if result is None:
                outcome.missing.append(pk)
            elif isinstance(result, RunNotRetryable):
                outcome.skipped[pk] = str(result)
            else:
                outcome.done.append(pk)
                outcome.retries[pk] = result.pk
        _record(request, "run.retry_many", outcome)
    return outcome


def _record(request, action: str, outcome: Outcome) -> None:
    """One entry for the request: the runs acted on, skipped and not found."""
    target = ("run", "", f"runs {', '.join(f'#{pk}' for pk in outcome.ids)}")
    changes: dict = {"runs": outcome.done}
    if outcome.retries:
        changes["retries"] = [outcome.retries[pk] for pk in outcome.done]
    if outcome.skipped:
        changes["skipped"] = sorted(outcome.skipped)
    if outcome.missing:
        changes["not_found"] = outcome.missing
    audit.record(request, action, target, changes)
