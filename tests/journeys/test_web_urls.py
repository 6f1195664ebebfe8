"""Issue 27: ``cnc build`` on a JSONL table of web URLs (a server on 127.0.0.1 started here), in a fresh process.

Good images land; a 404, a non-image, a server that accepts and never answers and an ``X-Robots-Tag: noai`` image
are quarantined with their reasons; a URL that fails twice is retried and lands. The build is bounded by the
deadline settings (the test's own timeout bounds it), and every row is accounted for exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import FAST_BUILD, HANG, REPO, TINY_CONFIG, WebServer, photo_bytes

JPG = {"Content-Type": "image/jpeg"}


@pytest.mark.ray
def test_build_from_web_urls(tmp_path):
    with WebServer() as web:
        rows = [(f"good{i}", web.route(f"/good{i}.jpg", (200, JPG, photo_bytes(i)))) for i in range(3)]
        rows += [
            ("missing", web.url + "/missing.jpg"),
            ("text", web.route("/text.jpg", (200, {"Content-Type": "text/plain"}, b"not an image"))),
            ("silent", web.route("/silent.jpg", HANG)),
            ("optout", web.route("/optout.jpg", (200, {**JPG, "X-Robots-Tag": "noai, noimageai"}, photo_bytes(7)))),
            ("flaky", web.route("/flaky.jpg", (503, {}, b""), (503, {}, b""), (200, JPG, photo_bytes(8)))),
        ]
        table = tmp_path / "urls.jsonl"
        table.write_text("".join(json.dumps({"key": k, "url": u, "caption": f"photo {k}"}) + "\n" for k, u in rows))
        out = tmp_path / "build"
        sets = FAST_BUILD + ["ray.num_workers=1", "samples_per_shard=5", "max_failure_fraction=0.6",
                             "fetch.read_timeout_s=0.5", "fetch.deadline_s=3", "fetch.retries=2", "fetch.backoff_s=0.05"]
        proc = subprocess.run([sys.executable, "-m", "cnc.cli", "build", "--config", str(TINY_CONFIG), "--input",
                               str(table), "--output", str(out), *[a for s in sets for a in ("--set", s)]],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-3000:]
        assert "Traceback" not in log
        requests = list(web.requests)
    from triplets.shardio import iter_samples

    keys = [s.key for tar in sorted(out.glob("*.tar")) for s in iter_samples(str(tar))]
    errors = [json.loads(line) for f in sorted((out / "_cnc" / "errors").glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    assert sorted(keys) == ["flaky", "good0", "good1", "good2"]  # exactly once each
    by_key = {e["key"]: e for e in errors}
    assert len(errors) == len(by_key) == 4 and not set(by_key) & set(keys)
    assert (by_key["missing"]["stage"], by_key["missing"]["reason"]) == ("fetch", "HTTP 404")
    assert by_key["text"]["stage"] == "decode" and by_key["text"]["reason"].startswith("not an image")
    assert by_key["silent"]["stage"] == "fetch" and by_key["silent"]["reason"].startswith(("timeout", "deadline"))
    assert by_key["optout"]["reason"] == "opted out: X-Robots-Tag noai"
    assert all(e["source"].startswith(web.url) for e in errors)
    paths = [p for p, _ in requests]
    assert paths.count("/flaky.jpg") == 3 and paths.count("/good0.jpg") == 1  # retried twice; good ones once
    assert all(h["User-Agent"].startswith("cnc/") for _, h in requests)
    manifest = json.loads((out / "_cnc" / "manifest.json").read_text())
    assert manifest["totals"]["failures_by_stage"] == {"decode": 1, "fetch": 3}
