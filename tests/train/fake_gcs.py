"""An offline stand-in for Google Cloud Storage: one bucket, reached the two ways a run reaches GCS.

* etils `epath` (jaxsd's files, orbax's metadata and directory work) goes through fsspec's "gs"/"gcs"
  protocol, where gcsfs would sit: `FakeGCSFileSystem` has gcsfs's semantics — objects only, a
  "directory" is a name prefix, `mkdir` creates nothing, an object cannot be appended to.
* orbax's arrays go through tensorstore's own `gcs` driver over HTTP: `FakeGCSServer` answers the
  JSON API requests it sends (read with byte ranges and generation conditions, upload, delete,
  list) on 127.0.0.1; tensorstore finds it through TENSORSTORE_GCS_HTTP_URL.

The bucket's objects are files under a local root (`FakeGCS`), so both sides — and `jaxsd`
commands run as subprocesses (`command_env`: a sitecustomize on their PYTHONPATH calls `activate`)
— see the same objects. A path that lost its "gs://" on the way (`pathlib.Path("gs://b/x")` is
"gs:/b/x") lands in the working directory instead, which the tests look for.

orbax also asks GCS, through the google-cloud-storage client, whether a bucket has a hierarchical
namespace (when it lists steps); this bucket is a flat one, so `activate` answers False for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem

BUCKET = "jaxsd-test"  # a valid GCS bucket name (tensorstore checks)
ROOT_ENV = "JAXSD_FAKE_GCS_ROOT"
SITE = Path(__file__).parent / "fake_gcs_site"  # its sitecustomize.py activates the fake in subprocesses


class FakeGCS:
    """The bucket: object NAME is the file ROOT/NAME; its generation is a hash of its bytes.

    (A content hash, not a counter, so that every process computes the same one without sharing
    state; two versions with equal bytes having one generation is harmless.)"""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def file(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str) -> bytes | None:
        f = self.file(name)
        return f.read_bytes() if name and f.is_file() else None

    def put(self, name: str, data: bytes) -> None:
        f = self.file(name)
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, f)  # an object appears whole

    def delete(self, name: str) -> bool:
        f = self.file(name)
        if not name or not f.is_file():
            return False
        f.unlink()
        for parent in f.parents:  # no empty "directories" left behind: a prefix exists only with objects
            if parent == self.root or any(parent.iterdir()):
                break
            parent.rmdir()
        return True

    def names(self, prefix: str = "") -> list[str]:
        out = []
        for root, _, files in os.walk(self.root):
            for f in files:
                name = os.path.relpath(os.path.join(root, f), self.root).replace(os.sep, "/")
                if not name.startswith(".upload-") and name.startswith(prefix):
                    out.append(name)
        return sorted(out)

    def has_prefix(self, prefix: str) -> bool:
        d = self.file(prefix.rstrip("/"))
        return d.is_dir() and any(files for _, _, files in os.walk(d))


def generation(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:7], "big") + 1  # > 0: 0 means "no object"


def _split(path: str) -> str:
    bucket, _, name = path.partition("/")
    if bucket != BUCKET:
        raise FileNotFoundError(f"gs://{path}: no such bucket (the fake has {BUCKET})")
    return name


class _Upload(io.BytesIO):
    """A write: the object appears whole when the file is closed (as a GCS upload does)."""

    def __init__(self, store: FakeGCS, name: str):
        super().__init__()
        self.store, self.name = store, name

    def close(self) -> None:
        if not self.closed:
            self.store.put(self.name, self.getvalue())
        super().close()


class FakeGCSFileSystem(AbstractFileSystem):
    """fsspec over the fake bucket (`FakeGCSFileSystem.store`) with gcsfs's object-store semantics."""

    protocol = ("gs", "gcs")
    root_marker = ""
    cachable = False
    store: FakeGCS | None = None  # set by `activate`

    def __init__(self, *args, finalize_on_close: bool = False, **kwargs):
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for p in ("gs://", "gcs://"):
            path = path.removeprefix(p)
        return path.strip("/")

    def _name(self, path: str) -> str:
        return _split(self._strip_protocol(path))

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        name = _split(path)
        f = self.store.file(name)
        if name and f.is_file():
            st = f.stat()
            return {"name": path, "size": st.st_size, "type": "file", "mtime": st.st_mtime}
        if not name or self.store.has_prefix(name):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(f"gs://{path}")

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        info = self.info(path)
        if info["type"] == "file":
            return [info] if detail else [path]
        name = _split(path)
        prefix = name + "/" if name else ""
        children = sorted({n[len(prefix):].split("/")[0] for n in self.store.names(prefix)})
        out = [self.info(f"{path}/{c}") for c in children]
        return out if detail else [o["name"] for o in out]

    def _open(self, path, mode="rb", **kwargs):
        name = self._name(path)
        if mode == "rb":
            data = self.store.get(name)
            if data is None:
                raise FileNotFoundError(f"gs://{self._strip_protocol(path)}")
            return io.BytesIO(data)
        if mode == "wb":
            return _Upload(self.store, name)
        raise NotImplementedError(f"gs://{self._strip_protocol(path)}: mode {mode!r} — a GCS object cannot be "
                                  "appended to or updated in place")

    def cp_file(self, path1, path2, **kwargs):
        self.store.put(self._name(path2), self.cat_file(path1))

    def rm_file(self, path):
        self.store.delete(self._name(path))

    def rm(self, path, recursive=False, maxdepth=None):
        for p in [path] if isinstance(path, str) else path:
            name = self._name(p)
            if self.store.delete(name):
                continue
            if not self.store.has_prefix(name):
                raise FileNotFoundError(f"gs://{self._strip_protocol(p)}")
            if recursive:
                for n in self.store.names(name + "/"):
                    self.store.delete(n)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        src, dst = self._name(path1), self._name(path2)
        moves = [(src, dst)] if self.store.file(src).is_file() else \
            [(n, dst + n[len(src):]) for n in self.store.names(src + "/")]
        if not moves:
            raise FileNotFoundError(f"gs://{self._strip_protocol(path1)}")
        for a, b in moves:
            self.store.put(b, self.store.get(a))
            self.store.delete(a)

    def mkdir(self, path, create_parents=True, **kwargs):
        pass  # no directories in an object store (gcsfs creates nothing either)

    def makedirs(self, path, exist_ok=False):
        pass

    def rmdir(self, path):
        pass


