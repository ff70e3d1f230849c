"""The `bitserve` command: `up` (everything on one machine), `api`, `worker`, `migrate`,
`keys` (service.cli_keys) and `storage sweep` (service.sweep); `datasets`, `jobs`, `models`,
`predict` and `deployments` work with a running service and are handed to bitserve_client.cli.

`bitserve up` is the embedded default: with nothing configured it keeps everything under
BITSERVE_HOME (SQLite database, kombu's SQLAlchemy transport as the broker, the artifact
store), runs the migrations, then starts the Celery training worker as a child process and
the gateway (uvicorn) in this process. A worker that exits on its own (e.g. killed by the OOM
killer) is restarted with a growing pause while the API keeps serving (service.supervisor); a
crash loop shows in /readyz and the log. Ctrl-C or SIGTERM stops all of it: the gateway drains,
the worker gets SIGTERM (a warm shutdown), and is killed if it has not stopped after a grace
period; a job it was running is re-queued by the reconciler and resumes from its checkpoint.

The service never imports `worker/` (the gateway must not load training code): the worker is
started as `python -m celery -A worker.celery_app worker`, with the same environment.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from bitcore.atomic import PRIVATE_UMASK, make_private_dir
from service.cli_keys import ADMIN_KEY_FILE, cmd_keys, ensure_admin_key
from service.cli_keys import add_parser as add_keys_parser
from service.cli_settings import StartupError, check_home, load_settings
from service.log_format import FORMATTERS, LogFormat
from service.settings import Settings, get_settings
from service.supervisor import Supervisor

log = logging.getLogger(__name__)

# A running training step checkpoints and hands its job back on SIGTERM (worker.runner); a big
# model on a CPU may need a while for that. A second Ctrl-C kills at once.
WORKER_STOP_GRACE_SECONDS = 30.0
STARTUP_TIMEOUT_SECONDS = 60.0


# Commands against a running service (bitserve_client.cli: click and rich, over HTTP): they
# need neither the server's settings nor its database, and are dispatched before argparse.
REMOTE_COMMANDS = {
    "datasets": "upload, list, show or delete datasets on a running service",
    "jobs": "start, watch, list, show or cancel fine-tuning jobs on a running service",
    "models": "list, show, export or delete models on a running service",
    "predict": "classify images with a model on a running service",
    "deployments": "stable names for models on a running service: create, split, roll back",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in REMOTE_COMMANDS:
        from bitserve_client.cli import main as remote_main

        return remote_main(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run(args)
    except StartupError as exc:
        print(f"bitserve: {exc}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    # Before anything is created: the database, uploads, logs and every child process's files
    # are private to the service's user (0o600 files, 0o700 directories; docs/security.md).
    os.umask(PRIVATE_UMASK)
    # Command-line values go through the environment so child processes see the same settings.
    if getattr(args, "host", None):
        os.environ["BITSERVE_HOST"] = args.host
    if getattr(args, "port", None):
        os.environ["BITSERVE_PORT"] = str(args.port)
    get_settings.cache_clear()
    settings = load_settings()
    check_home(settings)
    if args.command == "keys":
        return cmd_keys(settings, args)
    if args.command == "storage":
        return cmd_storage_sweep(settings, args.dry_run, args.min_age)
    if args.command == "worker":
        return cmd_worker(settings, parse_roles(args.queues))
    handler = {"up": cmd_up, "api": cmd_api, "migrate": cmd_migrate}
    return int(handler[args.command](settings))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitserve",
        description="Fine-tune BiT models and serve them over REST.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  bitserve up                      # everything on this machine, data in ./.bitserve\n"
        "  BITSERVE_PORT=9000 bitserve up   # settings are environment variables (README)\n"
        "  bitserve jobs list               # work with the running service\n"
        "\nexit status: 0 ok, 2 bad usage or settings, 1 anything else",
    )
    parser.add_argument("--version", action="version", version=f"bitserve {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    up = commands.add_parser(
        "up", help="migrate, then run the API, a training worker and an ingest worker"
    )
    api = commands.add_parser("api", help="run the API gateway (uvicorn) only")
    for sub in (up, api):
        sub.add_argument("--host", help="listen address (default BITSERVE_HOST or 127.0.0.1)")
        sub.add_argument("--port", type=int, help="listen port (default BITSERVE_PORT or 8000)")
    worker = commands.add_parser("worker", help="run a Celery worker (training and ingestion)")
    worker.add_argument(
        "--queues",
        default=",".join(WORKER_ROLES),
        help="what this worker takes, comma-separated: train (fine-tuning jobs), ingest "
        "(uploaded datasets); default both. GPU nodes: --queues train, with ingest workers "
        "on CPU nodes (the queue names are BITSERVE_TRAIN_QUEUE and BITSERVE_INGEST_QUEUE)",
    )
    commands.add_parser("migrate", help="bring the database schema up to date")
    add_keys_parser(commands)
    storage = commands.add_parser("storage", help="maintain the object store")
    actions = storage.add_subparsers(dest="storage_command", metavar="ACTION", required=True)
    sweep = actions.add_parser(
        "sweep", help="delete stored folders no row points to, and dead uploads"
    )
    sweep.add_argument("--dry-run", action="store_true", help="list them, delete nothing")
    sweep.add_argument(
        "--min-age",
        type=float,
        metavar="SECONDS",
        help="only what is untouched this long (default BITSERVE_SWEEP_MIN_AGE_SECONDS, 3600)",
    )
    for name, text in REMOTE_COMMANDS.items():  # listed here, parsed by bitserve_client.cli
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _version() -> str:
    from bitcore import __version__

    return __version__


# -- commands ------------------------------------------------------------------------------


def cmd_migrate(settings: Settings) -> int:
    from service.db import migrate

    make_private_dir(settings.home)
    migrate(settings.database_url)
    print(f"database is up to date: {_redact(settings.database_url)}", flush=True)
    return 0


def cmd_storage_sweep(settings: Settings, dry_run: bool, min_age: float | None) -> int:
    """Print what was (or would be) removed; exit 1 if the store refused a delete."""
    from service.db import Database
    from service.object_store import ObjectStoreError
    from service.storage import Storage
    from service.sweep import format_report, sweep

    min_age = settings.sweep_min_age_seconds if min_age is None else min_age
    if min_age < 0:
        raise SystemExit("bitserve: --min-age must be >= 0")
    db = Database(settings.database_url)
    try:
        with db.sessionmaker() as session:
            report = sweep(
                Storage.from_settings(settings), session, min_age_seconds=min_age, dry_run=dry_run
            )
    except ObjectStoreError as exc:
        raise SystemExit(f"bitserve: the object store could not be listed: {exc}") from None
    finally:
        db.dispose()
    print(format_report(report), flush=True)
    return 1 if report.failed else 0


def parse_roles(text: str) -> tuple[str, ...]:
    """`--queues train,ingest` -> ("train", "ingest"); exits naming the unknown ones."""
    roles = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [role for role in roles if role not in WORKER_ROLES]
    if unknown or not roles:
        raise SystemExit(
            f"bitserve worker: --queues takes {' and/or '.join(WORKER_ROLES)} "
            f"(comma-separated), not {text!r}"
        )
    return roles


def cmd_worker(settings: Settings, roles: tuple[str, ...] = ("train", "ingest")) -> int:
    make_private_dir(settings.home)
    command = worker_command(settings, roles=roles)
    os.execve(command[0], command, child_environment(settings))
    return 0  # not reached


def cmd_api(settings: Settings) -> int:
    """Serve until SIGTERM/Ctrl-C, then drain (service.draining) and exit 0.

    The port is bound with SO_REUSEPORT: a second `bitserve api` on the same port shares it,
    so one can be restarted while the other serves (docs/operations.md, "Rolling restarts").
    """
    from service.app import create_app
    from service.draining import DrainingServer

    app = create_app(settings)
    sock = listen_socket(settings.host, settings.port)
    server = DrainingServer(
        _uvicorn_config(settings, app), app.state.drain, settings.shutdown_grace_seconds
    )
    # uvicorn re-raises the signal it stopped on once it has shut down; handled here, Ctrl-C
    # ends with exit status 0 instead of a KeyboardInterrupt traceback.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    # uvicorn does not announce sockets it is given: say where it listens (and which process).
    print(
        f"bitserve api: listening on http://{_display_host(settings.host)}:{settings.port}"
        f" (pid {os.getpid()})",
        flush=True,
    )
    server.run(sockets=[sock])
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (Linux, macOS): processes of the same
    user may bind the same port and the kernel spreads new connections between them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"bitserve: cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock


def declare_queues(settings: Settings) -> None:
    """The embedded broker's queues, before its two workers race to create them."""
    from service.broker import Broker

    broker = Broker(settings)
    try:
        broker.declare_queues()
    finally:
        broker.close()


