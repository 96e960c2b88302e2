from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from tasks_app import tokens
from tasks_app.models import Attempt


class WorkerQuerySet(models.QuerySet):
    def with_busy_slots(self):
        """Annotate each worker with `busy`: the slots its active attempts use."""
        return self.annotate(
            busy=models.Count("attempts", filter=models.Q(attempts__status__in=Attempt.ACTIVE))
        )


class Worker(models.Model):
    """A node running the agent, known by its hashed credential."""

    class State(models.TextChoices):
        # Enrolled but not approved by an admin yet: no work, whether connected
        # or not (channel_name says that). Sticky like disabled: connecting,
        # disconnecting and being reaped leave it as it is; approve() ends it.
        PENDING = "pending"
        ONLINE = "online"
        OFFLINE = "offline"
        DRAINING = "draining"
        DISABLED = "disabled"

    name = models.CharField(max_length=200, unique=True)
    hostname = models.CharField(max_length=255, blank=True)
    # Decided on the server (the admin's approval, or an auto-approving token
    # taking the request as it is): what dispatch uses. The agent's hello
    # cannot widen them; it only updates the requested_* pair below.
    labels = models.JSONField(default=list, blank=True)
    capacity = models.PositiveIntegerField(default=1)
    # What the agent asks for (at enrollment, then in every hello), shown on
    # approval. Dispatch gives it no more slots than it asks for (its agent
    # would reject the rest), and no more than `capacity`.
    requested_labels = models.JSONField(default=list, blank=True)
    requested_capacity = models.PositiveIntegerField(null=True, blank=True)
    # Null while pending. A worker made any other way than by enrolling (the
    # Django admin, a data migration) is an admin's doing: approved.
    approved_at = models.DateTimeField(null=True, blank=True, default=timezone.now)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # An admin's consent to one re-enrollment under this name (its agent lost
    # its credential); used up by that enrollment.
    reenroll_allowed = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.OFFLINE)
    # An operator's drain outlives reconnects; an agent's own drain (it is
    # shutting down) is reported in its hello and heartbeats instead.
    drain_requested = models.BooleanField(default=False)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    connected_at = models.DateTimeField(null=True, blank=True)
    agent_version = models.CharField(max_length=50, blank=True)
    credential_hash = models.CharField(max_length=64, unique=True)
    # The websocket consumer currently serving this worker: frames are sent to
    # it alone, and a stale one must not mark the worker offline when a newer
    # connection has taken over.
    channel_name = models.CharField(max_length=200, blank=True)
    # The server process (Server.name) that connection is on, for operators.
    server = models.CharField(max_length=255, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkerQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["state"], name="worker_state")]

    def __str__(self) -> str:
        return self.name

    @property
    def is_pending(self) -> bool:
        return self.approved_at is None

    @property
    def slots(self) -> int:
        """What dispatch fills: the decided capacity, or less if the agent asks for less."""
        return min(self.capacity, self.requested_capacity or self.capacity)


class EnrollmentToken(models.Model):
    """Lets agents register: max_uses times (None: any number) until it expires or is revoked."""

    token_hash = models.CharField(max_length=64, unique=True)
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    uses = models.PositiveIntegerField(default=0)
    max_uses = models.PositiveIntegerField(null=True, blank=True)
    # Workers it enrolls skip the admin's approval, their requests taken as
    # they are: for `make run`'s local agents and for fleets an admin vouches for.
    auto_approve = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"enrollment token {self.pk} ({self.note or 'no note'})"

    @classmethod
    def mint(
        cls,
        *,
        note: str = "",
        user=None,
        ttl_hours: float | None = None,
        max_uses: int | None = None,
        auto_approve: bool = False,
    ) -> tuple[str, "EnrollmentToken"]:
        """A new token; the raw value is returned once and never stored."""
        raw, digest = tokens.mint("enr")
        hours = settings.SCHEDULER_ENROLLMENT_TTL_HOURS if ttl_hours is None else ttl_hours
        token = cls.objects.create(
            token_hash=digest,
            note=note,
            created_by=user if user is not None and user.is_authenticated else None,
            expires_at=timezone.now() + timedelta(hours=hours),
            max_uses=max_uses,
            auto_approve=auto_approve,
        )
        return raw, token

    def options(self) -> dict:
        """What it was minted with, for the audit log."""
        return {
            "expires_at": self.expires_at.isoformat(),
            "max_uses": self.max_uses,
            "auto_approve": self.auto_approve,
        }

    @property
    def is_usable(self) -> bool:
        return (
            self.revoked_at is None
            and self.expires_at > timezone.now()
            and (self.max_uses is None or self.uses < self.max_uses)
        )

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "used up"
        return "usable"


class Server(models.Model):
    """A live `serve` process of this install (workers_app.servers).

    Servers know each other through this table: each heartbeats its row every
    tick and deletes it when it stops; one that is silent for
    servers.SILENT_AFTER_S (or whose process is gone, on the same host) is
    dead. A second server is refused unless the install runs on PostgreSQL
    and Redis.
    """

    name = models.CharField(max_length=255, unique=True)  # hostname:pid:random
    hostname = models.CharField(max_length=255)
    # Which kernel and pid namespace `pid` is in (boot id / namespace): only
    # there may a missing process be taken for a dead server.
    host_key = models.CharField(max_length=100, blank=True)
    pid = models.PositiveIntegerField()
    address = models.CharField(max_length=255, blank=True)  # where it listens
    database = models.CharField(max_length=50)
    # "in-memory", or "redis <host:port/db> prefix <prefix>": servers of one
    # install must all name the same one.
    channel_layer = models.CharField(max_length=300)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["started_at", "id"]

    def __str__(self) -> str:
        return self.name


class StuckQueue(models.Model):
    """A label set whose ready work no worker taking work can run: one row per
    episode, from when a server first saw it until it clears (workers_app.stuck).

    Unique by labels: every server sees the same episode start, so the alert's
    deliveries (keyed by the episode) are planned once.
    """

    labels_key = models.CharField(max_length=2200, unique=True)
    since = models.DateTimeField(default=timezone.now)
    alerted_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"queue [{self.labels_key or 'no labels'}] stuck since {self.since:%Y-%m-%d %H:%M}"
