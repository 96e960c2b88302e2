from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from scheduler_site import health
from scheduler_site.overview import overview_page
from tasks_app import token_views
from workers_app.views import agent_download

urlpatterns = [
    path("", overview_page, name="home"),
    path("", include("tasks_app.urls")),
    path("workers/", include("workers_app.urls")),
    path("api/", include("scheduler_site.api_urls")),
    path("agent.py", agent_download, name="agent-download"),
    path("account/tokens/", token_views.tokens, name="tokens"),
    path("account/tokens/<int:pk>/revoke/", token_views.token_revoke, name="token-revoke"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    # For Prometheus, load balancers and systemd: no login (scheduler_site.health).
    path("metrics", health.metrics, name="metrics"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
]

# Under /api/ a refused Host header is answered in JSON too (tasks_app.jsonapi).
handler400 = "tasks_app.jsonapi.bad_request"
