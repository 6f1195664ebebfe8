"""triplets.fetch against a scripted HTTP server on 127.0.0.1 (no Ray; seconds)."""

from __future__ import annotations

import pytest

import cnc
from tests.support import HANG, WebServer, photo_bytes
from triplets.fetch import Fetcher, opt_out, retry_after_seconds

FAST = {"connect_timeout_s": 1, "read_timeout_s": 0.5, "deadline_s": 5, "retries": 2, "backoff_s": 0.01}
JPG = {"Content-Type": "image/jpeg"}


@pytest.fixture
def web():
    with WebServer() as server:
        yield server


def test_opt_out_directives_follow_img2dataset():
    banned = ["noai", "noimageai", "noindex", "noimageindex"]
    assert opt_out(["noai"], banned) == "noai"
    assert opt_out(["nofollow", "NoImageAI, nosnippet"], banned) == "noimageai"
    assert opt_out(["cnc: noindex"], banned) == "noindex"  # addressed to us
    assert opt_out(["googlebot: noai"], banned) is None  # addressed to another robot
    assert opt_out(["max-snippet: 20, noai"], banned) == "noai"  # a valued directive is not a robot name
    assert opt_out(["unavailable_after: 25 Jun 2010 15:00:00 PST"], banned) is None
    assert opt_out(["noai"], []) is None  # switched off
    assert opt_out([], banned) is None


def test_retry_after_seconds_and_dates():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Thu, 01 Jan 1970 00:01:40 GMT", now=40.0) == 60.0
    assert retry_after_seconds("Thu, 01 Jan 1970 00:00:10 GMT", now=40.0) == 0.0  # in the past: no wait
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_answers_become_bytes_or_reasons(web):
    img = photo_bytes(0)
    urls = {
        "good": web.route("/good.jpg", (200, JPG, img)),
        "missing": web.route("/missing.jpg", (404, {}, b"no")),
        "optout": web.route("/optout.jpg", (200, {**JPG, "X-Robots-Tag": "noai"}, img)),
        "big": web.route("/big.jpg", (200, JPG, b"x" * 9000)),
        "unsized": web.route("/unsized.jpg", (200, {"Content-Length": None}, b"x" * 9000)),
        "redirect": web.route("/old.jpg", (301, {"Location": "/good.jpg"}, b"")),
    }
    f = Fetcher({**FAST, "max_bytes": 8000})
    try:
        got = {k: f.fetch(u) for k, u in urls.items()}
    finally:
        f.close()
    assert got["good"].data == img and got["good"].attempts == 1 and got["redirect"].data == img
    assert got["missing"].reason == "HTTP 404" and got["missing"].attempts == 1  # a 4xx is not retried
    assert got["optout"].reason == "opted out: X-Robots-Tag noai" and got["optout"].data is None
    assert got["big"].reason == "too large: Content-Length over fetch.max_bytes=8000"
    assert got["unsized"].reason == "too large: over fetch.max_bytes=8000 bytes"  # counted while streaming
    agent = web.requests[0][1]["User-Agent"]
    assert agent.startswith(f"cnc/{cnc.__version__} ") and all(h["User-Agent"] == agent for _, h in web.requests)

    f = Fetcher({**FAST, "disallowed_header_directives": []})  # opt-outs switched off
    try:
        assert f.fetch(urls["optout"]).data == img
    finally:
        f.close()


def test_retries_on_5xx_and_429_then_answer(web):
    img = photo_bytes(1)
    flaky = web.route("/flaky.jpg", (503, {}, b""), (500, {}, b""), (200, JPG, img))
    slow_down = web.route("/429.jpg", (429, {"Retry-After": "1"}, b""), (200, JPG, img))
    broken = web.route("/broken.jpg", (503, {}, b""))
    f = Fetcher(FAST)
    try:
        got = f.fetch(flaky)
        assert got.data == img and got.attempts == 3 and web.hits("/flaky.jpg") == 3
        got = f.fetch(slow_down)
        assert got.data == img and got.attempts == 2
        times = [t for t, (p, _) in zip(web.request_times, web.requests) if p == "/429.jpg"]
        assert times[1] - times[0] >= 1.0  # Retry-After honoured
        got = f.fetch(broken)
        assert got.reason == "HTTP 503 (3 attempt(s))" and web.hits("/broken.jpg") == 3  # 1 + fetch.retries
    finally:
        f.close()


def test_unreachable_hosts_and_bad_urls_get_host_free_reasons():
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    f = Fetcher(FAST)
    try:
        refused = f.fetch(f"http://127.0.0.1:{port}/a.jpg")
        bad = f.fetch("http://[::1/a.jpg")
    finally:
        f.close()
    assert refused.reason == "connection failed: Connection refused" and refused.attempts == 1
    assert bad.reason == "invalid URL"


