from django.urls import path

from tasks_app import api as tasks_api
from workers_app import api as workers_api

app_name = "api"

urlpatterns = [
    path("tasks", tasks_api.tasks, name="tasks"),
    path("tasks/<int:pk>", tasks_api.task_detail, name="task"),
    path("tasks/<int:pk>/run", tasks_api.task_run, name="task-run"),
    path("runs", tasks_api.runs, name="runs"),
    path("runs/<int:pk>", tasks_api.run_detail, name="run"),
    path("runs/<int:pk>/cancel", tasks_api.run_cancel, name="run-cancel"),
    path("runs/<int:pk>/retry", tasks_api.run_retry, name="run-retry"),
    path("scheduler", tasks_api.scheduler, name="scheduler"),
    path("scheduler/pause", tasks_api.scheduler_pause, name="scheduler-pause"),
    path("scheduler/resume", tasks_api.scheduler_resume, name="scheduler-resume"),
    path("workers/<int:pk>/<str:action>", workers_api.worker_action, name="worker-action"),
    path("workers", workers_api.workers, name="workers"),
    path("workers/register", workers_api.register, name="worker-register"),
]
