"""The writer: jobs applied together in one transaction, each answered on its own."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from django.db import transaction

from tasks_app.models import Task
from tasks_app.writer import Writer

pytestmark = pytest.mark.django_db(transaction=True)


def make_tasks(payloads: list[str]) -> list[str]:
    """A handler: creates a task per payload, refuses the payload "bad"."""
    if "bad" in payloads:
        raise ValueError("bad payload")
    Task.objects.bulk_create(Task(name=name, command="true") for name in payloads)
    return [name.upper() for name in payloads]


@database_sync_to_async
def task_names() -> list[str]:
    return sorted(Task.objects.values_list("name", flat=True))


async def test_it_applies_what_accumulated_in_one_batch_and_answers_each_job():
    writer = Writer()
    writer.register("make", make_tasks, order=0)

    futures = [writer.submit_nowait("make", name) for name in ("a", "b", "c")]

    assert await asyncio.gather(*futures) == ["A", "B", "C"]
    assert writer.batches == 1
    assert await task_names() == ["a", "b", "c"]


async def test_a_failing_job_fails_alone_and_the_rest_of_its_batch_is_applied():
    writer = Writer()
    writer.register("make", make_tasks, order=0)

    futures = [writer.submit_nowait("make", name) for name in ("a", "bad", "b")]
    results = await asyncio.gather(*futures, return_exceptions=True)

    assert results[0] == "A" and results[2] == "B"
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad payload"
    assert await task_names() == ["a", "b"]


async def test_a_hook_failing_after_the_commit_does_not_apply_the_batch_twice():
    writer = Writer()

    def make_and_hook(payloads):
        # A careless after-commit hook (ours are all robust=True).
        transaction.on_commit(lambda: 1 / 0)
        return make_tasks(payloads)

    writer.register("make", make_and_hook, order=0)

    assert await writer.submit("make", "once") == "ONCE"
    assert await task_names() == ["once"]


async def test_follow_ups_requested_many_times_run_once_after_the_batch():
    writer = Writer()
    passes = []
    writer.register_followup("count", lambda: passes.append(1))

    def request_follow_up(payloads):
        for _ in payloads:
            writer.request("count")
        return payloads

    writer.register("ask", request_follow_up, order=0)

    await asyncio.gather(*(writer.submit_nowait("ask", n) for n in range(5)))

    assert passes == [1]