def test_retry_after_past_the_deadline_fails_at_once(web):
    url = web.route("/later.jpg", (503, {"Retry-After": "3600"}, b""))
    f = Fetcher(FAST)
    try:
        got = f.fetch(url)
    finally:
        f.close()
    assert got.reason == "HTTP 503; its Retry-After is past fetch.deadline_s=5 s (1 attempt(s))"
    f = Fetcher({**FAST, "backoff_s": 100})  # our own backoff past the deadline: a deadline failure at once
    try:
        got = f.fetch(web.route("/down.jpg", (503, {}, b"")))
    finally:
        f.close()
    assert got.reason == "deadline: no complete answer within fetch.deadline_s=5 s (1 attempt(s); last: HTTP 503)"


def test_a_silent_server_costs_at_most_the_deadline(web):
    url = web.route("/hang.jpg", HANG)
    f = Fetcher({**FAST, "read_timeout_s": 0.3, "retries": 1})  # read timeouts, retried once
    g = Fetcher({**FAST, "read_timeout_s": 60, "deadline_s": 1})  # the total deadline cuts the request
    try:
        timed_out, cut = f.fetch(url), g.fetch(url)
    finally:
        f.close()
        g.close()
    assert timed_out.reason == "timeout: no data for fetch.read_timeout_s=0.3 s (2 attempt(s))"
    assert cut.reason == "deadline: no complete answer within fetch.deadline_s=1 s (1 attempt(s))"
    assert cut.seconds < 60  # the read timeout never ran out: the deadline ended it


def test_in_flight_requests_are_bounded_and_order_is_kept():
    with WebServer(delay_s=0.3) as web:
        items = [{"key": f"k{i}", "source": web.route(f"/{i}.jpg", (200, JPG, bytes([i])))} for i in range(12)]
        items.insert(3, {"key": "gone", "source": web.url + "/nothing.jpg"})
        f = Fetcher({**FAST, "concurrency": 4})
        try:
            got = list(f.map_items(items))
        finally:
            f.close()
        assert 2 <= web.max_in_flight <= 4
    assert [g.data for g, _ in got[:3]] == [b"\x00", b"\x01", b"\x02"] and got[3][0].reason == "HTTP 404"
    assert [g.data[0] for g, _ in got[4:]] == list(range(3, 12)) and all(m is None for _, m in got)


def test_hanging_url_does_not_stall_the_items_behind_it():
    """While the first item hangs, the lookahead window fetches every other item (each requested once)."""
    with WebServer() as web:
        hang = web.route("/hang.jpg", HANG)
        items = [{"key": "a", "source": hang}] + [
            {"key": f"b{i}", "source": web.route(f"/{i}.jpg", (200, JPG, b"ok"))} for i in range(6)]
        f = Fetcher({**FAST, "read_timeout_s": 30, "deadline_s": 5, "retries": 0})  # margin for a loaded machine
        try:
            stream = f.map_items(items, lookahead=8)
            first = next(stream)
            assert {p for p, _ in web.requests} == {"/hang.jpg"} | {f"/{i}.jpg" for i in range(6)}
            rest = list(stream)
        finally:
            f.close()
    assert first[0].reason.startswith("deadline:") and [g.data for g, _ in rest] == [b"ok"] * 6
    assert all(web.hits(f"/{i}.jpg") == 1 for i in range(6))


def test_read_ahead_stops_at_the_byte_budget():
    """Behind a hanging URL, items are fetched until the unconsumed bytes reach the budget, then no more."""
    with WebServer() as web:
        hang = web.route("/hang.jpg", HANG)
        items = [{"key": "a", "source": hang}] + [
            {"key": f"b{i}", "source": web.route(f"/{i}.jpg", (200, JPG, b"x" * 1000))} for i in range(10)]
        f = Fetcher({**FAST, "read_timeout_s": 30, "deadline_s": 1.5, "retries": 0, "concurrency": 2,
                     "object_store_concurrency": 2})
        try:
            stream = f.map_items(items, lookahead=100, buffer_bytes=2500)
            first = next(stream)  # returns after the deadline
            seen = sorted(p for p, _ in web.requests)
            rest = list(stream)
        finally:
            f.close()
    assert first[0].reason.startswith("deadline:")
    assert seen == ["/0.jpg", "/1.jpg", "/2.jpg", "/hang.jpg"]  # 3 x 1000 bytes >= 2500: no fourth image
    assert len(rest) == 10 and all(g.data == b"x" * 1000 for g, _ in rest)


def test_files_and_missing_files_go_through_the_pool(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    f = Fetcher()
    try:
        got = list(f.map_items([{"source": str(tmp_path / "a.jpg"), "mask_path": str(tmp_path / "none.png")},
                                {"source": ""}]))
    finally:
        f.close()
    (img, mask), (empty, _) = got
    assert img.data == b"abc" and mask.reason.startswith("cannot read source: ")
    assert empty.reason == "cannot read source: the input names no image for this item"


def test_fetcher_pickles_by_config():
    import pickle

    f = pickle.loads(pickle.dumps(Fetcher({"concurrency": 3})))
    assert f.cfg.concurrency == 3 and f._http is None
