"""Storage that does not answer: a shard is asked for again, then the run stops (never skipped like a damaged one)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import pytest
from ports import free_port
from test_stream import train_stream

from pretrain.data import shards
from pretrain.data.shards import read_shard
from pretrain.data.stream import loader
from pretrain.errors import UserError


def test_storage_that_does_not_answer_is_asked_again_then_stops_the_run(small_shards, tmp_path, capfd, monkeypatch):
    """Shards over HTTP (fsspec's, no retries of its own) from a server that is down, then up again; a forbidden
    shard is skipped, not waited for."""

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503 if "busy" in self.path else 403)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    refusing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=refusing.serve_forever, daemon=True).start()
    at = f"http://127.0.0.1:{refusing.server_port}"
    assert read_shard(f"{at}/secret.tar", outage_s=0) == ([], f"{at}/secret.tar: cannot be read (ClientResponseError: "
                                                             f"403, message='Forbidden', url='{at}/secret.tar')")
    with pytest.raises(shards.StorageUnreachable, match="could not be read for 0 s .ClientResponseError: 503"):
        read_shard(f"{at}/busy.tar", outage_s=0)  # a server error is storage that may answer again
    refusing.shutdown()

    port = free_port()
    url = f"http://127.0.0.1:{port}/train-000000.tar"
    with pytest.raises(shards.StorageUnreachable, match=f"{url} could not be read for 0 s"):
        read_shard(url, outage_s=0)
    with pytest.raises(shards.StorageUnreachable, match=f"{url} could not be read for 1 s"):
        read_shard(url, outage_s=1)  # one wait, ending at the patience rather than after the first retry's 2 s
    assert "asking again in 1 s (0 s so far; the run stops at 1 s)" in capfd.readouterr().err

    got = {}
    reader = threading.Thread(target=lambda: got.update(result=read_shard(url, outage_s=60)))
    reader.start()
    said = ""
    while "asking again in 2 s" not in said:  # the first attempt failed while the server was down
        said += capfd.readouterr().err
        time.sleep(0.05)
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               small_shards["train"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reader.join(timeout=60)
        samples, error = got["result"]
        assert error is None and len(samples) == 50
    finally:
        server.terminate()
        server.wait()
    assert said.startswith(f"warning: {url} cannot be read (ClientConnectorError: ")

    monkeypatch.setattr(shards, "OUTAGE_S", 0)  # the stream reads with the default
    with pytest.raises(UserError, match=f"{url} could not be read for 0 s .*; the run stops, and run again it resumes"):
        next(loader(train_stream([url]), 0, pin=False))


def test_storage_slow_to_answer_first_gets_a_line_while_its_client_waits(small_shards, monkeypatch, capfd):
    """A store's client asks an address that does not answer again for about 30 s (gcsfs) before the command can
    say so; a line says what it waits for meanwhile."""
    from data_tools import manifest, storage

    class Slow(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=small_shards["val"], **kwargs)

        def send_head(self):
            time.sleep(0.3)
            return super().send_head()

        def log_message(self, *args):
            pass

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    monkeypatch.setattr(storage, "SLOW_S", 0.1)
    url = f"http://127.0.0.1:{slow.server_port}"
    try:
        where, loaded = manifest.load(url)
    finally:
        slow.shutdown()
    assert loaded.num_samples > 0
    assert capfd.readouterr().err.startswith(f"still waiting for {url} after 0 s; an address that does not answer")
