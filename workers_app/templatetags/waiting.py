"""{% why_waiting run attempts as reason %} for the run page (tasks_app may not import us)."""

from django import template

from workers_app.waiting import why_waiting as explain

register = template.Library()


@register.simple_tag
def why_waiting(run, attempts):
    return explain(run, list(attempts))
