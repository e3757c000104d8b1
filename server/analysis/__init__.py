"""Pure estimators and derived quantities (stdlib/numpy only; no database, no HTTP)."""
