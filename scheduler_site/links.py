"""Absolute URLs of this server, for links that leave the page (API `next`, Add worker).

SCHEDULER_PUBLIC_URL, when set, is the address people and agents use (the
proxy's https URL, say); otherwise the request's own scheme and Host.
"""

from django.conf import settings
from django.http import HttpRequest


def absolute_url(request: HttpRequest, path: str) -> str:
    public = settings.SCHEDULER_PUBLIC_URL.rstrip("/")
    if public:
        return public + path
    return request.build_absolute_uri(path)
