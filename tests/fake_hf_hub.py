"""A fake Hugging Face Hub on 127.0.0.1, for upload tests: only what huggingface_hub (2.4) calls in
`create_repo` + `upload_folder` of a model repo, on the main branch.

    POST /api/repos/create                             200 {"url"}; 409 {"error", "url"} if it exists
    POST /api/models/<namespace>/<name>/preupload/main every file "regular": content comes inline
    POST /api/models/<namespace>/<name>/commit/main    NDJSON: a header line, then "file" lines
    anything else                                      404 (e.g. huggingface_hub's telemetry GETs)

The LFS / Xet transfer path is not implemented: preupload never answers "lfs", and a commit line
other than "header" / "file" is refused with 400, so a test relying on it fails loudly.
Every request needs `Authorization: Bearer <token>` (401 otherwise) and is recorded.
`hub.fail("commit", times=2, status=409)` makes the next two commits fail.

    with FakeHub(token="hf_test") as hub:   # hub.url -> HF_ENDPOINT
        ...
        hub.repos["me/model"].files         # {"path/in/repo": bytes}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

NAMESPACE = "fake-user"  # the token's user: a repo created without a namespace goes there
_REPO_ROUTE = re.compile(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)$")


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit summaries, oldest first


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str


class FakeHub:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._failures: dict[str, list[int]] = {}  # route -> statuses of the next calls
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, route: str, times: int, status: int) -> None:
        """Answer the next `times` calls of `route` ("create", "preupload", "commit") with status."""
        with self._lock:
            self._failures.setdefault(route, []).extend([status] * times)

    def calls(self, route: str) -> list[Request]:
        suffix = "/api/repos/create" if route == "create" else f"/{route}/"
        return [r for r in self.requests if suffix in r.path]

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (a later connection is refused); safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- request handling

    def handle(self, method: str, path: str, auth: str, body: bytes) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(Request(method, path, auth))
            if auth != f"Bearer {self.token}":
                return 401, {"error": "Invalid credentials in Authorization header"}
            if method == "POST" and path == "/api/repos/create":
                return self._injected("create") or self._create(json.loads(body))
            route = _REPO_ROUTE.match(path)
            if method != "POST" or route is None:
                return 404, {"error": f"the fake hub has no {method} {path}"}
            repo_id, action, revision = route.group(1), route.group(2), unquote(route.group(3))
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}
            if revision != "main":
                return 400, {"error": f"the fake hub only has the main branch, got {revision!r}"}
            if failed := self._injected(action):
                return failed
            if action == "preupload":
                return self._preupload(json.loads(body))
            return self._commit(repo_id, body)

    def _injected(self, route: str) -> tuple[int, dict] | None:
        statuses = self._failures.get(route)
        if not statuses:
            return None
        return statuses.pop(0), {"error": f"injected failure of {route}"}

    def _create(self, payload: dict) -> tuple[int, dict]:
        repo_id = f"{payload.get('organization') or NAMESPACE}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            # The real Hub's answer: huggingface_hub reads "url" even from the 409 (exist_ok).
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id}

    @staticmethod
    def _preupload(payload: dict) -> tuple[int, dict]:
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            for f in payload["files"]
        ]
        return 200, {"files": files, "commitOid": "0" * 40}

    def _commit(self, repo_id: str, body: bytes) -> tuple[int, dict]:
        repo = self.repos[repo_id]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "a commit starts with a header line"}
        added = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] != "file" or value.get("encoding") != "base64":
                return 400, {"error": f"the fake hub cannot commit {line['key']!r} lines"}
            added[value["path"]] = base64.b64decode(value["content"])
        repo.files.update(added)
        repo.commits.append(lines[0]["value"]["summary"])
        oid = hashlib.sha1(f"{len(repo.commits)}:{sorted(added)}".encode()).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def _answer(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = urlsplit(self.path).path
            status, payload = hub.handle(method, path, self.headers.get("Authorization", ""), body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            pass  # keep pytest's output clean; hub.requests records every call

    return Handler