def cmd_up(settings: Settings) -> int:
    """Migrate, start the worker, serve the API until Ctrl-C/SIGTERM, then stop everything."""
    from service.app import create_app
    from service.draining import DrainingServer

    _check_port_free(settings.host, settings.port)
    # A terminal reads these logs: escaped text unless BITSERVE_LOG_FORMAT says otherwise (the
    # worker child gets the same through its environment).
    settings = settings.model_copy(update={"log_format": settings.log_format or "text"})
    cmd_migrate(settings)
    from service.broker import is_sqlalchemy_url

    if is_sqlalchemy_url(settings.broker_url):
        declare_queues(settings)
    new_key = ensure_admin_key(settings) if settings.auth == "required" else None
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # uvicorn installs its own handlers while it serves and re-raises the signal after its
        # graceful shutdown: recording it here (instead of dying) lets the children be stopped.
        received.append(signum)
        if len(received) > 1:  # a second Ctrl-C: stop waiting for the worker
            supervisor.kill()

    supervisor = Supervisor()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # Migrated just above: the app need not run the migrations again on start-up.
    app = create_app(settings.model_copy(update={"auto_migrate": False}))
    app.state.supervisor = supervisor  # /readyz reports a crash-looping worker
    # The same drain as `bitserve api`: in-flight requests finish, new ones get 503.
    server = DrainingServer(
        _uvicorn_config(settings, app), app.state.drain, settings.shutdown_grace_seconds
    )
    try:
        env = child_environment(settings)
        # Two workers: an upload is ingested while a long training job runs.
        supervisor.start("worker", worker_command(settings, roles=("train",)), env)
        supervisor.start("ingest", worker_command(settings, roles=("ingest",)), env)
        watcher = threading.Thread(
            target=_watch,
            args=(server, supervisor, settings, new_key),
            name="bitserve-watch",
            daemon=True,
        )
        watcher.start()
        if not received:  # Ctrl-C while starting: do not start serving at all
            server.run()
    finally:
        supervisor.stop(WORKER_STOP_GRACE_SECONDS)
    print("bitserve: stopped", flush=True)
    return 0


