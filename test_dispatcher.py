"""Tests for docker_job_dispatcher.py, against a real Docker daemon.

Run them next to a daemon with::

    pip install jq pytest && python3 -m pytest test_dispatcher.py

The tests build a tiny image with ``docker import`` from the host's static
busybox (or use the image named in ``DJD_TEST_IMAGE``), start the dispatcher
as a subprocess on a free port, and check real containers through the Docker
API. Every run uses a namespace of its own and removes what it created.
Faults are made by small proxies between the dispatcher and the daemon.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DISPATCHER = HERE / "docker_job_dispatcher.py"
DOCKER_SOCKET = os.environ.get("DJD_TEST_DOCKER_SOCKET", "/var/run/docker.sock")
NAMESPACE_LABEL = "docker-job-dispatcher.namespace"
RESTART_LABEL = "docker-job-dispatcher.restart-policy"
RUN_ID = uuid.uuid4().hex[:8]


# --- Talking to Docker directly -------------------------------------------


class UnixConnection(http.client.HTTPConnection):
    """HTTP over the daemon's unix socket."""

    def __init__(self, path: str, timeout: float = 60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def docker(method: str, path: str, body=None, query=None, raw: bytes = None,
           timeout: float = 60):
    """Call the Docker API; return (status, decoded JSON or text)."""
    if query:
        path += "?" + urllib.parse.urlencode(
            {k: json.dumps(v) if isinstance(v, (dict, list)) else v
             for k, v in query.items()}
        )
    connection = UnixConnection(DOCKER_SOCKET, timeout)
    try:
        headers = {}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif raw is not None:
            headers["Content-Type"] = "application/x-tar"
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(payload)
    except ValueError:
        return response.status, payload.decode("utf-8", "replace")


def inspect(name: str):
    """Return Docker's inspect reply for a container, or None if absent."""
    status, info = docker("GET", f"/containers/{name}/json")
    return info if status == 200 else None


def namespace_containers(namespace: str, status: list[str] | None = None):
    """Return the summaries of the containers labelled with ``namespace``."""
    filters = {"label": [f"{NAMESPACE_LABEL}={namespace}"]}
    if status:
        filters["status"] = status
    code, containers = docker("GET", "/containers/json",
                              query={"all": 1, "filters": filters})
    assert code == 200, containers
    return containers


def remove_namespace(namespace: str) -> None:
    """Remove every container of a namespace."""
    for container in namespace_containers(namespace):
        docker("DELETE", f"/containers/{container['Id']}", query={"force": 1})


def wait_for(predicate, timeout: float = 30, interval: float = 0.05,
             message: str = "condition"):
    """Poll ``predicate`` until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)


def daemon_available() -> bool:
    """Return whether a Docker daemon answers on the socket."""
    try:
        return docker("GET", "/_ping", timeout=5)[0] == 200
    except OSError:
        return False


# --- Fixtures: image, namespace, dispatcher --------------------------------


@pytest.fixture(scope="session")
def image():
    """Return the name of a tiny image with busybox, made for this run."""
    if not daemon_available():
        pytest.fail(f"no Docker daemon answers on {DOCKER_SOCKET}")
    if os.environ.get("DJD_TEST_IMAGE"):
        yield os.environ["DJD_TEST_IMAGE"]
        return
    busybox = shutil.which("busybox") or "/bin/busybox"
    assert os.path.exists(busybox), "install busybox-static to build the test image"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "echo", "sleep", "true", "false", "timeout",
                       "cat", "env", "printf", "ls", "yes", "seq"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    # Podman ignores the tag of an import: the run's id goes in the name.
    name = f"djd-test-{RUN_ID}:latest"
    status, reply = docker(
        "POST", "/images/create",
        query={"fromSrc": "-", "repo": f"djd-test-{RUN_ID}", "tag": "latest"},
        raw=buffer.getvalue(),
    )
    assert status == 200, reply
    yield name
    docker("DELETE", f"/images/{name}", query={"force": 1})


@pytest.fixture
def namespace(image):
    """Return a fresh namespace; its containers are removed afterwards."""
    name = f"djd-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    yield name
    remove_namespace(name)


def free_port() -> int:
    """Return a TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Reply:
    """An HTTP reply: status, headers and body, with the JSON decoded."""

    def __init__(self, status: int, headers, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Reply({self.status}, {self.body[:300]!r})"


class RunningDispatcher:
    """The dispatcher running as a subprocess, with its log in a file."""

    def __init__(self, args: list[str], env: dict[str, str], port: int,
                 log_path: Path):
        self.port = port
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(DISPATCHER), *args],
            env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15) -> None:
        """Wait until /health/live answers, or fail with the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dispatcher exited:\n{self.log}")
            try:
                if self.request("GET", "/health/live", timeout=1).status == 204:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"dispatcher did not start:\n{self.log}")

    def request(self, method: str, path: str, body=None, headers=None,
                timeout: float = 30, raw: bytes | None = None) -> Reply:
        """Send one request on a new connection and return the reply."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                timeout=timeout)
        try:
            data = raw
            if body is not None:
                data = json.dumps(body).encode()
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            connection.close()

    def submit(self, body, path: str = "/job") -> Reply:
        return self.request("POST", path, body=body)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        """Stop the process with ``sig`` and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode


@pytest.fixture
def start_dispatcher(namespace, image, tmp_path):
    """Return a function that starts a dispatcher; all are stopped after.

    ``start_dispatcher(*args, env={...})`` runs the dispatcher in the test's
    namespace with JOB_IMAGE set to the test image, waits until it answers,
    and returns a RunningDispatcher. ``wait=False`` skips the wait.
    """
    started = []

    def start(*args: str, env: dict | None = None, wait: bool = True,
              port: int | None = None) -> RunningDispatcher:
        port = port or free_port()
        environment = {
            key: value for key, value in os.environ.items()
            if not key.startswith(("JOB_", "DOCKER_"))
        }
        environment.update({"JOB_IMAGE": image, "PYTHONUNBUFFERED": "1"})
        if DOCKER_SOCKET != "/var/run/docker.sock":
            environment["DOCKER_HOST"] = "unix://" + DOCKER_SOCKET
        environment.update(env or {})
        arguments = ["--host", "127.0.0.1", "-p", str(port), "-n", namespace]
        process = RunningDispatcher(
            arguments + list(args), environment, port,
            tmp_path / f"dispatcher-{len(started)}.log",
        )
        started.append(process)
        if wait:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL)


# --- A proxy in front of the daemon, for faults and other transports -------


class DockerProxy:
    """A TCP (or TLS) proxy on loopback in front of the daemon's socket.

    ``mode`` says what happens to new requests: ``pass`` forwards them,
    ``refuse`` closes the listening socket so connections are refused,
    ``hang`` accepts and never answers, ``error`` answers 500, ``cut``
    forwards the request but closes halfway through the reply. ``drop()``
    closes every open connection, long streams included.
    """

    def __init__(self, tls_context: ssl.SSLContext | None = None,
                 unix_path: str | None = None):
        self.tls_context = tls_context
        self.unix_path = unix_path
        self.mode = "pass"
        self.port = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._listen()

    def _listen(self):
        if self.unix_path:
            if os.path.exists(self.unix_path):
                os.unlink(self.unix_path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.unix_path)
        else:
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", self.port or 0))
            self.port = self.listener.getsockname()[1]
        self.listener.listen(128)
        threading.Thread(target=self._accept, args=(self.listener,),
                         daemon=True).start()

    @property
    def docker_host(self) -> str:
        if self.unix_path:
            return "unix://" + self.unix_path
        return f"tcp://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        """Change how new requests are treated (see the class docstring)."""
        if mode == "refuse" and self.mode != "refuse":
            self.listener.close()
        if mode != "refuse" and self.mode == "refuse":
            self._listen()
        self.mode = mode
        if mode != "pass":
            self.drop()

    def drop(self) -> None:
        """Close every open connection through the proxy."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def close(self) -> None:
        self._stopped = True
        self.listener.close()
        self.drop()

    def _accept(self, listener):
        while not self._stopped:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.mode == "refuse" or listener is not self.listener:
                client.close()  # accepted just before the listener closed
                continue
            threading.Thread(target=self._serve, args=(client,),
                             daemon=True).start()

    def _serve(self, client: socket.socket):
        try:
            if self.tls_context is not None:
                client = self.tls_context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            client.close()
            return
        with self._lock:
            self._connections.append(client)
        if self.mode == "hang":
            return  # held open until drop() or close()
        if self.mode == "error":
            try:
                client.recv(65536)
                body = b'{"message":"proxy says no"}'
                client.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body))
            except OSError:
                pass
            client.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(DOCKER_SOCKET)
        except OSError:
            client.close()
            return
        with self._lock:
            self._connections.append(upstream)
        cut = self.mode == "cut"
        sockets = [client, upstream]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 1.0)
                if self._stopped:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    target = upstream if sock is client else client
                    if cut and sock is upstream:
                        target.sendall(data[: max(1, len(data) // 2)])
                        return
                    target.sendall(data)
        except (OSError, ValueError):
            pass  # closed by drop() or close()
        finally:
            for sock in sockets:
                try:
                    sock.close()
                except OSError:
                    pass


@pytest.fixture
def proxy():
    """Return a plain TCP proxy in front of the daemon, closed afterwards."""
    instance = DockerProxy()
    yield instance
    instance.close()


# --- Smoke ---------------------------------------------------------------


class TestSmoke:
    def test_submit_creates_and_starts_a_job(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(env={"JOB_COMMAND": "echo"})
        name = f"demo-job-smoke-{namespace}"
        reply = dispatcher.submit({"id": f"smoke-{namespace}", "args": ["hi"]})
        assert reply.status == 201, reply
        assert reply.json == {"id": name}
        info = wait_for(lambda: (inspect(name) or {}).get("State", {})
                        .get("Status") == "exited" and inspect(name))
        assert info["Config"]["Labels"][NAMESPACE_LABEL] == namespace
        assert info["State"]["ExitCode"] == 0

    def test_proxy_passes_requests_through(self, start_dispatcher, proxy):
        dispatcher = start_dispatcher(
            "-t", "http", env={"DOCKER_HOST": proxy.docker_host})
        assert dispatcher.request("GET", "/health/ready").status == 204
        proxy.set_mode("refuse")
        assert dispatcher.request("GET", "/health/ready").status == 503
        proxy.set_mode("pass")
        assert dispatcher.request("GET", "/health/ready").status == 204
