"""python -m bench.client --quick runs end to end (toy service in-process) and writes its JSON."""

import json
import subprocess
import sys

from tests.support.paths import REPO


def test_quick_client_benchmark(tmp_path):
    out = tmp_path / "client.json"
    cmd = [sys.executable, "-m", "bench.client", "--quick", "--requests", "8", "--seconds", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for level in ("concurrency_1", "concurrency_8"):
        r = result["overhead"][level]
        assert r["raw_stub"]["requests"] == r["cxr_client"]["requests"] == 8
        assert r["batch_process_images"]["failed"] == 0 and r["client_vs_raw"] > 0
    assert "analyze" not in result
