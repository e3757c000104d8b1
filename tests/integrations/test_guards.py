"""Adapters are import-guarded, and ``client_hooks`` never imports them or their frameworks."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("lightning", "lightning", "gradsentry[lightning]"),
    ("huggingface", "transformers", "gradsentry[huggingface]"),
])
def test_missing_framework_names_the_extra(module: str, framework: str, extra: str) -> None:
    # None in sys.modules makes any import of the framework fail, as if it were not installed.
    got = run(f"import sys; sys.modules[{framework!r}] = None\n"
              f"try:\n    import client_hooks.integrations.{module}\n"
              f"except ImportError as exc:\n    print(exc)")
    assert got.returncode == 0, got.stderr
    assert f"pip install {extra}" in got.stdout


def test_client_hooks_imports_no_adapter() -> None:
    got = run("import sys, torch, client_hooks; client_hooks.watch; client_hooks.Monitor\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('lightning', 'pytorch_lightning', 'transformers') "
              "or m.startswith('client_hooks.integrations')))")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "[]"
