"""Senders, one per receiver kind: HTTP (webhook, Slack, Alertmanager) and SMTP email."""

from __future__ import annotations

import smtplib
import urllib.error
import urllib.request
from email.message import EmailMessage
from typing import Any

from server.alerts import payloads
from server.jsonenc import dumps_str

TIMEOUT_S = 5.0


class DeliveryError(Exception):
    """The receiver did not take the notification; the outbox retries it later."""


def post_json(url: str, body: Any) -> None:
    data = dumps_str(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "gradsentry-alerts"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"{url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(f"{url} unreachable: {exc}") from None
    if not 200 <= status < 300:
        raise DeliveryError(f"{url} answered {status}")


def send_email(config: dict[str, Any], subject: str, text: str) -> None:
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = subject, config["from"], ", ".join(config["to"])
    msg.set_content(text)
    try:
        with smtplib.SMTP(config["host"], int(config.get("port", 25)), timeout=TIMEOUT_S) as smtp:
            if config.get("starttls"):
                smtp.starttls()
            if config.get("username"):
                smtp.login(config["username"], config.get("password", ""))
            smtp.send_message(msg)
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"SMTP {config['host']}:{config.get('port', 25)}: {exc}") from None


def deliver(
    kind: str,
    name: str,
    url: str | None,
    config: dict[str, Any],
    alerts: list[dict[str, Any]],
    external_url: str,
) -> None:
    """Send one group of alert snapshots to one receiver; raises DeliveryError."""
    if kind == "webhook":
        assert url is not None
        post_json(url, payloads.webhook_v4(alerts, name, external_url))
    elif kind == "slack":
        assert url is not None
        post_json(url, payloads.slack(alerts, external_url))
    elif kind == "alertmanager":
        assert url is not None
        post_json(
            url.rstrip("/") + "/api/v2/alerts", payloads.alertmanager_v2(alerts, external_url)
        )
    elif kind == "email":
        subject, text = payloads.email(alerts, external_url)
        send_email(config, subject, text)
    else:
        raise DeliveryError(f"unknown receiver kind {kind!r}")
