"""Access control: project-scoped API tokens, scopes, open/required modes, rate limits.

``tokens`` (format, hashing, the request's principal), ``store`` (create, list, revoke,
authenticate), ``ratelimit`` (a counter per token and window in the database), ``mode`` (when
tokens are required), ``ownership`` (which project a run, alert, silence or receiver is in),
``deps`` (the FastAPI dependencies every route declares).
"""
