"""The task form, shared by the dashboard and the JSON API."""

import shlex

from django import forms
from django.utils import timezone

from tasks_app import cron, routing, validators
from tasks_app.exceptions import InvalidSchedule, SecretsUnreadable
from tasks_app.models import MAX_SHARDS, TASK_FIELDS, MisfirePolicy, Strategy, Task

MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_RETRIES = 100
MAX_BACKOFF_S = 24 * 3600
MAX_CONCURRENCY = 10_000
MAX_PRIORITY = 100


class EnvField(forms.Field):
    """KEY=VALUE lines in the browser, an object in the API."""

    widget = forms.Textarea(attrs={"rows": 3, "placeholder": "GREETING=hello\nLOG_LEVEL=debug"})

    def to_python(self, value):
        return validators.clean_env(value)

    def prepare_value(self, value):
        if isinstance(value, dict):
            return "\n".join(f"{key}={val}" for key, val in value.items())
        return value


class SecretEnvField(forms.Field):
    """New secret variables as KEY=VALUE lines in the browser; in the API the
    whole set as an object, where null keeps a name's current value. Never
    rendered with a value."""

    widget = forms.Textarea(
        attrs={"rows": 2, "placeholder": "API_TOKEN=...", "autocomplete": "off"}
    )

    def to_python(self, value):
        return validators.clean_secret_env(value)

    def prepare_value(self, value):
        return ""  # write-only: a redisplayed form (an error elsewhere) asks again


class LabelsField(forms.Field):
    """Comma-separated in the browser, a list in the API."""

    widget = forms.TextInput(attrs={"placeholder": "linux, gpu"})

    def to_python(self, value):
        return validators.clean_labels(value)

    def prepare_value(self, value):
        if isinstance(value, list):
            return ", ".join(value)
        return value


class WebhooksField(forms.Field):
    """Lines of "URL EVENTS [SECRET]" in the browser, a list of objects in the API.
    Shown without the secrets: a line left without one keeps its URL's secret."""

    widget = forms.Textarea(
        attrs={
            "rows": 2,
            "spellcheck": "false",
            "autocomplete": "off",
            "placeholder": "https://hooks.example.com/ci failure,recovery s3cret",
        }
    )

    def prepare_value(self, value):
        if isinstance(value, list):
            return "\n".join(
                f"{hook['url']} {','.join(hook['events'])}"
                for hook in value
                if isinstance(hook, dict) and "url" in hook and "events" in hook
            )
        if isinstance(value, str):
            # Redisplayed after an error: the typed secrets are not sent back
            # (write-only, as SecretEnvField), the rest of each line is.
            return "\n".join(" ".join(line.split()[:2]) for line in value.splitlines())
        return value


class NotifyEmailsField(forms.Field):
    """Lines of "ADDRESS EVENTS" in the browser, a list of objects in the API."""

    widget = forms.Textarea(
        attrs={"rows": 2, "spellcheck": "false", "placeholder": "ops@example.com failure,recovery"}
    )

    def to_python(self, value):
        return validators.clean_notify_emails(value)

    def prepare_value(self, value):
        if isinstance(value, list):
            return "\n".join(
                f"{entry['address']} {','.join(entry['events'])}"
                for entry in value
                if isinstance(entry, dict) and "address" in entry and "events" in entry
            )
        return value


COMMAND_HELP = (
    "Without “shell”, it is split into arguments like a shell would (shlex), and "
    "newlines count as spaces: several lines make one command line. With “shell”, "
    "the lines run as one script through /bin/sh -c."
)


