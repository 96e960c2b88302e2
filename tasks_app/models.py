import shlex
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.utils import timezone

from tasks_app import cron, secret_env, tokens
from tasks_app.exceptions import SecretsUnreadable
from tasks_app.signals import work_queued

# A task's fields as people set them, with the JSON types the API takes. The
# form, the API's type checks, the JSON shape and a run's snapshot of its task
# all derive from this one list.
TASK_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "command": (str,),
    "shell": (bool,),
    "env": (dict,),
    "working_dir": (str,),
    "timeout": (int, type(None)),
    "labels": (list,),
    "max_retries": (int,),
    "retry_backoff_s": (int, float),
    "retry_backoff_max_s": (int, float),
    "concurrency_limit": (int, type(None)),
    "busy_policy": (str,),
    "priority": (int,),
    "strategy": (str,),
    "pinned_worker": (str,),
    "enabled": (bool,),
    "schedule": (str,),
    "timezone": (str,),
    "misfire_policy": (str,),
    "schedule_paused": (bool,),
    "shards": (int,),
    "merge_command": (str,),
}
# What a run does not keep of its task: who it is, whether, when (a run is made
# by its schedule, never runs one) and how often at once it may be triggered.
NOT_IN_SNAPSHOT = (
    "name",
    "enabled",
    "schedule",
    "timezone",
    "misfire_policy",
    "schedule_paused",
    "concurrency_limit",
    "busy_policy",
)
# Most shards one run may have: each is an attempt row per try, a cell of the
# run page's grid and an entry of the API's run object (README, "Shards").
MAX_SHARDS = 1000
# The fields that decide when a task fires next (Task.next_fire_at).
SCHEDULE_FIELDS = ("schedule", "timezone", "schedule_paused", "enabled")


def labels_key(labels) -> str:
    """One string per set of required labels: the queue is kept apart by it."""
    return ",".join(sorted(set(labels or ())))


def pin_label(worker_id: int) -> str:
    """The pseudo-label of one worker: an attempt that carries it in its labels
    key can only go to that worker (real labels cannot contain '@')."""
    return f"@{worker_id}"


def queue_at(ready_at: datetime, priority: int) -> datetime:
    """An attempt's place in the queue: its ready time, moved earlier by a
    step (SCHEDULER_PRIORITY_AGING_S) per priority point.

    Each point is worth one step of waiting: priority 10 goes ahead of
    priority-0 work that has waited less than 10 steps, and nothing waits
    behind newer work for more than 100 steps (the highest priority). A
    priority is never negative, so a ready attempt's queue_at is <= now.
    """
    return ready_at - timedelta(seconds=priority * settings.SCHEDULER_PRIORITY_AGING_S)


class Strategy(models.TextChoices):
    LEAST_LOADED = "least_loaded", "least_loaded: the worker with the smallest share busy"
    ROUND_ROBIN = "round_robin", "round_robin: successive attempts to successive workers"
    RANDOM = "random", "random: any worker with a free slot"
    PINNED = "pinned", "pinned: only the named worker"
    BROADCAST = "broadcast", "broadcast: once on every matching online worker"


class MisfirePolicy(models.TextChoices):
    SKIP = "skip", "Skip missed ticks"
    RUN_ONCE = "run_once", "Run once for the latest missed tick"


