"""The dashboard's API tokens page: a user mints, lists and revokes their own tokens.

A token carries its owner's role (tasks_app.roles); the raw value is shown
once, right after it is made, and only its hash is stored.
"""

from datetime import timedelta

from django import forms
from django.contrib import messages
from django.db import transaction
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from tasks_app import audit
from tasks_app.models import ApiToken
from tasks_app.roles import VIEWER, role_required

# Days a new token lives; 0: until revoked.
EXPIRY_CHOICES = [(7, "7 days"), (30, "30 days"), (90, "90 days"), (365, "1 year"), (0, "never")]


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, required=False, strip=True)
    expires_in_days = forms.TypedChoiceField(
        choices=EXPIRY_CHOICES, coerce=int, initial=90, label="Expires in"
    )


@require_http_methods(["GET", "POST"])
@role_required(VIEWER)
def tokens(request):
    form = TokenForm(request.POST or None)
    raw = None
    if request.method == "POST" and form.is_valid():
        days = form.cleaned_data["expires_in_days"]
        expires_at = timezone.now() + timedelta(days=days) if days else None
        with transaction.atomic():
            raw, token = ApiToken.mint(
                request.user, name=form.cleaned_data["name"], expires_at=expires_at
            )
            audit.record(request, "token.create", token, audit.token_changes(token))
        form = TokenForm()
    mine = ApiToken.objects.filter(user=request.user).order_by("-created_at", "-id")
    status = 400 if request.method == "POST" and raw is None else 200
    context = {"form": form, "raw": raw, "tokens": mine, "now": timezone.now()}
    return render(request, "tasks/tokens.html", context, status=status)


@require_POST
@role_required(VIEWER)
def token_revoke(request, pk: int):
    # Only the owner's own tokens: another user's id is "no such token".
    token = ApiToken.objects.filter(pk=pk, user=request.user).first()
    if token is None:
        raise Http404("No such token.")
    with transaction.atomic():
        # A double click revokes (and is recorded) once.
        updated = ApiToken.objects.filter(pk=pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        if updated:
            audit.record(request, "token.revoke", token)
    messages.success(request, "Token revoked: requests with it are refused from now on.")
    return redirect("tokens")
