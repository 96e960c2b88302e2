"""The address a request came from, for the login rate limit (django-axes)."""

from django.conf import settings
from django.http import HttpRequest


def client_ip(request: HttpRequest) -> str:
    """The connection's address; behind a proxy, the header it sets
    (SCHEDULER_CLIENT_IP_HEADER), which a client cannot choose because the
    proxy overwrites it. Trusted only when configured: otherwise anyone could
    send a new address with every guess and never be locked out."""
    header = settings.SCHEDULER_CLIENT_IP_HEADER
    if header:
        forwarded = request.META.get(header, "").split(",")[-1].strip()
        if forwarded:
            return forwarded
    # No address at all (a request made in-process, as Django's test client
    # force_login does, or a unix socket): an address all the same, since
    # axes keeps it in a GenericIPAddressField (PostgreSQL's inet).
    return request.META.get("REMOTE_ADDR", "") or "0.0.0.0"