class Task(models.Model):
    """What to run: a command and how to run it."""

    name = models.CharField(max_length=200, unique=True)
    command = models.TextField(
        help_text="Split into argv like a shell would (shlex), unless shell is set."
    )
    shell = models.BooleanField(default=False, help_text="Run the command through /bin/sh -c.")
    env = models.JSONField(default=dict, blank=True)
    # Write-only variables: one Fernet token of their JSON (tasks_app.secret_env),
    # never shown; a run's snapshot keeps the token, not the values.
    secret_env = models.TextField(blank=True, default="", editable=False)
    # Their names, sorted, in clear: all that is ever shown of them, and still
    # known when the token cannot be decrypted (SECRET_KEY changed), so that
    # people can tell which values to set again.
    secret_env_keys = models.JSONField(default=list, blank=True, editable=False)
    # Notifications (tasks_app.notify): [{"url", "events", "secret"}] with each
    # secret a Fernet token (tasks_app.secret_env), never shown; and
    # [{"address", "events"}]. Set through the task form and the API only.
    webhooks = models.JSONField(default=list, blank=True, editable=False)
    notify_emails = models.JSONField(default=list, blank=True, editable=False)
    working_dir = models.CharField(max_length=1024, blank=True)
    timeout = models.PositiveIntegerField(
        null=True, blank=True, help_text="Seconds; empty for none."
    )
    labels = models.JSONField(
        default=list, blank=True, help_text="A worker must have all of these."
    )
    max_retries = models.PositiveSmallIntegerField(
        default=0, help_text="Retries after a failed, timed-out or lost attempt."
    )
    retry_backoff_s = models.FloatField(
        default=10.0, help_text="Delay before the first retry; doubles each time, with jitter."
    )
    retry_backoff_max_s = models.FloatField(default=600.0, help_text="Cap on the retry delay.")

    class BusyPolicy(models.TextChoices):
        QUEUE = "queue", "queue: wait for a running one to end"
        SKIP = "skip", "skip: record a skipped run"
        REPLACE = "replace", "replace: cancel the running one(s)"

    concurrency_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Runs of this task at once; empty or 0 for no limit, 1 never overlaps.",
    )
    busy_policy = models.CharField(
        max_length=16,
        choices=BusyPolicy.choices,
        default=BusyPolicy.QUEUE,
        help_text="What a trigger does when the limit is reached.",
    )
    priority = models.PositiveSmallIntegerField(
        default=0,
        help_text="0-100; higher is dispatched first, and waiting work ages up "
        "(one point per SCHEDULER_PRIORITY_AGING_S).",
    )
    strategy = models.CharField(
        max_length=16,
        choices=Strategy.choices,
        default=Strategy.LEAST_LOADED,
        help_text="How an attempt picks among the workers that can take it.",
    )
    # A worker's name, not a key: tasks_app does not depend on workers_app,
    # and a name says what was meant after that worker is deleted (a run
    # triggered then fails with that reason; see lifecycle._routes).
    pinned_worker = models.CharField(
        max_length=200, blank=True, help_text="The worker a pinned task runs on (its name)."
    )
    # Fan-out and fan-in: a run makes `shards` attempts (SCHEDULER_SHARD_INDEX
    # 0..N-1), then, once all succeeded, one of merge_command (see lifecycle).
    shards = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_SHARDS)],
        help_text=f"Attempts per run, each with SCHEDULER_SHARD_INDEX/COUNT; 1 to {MAX_SHARDS}.",
    )
    merge_command = models.TextField(
        blank=True,
        help_text="Run once all shards succeeded, with their stdout as its stdin; empty for none.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    # (After the two above: the field named timezone hides django.utils.timezone
    # in the rest of this class body.)
    schedule = models.CharField(
        max_length=200,
        blank=True,
        validators=[cron.validate_schedule],
        help_text="Five-field cron expression or @hourly/@daily/@weekly/@monthly/@yearly; "
        "empty for none.",
    )
    timezone = models.CharField(
        max_length=64,
        default="UTC",
        validators=[cron.validate_timezone],
        help_text="IANA time zone the schedule is read in.",
    )
    misfire_policy = models.CharField(
        max_length=16,
        choices=MisfirePolicy.choices,
        default=MisfirePolicy.SKIP,
        help_text="What a tick missed while the scheduler was down or paused does.",
    )
    schedule_paused = models.BooleanField(
        default=False, help_text="The schedule does not fire; the task can still be run."
    )
    # When the schedule fires next (UTC), kept by save() and by each firing:
    # a scheduler pass reads only the due tasks off this index. Null: never
    # (no schedule, schedule paused, task disabled).
    next_fire_at = models.DateTimeField(null=True, blank=True, db_index=True, editable=False)

    class Meta:
        ordering = ["name"]
        # The roles (tasks_app.roles): held through the groups of the same names.
        permissions = [
            ("view_scheduler", "Read tasks, runs, output and workers"),
            ("operate_scheduler", "Create, edit, run, cancel, retry tasks; drain workers"),
            ("administer_scheduler", "Enroll, approve, revoke workers; pause; manage users"),
        ]

    @classmethod
    def from_db(cls, db, field_names, values):
        task = super().from_db(db, field_names, values)
        task._loaded_schedule = task._schedule_key()
        task._loaded_limit = task.__dict__.get("concurrency_limit")
        return task

    def _schedule_key(self) -> tuple:
        return tuple(self.__dict__.get(name) for name in SCHEDULE_FIELDS)

    def save(self, *args, **kwargs):
        # A new or changed schedule counts from now: ticks it would have had
        # before (while paused, disabled or under another expression) are not
        # misfires to catch up.
        if self._schedule_key() != getattr(self, "_loaded_schedule", None):
            self.next_fire_at = self.compute_next_fire()
            if kwargs.get("update_fields") is not None:
                kwargs["update_fields"] = {*kwargs["update_fields"], "next_fire_at"}
        raised = self._limit_raised()
        super().save(*args, **kwargs)
        self._loaded_schedule = self._schedule_key()
        self._loaded_limit = self.concurrency_limit
        if raised:
            from tasks_app import lifecycle  # lifecycle builds on these models

            lifecycle.release_held_runs(self.pk)

    def _limit_raised(self) -> bool:
        """Held runs may go: the limit was lifted or raised since it was loaded."""
        if "_loaded_limit" not in self.__dict__ or "concurrency_limit" not in self.__dict__:
            return False
        old, new = self._loaded_limit, self.concurrency_limit
        return bool(old) and (not new or new > old)

    def set_schedule_paused(self, paused: bool) -> None:
        """Pause the schedule (the task can still be run) or resume it from now."""
        self.schedule_paused = paused
        self.save(update_fields=["schedule_paused", "updated_at"])

    def compute_next_fire(self, after=None):
        """The next fire time after `after` (default: the clock's now), or None."""
        from tasks_app import clock

        if not self.schedule or self.schedule_paused or not self.enabled:
            return None
        return cron.next_fire(self.schedule, self.timezone, after or clock.now())

    def __str__(self) -> str:
        return self.name

    def argv(self) -> list[str]:
        return shlex.split(self.command)

    def secret_values(self) -> dict[str, str]:
        return secret_env.decrypt(self.secret_env)

    def secrets_unreadable(self) -> bool:
        """It has secret variables this server cannot decrypt (another SECRET_KEY)."""
        return bool(self.secret_env) and not secret_env.readable(self.secret_env)

    def set_secret_values(self, values: dict[str, str]) -> None:
        self.secret_env = secret_env.encrypt(values)
        self.secret_env_keys = sorted(values)

    def set_webhooks(self, hooks: list[dict]) -> None:
        """Keep these webhooks (validators.clean_webhooks' shape), secrets encrypted."""
        self.webhooks = [
            {
                "url": hook["url"],
                "events": list(hook["events"]),
                "secret": secret_env.encrypt({"secret": hook["secret"]}),
            }
            for hook in hooks
        ]

    def webhooks_shown(self) -> list[dict]:
        """The webhooks as the API and pages show them: never the secret."""
        return [
            {"url": hook["url"], "events": list(hook["events"]), "has_secret": bool(hook["secret"])}
            for hook in self.webhooks or ()
        ]

    def webhook_secret(self, url: str) -> str | None:
        """The secret of this task's webhook to `url` (None: no such webhook).

        Raises SecretsUnreadable when it was encrypted under another SECRET_KEY.
        """
        for hook in self.webhooks or ():
            if hook["url"] == url:
                return secret_env.decrypt(hook["secret"])["secret"]
        return None

    def definition(self, params: dict | None = None) -> dict:
        """The snapshot a run keeps, so that editing the task never rewrites history.

        Run parameters are applied here: `args` are appended to the command
        line (quoted), `env` is laid over the task's environment.
        """
        snapshot = {
            name: getattr(self, name) for name in TASK_FIELDS if name not in NOT_IN_SNAPSHOT
        }
        snapshot["env"] = dict(self.env)
        snapshot["labels"] = list(self.labels)
        params = params or {}
        try:
            # Read now, so that a run whose agent could not be given its
            # secrets is refused at its trigger rather than stuck in dispatch.
            secrets = self.secret_values()
        except SecretsUnreadable as exc:
            raise ValidationError(str(exc)) from None
        overlap = set(params.get("env") or ()) & set(secrets)
        if overlap:
            # Silently running without the secret (or with a value chosen by
            # whoever triggers) would be worse than saying no.
            raise ValidationError(
                f"Run parameters cannot set {', '.join(sorted(overlap))}: "
                "a secret variable of this task."
            )
        if params.get("args"):
            snapshot["command"] = f"{self.command} {shlex.join(params['args'])}"
        snapshot["env"].update(params.get("env") or {})
        # The token, not the values: a run row (its API, page, a database copy)
        # shows no secret. The assign frame decrypts it for the agent.
        snapshot["secret_env"] = self.secret_env
        snapshot["argv"] = None if self.shell else shlex.split(snapshot["command"])
        # Run parameters are the shards' own: the merge runs as written.
        merge = self.merge_command
        snapshot["merge_argv"] = shlex.split(merge) if merge and not self.shell else None
        return snapshot


class DeletedTask(models.Model):
    """A deleted task's id and name: its runs keep the id, this says it is gone."""

    id = models.BigIntegerField(primary_key=True)
    name = models.CharField(max_length=200)
    deleted_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} (deleted)"


