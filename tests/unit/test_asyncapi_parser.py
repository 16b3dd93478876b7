"""docs/asyncapi.json as AsyncAPI's own tools read it: the official parser, through Node.

`@asyncapi/parser` (pinned in tests/asyncapi/package.json, installed by `make
asyncapi-parser`, which `make test` runs) parses the checked-in document and
validates it with its rules, `$ref`s resolved; any error or warning fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PARSER = ROOT / "tests" / "asyncapi"
DOCUMENT = ROOT / "docs" / "asyncapi.json"
# Spectral's severities: 0 error, 1 warning, 2 information, 3 hint.
ERROR, WARNING = 0, 1


def parse(path: Path) -> dict[str, Any]:
    node = shutil.which("node")
    assert node, "node is missing: install Node.js (Debian: apt-get install nodejs)"
    assert (PARSER / "node_modules" / "@asyncapi" / "parser").is_dir(), (
        "the AsyncAPI parser is not installed: run `make asyncapi-parser`"
    )
    done = subprocess.run(
        [node, str(PARSER / "parse.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_official_parser_reads_the_contract_with_no_error_or_warning() -> None:
    result = parse(DOCUMENT)
    problems = [d for d in result["diagnostics"] if d["severity"] in (ERROR, WARNING)]
    assert problems == [], json.dumps(problems, indent=1)[:4000]
    assert result["document"] is True


def test_the_parser_refuses_a_ref_that_resolves_nowhere(tmp_path: Path) -> None:
    """The check can fail: a payload `$ref` into a schema's own `$defs` is what it caught."""
    doc = json.loads(DOCUMENT.read_text())
    doc["components"]["messages"]["orderEvent"]["payload"] = {"$ref": "#/$defs/OrderEvent"}
    broken = tmp_path / "asyncapi.json"
    broken.write_text(json.dumps(doc))
    result = parse(broken)
    assert result["document"] is False
    assert {d["code"] for d in result["diagnostics"] if d["severity"] == ERROR} == {"invalid-ref"}
