"""The collector never imports torch (the client side is pinned in tests/client)."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_server_never_imports_torch() -> None:
    loaded = _modules_after("import server.app, server.cli, server.migrate; "
                            "server.app.create_app()")
    assert "server" in loaded and "fastapi" in loaded
    assert "torch" not in loaded

