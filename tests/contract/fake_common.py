"""Pieces shared by the fake VMM API servers (stdlib only: they run as separate scripts).

Environment the fakes read:
  FAKE_VMM_RECORD   file to append one JSON line per request (and one for argv)
  FAKE_VMM_FAULT    "exit" (die at once), "hang" (never open the API socket),
                    "error:<path-suffix>" (answer that request with a 500/400 error),
                    "stall:<path-suffix>" (never answer that request)
  FAKE_AGENT_SOCKET Unix socket of a fake agent; hybrid vsock connections are proxied to it
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

RECORD = os.environ.get("FAKE_VMM_RECORD", "")
FAULT = os.environ.get("FAKE_VMM_FAULT", "")
AGENT_SOCKET = os.environ.get("FAKE_AGENT_SOCKET", "")
_record_lock = threading.Lock()
_PR_SET_NAME = 15


def record(entry: dict[str, Any]) -> None:
    if not RECORD:
        return
    with _record_lock, open(RECORD, "a") as f:
        f.write(json.dumps(entry) + "\n")


def apply_startup_fault() -> None:
    if FAULT == "exit":
        print("fake vmm: cannot open /dev/kvm: No such file or directory", file=sys.stderr, flush=True)
        sys.exit(3)
    if FAULT == "hang":
        time.sleep(3600)
        sys.exit(0)


def injected_error(path: str) -> bool:
    return FAULT.startswith("error:") and path.endswith(FAULT.removeprefix("error:"))


def stall_if_asked(path: str) -> None:
    if FAULT.startswith("stall:") and path.endswith(FAULT.removeprefix("stall:")):
        time.sleep(3600)


Reply = tuple[int, Any]  # status, JSON-able body (None: no body)


def serve(socket_path: str, handle: Callable[[str, str, bytes], Reply]) -> socketserver.BaseServer:
    """Serve HTTP/1.1 on a Unix socket; ``handle(method, path, body)`` answers each request."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            stall_if_asked(self.path)
            try:
                status, body = handle(self.command, self.path, raw)
            except Exception as exc:  # a fake's own failure still answers, as a 500
                status, body = 500, [f"fake VMM failed: {exc!r}"]
            payload = b"" if body is None else json.dumps(body).encode()
            try:
                parsed: Any = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            record({"method": self.command, "path": self.path, "body": parsed, "status": status})
            self.send_response(status)
            if payload:
                self.send_header("Content-Type", "application/json")
            if status != 204:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _dispatch

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    server = Server(socket_path, Handler)
    return server


def exit_soon(delay: float = 0.05) -> None:
    """Exit after the current response is written (vmm.shutdown, guest reboot)."""

    def _go() -> None:
        time.sleep(delay)
        os._exit(0)

    threading.Thread(target=_go, daemon=True).start()


class VcpuThreads:
    """Threads named like the VMM's vCPU threads, so /proc/<pid>/task shows them."""

    def __init__(self, name_format: str) -> None:
        self.name_format = name_format
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, count: int) -> None:
        self._stop.clear()
        for index in range(count):
            ready = threading.Event()
            thread = threading.Thread(target=self._run, args=(index, ready), daemon=True)
            thread.start()
            ready.wait(1.0)
            self._threads.append(thread)

    def _run(self, index: int, ready: threading.Event) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, (self.name_format % index).encode()[:15], 0, 0, 0)
        ready.set()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(1.0)
        self._threads.clear()


class HybridVsock:
    """The host side of hybrid vsock: a Unix socket answering ``CONNECT <port>\\n`` with ``OK <n>\\n``.

    Connections are refused (closed) while the guest does not run; accepted ones are proxied
    to FAKE_AGENT_SOCKET when set, else echoed.
    """

    MAX_COMMAND = 32
    FIRST_HOST_PORT = 1 << 30

    def __init__(
        self, path: str, guest_running: Callable[[], bool], ports: tuple[int, ...] = (1024,)
    ) -> None:
        self.path = path
        self.guest_running = guest_running
        self.ports = ports
        self._next_port = self.FIRST_HOST_PORT
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)  # raises when the path exists, as the real VMMs do
        self._sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        command = b""
        conn.settimeout(5.0)
        try:
            while not command.endswith(b"\n") and len(command) < self.MAX_COMMAND:
                byte = conn.recv(1)
                if not byte:
                    break
                command += byte
            record({"vsock": command.decode(errors="replace")})
            words = command.decode(errors="replace").split()
            if (
                len(words) != 2
                or words[0].upper() != "CONNECT"
                or not words[1].isdigit()
                or int(words[1]) not in self.ports
                or not self.guest_running()
            ):
                conn.close()  # what the VMMs do: no OK line, just EOF
                return
            conn.sendall(f"OK {self._next_port}\n".encode())
            self._next_port += 1
            conn.settimeout(None)
            if AGENT_SOCKET:
                agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                agent.connect(AGENT_SOCKET)
                threading.Thread(target=_pipe, args=(agent, conn), daemon=True).start()
                _pipe(conn, agent)
            else:
                _pipe(conn, conn)
        except OSError:
            conn.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
