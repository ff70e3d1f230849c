"""bitserve_client.cli without a server: --set parsing, what goes to stdout and stderr, predict
requests in batches, usage errors (exit 2), a service that is not running (exit 1, one line)
and the dispatch from the `bitserve` entry point. Against a live server:
tests/integration/cli_remote/."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bitserve_client.cli import COMMANDS, main
from bitserve_client.cli.jobs import parse_override
from bitserve_client.cli.models import PREDICT_BATCH_IMAGES, batches
from bitserve_client.cli.remote import Remote
from service import cli as service_cli

# -- --set -------------------------------------------------------------------------------------


def test_parse_override() -> None:
    assert parse_override("steps=200") == ("steps", 200)
    assert parse_override(" base_lr = 0.003 ") == ("base_lr", 0.003)
    assert parse_override("mixup_alpha=1e-1") == ("mixup_alpha", 0.1)
    for text, reason in [
        ("steps", "expected KEY=VALUE, got 'steps'"),
        ("=3", "expected KEY=VALUE, got '=3'"),
        ("steps=ten", "the value of steps must be a number, got 'ten'"),
    ]:
        with pytest.raises(ValueError) as caught:
            parse_override(text)
        assert str(caught.value) == reason


# -- output --------------------------------------------------------------------------------------


def test_json_goes_alone_to_stdout_and_notes_to_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    remote = Remote("http://x", None, True, out=out, err=err)
    remote.note("uploading x.zip")
    remote.emit([{"id": "ds_x", "name": "ü"}], lambda: "not shown")
    assert json.loads(out.getvalue()) == [{"id": "ds_x", "name": "ü"}]
    assert err.getvalue() == "uploading x.zip\n"

    out, err = io.StringIO(), io.StringIO()
    people = Remote("http://x", None, False, out=out, err=err)
    people.note("uploading x.zip")
    people.emit({"id": "ds_x"}, lambda: "deleted ds_x")
    assert (out.getvalue(), err.getvalue()) == ("uploading x.zip\ndeleted ds_x\n", "")


def test_predict_requests_are_batched(tmp_path: Path) -> None:
    paths = []
    for i in range(PREDICT_BATCH_IMAGES + 3):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"x" * 10)
        paths.append(path)
    assert [len(b) for b in batches(paths)] == [PREDICT_BATCH_IMAGES, 3]
    assert [p for b in batches(paths) for p in b] == paths


# -- the command line, in process --------------------------------------------------------------


NOT_ANSWERING = (
    "bitserve: the bitserve server at {} is not answering; start it with `bitserve up` (or "
    "`docker compose up`), or point BITSERVE_URL / --url at a running one\n"
)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def closed_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_service_that_is_not_running_is_one_line_and_exit_1(
    closed_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITSERVE_URL", closed_url)
    assert main(["models", "list", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == NOT_ANSWERING.format(closed_url)
    # --url wins over the environment; the entry point hands the command over.
    assert service_cli.main(["jobs", "show", "job_x", "--url", closed_url + "/"]) == 1
    assert capsys.readouterr().err == NOT_ANSWERING.format(closed_url)


def test_a_service_that_is_not_running_is_one_line_on_stderr_from_a_fresh_process(
    closed_url: str, tmp_path: Path
) -> None:
    # The client's retries back off before it gives up; the program then prints one line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITSERVE_")}
    env.update(BITSERVE_URL=closed_url, BITSERVE_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "bitserve_client.cli", "jobs", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        NOT_ANSWERING.format(closed_url),
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["jobs", "create", "--dataset", "ds_x"], "Missing option '--base-model'"),
        (
            ["jobs", "create", "--dataset", "d", "--base-model", "m", "--set", "steps=x"],
            "Invalid value for '--set': the value of steps must be a number, got 'x'",
        ),
        (["jobs", "list", "--status", "done"], "Invalid value for '--status'"),
        (["models", "export", "mdl_x", "--format", "pt"], "Invalid value for '--format'"),
        (["predict", "mdl_x"], "Missing argument 'IMAGE...'"),
        (["models", "evaluate", "mdl_x"], "Missing argument 'DATASET|DIR|ARCHIVE'"),
        (
            ["models", "evaluate", "mdl_x", "photos/held-out"],
            "Invalid value for DATASET|DIR|ARCHIVE: no such folder or archive: photos/held-out",
        ),
        (
            ["models", "evaluate", "mdl_x", "held-out.zip"],
            "no such folder or archive: held-out.zip",
        ),
        (
            ["models", "batch-predict", "mdl_x", "ds_y", "--top-k", "0"],
            "Invalid value for '--top-k'",
        ),
        (
            ["models", "batch-predict", "mdl_x", "ds_y", "--format", "parquet"],
            "Invalid value for '--format'",
        ),
        (
            ["models", "batch-predict", "mdl_x", "ds_y", "-o", "/no/such/folder/p.csv"],
            "Invalid value for -o/--output: no such folder: /no/such/folder",
        ),
        (
            ["models", "batch-predict", "mdl_x", "photos/unlabelled"],
            "no such folder or archive: photos/unlabelled",
        ),
        (["predict", "mdl_x", "/no/such.png"], "'/no/such.png' does not exist"),
        (["datasets", "upload", "/no/such/folder"], "'/no/such/folder' does not exist"),
        (["datasets", "list", "--limit", "-1"], "Invalid value for '--limit'"),
        (
            ["models", "list", "--url", "localhost:8000"],
            "Invalid value for '--url' / BITSERVE_URL: 'localhost:8000' is no http:// or "
            "https:// URL",
        ),
    ],
)
def test_usage_errors_exit_2_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], closed_url: str
) -> None:
    assert main(argv if "--url" in argv else [*argv, "--url", closed_url]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
    assert "not answering" not in captured.err


def test_an_empty_folder_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_url: str
) -> None:
    assert main(["datasets", "upload", str(tmp_path), "--url", closed_url]) == 2
    assert "has no files to upload" in capsys.readouterr().err
    assert main(["models", "evaluate", "mdl_x", str(tmp_path), "--url", closed_url]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for DATASET|DIR|ARCHIVE" in err and "has no files to upload" in err


def test_export_to_a_missing_folder_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_url: str
) -> None:
    target = tmp_path / "missing" / "m.zip"
    assert main(["models", "export", "mdl_x", "-o", str(target), "--url", closed_url]) == 2
    assert f"no such folder: {target.parent}" in capsys.readouterr().err


def test_the_entry_point_lists_and_dispatches_the_remote_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert tuple(service_cli.REMOTE_COMMANDS) == COMMANDS
    with pytest.raises(SystemExit):
        service_cli.main(["--help"])
    listed = capsys.readouterr().out
    for name in ("up", "api", "worker", *COMMANDS):
        # argparse puts the help of a name as long as "deployments" on the next line
        assert f"\n    {name} " in listed or f"\n    {name}\n" in listed
    assert service_cli.main(["jobs", "--help"]) == 0
    assert "Usage: bitserve jobs [OPTIONS] COMMAND" in capsys.readouterr().out
