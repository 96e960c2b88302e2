"""The dashboard's audit page: who changed what, for admins."""

import json

from django.conf import settings
from django.contrib import messages
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET

from tasks_app import audit, audit_history
from tasks_app.history import InvalidFilter
from tasks_app.roles import ADMIN, role_required


@require_GET
@role_required(ADMIN)
def audit_log(request):
    try:
        filters = audit_history.parse_filters(request.GET)
    except InvalidFilter as exc:
        messages.error(request, f"Filters ignored: {exc}.")
        filters = {}
    page = audit_history.entries_page(limit=settings.SCHEDULER_PAGE_SIZE, **filters)
    kept = audit_history.query_string_values({k: v for k, v in filters.items() if k != "before"})
    here = reverse("tasks:audit")
    older_url = None
    if page.next_before:
        older_url = f"{here}?{urlencode({**kept, 'before': page.next_before})}"
    context = {
        "page": page,
        "rows": [
            (e, json.dumps(e.changes, ensure_ascii=False) if e.changes else "")
            for e in page.entries
        ],
        # What was typed, to show it again (a day stays a day).
        "typed": {name: request.GET.get(name, "") for name in audit_history.FILTERS}
        if filters
        else {},
        "actions": audit.ACTIONS,
        "older_url": older_url,
        "newest_url": f"{here}?{urlencode(kept)}" if "before" in filters else None,
    }
    template = "tasks/audit.html#audit-table" if request.htmx else "tasks/audit.html"
    return render(request, template, context)
