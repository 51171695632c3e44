"""Inputs for the source tests, made on the fly: images, WebDataset shards (good and hostile),
Parquet image-bytes files, and a local HTTP server with misbehaving routes."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = (int(x) for x in rng.integers(24, 96, 2))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def good_shard(path: Path, keys: list[str], seed: int = 0) -> dict[str, bytes]:
    """A WebDataset shard with key.png + key.json + key.txt per sample; returns {key: png bytes}."""
    out = {}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i, k in enumerate(keys):
            out[k] = image_bytes(seed * 1000 + i)
            add_member(tf, f"{k}.png", out[k])
            add_member(tf, f"{k}.json", json.dumps({"key": k, "url": f"https://example.org/{k}.png"}).encode())
            add_member(tf, f"{k}.txt", f"alt text of {k}".encode())
    return out


def hostile_shard(path: Path) -> dict[str, bytes]:
    """Good samples around every kind of hostile member; returns the good ones' bytes."""
    good = {}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        good["ok1"] = image_bytes(1)
        add_member(tf, "ok1.png", good["ok1"])
        add_member(tf, "ok1.txt", b"first")
        add_member(tf, "../../etc/x.jpg", image_bytes(2))            # path traversal
        add_member(tf, "/abs/y.jpg", image_bytes(3))                 # absolute name
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"    # a symlink out
        tf.addfile(link)
        hard = tarfile.TarInfo("hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "ok1.png"
        tf.addfile(hard)
        fifo = tarfile.TarInfo("fifo.jpg")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
        add_member(tf, "nojpg.json", b"{}")                           # a sample without an image
        add_member(tf, "noext", b"ignored")                          # no extension: not a sample
        good["ok2"] = image_bytes(4)
        add_member(tf, "./ok2.png", good["ok2"])                      # './' prefix: key ok2
        big = tarfile.TarInfo("big.jpg")
        big.size = 2 << 30                                           # claims 2 GB, holds nothing
        tf.fileobj.write(big.tobuf(tarfile.GNU_FORMAT))
        tf.offset += tarfile.BLOCKSIZE
        tf.fileobj.write(b"\0" * 2 * tarfile.BLOCKSIZE)
        tf.offset += 2 * tarfile.BLOCKSIZE
    return good


def bytes_parquet(path: Path, n: int, seed: int = 0, nulls: tuple[int, ...] = (), empty: tuple[int, ...] = (),
                  row_group_size: int | None = None) -> dict[str, bytes]:
    """img2dataset-style Parquet: key, jpg (bytes; some null / empty), caption, width."""
    imgs = {f"{seed:03d}{i:04d}": image_bytes(seed * 1000 + i) for i in range(n)}
    col = [None if i in nulls else b"" if i in empty else v for i, v in enumerate(imgs.values())]
    pq.write_table(pa.table({"key": list(imgs), "jpg": pa.array(col, pa.binary()),
                             "caption": [f"caption {k}" for k in imgs], "width": list(range(n))}),
                   path, row_group_size=row_group_size)
    return imgs


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: dict = {}

    def log_message(self, *args) -> None:      # quiet
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.hits[path] = self.hits.get(path, 0) + 1
        route = self.routes.get(path)
        if route is None:
            self.send_error(404)
            return
        route(self)


def _send(h: http.server.BaseHTTPRequestHandler, body: bytes, ctype: str = "image/png", code: int = 200) -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


class HttpServer:
    """A threaded server on 127.0.0.1 with routes: /ok.png, /redirect, /loop, /html, /big, /slow, /flaky."""

    def __init__(self, images: dict[str, bytes], slow_s: float = 5.0):
        routes = {f"/{name}": (lambda h, b=data: _send(h, b)) for name, data in images.items()}
        first = next(iter(images))

        def redirect(h, to=f"/{first}"):
            h.send_response(302)
            h.send_header("Location", to)
            h.send_header("Content-Length", "0")
            h.end_headers()

        def slow(h):
            time.sleep(slow_s)
            try:
                _send(h, images[first])
            except OSError:
                pass

        flaky_calls = [0]

        def flaky(h):                      # 503 on every odd request, the image on every even one
            flaky_calls[0] += 1
            if flaky_calls[0] % 2:
                _send(h, b"busy", "text/plain", 503)
            else:
                _send(h, images[first])

        routes.update({"/redirect": redirect, "/loop": lambda h: redirect(h, "/loop"),
                       "/html": lambda h: _send(h, b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html"),
                       "/big": lambda h: _send(h, b"\x89PNG" + b"\0" * (3 << 20)), "/slow": slow, "/flaky": flaky,
                       "/always503": lambda h: _send(h, b"down", "text/plain", 503)})
        handler = type("H", (_Handler,), {"routes": routes, "hits": {}})
        self.handler = handler
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def hits(self, path: str) -> int:
        return self.handler.hits.get(path, 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def s3_server(objects: dict[str, bytes]) -> Iterator[str]:
    """An S3-compatible server (moto's server mode, not a mock of fsspec) on 127.0.0.1 holding
    `objects` ({"bucket/key": bytes}, buckets created), credentials test/test in us-east-1; yields
    its endpoint URL. Skips the test when moto, boto3 or s3fs is not installed."""
    import pytest

    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        for bucket in sorted({k.split("/", 1)[0] for k in objects}):
            client.create_bucket(Bucket=bucket)
        for k, body in objects.items():
            bucket, key = k.split("/", 1)
            client.put_object(Bucket=bucket, Key=key, Body=body)
        yield endpoint
    finally:
        srv.stop()
