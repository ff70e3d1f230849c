"""The README's curl walk-through, run as written against `bitserve up` on embedded defaults.

A user copies the walk-through's commands into a shell in the folder where `make up` runs;
this test does the same: `bitserve up` in a fresh folder (its `.bitserve` there, `.venv`
linked to the environment running the tests), then the README's bash blocks of that section
in `bash` with `set -euo pipefail`. Two edits only, both asserted to match exactly one line:
the commented demo-set command is uncommented (the user has no images at hand), and `API=`
names the test's free port instead of 8000. Every step's output is then checked: a README
whose commands drift from the API fails here, not in a user's terminal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.embedded import REPO_ROOT, Up

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(480)]

WALK_TIMEOUT_S = 360  # 60 training steps of the tiny model on 2 busy cores, plus ingest
DEMO_SET_LINE = re.compile(r"^#\s+(\.venv/bin/python -c .*make_image_folder.*)$")
API_LINE = "API=http://127.0.0.1:8000"
TOOLS = ("bash", "curl", "jq", "zip", "unzip", "base64")  # what the walk-through's lines call


def walkthrough_blocks(readme: str) -> list[str]:
    """The bash blocks of the README's "Walk-through (curl)" section, in order."""
    section = readme.split("\n## Walk-through (curl)\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```bash\n(.*?)^```$", section, flags=re.M | re.S)


def runnable(blocks: list[str], api: str) -> str:
    """The blocks as one script, with the demo set made and the test's port: nothing else."""
    lines = "\n".join(blocks).splitlines()
    demo = [i for i, line in enumerate(lines) if DEMO_SET_LINE.match(line)]
    api_lines = [i for i, line in enumerate(lines) if line == API_LINE]
    assert len(demo) == 1 and len(api_lines) == 1, (demo, api_lines)
    match = DEMO_SET_LINE.match(lines[demo[0]])
    assert match is not None
    lines[demo[0]] = match.group(1)
    lines[api_lines[0]] = f"API={api}"
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def one_line_json(out: str, prefix: str) -> dict:
    """The single output line (a `jq -c` result) that starts with `prefix`, parsed."""
    found = [line for line in out.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return json.loads(found[0])


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"the README walk-through calls {missing}: put them on the PATH"
    walk = tmp_path / "walk"
    walk.mkdir()
    # The user's checkout has .venv; here it is the environment that runs the tests.
    (walk / ".venv").symlink_to(Path(sys.executable).parent.parent)
    assert (walk / ".venv" / "bin" / "python").exists(), "the tests must run from a venv"
    yield walk


def test_the_curl_walkthrough_runs_as_written(folder: Path) -> None:
    up = Up(folder / ".bitserve", cwd=folder)
    try:
        up.wait_ready()
        script = runnable(walkthrough_blocks((REPO_ROOT / "README.md").read_text()), up.url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BITSERVE_")}
        env["PYTHONPATH"] = str(REPO_ROOT)  # `tests.imagegen` for the demo set
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=WALK_TIMEOUT_S,
        )
        if done.returncode != 0:
            print(done.stdout[-6000:], done.stderr[-4000:], up.log()[-4000:], sep="\n---\n")
        assert done.returncode == 0, done.stderr[-2000:]
        out = done.stdout

        # 1. The demo set: 20 + 20 images, uploaded as one dataset that the ingest made ready.
        assert sorted(p.name for p in (folder / "my_images").iterdir()) == ["cat", "dog"]
        assert len(list((folder / "my_images" / "cat").iterdir())) == 20
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["id"].startswith("ds_") and dataset["name"] == "pets"
        assert "event: done" in out

        # 2./3. The job, followed to the end; the model it made knows both classes.
        job = json.loads((folder / "job.json").read_text())
        assert job["id"].startswith("job_") and job["base_model"] == "tiny-R10x0.25"
        assert '"classes": [\n    "cat",\n    "dog"\n  ]' in out
        accuracy = float(re.findall(r'^  "accuracy": ([0-9.]+)$', out, flags=re.M)[0])
        assert accuracy >= 0.75  # the demo set is easy: 100 % in the README's run

        # 5. The artifact: weights and metadata in the zip.
        assert "model.safetensors" in out and "metadata.json" in out

        # 6. The audit trail (changes only; reads are not audited), newest first.
        audit = [json.loads(line) for line in out.splitlines() if line.startswith('["')]
        assert audit == [["POST", "/v1/jobs", 202], ["POST", "/v1/datasets", 202]]

        # 7. The stable name answers with the model the job made, and says which.
        created = one_line_json(out, '{"name":"pets"')
        model_id = created["targets"][0]["model_id"]
        assert model_id.startswith("mdl_") and created["version"] == 1
        answered = one_line_json(out, '{"model_id":')
        assert answered["model_id"] == model_id and answered["version"] == 1
        assert answered["predictions"][0]["top_k"][0]["label"] == "cat"

        # Cleaning up: the deployment, then the model, each 204; the model is gone.
        assert out.splitlines()[-2:] == ["204", "204"]
        key = (folder / ".bitserve" / "admin.key").read_text().strip()
        gone = httpx.get(
            f"{up.url}/v1/models/{model_id}", headers={"Authorization": f"Bearer {key}"}
        )
        assert gone.status_code == 404
    finally:
        up.kill()
