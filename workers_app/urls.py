from django.urls import path

from workers_app import views

app_name = "workers"

urlpatterns = [
    path("", views.worker_list, name="list"),
    path("add/", views.worker_add, name="add"),
    path("<int:pk>/revoke/", views.worker_revoke, name="revoke"),
    path("<int:pk>/approve/", views.worker_approve, name="approve"),
    path("<int:pk>/allow-reenroll/", views.worker_allow_reenroll, name="allow-reenroll"),
    path("tokens/", views.token_mint, name="token-mint"),
    path("tokens/<int:pk>/revoke/", views.token_revoke, name="token-revoke"),
    path("<int:pk>/<str:action>/", views.worker_state, name="state"),
]
