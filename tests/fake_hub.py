"""A stand-in for the Hugging Face Hub at the HTTP boundary: huggingface_hub's own client code runs unchanged,
only the transport under it answers locally and records what would have been sent."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
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

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
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


@contextlib.contextmanager
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle)))
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