def record_task_saved(sender, instance: Task, created: bool, raw: bool = False, **kwargs) -> None:
    """task.created / task.changed, whoever saved it (dashboard, API, admin, a
    schedule paused): the live task list follows these. Not for a fixture or
    database copy loaded raw."""
    if raw:
        return
    from tasks_app import events  # events builds on these models

    kind = events.TASK_CREATED if created else events.TASK_CHANGED
    events.record(kind, task_id=instance.pk, name=instance.name)


def record_task_deleted(sender, instance: Task, **kwargs) -> None:
    from tasks_app import events

    events.record(events.TASK_DELETED, task_id=instance.pk, name=instance.name)


def remember_deleted_task(sender, instance: Task, **kwargs) -> None:
    DeletedTask.objects.update_or_create(pk=instance.pk, defaults={"name": instance.name})
    # Its runs live on, its limit does not: runs held back by it go now, or
    # nothing would ever release them.
    held = Attempt.objects.filter(
        run__task_id=instance.pk, status=Attempt.Status.QUEUED, ready_at=HELD_UNTIL
    ).values_list("priority", flat=True)
    released = 0
    now = timezone.now()
    # One update per priority among them (there are few), not one per row.
    for priority in set(held):
        released += held.filter(priority=priority).update(
            ready_at=now, queue_at=queue_at(now, priority)
        )
    if released:
        transaction.on_commit(lambda: work_queued.send(sender=Run, labels_keys=None), robust=True)


