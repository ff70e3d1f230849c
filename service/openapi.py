"""Write the API's OpenAPI document: `python -m service.openapi docs/openapi.json`.

docs/openapi.json is the REST contract as the code builds it (docs/api.md explains it);
tests/unit/test_openapi_contract.py fails when the committed file and the code disagree.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def render(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build() -> dict[str, Any]:
    """The document of an app on throwaway embedded settings (nothing is started)."""
    from service.app import create_app
    from service.settings import Settings

    with tempfile.TemporaryDirectory() as home:
        spec: dict[str, Any] = create_app(Settings(home=Path(home))).openapi()
    return spec


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m service.openapi OUT.json", file=sys.stderr)
        return 2
    Path(args[0]).write_text(render(build()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
