"""A small Hugging Face Hub-compatible server for the tests (standard library only).

The real Hub is out of reach and no installable server implements its upload API, so the tests
point huggingface_hub's real client at this one (``HF_ENDPOINT``). It keeps repos in memory as
chains of commits and implements what the client uses: create repo, repo info, preupload,
NDJSON commit (inline files and git-LFS files), the LFS batch API (basic transfer), tree
listing, resolve (HEAD/GET with the headers the client requires), branches, tags, refs, commit
lists, YAML validation, and the ``X-Error-Code`` headers the client turns into exceptions.
``upload_mode`` chooses what preupload answers: ``"regular"`` (contents inline, base64) or
``"lfs"`` (binary files through the LFS batch API).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    lfs: set[str]
    title: str
    parent: str | None
    date: str = field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    )


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        return self.commits.get(oid) if oid else None


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    def __init__(self, upload_mode: str = "regular"):
        self.upload_mode = upload_mode
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return self.repos[repo_id]

    def commit(self, repo_id: str, rev: str) -> Commit:
        commit = self.repo(repo_id).resolve(rev)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def new_commit(
        self, repo: Repo, branch: str, files: dict[str, bytes], lfs: set[str], title: str
    ) -> Commit:
        parent = repo.branches.get(branch)
        seed = f"{parent}{title}{time.time_ns()}{sorted(files)}".encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), files, lfs, title, parent)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    endpoint: str

    def log_message(self, *args):  # keep test output clean
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        body = self._body()  # always read it: an unread body corrupts a kept-alive connection
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"{method} {path}")
        try:
            with self.state.lock:
                for pattern, verb, handler in _ROUTES:
                    match = re.fullmatch(pattern, path)
                    if match and verb == method:
                        return handler(self, body, **match.groupdict())
            raise HubError(404, None, f"no route for {method} {path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._json(error.status, {"error": error.message}, headers)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- repos
    def create_repo(self, body):
        request = json.loads(body)
        repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
        url = {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", **url})
        # huggingface_hub 2.x sends "visibility"; older clients sent "private"
        private = request.get("visibility") == "private" or bool(request.get("private"))
        repo = Repo(private=private)
        self.state.repos[repo_id] = repo
        gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        self.state.new_commit(
            repo, "main", {".gitattributes": gitattributes}, set(), "initial commit"
        )
        self._json(200, url)

    def delete_repo(self, body):
        request = json.loads(body)
        self.state.repos.pop(f"{request.get('organization') or 'tester'}/{request['name']}", None)
        self._json(200, {})

    def repo_info(self, body, repo, rev="main"):
        commit = self.state.commit(repo, rev)
        self._json(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": commit.oid,
                "private": self.state.repo(repo).private,
                "lastModified": commit.date,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": name} for name in sorted(commit.files)],
            },
        )

    # -- upload
    def preupload(self, body, repo, rev):
        self.state.commit(repo, rev)
        files = json.loads(body)["files"]

        def mode(path):
            binary = not path.endswith((".json", ".md", ".txt", ".gitattributes"))
            return "lfs" if self.state.upload_mode == "lfs" and binary else "regular"

        self._json(
            200,
            {
                "files": [
                    {"path": f["path"], "uploadMode": mode(f["path"]), "shouldIgnore": False}
                    for f in files
                ]
            },
        )

    def commit(self, body, repo, rev):
        repo_obj = self.state.repo(repo)
        if rev not in repo_obj.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        parent = repo_obj.commits[repo_obj.branches[rev]]
        files, lfs = dict(parent.files), set(parent.lfs)
        title = "commit"
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary", title)
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs_objects:
                    raise HubError(400, None, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.state.lfs_objects[value["oid"]]
                lfs.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
                lfs.discard(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    files.pop(path)
                    lfs.discard(path)
        commit = self.state.new_commit(repo_obj, rev, files, lfs, title)
        self._json(
            200,
            {"commitOid": commit.oid, "commitUrl": f"{self.endpoint}/{repo}/commit/{commit.oid}"},
        )

    def lfs_batch(self, body, repo):
        self.state.repo(repo)
        request = json.loads(body)
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.endpoint}/lfs-verify/{obj['oid']}"},
                }
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def lfs_upload(self, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, None, "uploaded bytes do not match their oid")
        self.state.lfs_objects[oid] = body
        self._send(200)

    def lfs_verify(self, body, oid):
        self._json(200 if oid in self.state.lfs_objects else 404, {})

    # -- download and listing
    def tree(self, body, repo, rev, path=""):
        commit = self.state.commit(repo, rev)
        prefix = path.strip("/") + "/" if path else ""
        entries = []
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            data = commit.files[name]
            entry = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_oid(data)}
            if name in commit.lfs:
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            entries.append(entry)
        self._json(200, entries)

    def _resolve(self, repo, rev, path, head):
        commit = self.state.commit(repo, rev)
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}")
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if path in commit.lfs:
            sha = hashlib.sha256(data).hexdigest()
            headers.update(
                {"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
            )
        else:
            headers["ETag"] = f'"{_git_blob_oid(data)}"'
        self._send(200, data, headers, content_type="application/octet-stream", head=head)

    def resolve_get(self, body, repo, rev, path):
        self._resolve(repo, rev, path, head=False)

    def resolve_head(self, body, repo, rev, path):
        self._resolve(repo, rev, path, head=True)

    # -- refs
    def create_branch(self, body, repo, branch):
        repo_obj = self.state.repo(repo)
        if branch in repo_obj.branches:
            raise HubError(409, None, f"branch {branch} already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo_obj.branches[branch] = self.state.commit(repo, start).oid
        self._json(200, {})

    def create_tag(self, body, repo, rev):
        commit = self.state.commit(repo, rev)
        tag = json.loads(body)["tag"]
        repo_obj = self.state.repo(repo)
        if tag in repo_obj.tags:
            raise HubError(409, None, f"tag {tag} already exists")
        repo_obj.tags[tag] = commit.oid
        self._json(200, {})

    def refs(self, body, repo):
        repo_obj = self.state.repo(repo)

        def refs_of(kind, table):
            return [
                {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid}
                for n, oid in table.items()
            ]

        self._json(
            200,
            {
                "branches": refs_of("heads", repo_obj.branches),
                "tags": refs_of("tags", repo_obj.tags),
                "converts": [],
            },
        )

    def commits(self, body, repo, rev):
        commit = self.state.commit(repo, rev)
        history = []
        repo_obj = self.state.repo(repo)
        while commit is not None:
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": "",
                    "authors": [{"user": "tester"}],
                    "date": commit.date,
                }
            )
            commit = repo_obj.commits.get(commit.parent) if commit.parent else None
        self._json(200, history)

    def validate_yaml(self, body):
        self._json(200, {"errors": [], "warnings": []})

    def whoami(self, body):
        self._json(
            200,
            {
                "type": "user",
                "name": "tester",
                "orgs": [],
                "auth": {"accessToken": {"displayName": "test", "role": "write"}},
            },
        )


_ROUTES = [
    (r"/api/repos/create", "POST", _Handler.create_repo),
    (r"/api/repos/delete", "DELETE", _Handler.delete_repo),
    (rf"/api/models/{_REPO}", "GET", _Handler.repo_info),
    (rf"/api/models/{_REPO}/revision/(?P<rev>.+)", "GET", _Handler.repo_info),
    (rf"/api/models/{_REPO}/preupload/{_REV}", "POST", _Handler.preupload),
    (rf"/api/models/{_REPO}/commit/{_REV}", "POST", _Handler.commit),
    (rf"/api/models/{_REPO}/tree/{_REV}", "GET", _Handler.tree),
    (rf"/api/models/{_REPO}/tree/{_REV}/(?P<path>.+)", "GET", _Handler.tree),
    (rf"/api/models/{_REPO}/branch/(?P<branch>.+)", "POST", _Handler.create_branch),
    (rf"/api/models/{_REPO}/tag/{_REV}", "POST", _Handler.create_tag),
    (rf"/api/models/{_REPO}/refs", "GET", _Handler.refs),
    (rf"/api/models/{_REPO}/commits/{_REV}", "GET", _Handler.commits),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", _Handler.lfs_batch),
    (r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "PUT", _Handler.lfs_upload),
    (r"/lfs-verify/(?P<oid>[0-9a-f]{64})", "POST", _Handler.lfs_verify),
    (rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "GET", _Handler.resolve_get),
    (rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "HEAD", _Handler.resolve_head),
    (r"/api/validate-yaml", "POST", _Handler.validate_yaml),
    (r"/api/whoami-v2", "GET", _Handler.whoami),
]


class HubServer:
    """``with HubServer() as hub: ...`` serves on 127.0.0.1 at ``hub.endpoint`` until exit."""

    def __init__(self, upload_mode: str = "regular"):
        self.state = HubState(upload_mode)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        handler.endpoint = self.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":  # run it by hand: python tests/hub_server.py
    with HubServer() as hub:
        print(f"serving a test Hub at {hub.endpoint}; HF_ENDPOINT={hub.endpoint}")
        threading.Event().wait()