class Run(models.Model):
    """One triggering of a task, with a snapshot of the task as it was."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"
        # Never started: the task's concurrency limit was reached (busy policy skip).
        SKIPPED = "skipped"

    class Trigger(models.TextChoices):
        MANUAL = "manual"
        API = "api"
        SCHEDULE = "schedule"
        RETRY = "retry"

    FINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.SKIPPED)

    # The task's id outlives the task (no constraint, nothing done on delete),
    # so its history stays findable by id; DeletedTask says it is gone. Ids are
    # never reused (AUTOINCREMENT on SQLite, a sequence on PostgreSQL).
    task = models.ForeignKey(
        Task,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="runs",
    )
    task_name = models.CharField(max_length=200)
    definition = models.JSONField()
    retry_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="retries"
    )
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.MANUAL)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # Who asked (a username; kept as text like task_name, so it outlives the user).
    # db_default: raw inserts (lifecycle's, seedruns') need not name it.
    cancel_requested_by = models.CharField(max_length=150, blank=True, default="", db_default="")
    reason = models.CharField(max_length=500, blank=True, help_text="Why the run failed.")
    # Given at trigger time ({"env": {...}, "args": [...]}); already applied to
    # the definition, kept to show what this run was asked for.
    params = models.JSONField(default=dict, blank=True)
    # The cron tick a scheduled run is for (trigger "schedule"), null otherwise.
    scheduled_for = models.DateTimeField(null=True, blank=True)
    # A delayed run ("run at"): its first attempt is not dispatched before this.
    run_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        # The runs pages and API page newest first by (created_at, id), filtered
        # (tasks_app.history); each index orders a filter's rows the list's way.
        # run_task_id serves "the newest run of each task" (the task list), by id.
        # The task-name prefix index is PostgreSQL's alone (text_pattern_ops):
        # migration 0014.
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="run_created"),
            models.Index(fields=["status", "-created_at", "-id"], name="run_status_created"),
            models.Index(fields=["task", "-created_at", "-id"], name="run_task_created"),
            models.Index(fields=["task", "-id"], name="run_task_id"),
            # The overview's windows (runs finished since a time, by status), and
            # retention's oldest-first scan of the runs that ended before its cutoff.
            models.Index(fields=["finished_at", "status"], name="run_finished"),
        ]
        constraints = [
            # A cron tick makes one run, however many server processes fire
            # it at once: the database, not a flag in memory, decides.
            models.UniqueConstraint(
                fields=["task", "scheduled_for"],
                condition=models.Q(scheduled_for__isnull=False),
                name="run_task_scheduled_for",
            )
        ]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.task_name}"

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None


# The ready_at of an attempt held back by its task's concurrency limit: later
# than any real time, so dispatch (which takes ready_at <= now) never sees it
# until lifecycle releases it (sets ready_at to the time a run of the task ended).
HELD_UNTIL = datetime(9000, 1, 1, tzinfo=UTC)


class Attempt(models.Model):
    """One try of one shard of a run on one worker."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        ASSIGNED = "assigned"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        TIMED_OUT = "timed_out"
        CANCELLED = "cancelled"
        LOST = "lost"

    ACTIVE = (Status.ASSIGNED, Status.RUNNING)
    FINAL = (Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED, Status.LOST)

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="attempts")
    shard_index = models.PositiveIntegerField(default=0)
    try_number = models.PositiveIntegerField(default=1)
    worker = models.ForeignKey(
        "workers_app.Worker",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="attempts",
    )
    # Kept as text too, so history names the worker after it is deleted.
    worker_name = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    exit_code = models.IntegerField(null=True, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    queued_at = models.DateTimeField(default=timezone.now)
    # The queue's order and partition: dispatch takes the smallest queue_at of
    # a labels_key (the run's required labels, and a pinned attempt's worker
    # as "@<id>") with one index range scan, so its cost follows the slots it
    # fills, not the queue's length. ready_at is when it may go at all (a
    # retry's backoff, a delayed run's time); queue_at is ready_at less its
    # priority's head start (models.queue_at), kept with it on every write.
    labels_key = models.CharField(max_length=2200, blank=True, default="")
    ready_at = models.DateTimeField(default=timezone.now)
    queue_at = models.DateTimeField(default=timezone.now)
    # The run's priority, copied so that a re-queue can recompute queue_at.
    priority = models.PositiveSmallIntegerField(default=0, db_default=0)
    # Failover: the worker the try before this one was lost on, failed on or
    # was refused by; dispatch gives it to another eligible worker with a free
    # slot when there is one. A plain id: a hint, not a relation.
    avoid_worker = models.BigIntegerField(null=True, blank=True)
    # The run's timeout, for the master's backstop without reading the run.
    timeout_s = models.PositiveIntegerField(null=True, blank=True)
    assigned_at = models.DateTimeField(null=True, blank=True)
    accepted_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Set when the master, not the agent, ended the attempt (lost, timeout
    # backstop): the agent's own report may still arrive, late.
    closed_by_master = models.BooleanField(default=False)
    late_status = models.CharField(max_length=16, blank=True)
    late_exit_code = models.IntegerField(null=True, blank=True)
    late_reason = models.CharField(max_length=500, blank=True)
    late_reported_at = models.DateTimeField(null=True, blank=True)
    output_bytes = models.BigIntegerField(default=0, help_text="Bytes the command printed.")
    stored_bytes = models.BigIntegerField(default=0, help_text="Bytes of output kept.")
    truncated = models.BooleanField(default=False)

    class Meta:
        ordering = ["run_id", "shard_index", "try_number"]
        indexes = [
            # Dispatch takes queued attempts of one label set, oldest ready
            # first; slot counts and liveness scan a worker's active attempts.
            models.Index(fields=["status", "labels_key", "queue_at", "id"], name="attempt_queue"),
            models.Index(fields=["worker", "status"], name="attempt_worker_status"),
            # The overview's workers: attempts each finished in the last hour.
            models.Index(fields=["finished_at"], name="attempt_finished"),
            # The runs list's worker filter: EXISTS (an attempt of the run on it).
            models.Index(fields=["worker_name", "run"], name="attempt_worker_name_run"),
        ]
        # Two processes retrying the same failure create the same try once.
        constraints = [
            models.UniqueConstraint(
                fields=["run", "shard_index", "try_number"], name="attempt_run_shard_try"
            )
        ]

    @classmethod
    def queued(cls, *, ready, now, priority: int = 0, **fields) -> "Attempt":
        """A new try, queued at `now`, dispatchable from `ready`, its place in
        the queue set by its priority (the one place queue_at is first made)."""
        return cls(
            queued_at=now,
            ready_at=ready,
            queue_at=queue_at(ready, priority),
            priority=priority,
            **fields,
        )

    def __str__(self) -> str:
        return f"attempt {self.pk} (run {self.run_id}, try {self.try_number})"

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL

    @property
    def is_held(self) -> bool:
        """Queued behind its task's concurrency limit (busy policy queue)."""
        return self.status == self.Status.QUEUED and self.ready_at == HELD_UNTIL

    @property
    def not_before(self):
        """When a delay (a delayed run's, a retry's backoff, a refused assignment's)
        lets it go, if it waits for one; None while held by the concurrency limit."""
        if self.is_held:
            return None
        if self.ready_at and self.queued_at and self.ready_at > self.queued_at:
            return self.ready_at
        return None

    @property
    def is_superseded(self) -> bool:
        """The master gave up on it, then the agent's own result arrived anyway."""
        return bool(self.late_reported_at)

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None


class LogChunk(models.Model):
    """A batch of output of one attempt; appended, never rewritten."""

    class Stream(models.TextChoices):
        STDOUT = "stdout"
        STDERR = "stderr"

    attempt = models.ForeignKey(Attempt, on_delete=models.CASCADE, related_name="log_chunks")
    seq = models.PositiveIntegerField()
    stream = models.CharField(max_length=6, choices=Stream.choices)
    data = models.TextField()

    class Meta:
        ordering = ["attempt_id", "seq"]
        # A replayed chunk (same attempt, same seq) is a duplicate, never a second copy.
        constraints = [
            models.UniqueConstraint(fields=["attempt", "seq"], name="logchunk_attempt_seq")
        ]

    def __str__(self) -> str:
        return f"{self.stream} #{self.seq} of attempt {self.attempt_id}"


class ApiToken(models.Model):
    """A bearer token for the JSON API, stored as a hash."""

    # "Last used" is recorded at most this often, not on every request.
    LAST_USED_RESOLUTION = timedelta(minutes=1)

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, blank=True)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    # None: until revoked.
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"API token {self.name or self.pk} of {self.user}"

    @property
    def is_live(self) -> bool:
        return self.revoked_at is None and (
            self.expires_at is None or self.expires_at > timezone.now()
        )

    @classmethod
    def mint(cls, user, *, name: str = "", expires_at=None) -> tuple[str, "ApiToken"]:
        """A new token for this user; the raw value is returned once and never stored."""
        raw, digest = tokens.mint("api")
        token = cls.objects.create(
            user=user, name=name[:100], token_hash=digest, expires_at=expires_at
        )
        return raw, token


class SchedulerState(models.Model):
    """The master-wide switch: while paused, nothing new is dispatched."""

    paused = models.BooleanField(default=False)
    paused_at = models.DateTimeField(null=True, blank=True)
    paused_by = models.CharField(max_length=150, blank=True)

    class Meta:
        verbose_name = "scheduler state"
        verbose_name_plural = "scheduler state"

    def __str__(self) -> str:
        return "paused" if self.paused else "running"

    @classmethod
    def current(cls) -> "SchedulerState":
        state, _ = cls.objects.get_or_create(pk=1)
        return state

    @classmethod
    def set_paused(cls, paused: bool, by: str = "") -> "SchedulerState":
        """Pause (nothing new is dispatched, running work finishes) or resume."""
        from tasks_app import events  # events builds on these models

        cls.current()
        fields = {
            "paused": paused,
            "paused_at": timezone.now() if paused else None,
            "paused_by": by if paused else "",
        }
        # Race: two people flipping it at once; only the one that moves the
        # switch records the change (pausing again only renews who and when).
        if cls.objects.filter(pk=1, paused=not paused).update(**fields):
            kind = events.SCHEDULER_PAUSED if paused else events.SCHEDULER_RESUMED
            events.record(kind, by=by)
        else:
            cls.objects.filter(pk=1).update(**fields)
        # Dispatch keeps the switch in memory: tell it (and, on resume, to look).
        transaction.on_commit(lambda: work_queued.send(sender=cls, labels_keys=None), robust=True)
        return cls.current()

    @classmethod
    def is_paused(cls) -> bool:
        return cls.objects.filter(pk=1, paused=True).exists()


class AuditEntryQuerySet(models.QuerySet):
    """Entries are only ever added: no update or delete through the ORM."""

    def update(self, **kwargs):
        raise AuditEntry.Immutable("audit entries are never edited")

    def delete(self):
        raise AuditEntry.Immutable(
            "audit entries are never deleted through the application; see README, Audit"
        )


class AuditEntry(models.Model):
    """Who changed what, when, from where (tasks_app.audit records them).

    Written once and never edited: save() refuses an existing row and the
    queryset refuses update() and delete(). Its user and token are kept by id
    without a database constraint (DO_NOTHING): deleting a user or token
    leaves the entry exactly as written, and `actor` still says who it was.
    """

    class Immutable(Exception):
        """An audit entry cannot be changed or deleted."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    # "bob", "bob (token ci)", "manage.py", "system"; for a failed login the
    # name that was tried.
    actor = models.CharField(max_length=300)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    token = models.ForeignKey(
        ApiToken,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    action = models.CharField(max_length=40)
    # "task 12 (nightly)": readable as it was then, whatever the object became.
    target = models.CharField(max_length=300, blank=True)
    target_type = models.CharField(max_length=40, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    address = models.CharField(max_length=64, blank=True)
    # Edits: {field: [old, new]}; secrets by name only. Others: ids and facts.
    changes = models.JSONField(default=dict, blank=True)

    objects = AuditEntryQuerySet.as_manager()

    class Meta:
        verbose_name = "audit entry"
        verbose_name_plural = "audit entries"
        ordering = ["-id"]
        # The page's filters, each newest first (keyset on id).
        indexes = [
            models.Index(fields=["action", "-id"], name="audit_action_newest"),
            models.Index(fields=["actor", "-id"], name="audit_actor_newest"),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.target}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise self.Immutable("audit entries are never edited")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise self.Immutable("audit entries are never deleted through the application")


class Event(models.Model):
    """One state change, written in the same transaction as the change (an outbox).

    The live dashboard, run timelines, notifications and retention read these;
    `tasks_app.events` writes them and, once their transaction commits, tells
    every server. Ids are plain integers rather than foreign keys: an event
    outlives nothing it names (retention deletes old runs and their events
    together) and writing one takes no lock on the rows it names.
    """

    id = models.BigAutoField(primary_key=True)
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=40)
    run_id = models.BigIntegerField(null=True, blank=True)
    attempt_id = models.BigIntegerField(null=True, blank=True)
    task_id = models.BigIntegerField(null=True, blank=True)
    worker_id = models.BigIntegerField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            # A run's timeline; a task's and a worker's recent events.
            models.Index(fields=["run_id", "id"], name="event_run"),
            models.Index(fields=["task_id", "id"], name="event_task"),
            models.Index(fields=["worker_id", "id"], name="event_worker"),
            # Retention deletes by age.
            models.Index(fields=["at"], name="event_at"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.kind}"


class Delivery(models.Model):
    """One notification to one target: a task's webhook or address told of a
    run's event, or an operator told of a stuck queue (tasks_app.notify).

    Planned once however many servers plan: the unique (event, channel,
    target) (or (episode, channel, target) for an alert) is the arbiter and
    plans are inserted with ON CONFLICT DO NOTHING. Sent once: a sender claims
    a row by moving it to `sending` with a lease (next_try_at), under
    SKIP LOCKED on PostgreSQL.
    """

    class Channel(models.TextChoices):
        WEBHOOK = "webhook"
        EMAIL = "email"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        SENT = "sent"
        FAILED = "failed"

    # The Event it tells of (a plain id, like Event's own: retention deletes both).
    event_id = models.BigIntegerField(null=True, blank=True)
    # A stuck-queue alert's episode ("stuck:<labels>@<since>"), instead of an event.
    episode = models.CharField(max_length=300, null=True, blank=True)
    run_id = models.BigIntegerField(null=True, blank=True)
    task_id = models.BigIntegerField(null=True, blank=True)
    # failure, recovery, success, stuck_queue
    kind = models.CharField(max_length=20)
    channel = models.CharField(max_length=10, choices=Channel.choices)
    target = models.CharField(max_length=500)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # When it may be tried (pending), or when a sender's claim lapses (sending).
    next_try_at = models.DateTimeField(default=timezone.now)
    response_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    # What an alert says (a run's notification is built from the run when sent).
    body = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "deliveries"
        indexes = [
            # The senders' claim: due rows of a status, oldest first.
            models.Index(fields=["status", "next_try_at"], name="delivery_due"),
            # A task page's delivery log, newest first.
            models.Index(fields=["task_id", "-id"], name="delivery_task"),
            models.Index(fields=["run_id"], name="delivery_run"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["event_id", "channel", "target"],
                condition=models.Q(event_id__isnull=False),
                name="delivery_once_per_event",
            ),
            models.UniqueConstraint(
                fields=["episode", "channel", "target"],
                condition=models.Q(episode__isnull=False),
                name="delivery_once_per_episode",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} to {self.target} ({self.status})"


class NotifyCursor(models.Model):
    """How far the notification planners have read the events (one row, pk 1).

    Shared by every server: it is the end of the unbroken run of event ids
    planned so far (tasks_app.notify: events past a gap are planned at once
    and looked at again until the gap fills or ages out), so a server behind
    another never skips an event, and the unique constraints of Delivery keep
    a second look from planning twice.
    """

    last_event_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"notifications planned up to event {self.last_event_id}"
