"""gradsentry collector: ingest, storage, queries and (later) analysis and alerts.

Never imports torch.
"""

__version__ = "0.1.0"
