"""Middleware of the project itself."""


class OneThreadHop:
    """Innermost and sync only, so that Django runs the whole middleware chain
    in one hop to a thread under ASGI.

    Django's built-in middleware can run either way and takes the mode of the
    handler inside it. With Django's async view handler innermost they all run
    async, and then every sync process_request/process_response costs a hop to
    a thread and back: two per middleware per request. A sync-only handler
    innermost turns the whole chain sync: one hop for all of it, and the view
    runs in that same thread. Measured under daphne on the 2-core machine, an
    empty view: 2.56 -> 1.39 ms of server CPU per request.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)


class Probes:
    """Outermost: /healthz, /readyz and /metrics answered before any other
    middleware sees the request.

    Load balancers, Kubernetes and Prometheus reach each server by its own
    address (Host: 10.0.0.5:8001), which SCHEDULER_ALLOWED_HOSTS does not
    list; CommonMiddleware would answer them 400 (Django's host check), and
    with SCHEDULER_HTTPS SecurityMiddleware would redirect their plain http to
    https. These three build no URL from the Host header (what the check
    protects) and need no session, CSRF or login, so they skip the chain:
    its cost too, for a probe every few seconds. They stay in the URL conf
    (scheduler_site.urls) for reverse() and the roles table.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response) -> None:
        from scheduler_site import health

        self.get_response = get_response
        self.views = {
            "/healthz": health.healthz,
            "/readyz": health.readyz,
            "/metrics": health.metrics,
        }

    def __call__(self, request):
        view = self.views.get(request.path_info)
        if view is not None:
            return view(request)
        return self.get_response(request)
