"""Notification bodies (pure): Alertmanager webhook v4, Alertmanager API v2, Slack, email.

Each takes the alert snapshots of one group (the alerts of one run pending for one receiver)
as written to the outbox (``AlertOut`` dumped to JSON).
"""

from __future__ import annotations

from typing import Any

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end yet"
ICON = {"critical": ":rotating_light:", "warning": ":warning:", "resolved": ":white_check_mark:"}


def labels(a: dict[str, Any]) -> dict[str, str]:
    return {
        "alertname": a["rule"],
        "project": a["project"],
        "run": a["run"],
        "scope": a["scope"],
        "severity": a["severity"],
    }


def am_annotations(a: dict[str, Any]) -> dict[str, str]:
    out = {"summary": a["summary"], "step": str(a["step"]), "value": str(a["value"])}
    if a["layers"]:
        out["layers"] = ", ".join(f"{x['layer']} ({x['score']:.3g})" for x in a["layers"])
    if a["first_layer"] is not None:
        out["first_layer"] = a["first_layer"]
        out["first_layer_lead_steps"] = str(a["first_layer_lead_steps"])
    out["description"] = _description(a)
    return out


def _description(a: dict[str, Any]) -> str:
    text = f"{a['summary']} (run {a['run']}, step {a['step']})"
    if a["first_layer"] is not None:
        text += (
            f"; first layer to deviate: {a['first_layer']}, "
            f"{a['first_layer_lead_steps']} steps earlier"
        )
    return text


def generator_url(a: dict[str, Any], external_url: str) -> str:
    return f"{external_url.rstrip('/')}/api/v1/alerts/{a['id']}"


def am_alert(a: dict[str, Any], external_url: str) -> dict[str, Any]:
    """One alert as Alertmanager's webhook shows it."""
    return {
        "status": a["state"],
        "labels": labels(a),
        "annotations": am_annotations(a),
        "startsAt": a["starts_at"],
        "endsAt": a["ends_at"] or ZERO_TIME,
        "generatorURL": generator_url(a, external_url),
        "fingerprint": a["fingerprint"],
    }


def _common(dicts: list[dict[str, str]]) -> dict[str, str]:
    first = dicts[0]
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in dicts[1:])}


def webhook_v4(alerts: list[dict[str, Any]], receiver: str, external_url: str) -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4), grouped by run."""
    items = [am_alert(a, external_url) for a in alerts]
    run, project = alerts[0]["run"], alerts[0]["project"]
    return {
        "version": "4",
        "groupKey": f'{{}}:{{project="{project}", run="{run}"}}',
        "truncatedAlerts": 0,
        "status": "firing" if any(a["state"] == "firing" for a in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": {"project": project, "run": run},
        "commonLabels": _common([i["labels"] for i in items]),
        "commonAnnotations": _common([i["annotations"] for i in items]),
        "externalURL": external_url,
        "alerts": items,
    }


def alertmanager_v2(alerts: list[dict[str, Any]], external_url: str) -> list[dict[str, Any]]:
    """Body of ``POST /api/v2/alerts`` (postableAlerts): endsAt only once resolved."""
    out = []
    for a in alerts:
        item = {
            "labels": labels(a),
            "annotations": am_annotations(a),
            "startsAt": a["starts_at"],
            "generatorURL": generator_url(a, external_url),
        }
        if a["state"] == "resolved" and a["ends_at"]:
            item["endsAt"] = a["ends_at"]
        out.append(item)
    return out


def _line(a: dict[str, Any]) -> str:
    status = "resolved" if a["state"] == "resolved" else a["severity"]
    line = f"{ICON[status]} *[{status.upper()}] {a['rule']}* ({a['scope']}): {a['summary']}"
    if a["first_layer"] is not None and a["state"] == "firing":
        line += (
            f"\n    first layer to deviate: `{a['first_layer']}` "
            f"({a['first_layer_lead_steps']} steps earlier)"
        )
    return line


def slack(alerts: list[dict[str, Any]], external_url: str) -> dict[str, Any]:
    """A Slack incoming-webhook message (``text`` fallback plus mrkdwn blocks)."""
    run, project = alerts[0]["run"], alerts[0]["project"]
    header = f"gradsentry: {len(alerts)} alert(s) on run `{run}` (project {project})"
    body = "\n".join(_line(a) for a in alerts)
    return {
        "text": f"{header}\n{body}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": header}},
            {"type": "section", "text": {"type": "mrkdwn", "text": body}},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": generator_url(alerts[0], external_url)}],
            },
        ],
    }


def email(alerts: list[dict[str, Any]], external_url: str) -> tuple[str, str]:
    """(subject, plain-text body)."""
    firing = [a for a in alerts if a["state"] == "firing"]
    status = "FIRING" if firing else "RESOLVED"
    run = alerts[0]["run"]
    subject = f"[gradsentry {status}:{len(alerts)}] run {run}: " + ", ".join(
        sorted({a["rule"] for a in alerts})
    )
    lines = []
    for a in alerts:
        lines.append(f"[{a['state'].upper()} {a['severity']}] {a['rule']} ({a['scope']})")
        lines.append(f"  {_description(a)}")
        if a["layers"]:
            lines.append("  layers: " + am_annotations(a)["layers"])
        lines.append(f"  {generator_url(a, external_url)}")
    return subject, "\n".join(lines) + "\n"
