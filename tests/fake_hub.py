"""A minimal Hugging Face Hub on 127.0.0.1 for tests: serves repo folders through the resolve API."""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = 'c0ffee' * 6 + 'c0ff'


class FakeHub:
    """`repos` maps 'org/name' to a folder. `mode`: 'ok', 'error' (HTTP 500) or 'corrupt' (bytes flipped)."""

    def __init__(self, repos):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.mode = 'ok'
        self.downloads = []  # filenames whose bytes were sent (GET)
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
                if hub.mode == 'error':
                    return self._error(500, None)
                if repo not in hub.repos:
                    return self._error(404, 'RepoNotFound')
                path = hub.repos[repo] / filename
                if not path.is_file():
                    return self._error(404, 'EntryNotFound')
                data = path.read_bytes()
                etag = hashlib.sha256(data).hexdigest()
                if hub.mode == 'corrupt' and body:
                    data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
                self.send_response(200)
                self.send_header('X-Repo-Commit', COMMIT)
                self.send_header('ETag', f'"{etag}"')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                if body:
                    hub.downloads.append(filename)
                    self.wfile.write(data)

            def _error(self, code, error_code):
                self.send_response(code)
                if error_code:
                    self.send_header('X-Error-Code', error_code)
                self.send_header('Content-Length', '0')
                self.end_headers()

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
