"""A minimal Hugging Face Hub on 127.0.0.1 for tests: serves repo folders through the resolve API.

`faults` makes a repo's weight files (.safetensors, .bin) misbehave; its other files (config.json,
README.md) are served normally, so `hf-hub:` names still resolve. Every wait is bounded: a hanging
request is released when the hub closes, or after `MAX_HANG` seconds.
"""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = 'c0ffee' * 6 + 'c0ff'
MAX_HANG = 30.0
FAULTS = (
    'error',      # HTTP 500
    'hang_head',  # HEAD never answers
    'hang_get',   # HEAD answers, GET never does
    'stall',      # GET sends half of what is asked, then nothing
    'cut',        # GET sends half the body, then closes the connection (ignores Range: starts over)
    'altered',    # GET sends `substitutes[repo]` (e.g. other valid weights) under the original ETag
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that give up (timeouts, cut transfers) are the point of the faults


class FakeHub:
    """`repos` maps 'org/name' to a folder; `faults` maps 'org/name' to one of FAULTS."""

    def __init__(self, repos, faults=None, substitutes=None):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.faults = dict(faults or {})
        self.substitutes = dict(substitutes or {})
        self.requests = []  # (method, repo, filename), as received
        self.downloads = []  # filenames whose whole body was sent (GET)
        self.release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body):
                parts = unquote(urlsplit(self.path).path).strip('/').split('/')
                if len(parts) < 5 or parts[2] != 'resolve':
                    return self._error(404, 'RepoNotFound')
                repo, filename = '/'.join(parts[:2]), '/'.join(parts[4:])
                hub.requests.append(('GET' if body else 'HEAD', repo, filename))
                fault = hub.faults.get(repo) if filename.endswith(('.safetensors', '.bin')) else None
                if fault == 'error':
                    return self._error(500, None)
                if fault == 'hang_head' or (fault == 'hang_get' and body):
                    hub.release.wait(MAX_HANG)
                    self.close_connection = True
                    return
                if repo not in hub.repos:
                    return self._error(404, 'RepoNotFound')
                path = hub.repos[repo] / filename
                if not path.is_file():
                    return self._error(404, 'EntryNotFound')
                data = path.read_bytes()
                etag = hashlib.sha256(data).hexdigest()
                if body and fault == 'altered':
                    data = hub.substitutes[repo]
                start = self._range_start() if body and fault != 'cut' else 0
                self.send_response(206 if start else 200)
                self.send_header('X-Repo-Commit', COMMIT)
                self.send_header('ETag', f'"{etag}"')
                if start:
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                data = data[start:]
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                if not body:
                    return
                if fault in ('stall', 'cut'):
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    if fault == 'stall':
                        hub.release.wait(MAX_HANG)
                    self.close_connection = True
                    return
                self.wfile.write(data)
                hub.downloads.append(filename)

            def _range_start(self):
                value = self.headers.get('Range', '')
                return int(value[len('bytes='):].split('-')[0]) if value.startswith('bytes=') else 0

            def _error(self, code, error_code):
                self.send_response(code)
                if error_code:
                    self.send_header('X-Error-Code', error_code)
                self.send_header('Content-Length', '0')
                self.end_headers()

        self.server = _Server(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def count(self, method, repo=None):
        return sum(1 for m, r, _ in self.requests if m == method and (repo is None or r == repo))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