# -- pieces ------------------------------------------------------------------------------


WORKER_ROLES = ("train", "ingest")


def worker_command(
    settings: Settings,
    *,
    roles: tuple[str, ...] = WORKER_ROLES,
    pool: str | None = None,
    name: str | None = None,
) -> list[str]:
    """The Celery worker for the queues of `roles` ("train", "ingest"), one task at a time
    per process.

    concurrency 1 -> the solo pool (the task runs in the worker process itself); more ->
    prefork children (the parent never touches CUDA: the device is chosen inside the task).
    `pool` and `name` override those choices (tests run prefork with one child, and several
    workers side by side).
    """
    concurrency = int(settings.worker_concurrency)
    pool = pool or ("solo" if concurrency == 1 else "prefork")
    queues = {"train": settings.train_queue, "ingest": settings.ingest_queue}
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        ",".join(queues[role] for role in roles),
        "-c",
        str(concurrency),
        f"--pool={pool}",
        # The database, not the broker, coordinates workers (claims, heartbeats, cooperative
        # cancel): Celery's mingle/gossip/event heartbeats would only add broadcast traffic,
        # which the embedded SQLAlchemy transport emulates by polling (slow start-up).
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "--loglevel=INFO",
        "-n",
        name or f"bitserve-{'-'.join(roles)}-{os.getpid()}@{socket.gethostname()}",
    ]