class TaskForm(forms.ModelForm):
    # Shown folded under "Advanced" on the page: most tasks never change them.
    ADVANCED_FIELDS = (
        "max_retries",
        "retry_backoff_s",
        "retry_backoff_max_s",
        "concurrency_limit",
        "busy_policy",
        "priority",
        "strategy",
        "pinned_worker",
        "shards",
        "merge_command",
    )
    # Shown as their own "Schedule" group.
    SCHEDULE_FIELDS = ("schedule", "timezone", "misfire_policy", "schedule_paused")
    # Shown as their own "Notifications" group.
    NOTIFY_FIELDS = ("webhooks", "notify_emails")

    env = EnvField(required=False, label="Environment", help_text="One KEY=VALUE per line.")
    secret_env = SecretEnvField(
        required=False,
        label="New secret variables",
        help_text="One KEY=VALUE per line; write-only: shown by name only, masked as *** in "
        "output.",
    )
    webhooks = WebhooksField(
        required=False,
        label="Webhooks",
        help_text="One per line: URL EVENTS [SECRET], events from failure, recovery, success "
        "(comma-separated). The secret signs each body (X-Scheduler-Signature) and is never "
        "shown: a line without one keeps that URL's secret.",
    )
    notify_emails = NotifyEmailsField(
        required=False,
        label="E-mail",
        help_text="One per line: ADDRESS EVENTS, events from failure, recovery, success.",
    )
    labels = LabelsField(
        required=False, label="Required labels", help_text="Only workers with all of these run it."
    )
    timeout = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_TIMEOUT_S,
        help_text="Seconds; empty for no timeout.",
    )

    max_retries = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=MAX_RETRIES,
        initial=0,
        label="Retries",
        help_text="How many times a failed, timed-out or lost attempt is tried again.",
    )
    retry_backoff_s = forms.FloatField(
        required=False,
        min_value=0,
        max_value=MAX_BACKOFF_S,
        initial=10.0,
        label="Retry backoff (s)",
        help_text="Delay before the first retry; it doubles for each further one, with jitter.",
    )
    retry_backoff_max_s = forms.FloatField(
        required=False,
        min_value=0,
        max_value=MAX_BACKOFF_S,
        initial=600.0,
        label="Longest backoff (s)",
    )

    schedule = forms.CharField(
        required=False,
        max_length=cron.MAX_SCHEDULE_CHARS,
        label="Cron schedule",
        help_text="Five fields: minute hour day-of-month month day-of-week "
        "(*/15 * * * *, 0 9 * * 1-5), or @hourly, @daily, @weekly, @monthly, @yearly. "
        "Empty: no schedule.",
        widget=forms.TextInput(attrs={"placeholder": "0 3 * * *", "spellcheck": "false"}),
    )
    timezone = forms.CharField(
        required=False,
        max_length=64,
        label="Time zone",
        help_text="IANA name the schedule is read in: UTC, Europe/Berlin, America/New_York.",
        widget=forms.TextInput(attrs={"placeholder": "UTC", "spellcheck": "false"}),
    )
    misfire_policy = forms.ChoiceField(
        required=False,
        choices=MisfirePolicy.choices,
        label="Missed ticks",
        help_text="A tick missed while the scheduler was down or paused: skip it, or run "
        "once for the latest one if it is no older than one period and at most 24 hours.",
    )
    concurrency_limit = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=MAX_CONCURRENCY,
        label="Concurrency limit",
        help_text="Runs of this task at once; empty or 0 for no limit, 1 never overlaps.",
    )
    shards = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_SHARDS,
        initial=1,
        label="Shards",
        help_text=f"Split each run into this many attempts (1 to {MAX_SHARDS}), spread over "
        "the workers; each sees SCHEDULER_SHARD_INDEX and SCHEDULER_SHARD_COUNT.",
    )
    merge_command = forms.CharField(
        required=False,
        label="Merge command",
        widget=forms.Textarea(attrs={"rows": 2, "spellcheck": "false"}),
        help_text="Runs once every shard succeeded, like the command (shell or not), with "
        "the shards' stdout in shard order as its stdin and SCHEDULER_SHARD_OUTPUTS naming "
        "a directory of one file per shard; its stdout is the run's result. Empty: none.",
    )
    busy_policy = forms.ChoiceField(
        required=False,
        choices=Task.BusyPolicy.choices,
        initial=Task.BusyPolicy.QUEUE,
        label="When the limit is reached",
        help_text="What a new run does while the task has that many runs going.",
    )

    priority = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=MAX_PRIORITY,
        initial=0,
        label="Priority",
        help_text="0-100, higher first; waiting work gains a point a minute "
        "(SCHEDULER_PRIORITY_AGING_S), so none waits forever.",
    )
    strategy = forms.ChoiceField(
        required=False,
        choices=Strategy.choices,
        initial=Strategy.LEAST_LOADED,
        label="Routing",
        help_text="Which of the workers with the required labels runs it.",
    )
    pinned_worker = forms.CharField(
        required=False,
        max_length=200,
        label="Pinned worker",
        help_text="For “pinned” only: the name of the one worker that runs it.",
        widget=forms.TextInput(attrs={"placeholder": "worker name", "spellcheck": "false"}),
    )

    class Meta:
        model = Task
        fields = list(TASK_FIELDS)
        widgets = {
            "command": forms.Textarea(
                attrs={"rows": 3, "placeholder": 'python -c "print(6*7)"', "spellcheck": "false"}
            ),
            "name": forms.TextInput(attrs={"placeholder": "nightly-report"}),
            "working_dir": forms.TextInput(
                attrs={"placeholder": "/srv/app (empty: the agent's own)"}
            ),
        }
        help_texts = {"command": COMMAND_HELP}
        error_messages = {
            "command": {"required": "Enter the command to run."},
            "name": {"required": "Give the task a name."},
        }

    # The browser's fields for the secrets a task has: secret__NAME (blank keeps
    # it) and secret_remove (names to drop).
    SECRET_PREFIX = "secret__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Not model fields the form maps by itself (the secrets are never shown).
        self.initial.setdefault("webhooks", self.instance.webhooks_shown())
        self.initial.setdefault("notify_emails", list(self.instance.notify_emails or ()))
        # Encrypted under another SECRET_KEY: no value can be kept, each name
        # must be given again or removed (or the set left as it is, unreadable).
        self.secrets_unreadable = False
        try:
            self.current_secrets = self.instance.secret_values() if self.instance.secret_env else {}
            self.secret_names = sorted(self.current_secrets)
        except SecretsUnreadable:
            self.secrets_unreadable = True
            self.current_secrets = {}
            self.secret_names = list(self.instance.secret_env_keys)
        placeholder = "unreadable: type it again" if self.secrets_unreadable else "unchanged"
        for name in self.secret_names:
            self.fields[self.SECRET_PREFIX + name] = forms.CharField(
                required=False,
                label=name,
                strip=False,
                widget=forms.PasswordInput(
                    attrs={"placeholder": placeholder, "autocomplete": "new-password"}
                ),
            )
        if self.secret_names:
            self.fields["secret_remove"] = forms.MultipleChoiceField(
                required=False,
                choices=[(name, name) for name in self.secret_names],
                widget=forms.CheckboxSelectMultiple,
                label="Remove",
            )

    def secret_fields(self) -> list[tuple[forms.BoundField, str]]:
        """(value field, name) of each current secret, for the page."""
        return [(self[self.SECRET_PREFIX + n], n) for n in self.secret_names]

    def basic_fields(self) -> list[forms.BoundField]:
        grouped = self.ADVANCED_FIELDS + self.SCHEDULE_FIELDS + self.NOTIFY_FIELDS
        return [
            field
            for field in self
            if field.name not in grouped
            and not field.name.startswith(self.SECRET_PREFIX)
            and field.name not in ("secret_env", "secret_remove")
        ]

    def schedule_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.SCHEDULE_FIELDS]

    def notify_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.NOTIFY_FIELDS]

    def advanced_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.ADVANCED_FIELDS]

    def advanced_has_errors(self) -> bool:
        return any(name in self.errors for name in self.ADVANCED_FIELDS)

    def clean_command(self):
        # A browser sends a textarea's lines with CRLF (HTML's form encoding):
        # "do\r" is a syntax error for sh, so a script keeps plain newlines.
        return self.cleaned_data["command"].replace("\r\n", "\n")

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("The name cannot be blank.")
        return name

    def _default_if_empty(self, name: str):
        value = self.cleaned_data.get(name)
        return Task._meta.get_field(name).default if value is None else value

    def clean_max_retries(self):
        return self._default_if_empty("max_retries")

    def clean_retry_backoff_s(self):
        return self._default_if_empty("retry_backoff_s")

    def clean_retry_backoff_max_s(self):
        return self._default_if_empty("retry_backoff_max_s")

    def clean_schedule(self):
        try:
            return cron.check_schedule(self.cleaned_data["schedule"] or "")
        except InvalidSchedule as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_timezone(self):
        try:
            return cron.check_timezone(self.cleaned_data["timezone"] or "UTC")
        except InvalidSchedule as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_misfire_policy(self):
        return self.cleaned_data.get("misfire_policy") or MisfirePolicy.SKIP

    def clean_concurrency_limit(self):
        # 0 and empty both mean "no limit": kept as null, one way to say it.
        return self.cleaned_data.get("concurrency_limit") or None

    def clean_shards(self):
        return self._default_if_empty("shards")

    def clean_merge_command(self):
        return (self.cleaned_data.get("merge_command") or "").replace("\r\n", "\n")

    def clean_busy_policy(self):
        return self.cleaned_data.get("busy_policy") or Task.BusyPolicy.QUEUE

    def clean_priority(self):
        return self._default_if_empty("priority")

    def clean_strategy(self):
        return self.cleaned_data.get("strategy") or Strategy.LEAST_LOADED

    def clean_pinned_worker(self):
        return (self.cleaned_data.get("pinned_worker") or "").strip()

    def _check_pin(self, cleaned: dict) -> None:
        strategy, name = cleaned.get("strategy"), cleaned.get("pinned_worker")
        if strategy is None or name is None:
            return  # already refused field by field
        for field, error in routing.shape_errors(strategy, name, cleaned.get("shards")).items():
            self.add_error(field, error)

    def clean_working_dir(self):
        working_dir = self.cleaned_data["working_dir"].strip()
        if working_dir and not working_dir.startswith("/"):
            raise forms.ValidationError(
                "Use an absolute path (starting with /), or leave it empty."
            )
        return working_dir

    def clean_webhooks(self):
        return validators.clean_webhooks(self.cleaned_data.get("webhooks"), self.instance.webhooks)

    def _clean_secrets(self, cleaned: dict) -> dict[str, str] | None:
        """The task's secret variables after this change, or None (errors added)."""
        given = cleaned.get("secret_env")
        if given is None:
            return None  # refused field by field
        current = self.current_secrets
        if isinstance(self.data.get("secret_env"), dict):
            # The API: the object is the whole set, null keeps a value.
            unknown = sorted(k for k, v in given.items() if v is None and k not in current)
            if unknown:
                why = " (the stored values cannot be read)" if self.secrets_unreadable else ""
                self.add_error(
                    "secret_env",
                    f"No current value to keep for {', '.join(unknown)}{why}: give one.",
                )
                return None
            values = {k: current[k] if v is None else v for k, v in given.items()}
        else:
            # The browser (or the API leaving the field out): the current ones,
            # less those ticked for removal, changed where a value was typed,
            # then the new lines.
            removed = set(cleaned.get("secret_remove") or ())
            values, untouched = {}, []
            for name in self.secret_names:
                if name in removed:
                    continue
                typed = cleaned.get(self.SECRET_PREFIX + name) or ""
                if "\x00" in typed:
                    self.add_error(self.SECRET_PREFIX + name, "The value contains a NUL byte.")
                    return None
                if typed or name in current:
                    values[name] = typed or current[name]
                else:
                    untouched.append(name)
            if self.secrets_unreadable:
                if not (given or removed or values):
                    return None  # left as it is: still unreadable, runs still refused
                for name in untouched:
                    self.add_error(
                        self.SECRET_PREFIX + name,
                        "Its stored value cannot be read (another SECRET_KEY): "
                        "type it again or tick Remove.",
                    )
                if untouched:
                    return None
            values.update(given)
        both = sorted(set(values) & set(cleaned.get("env") or {}))
        if both:
            self.add_error(
                "secret_env",
                f"{', '.join(both)} set both as a variable and as a secret: keep one.",
            )
            return None
        if len(values) > validators.MAX_ENV:
            self.add_error("secret_env", f"At most {validators.MAX_ENV} secret variables.")
            return None
        return values

    def save(self, commit=True):
        if self.secret_values is not None:
            self.instance.set_secret_values(self.secret_values)
        if "webhooks" in self.cleaned_data:
            self.instance.set_webhooks(self.cleaned_data["webhooks"])
        if "notify_emails" in self.cleaned_data:
            self.instance.notify_emails = self.cleaned_data["notify_emails"]
        return super().save(commit)

    def clean(self):
        cleaned = super().clean()
        self.secret_values = self._clean_secrets(cleaned)
        command = cleaned.get("command")
        if command is not None:
            try:
                validators.check_command(command, cleaned.get("shell", False))
                validators.check_run_size(
                    {
                        "command": command,
                        "argv": None if cleaned.get("shell") else shlex.split(command),
                        "env": cleaned.get("env") or {},
                        "secret_env": self.secret_values or {},
                        "working_dir": cleaned.get("working_dir") or "",
                        "merge_command": cleaned.get("merge_command") or "",
                    }
                )
            except forms.ValidationError as exc:
                self.add_error("command", exc)
        self._check_pin(cleaned)
        merge = cleaned.get("merge_command")
        if merge and merge.strip():
            try:
                validators.check_command(merge, cleaned.get("shell", False))
            except forms.ValidationError as exc:
                self.add_error("merge_command", exc)
        elif merge is not None:
            cleaned["merge_command"] = ""
        return cleaned


