"""A Hugging Face hub on 127.0.0.1 for tests: serves ``/<repo>/resolve/<revision>/<file>`` (HEAD and GET) the way
huggingface_hub's ``hf_hub_download`` asks for a file; point ``HF_ENDPOINT`` at ``server.base``."""

import hashlib
import http.server

import pytest
from local_server import local_http_server

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """server.repos: {repo_id: {file name: bytes}}; every request is recorded in server.requests as 'METHOD path'."""

    def _serve(self, with_body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        repo, sep, rest = self.path.lstrip("/").partition("/resolve/")
        _revision, _, name = rest.partition("/")
        data = self.server.repos.get(repo, {}).get(name) if sep else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if repo in self.server.repos else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._serve(with_body=False)

    def do_GET(self):
        self._serve(with_body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server():
    with local_http_server(_HubHandler, repos={}) as httpd:
        yield httpd
