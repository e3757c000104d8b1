"""The alerting YAML file (``GRADSENTRY_ALERT_RULES_FILE``)::

    rules:                      # overrides for every project
      grad_norm_spike: {warning: 8, critical: 20}
    projects:
      llm-pretrain:
        rules:
          divergence: {margin: 0.2}
    receivers:
      - {name: oncall, kind: webhook, url: "http://alerts.internal/hook"}
      - {name: team-slack, kind: slack, url: "https://hooks.slack.com/...", project: llm}
      - {name: mail, kind: email, config: {host: smtp.internal, port: 25,
                                           from: gradsentry@x, to: [ml@x]}}

Precedence: built-in defaults < file ``rules`` < file ``projects.<p>.rules`` < REST.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from server.analysis.rules import RuleError, Rules, validate


@dataclass(frozen=True)
class AlertConfig:
    rules: Rules = field(default_factory=dict)
    projects: dict[str, Rules] = field(default_factory=dict)
    receivers: list[dict[str, Any]] = field(default_factory=list)


def load_config(path: Path | None) -> AlertConfig:
    """Parse and validate the file (cached until its modification time changes)."""
    if path is None:
        return AlertConfig()
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise ValueError(f"alert rules file {path}: {exc.strerror}") from None
    return _load(str(path), mtime)


@lru_cache(maxsize=8)
def _load(path: str, _mtime: int) -> AlertConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"alert rules file {path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"alert rules file {path}: the top level must be a mapping")
    unknown = set(doc) - {"rules", "projects", "receivers"}
    if unknown:
        raise ValueError(f"alert rules file {path}: unknown keys {sorted(unknown)}")
    try:
        rules = validate(doc.get("rules") or {})
        projects = {
            str(name): validate((spec or {}).get("rules") or {})
            for name, spec in (doc.get("projects") or {}).items()
        }
    except RuleError as exc:
        raise ValueError(f"alert rules file {path}: {exc}") from None
    receivers = doc.get("receivers") or []
    if not isinstance(receivers, list) or not all(isinstance(r, dict) for r in receivers):
        raise ValueError(f"alert rules file {path}: receivers must be a list of mappings")
    return AlertConfig(rules=rules, projects=projects, receivers=receivers)
