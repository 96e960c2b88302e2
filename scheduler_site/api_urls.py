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
    path("workers", workers_api.workers, name="workers"),
    path("workers/register", workers_api.register, name="worker-register"),
]