class _Handler(BaseHTTPRequestHandler):
    """The GCS JSON API requests tensorstore's `gcs` kvstore driver sends."""

    store: FakeGCS  # set on the subclass the server makes

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None,
               ctype: str = "application/json") -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._reply(code, json.dumps({"error": {"code": code, "message": message}}).encode())

    def _resource(self, name: str, data: bytes) -> bytes:
        return json.dumps({"kind": "storage#object", "bucket": BUCKET, "name": name, "size": str(len(data)),
                           "generation": str(generation(data)), "metageneration": "1"}).encode()

    def _route(self) -> tuple[bool, str | None, dict]:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.split("/")[1:]  # [upload,] storage, v1, b, BUCKET, o, [object]
        if parts[:1] == ["upload"]:
            parts = parts[1:]
        if parts[:3] != ["storage", "v1", "b"] or parts[3:5] != [BUCKET, "o"]:
            return False, None, query
        return True, urllib.parse.unquote(parts[5]) if len(parts) > 5 else None, query

    @staticmethod
    def _matches(q: dict, data: bytes | None) -> bool:
        """Whether the request's generation preconditions hold (ifGenerationMatch=0: must not exist)."""
        gen = 0 if data is None else generation(data)
        return "ifGenerationMatch" not in q or int(q["ifGenerationMatch"]) == gen

    def do_GET(self):
        ok, name, q = self._route()
        if not ok:
            return self._error(404, self.path)
        if name is None:  # list
            start, end = q.get("startOffset", ""), q.get("endOffset")
            names = [n for n in self.store.names(q.get("prefix", "")) if n >= start and (end is None or n < end)]
            items = [{"name": n, "size": str(self.store.file(n).stat().st_size)} for n in names]
            return self._reply(200, json.dumps({"kind": "storage#objects", "items": items}).encode())
        data = self.store.get(name)
        if data is None:
            return self._error(404, f"No such object: {BUCKET}/{name}")
        gen = generation(data)
        if "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"]) == gen:
            return self._reply(304, headers={"x-goog-generation": str(gen)})
        if not self._matches(q, data):
            return self._error(412, "conditionNotMet")
        if q.get("alt") != "media":
            return self._reply(200, self._resource(name, data))
        headers, code = {"x-goog-generation": str(gen)}, 200
        rng = self.headers.get("Range")
        if rng:  # "bytes=a-b", "bytes=a-" or "bytes=-n"
            first, _, last = rng.removeprefix("bytes=").partition("-")
            if first:
                lo, hi = int(first), int(last) if last else len(data) - 1
            else:
                lo, hi = max(0, len(data) - int(last)), len(data) - 1
            hi = min(hi, len(data) - 1)
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
            data, code = data[lo:hi + 1], 206
        self._reply(code, data, headers, ctype="application/octet-stream")

    def do_POST(self):
        ok, _, q = self._route()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not ok or q.get("uploadType") != "media":
            return self._error(400, f"unsupported upload {self.path}")
        name = q["name"]
        with self.store.lock:
            if not self._matches(q, self.store.get(name)):
                return self._error(412, "conditionNotMet")
            self.store.put(name, body)
        self._reply(200, self._resource(name, body))

    def do_DELETE(self):
        ok, name, q = self._route()
        with self.store.lock:
            data = self.store.get(name) if ok and name else None
            if data is None:
                return self._error(404, f"No such object: {name}")
            if not self._matches(q, data):
                return self._error(412, "conditionNotMet")
            self.store.delete(name)
        self._reply(204)


class FakeGCSServer:
    """The HTTP side, on a free port of 127.0.0.1, served from a daemon thread."""

    def __init__(self, store: FakeGCS):
        handler = type("Handler", (_Handler,), {"store": store})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def activate(root: str | os.PathLike, patch=setattr) -> None:
    """In this process, route epath's gs:// to the fake bucket under `root` and give orbax its answer
    about the bucket (tensorstore is routed by the environment: `command_env`). patch: `setattr`, or a
    pytest monkeypatch's, to have the changes undone."""
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    patch(FakeGCSFileSystem, "store", FakeGCS(root))
    patch(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    for protocol in FakeGCSFileSystem.protocol:
        fsspec.register_implementation(protocol, FakeGCSFileSystem, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()


def deactivate() -> None:
    from etils.epath import backend

    registry = sys.modules["fsspec.registry"]._registry  # (the name fsspec.registry is its read-only view)
    for protocol in FakeGCSFileSystem.protocol:
        registry.pop(protocol, None)
    backend.fsspec_backend._get_filesystem.cache_clear()


def command_env(store: FakeGCS, server: FakeGCSServer) -> dict[str, str]:
    """The environment of a process (this one or a `jaxsd` command) that uses the fake bucket."""
    from tests.helpers import REPO

    return {ROOT_ENV: str(store.root), "TENSORSTORE_GCS_HTTP_URL": server.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",  # tensorstore then looks for no credentials
            "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")])}
