"""`bitserve keys create|list|revoke`, and the admin key `bitserve up` makes on first start.

These talk to the database directly: they are the operator's tools (run where the settings
and BITSERVE_API_KEY_PEPPER of the deployment are). `create` prints the key on the last line
of stdout, and nowhere else; `list` never shows a key, only its id.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from bitcore.atomic import SECRET_MODE, atomic_write
from service import api_keys
from service.api_keys import DEFAULT_TENANT, Scope
from service.db import Database
from service.domain_errors import DomainError
from service.ids import rfc3339
from service.settings import Settings

ADMIN_KEY_FILE = "admin.key"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list or revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a key; prints it on the last line")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument(
        "--scope",
        action="append",
        choices=[s.value for s in Scope],
        help="admin, train or predict (repeatable; default train)",
    )
    create.add_argument("--expires-days", type=float, help="the key stops working after this")
    create.add_argument("--name", help="a label, e.g. who uses the key")
    create.add_argument(
        "--global", dest="global_admin", action="store_true", help="an admin of every tenant"
    )
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    revoke = actions.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id", help="the key's id (key_...), as `keys list` shows it")


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    db = Database(settings.database_url)
    try:
        with db.sessionmaker() as session:
            if args.keys_command == "create":
                expires = (
                    timedelta(days=args.expires_days) if args.expires_days is not None else None
                )
                made = api_keys.create_key(
                    session,
                    tenant_id=args.tenant,
                    scopes=[Scope(s) for s in (args.scope or [Scope.TRAIN.value])],
                    pepper=settings.pepper,
                    name=args.name,
                    expires_in=expires,
                    global_admin=args.global_admin,
                    created_by="cli",
                )
                print(
                    f"created {made.row.id} for tenant {made.row.tenant_id}: {_scopes(made.row.scopes)}"
                )
                print("the key (shown once, keep it secret):")
                print(made.token, flush=True)
            elif args.keys_command == "list":
                rows = session.scalars(
                    api_keys.list_keys(args.tenant).order_by(api_keys.ApiKey.created_at)
                ).all()
                for row in rows:
                    state = "revoked" if row.revoked_at else "active"
                    until = rfc3339(row.expires_at) or "never"
                    print(
                        f"{row.id}  {row.tenant_id:20}  {_scopes(row.scopes):22}  {state:7}  "
                        f"expires {until}  {row.name or ''}".rstrip()
                    )
            else:
                row = api_keys.revoke_key(session, None, args.key_id)
                print(f"revoked {row.id} (tenant {row.tenant_id})")
    except DomainError as exc:
        print(f"bitserve keys: {exc.message}", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    return 0


def _scopes(scopes: list[str]) -> str:
    return ",".join(scopes) + ("" if scopes else "-")


def ensure_admin_key(settings: Settings) -> str | None:
    """`bitserve up`'s first start: a global admin key for tenant "default", written to
    $BITSERVE_HOME/admin.key (mode 0600). Returns the new key, or None when the file already
    holds a key this database accepts (nothing is made then)."""
    path = settings.home / ADMIN_KEY_FILE
    db = Database(settings.database_url)
    try:
        with db.sessionmaker() as session:
            if path.is_file():
                try:
                    api_keys.authenticate(session, path.read_text().strip(), settings.pepper)
                    return None
                except DomainError:
                    pass  # revoked, or a new database: make another
            made = api_keys.create_key(
                session,
                tenant_id=DEFAULT_TENANT,
                scopes=[Scope.ADMIN],
                pepper=settings.pepper,
                name="bitserve up",
                global_admin=True,
                created_by="cli",
            )
    finally:
        db.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, mode=SECRET_MODE) as tmp:
        tmp.write_text(made.token + "\n")
    return made.token
