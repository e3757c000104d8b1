"""``gradsentry token create|list|revoke``: tokens straight in the database (like
``migrate``), for bootstrapping a collector that requires them and for scripts."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy.orm import Session

from server.auth import store
from server.auth.tokens import SCOPES
from server.db import make_engine
from server.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="create, list or revoke API tokens (in the database)")
    tsub = token.add_subparsers(dest="token_command", required=True)

    create = tsub.add_parser("create", help="create a token; it is printed once, on stdout")
    where = create.add_mutually_exclusive_group(required=True)
    where.add_argument("--project", help="the one project the token may touch")
    where.add_argument("--all-projects", action="store_true",
                       help="a token for every project (e.g. an admin or a Prometheus scraper)")
    create.add_argument("--scope", action="append", choices=SCOPES, dest="scopes",
                        help="repeat for several (default: ingest and read; admin implies both)")
    create.add_argument("--name", default="", help="a note for `token list`")
    create.add_argument("--database-url")

    lst = tsub.add_parser("list", help="tokens with their scopes and status (no secrets)")
    lst.add_argument("--project")
    lst.add_argument("--database-url")

    revoke = tsub.add_parser("revoke", help="revoke a token at once (every collector process)")
    revoke.add_argument("id", help="the token id (`gs_<id>_…`, or from `token list`)")
    revoke.add_argument("--database-url")


def run(args: argparse.Namespace) -> int:
    from server.migrate import upgrade

    settings = Settings(database_url=args.database_url) if args.database_url else Settings()
    upgrade(settings.database_url)  # as `serve` does: the tokens table must exist
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            if args.token_command == "create":
                return _create(session, args)
            if args.token_command == "list":
                return _list(session, args.project)
            return _revoke(session, args.id)
    finally:
        engine.dispose()


def _create(session: Session, args: argparse.Namespace) -> int:
    project = None if args.all_projects else args.project
    if len(args.name) > 128 or (project is not None and len(project) > 128):
        print("gradsentry: --name and --project take at most 128 characters", file=sys.stderr)
        return 2
    made = store.create(session, project, args.scopes or ("ingest", "read"), args.name or None)
    where = "every project" if project is None else f"project {project!r}"
    print(f"created token {made.id} ({','.join(made.scopes)} on {where}); it is shown only "
          "once, here:", file=sys.stderr)
    print(made.token, flush=True)
    return 0


def _list(session: Session, project: str | None) -> int:
    rows = store.list_tokens(session, project).tokens
    print(f"{'id':<12}  {'project':<20}  {'scopes':<18}  {'status':<8}  {'created (UTC)':<16}  "
          f"{'last used (UTC)':<16}  name")
    for t in rows:
        print(f"{t.id:<12}  {t.project or '*':<20}  {','.join(t.scopes):<18}  "
              f"{'revoked' if t.revoked_at else 'active':<8}  "
              f"{t.created_at:%Y-%m-%d %H:%M}  "
              f"{f'{t.last_used_at:%Y-%m-%d %H:%M}' if t.last_used_at else '-':<16}  {t.name}")
    return 0


def _revoke(session: Session, token: str) -> int:
    token_id = token.split("_")[1] if token.startswith("gs_") else token
    try:
        out = store.revoke(session, token_id)
    except Exception as exc:  # NotFound: say so, exit non-zero
        print(f"gradsentry: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 1
    print(f"token {out.id} revoked at {out.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    return 0
