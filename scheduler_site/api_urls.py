from django.urls import path, re_path

from scheduler_site import openapi
from tasks_app import api as tasks_api
from tasks_app.jsonapi import no_such_endpoint
from workers_app import api as workers_api

app_name = "api"

# Each view declares its operations in its api_view; /api/openapi.json is built
# from this table and those declarations.
urlpatterns = [
    path("tasks", tasks_api.tasks, name="tasks"),
    path("tasks/<int:pk>", tasks_api.task_detail, name="task"),
    path("tasks/<int:pk>/run", tasks_api.task_run, name="task-run"),
    path("runs", tasks_api.runs, name="runs"),
    path("runs/<int:pk>", tasks_api.run_detail, name="run"),
    path("runs/<int:pk>/cancel", tasks_api.run_cancel, name="run-cancel"),
    path("runs/<int:pk>/retry", tasks_api.run_retry, name="run-retry"),
    path("runs/<int:pk>/result", tasks_api.run_result, name="run-result"),
    path("runs/<int:pk>/events", tasks_api.run_events, name="run-events"),
    path("agent/attempts/<int:pk>/shards/", workers_api.shard_outputs, name="agent-shard-outputs"),
    path(
        "agent/attempts/<int:pk>/shards/<int:index>",
        workers_api.shard_output,
        name="agent-shard-output",
    ),
    path("scheduler", tasks_api.scheduler, name="scheduler"),
    path("scheduler/pause", tasks_api.scheduler_pause, name="scheduler-pause"),
    path("scheduler/resume", tasks_api.scheduler_resume, name="scheduler-resume"),
    path("workers/<int:pk>/approve", workers_api.worker_approve, name="worker-approve"),
    path("workers/<int:pk>/<str:action>", workers_api.worker_action, name="worker-action"),
    path("workers", workers_api.workers, name="workers"),
    path("workers/register", workers_api.register, name="worker-register"),
    path("audit", tasks_api.audit_log, name="audit"),
    path("openapi.json", openapi.openapi_json, name="openapi"),
    path("docs", openapi.docs, name="docs"),
    # Last: any other URL under /api/ is a JSON 404. It also keeps CommonMiddleware's
    # APPEND_SLASH from redirecting API URLs (it only redirects paths that match nothing).
    re_path(r"^.*$", no_such_endpoint, name="no-such-endpoint"),
]