def child_environment(settings: Settings) -> dict[str, str]:
    """This environment, with BITSERVE_HOME made absolute so children resolve the same paths."""
    env = dict(os.environ)
    env["BITSERVE_HOME"] = str(settings.home)
    if settings.log_format is not None:
        env["BITSERVE_LOG_FORMAT"] = settings.log_format
    return env


def _watch(server: object, supervisor: Supervisor, settings: Settings, new_key: str | None) -> None:
    """Print where things are once the API listens; restart a child that died (the API keeps
    serving); when the API starts shutting down, tell the worker at once (both drain in
    parallel)."""
    announced = False
    started = time.monotonic()
    while not _stopping(server):
        try:
            supervisor.poll()
        except Exception:  # e.g. a failed fork: try again on the next turn, keep serving
            log.exception("bitserve: supervising the worker failed")
        if not announced and getattr(server, "started", False):
            announced = True
            _announce(settings, new_key)
        elif not announced and time.monotonic() - started > STARTUP_TIMEOUT_SECONDS:
            announced = True  # uvicorn reports its own start-up errors
        time.sleep(0.2)
    supervisor.terminate()


def _stopping(server: object) -> bool:
    """uvicorn is shutting down, or (DrainingServer) has started draining on a signal."""
    drain = getattr(server, "drain", None)
    return bool(getattr(server, "should_exit", False) or getattr(drain, "draining", False))


def _announce(settings: Settings, new_key: str | None) -> None:
    base = f"http://{_display_host(settings.host)}:{settings.port}"
    lines = [
        "",
        "bitserve is up",
        f"  API:     {base}",
        f"  docs:    {base}/docs",
        f"  data:    {settings.home}",
        f"  database {_redact(settings.database_url)}",
        f"  broker   {_redact(settings.broker_url)}",
    ]
    if settings.auth == "off":
        lines.append("  API keys: off (BITSERVE_AUTH=off): every caller is an admin")
    else:
        lines.append(
            f"  API key: {settings.home / ADMIN_KEY_FILE} (admin; the CLI and client read it)"
        )
    if new_key is not None:
        # Shown this once, on the terminal of whoever started bitserve (never logged): the key
        # rides in the URL fragment, which browsers do not send to the server.
        lines.append(f"  web page, signed in (open once): {base}/#key={new_key}")
    lines += ["  Ctrl-C stops the API and the worker.", ""]
    print("\n".join(lines), flush=True)


def _log_config(log_format: LogFormat = "json") -> dict[str, Any]:
    """uvicorn's logging, plus the service's own loggers at INFO on the same stream: the audit
    trail's lines (service.audit) and the model cache's appear next to the access log. Every
    line is written by service.log_format (JSON, or escaped text), so no logged value (a path,
    a name) can start a line of its own; other libraries' warnings go the same way (root)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    for name in ("default", "access"):
        config["formatters"][name] = {"()": FORMATTERS[log_format]}
    for name in ("service", "bitcore"):
        config["loggers"][name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config


def _uvicorn_config(settings: Settings, app: object) -> uvicorn.Config:
    from service.connections import connection_options

    # One process: the model cache, the batcher and the DB engine live in it (load once).
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=_log_config(settings.log_format or "json"),
        # After the drain (or Ctrl-C under `bitserve up`): how long answers in progress may
        # take before uvicorn cancels them.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
        # The connection cap, header timeout and keep-alive (service.connections); the
        # open-files limit is raised first so the cap is reached before descriptors run out.
        **connection_options(settings),
    )


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"bitserve: cannot listen on {host}:{port} ({exc.strerror}); "
                "is bitserve already running? Set BITSERVE_PORT or --port to use another port."
            ) from None


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _redact(url: str) -> str:
    """A URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    if url.startswith(("redis://", "rediss://", "amqp://")):
        scheme, rest = url.split("://", 1)
        if "@" in rest:
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return url
    try:
        return make_url(url.replace("sqla+", "", 1)).render_as_string(hide_password=True)
    except Exception:
        return url.split("@", 1)[-1]


if __name__ == "__main__":
    raise SystemExit(main())