class RunForm(forms.Form):
    """Run now, or at a time, with extra environment and arguments (the task page)."""

    run_at = forms.DateTimeField(
        required=False,
        label="Run at",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": "1"}),
        help_text="Empty: now. In the server's time zone; "
        f"at most {validators.MAX_DELAY_DAYS} days ahead.",
    )
    env = EnvField(
        required=False,
        label="Extra environment",
        help_text="One KEY=VALUE per line, laid over the task's own.",
    )
    args = forms.CharField(
        required=False,
        label="Extra arguments",
        strip=False,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "--date\n2026-01-31"}),
        help_text="One argument per line, appended to the command as is: "
        "spaces and quotes stay part of the argument; blank lines are ignored.",
    )

    def clean_run_at(self):
        value = self.cleaned_data.get("run_at")
        return None if value is None else validators.clean_run_at(value, timezone.now())

    def clean_args(self):
        args = [line for line in self.cleaned_data["args"].splitlines() if line.strip()]
        try:
            return validators.clean_run_params({"args": args}).get("args", [])
        except forms.ValidationError as exc:
            raise forms.ValidationError(exc.message_dict["args"]) from None

    def params(self) -> dict:
        """The run parameters as lifecycle takes them ({} when none)."""
        params = {}
        if self.cleaned_data.get("env"):
            params["env"] = self.cleaned_data["env"]
        if self.cleaned_data.get("args"):
            params["args"] = self.cleaned_data["args"]
        return params
