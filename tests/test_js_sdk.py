"""The `openai` npm package under node: chat, streaming and embeddings."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).parent / "js"


def test_js_sdk_smoke(server):
    if not (JS / "node_modules" / "openai").is_dir():
        pytest.fail("tests/js/node_modules is missing: run `make node-deps`")
    node = shutil.which("node")
    assert node, "node is not installed"
    p = subprocess.run([node, str(JS / "smoke.mjs"), server.base_url, server.key, "thox-demo"],
                       capture_output=True, text=True, timeout=180, cwd=JS)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    chat = out["chat"]
    n = chat["usage"]["completion_tokens"]
    assert chat["content"] and 0 < n <= 8
    assert chat["finish"] == ("length" if n == 8 else "stop"), chat
    assert out["stream"]["text"] and out["stream"]["chunks"] >= 2
    # the JS SDK reads what the server answers for the same input
    usage = server.post("/embeddings", {"model": "thox-demo", "input": ["hello", "world"]}).json()["usage"]
    assert out["embeddings"] == {"count": 2, "dims": 576, "usage": usage}
    assert usage["prompt_tokens"] >= 2 and usage["total_tokens"] == usage["prompt_tokens"]
    assert out["badKey"] == 401
