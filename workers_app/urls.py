from django.urls import path

from workers_app import views

app_name = "workers"

urlpatterns = [
    path("", views.worker_list, name="list"),
    path("add/", views.worker_add, name="add"),
    path("<int:pk>/revoke/", views.worker_revoke, name="revoke"),
    path("<int:pk>/<str:action>/", views.worker_state, name="state"),
]
