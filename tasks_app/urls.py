from django.urls import path

from tasks_app import audit_views, views

app_name = "tasks"

urlpatterns = [
    path("tasks/", views.task_list, name="list"),
    path("tasks/new/", views.task_create, name="create"),
    path("tasks/<int:pk>/", views.task_detail, name="detail"),
    path("tasks/<int:pk>/edit/", views.task_edit, name="edit"),
    path("tasks/<int:pk>/delete/", views.task_delete, name="delete"),
    path("tasks/<int:pk>/run/", views.task_run, name="run"),
    path("tasks/<int:pk>/schedule/pause/", views.task_schedule_pause, name="schedule-pause"),
    path("tasks/<int:pk>/schedule/resume/", views.task_schedule_resume, name="schedule-resume"),
    path("runs/", views.run_list, name="runs"),
    path("runs/cancel/", views.runs_cancel_many, name="runs-cancel-many"),
    path("runs/retry/", views.runs_retry_many, name="runs-retry-many"),
    path("runs/<int:pk>/", views.run_detail, name="run-detail"),
    path("runs/<int:pk>/cancel/", views.run_cancel, name="run-cancel"),
    path("runs/<int:pk>/retry/", views.run_retry, name="run-retry"),
    path("runs/<int:pk>/result/", views.run_result, name="run-result"),
    path(
        "runs/<int:pk>/attempts/<int:attempt>/output.txt",
        views.attempt_output,
        name="attempt-output",
    ),
    path("scheduler/pause/", views.scheduler_pause, name="pause"),
    path("scheduler/resume/", views.scheduler_resume, name="resume"),
    path("scheduler/state/", views.scheduler_state, name="scheduler-state"),
    path("audit/", audit_views.audit_log, name="audit"),
]
