"""Serving a run's folder on localhost only, with the report rewritten when it is asked for."""

from __future__ import annotations

import functools
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from diffcore.errors import UserError
from diffcore.report.write import REPORT, write_report

#: a page asked for again within this many seconds is served as written (a reload storm costs one rewrite)
FRESH_S = 2.0


class _Handler(SimpleHTTPRequestHandler):
    folder: Path
    state: dict[str, Any]

    def do_GET(self) -> None:
        if self.path in ("/", f"/{REPORT}"):
            if self.path == "/":
                self.path = f"/{REPORT}"
            with self.state["lock"]:
                if time.monotonic() - self.state["written"] > FRESH_S:
                    try:
                        write_report(self.folder, intact_memo=self.state["memo"])
                    except (OSError, UserError):
                        pass  # serve the page written last
                    self.state["written"] = time.monotonic()
        super().do_GET()

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per image request would bury the address printed at start


def make_server(folder: Path, port: int) -> ThreadingHTTPServer:
    """A server of ``folder`` bound to 127.0.0.1 (never another interface: a run's files stay local)."""
    handler = type(
        "ReportHandler",
        (_Handler,),
        {"folder": folder, "state": {"lock": threading.Lock(), "written": time.monotonic(), "memo": {}}},
    )
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=str(folder)))
    except OSError as exc:
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror})", where="--serve", hint="choose another port") from None


def serve(folder: Path, port: int) -> None:
    server = make_server(folder, port)
    bound = server.server_address[1]
    print(f"diffcore: serving http://127.0.0.1:{bound}/{REPORT} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
