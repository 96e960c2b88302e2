"""Where a run's attempts may go: one (shard index, labels key) per attempt.

A labels key is the queue partition dispatch reads (models.labels_key): the
task's required labels, plus, for an attempt that must go to one worker,
that worker's pseudo-label "@<id>" (models.pin_label), which only that
worker matches on dispatch's board. So `pinned` and `broadcast` need nothing
of dispatch but the key, and a retry (which copies its try's key) stays on
the same worker: pinned work never fails over.

Naming workers is workers_app's knowledge, and tasks_app must not import it
(DESIGN.md): workers_app registers a `Directory` at start-up instead, as it
subscribes to tasks_app.signals. Without one (a bare tasks_app), pinned and
broadcast runs fail with a reason and nothing else changes.

Race: a broadcast reads who is online at trigger time; a worker that goes
offline a moment later keeps its shard queued (it runs when the worker is
back, or the run is cancelled), one that comes online a moment later gets none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from tasks_app.models import Strategy, labels_key, pin_label


@dataclass(frozen=True)
class OnlineWorker:
    id: int
    name: str
    labels: frozenset[str]


class Directory(Protocol):
    def ids_by_name(self, names: Iterable[str]) -> dict[str, int]:
        """Worker ids of those of these names that exist and are not revoked."""

    def taking_work(self) -> list[OnlineWorker]:
        """Workers online now and taking new work (not draining, disabled or revoked)."""


_directory: Directory | None = None


def register(directory: Directory | None) -> None:
    global _directory
    _directory = directory


def worker_exists(name: str) -> bool:
    return _directory is not None and name in _directory.ids_by_name([name])


def pin_error(strategy: str, name: str) -> str | None:
    """What is wrong with a task's strategy and pinned worker together, if
    anything: a name goes with `pinned`, and with nothing else."""
    if strategy == Strategy.PINNED and not name:
        return "Name the worker a pinned task runs on."
    if strategy != Strategy.PINNED and name:
        return (
            f"Only a pinned task names a worker (strategy is {strategy}): "
            "choose pinned, or leave it empty."
        )
    if name and not worker_exists(name):
        return f"No worker is named {name!r}."
    return None


def shape_errors(strategy: str, name: str, shards: int | None) -> dict[str, str]:
    """What is wrong with a task's strategy, pinned worker and shard count
    together, by field. A pinned task runs one shard on its worker, and a
    broadcast makes its own shards (one per worker): either with shards > 1
    would contradict itself, so it is refused rather than guessed at."""
    errors = {}
    pin = pin_error(strategy, name)
    if pin:
        errors["pinned_worker"] = pin
    if shards is not None and shards > 1:
        if strategy == Strategy.PINNED:
            errors["shards"] = (
                "A pinned task runs as one shard on its worker: set shards to 1, "
                "or choose another strategy to spread shards over workers."
            )
        elif strategy == Strategy.BROADCAST:
            errors["shards"] = (
                "A broadcast makes one shard per matching online worker: set shards to 1."
            )
    return errors


class Unroutable(Exception):
    """A run none of whose attempts can go anywhere (the reason is the message)."""


class Routes:
    """The directory's answers for one batch of runs: one query of each kind at most."""

    def __init__(self, definitions: Iterable[dict]) -> None:
        definitions = list(definitions)
        pinned = {
            d.get("pinned_worker", "") for d in definitions if d.get("strategy") == Strategy.PINNED
        }
        broadcast = any(d.get("strategy") == Strategy.BROADCAST for d in definitions)
        self.ids = _directory.ids_by_name(pinned) if pinned and _directory else {}
        self.online = _directory.taking_work() if broadcast and _directory else []

    def of(self, definition: dict) -> list[tuple[int, str]]:
        """(shard index, labels key) of each attempt a run with this snapshot
        starts with. A broadcast's shard count is the number of its workers:
        the caller puts it in the snapshot (definition["shards"]).

        Raises Unroutable when there is nowhere to go: the run fails at once.
        """
        labels = definition.get("labels") or []
        strategy = definition.get("strategy")
        if strategy == Strategy.PINNED:
            name = definition.get("pinned_worker", "")
            if name not in self.ids:
                raise Unroutable(f"pinned worker {name!r} no longer exists or was revoked")
            return [(0, labels_key([*labels, pin_label(self.ids[name])]))]
        if strategy == Strategy.BROADCAST:
            wanted = set(labels)
            targets = sorted(w.id for w in self.online if wanted <= w.labels)
            if not targets:
                where = f" with the labels {', '.join(labels)}" if labels else ""
                raise Unroutable(f"broadcast: no online worker{where} takes new work")
            return [(i, labels_key([*labels, pin_label(pk)])) for i, pk in enumerate(targets)]
        key = labels_key(labels)
        return [(i, key) for i in range(definition.get("shards", 1))]
