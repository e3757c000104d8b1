"""Web pages of the collector: templates and plotly figures. Knows no HTTP, no DB."""

from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"


def plotly_js_path() -> Path:
    """plotly.js as shipped inside the installed plotly package (no CDN: air-gapped clusters)."""
    import plotly  # noqa: PLC0415  (only the page route needs it)

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
