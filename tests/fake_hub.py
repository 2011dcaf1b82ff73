"""A stand-in for the Hugging Face Hub at the HTTP boundary: huggingface_hub's own client code runs unchanged,
only the transport under it answers locally and records what would have been sent."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import httpx2
import huggingface_hub
from huggingface_hub.utils._http import default_client_factory


@dataclass
class FakeHub:
    requests: list[httpx2.Request] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)
    uploaded: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # each commit's header (summary, ...) and its revision
    pull_requests: list[dict] = field(default_factory=list)
    models: dict[str, Path] = field(default_factory=dict)  # repo id -> local folder served as that model repo

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        served = self._serve_model(request, path)
        if served is not None:
            return served
        if path == "/api/repos/create":
            body = json.loads(request.content)
            self.created.append(body)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/preupload/" in path:  # answer "regular" for every file so the commit carries the contents
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if "/commit/" in path:
            create_pr = request.url.params.get("create_pr") == "1"
            for line in request.read().decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    revision = unquote(path.split("/commit/")[1])
                    self.commits.append({**item["value"], "revision": revision, "create_pr": create_pr})
                    if create_pr:  # the Hub opens a pull request with the commit's summary as its title
                        self.pull_requests.append({"title": item["value"]["summary"]})
                if item["key"] == "file":
                    self.uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            response = {"commitUrl": "https://huggingface.co/x/y/commit/0", "commitOid": "0"}
            if create_pr:
                response["pullRequestUrl"] = f"https://huggingface.co/x/y/discussions/{len(self.pull_requests)}"
            return httpx2.Response(200, json=response)
        return httpx2.Response(404, json={"error": f"not faked: {request.method} {path}"})


    def _serve_model(self, request: httpx2.Request, path: str) -> httpx2.Response | None:
        """What `snapshot_download` reads: the revision, the file tree, then each file."""
        for repo_id, folder in self.models.items():
            files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
            sha = hashlib.sha1("".join(f + _sha1(p) for f, p in files.items()).encode()).hexdigest()  # the commit
            if path == f"/api/models/{repo_id}/revision/main":
                siblings = [{"rfilename": f} for f in files]
                return httpx2.Response(200, json={"id": repo_id, "sha": sha, "siblings": siblings})
            if path.startswith(f"/api/models/{repo_id}/tree/"):
                tree = [
                    {"type": "file", "path": f, "size": p.stat().st_size, "oid": _sha1(p)} for f, p in files.items()
                ]
                return httpx2.Response(200, json=tree)
            prefix = f"/{repo_id}/resolve/{sha}/"
            if path.startswith(prefix) and unquote(path[len(prefix) :]) in files:
                file = files[unquote(path[len(prefix) :])]
                headers = {"x-repo-commit": sha, "etag": f'"{_sha1(file)}"', "content-length": str(file.stat().st_size)}
                body = b"" if request.method == "HEAD" else file.read_bytes()
                return httpx2.Response(200, headers=headers, content=body)
        return None


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def fake_hub(monkeypatch=None, models: dict[str, Path] | None = None) -> Iterator[FakeHub]:
    """The fake Hub for the block. With `monkeypatch`, offline mode (the test suite's default) is lifted for it and
    downloads go to a fresh cache, never the user's."""
    hub = FakeHub(models=dict(models or {}))
    if monkeypatch is not None:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", tempfile.mkdtemp(prefix="fake-hub-cache-"))
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle)))
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
