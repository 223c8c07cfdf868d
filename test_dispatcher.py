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

import asyncio
import hashlib
import http.client
import importlib
import functools
import io
import json
import math
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from prometheus_client import parser as prometheus_parser
from prometheus_client.openmetrics import parser as openmetrics_parser

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


@functools.lru_cache(maxsize=None)
def on_podman() -> bool:
    """Return whether the test daemon is Podman, whose answers differ."""
    connection = UnixConnection(DOCKER_SOCKET, 5)
    try:
        connection.request("GET", "/_ping")
        response = connection.getresponse()
        response.read()
        return response.getheader("Libpod-Api-Version") is not None
    finally:
        connection.close()


def daemon_available() -> bool:
    """Return whether a Docker daemon answers on the socket."""
    try:
        return docker("GET", "/_ping", timeout=5)[0] == 200
    except OSError:
        return False


# --- Fixtures: image, namespace, dispatcher --------------------------------


@pytest.fixture(scope="module")
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


# The job-route and upkeep tests, which also run against Podman. The rest
# checks what only Docker does, or the dispatcher itself, and runs once.
PODMAN_CLASSES = {
    "TestRoutes", "TestJqLayer", "TestManifest", "TestDefaultFilter",
    "TestLogging", "TestConcurrencyLimit", "TestNoStartLimit", "TestFastPath",
    "TestPoisonJobs", "TestCleaning", "TestDaemonOutage", "TestRestartSafety",
    "TestSignals", "TestLogs", "TestWait", "TestDelete", "TestDryRun",
    "TestMetrics", "TestSmoke",
}


@pytest.fixture(autouse=True)
def only_job_tests_on_podman(request):
    """Skip, against Podman, the tests that do not concern it."""
    if on_podman() and (request.cls is None
                        or request.cls.__name__ not in PODMAN_CLASSES):
        pytest.skip("runs against Docker only")


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


def dispatcher_environment(image_name: str, extra: dict | None = None) -> dict:
    """Return a dispatcher's environment: ours without JOB_ and DOCKER_
    settings, the test image as JOB_IMAGE, the test daemon, and ``extra``."""
    environment = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("JOB_", "DOCKER_"))
    }
    environment.update({"JOB_IMAGE": image_name, "PYTHONUNBUFFERED": "1"})
    if DOCKER_SOCKET != "/var/run/docker.sock":
        environment["DOCKER_HOST"] = "unix://" + DOCKER_SOCKET
    environment.update(extra or {})
    return environment


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
        environment = dispatcher_environment(image, env)
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
            try:
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
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


# === Core: command line, routes, jq layer, transports =====================


JOB_FILTER = r"""
{
  Name: ($ENV.NS + ($PATH | split("/") | join("-")) + "-"
         + (.n // "null" | tostring)),
  Image: (.image // $ENV.JOB_IMAGE),
  Cmd: ["true"],
  HostConfig: {NetworkMode: "none"},
  Labels: (LABELS)
}
"""

ROUTE_LABELS = '{path: $PATH, null_body: (. == null | tostring)}'

ONE_MIB = 1024 * 1024


# --- Helpers ---------------------------------------------------------------


def job_filter(labels: str = "{}") -> str:
    """Return JOB_FILTER with ``labels`` as the jq expression of its Labels."""
    return JOB_FILTER.replace("LABELS", labels)


def job_name(namespace: str, n, path: str = "/job") -> str:
    """Return the name JOB_FILTER gives the body {"n": n} sent to ``path``."""
    return namespace + path.rstrip("/").replace("/", "-") + "-" + str(n)


def post(dispatcher: RunningDispatcher, raw: bytes, path: str = "/job",
         headers: dict | None = None) -> Reply:
    """Send ``raw`` as it is, as a POST body."""
    return dispatcher.request("POST", path, raw=raw, headers=headers)


def labels_of(name: str) -> dict:
    """Return the labels of an existing container."""
    info = inspect(name)
    assert info is not None, f"no container {name!r}"
    return info["Config"]["Labels"]


def assert_error(reply: Reply, status: int, message: str | None = None) -> str:
    """Check a JSON error reply; return its message."""
    assert reply.status == status, reply
    assert reply.headers["Content-Type"] == "application/json", reply.headers
    body = reply.json
    assert list(body) == ["error"], body
    assert body["error"]["code"] == status, body
    if message is not None:
        assert body["error"]["message"] == message
    return body["error"]["message"]


def exited(name: str) -> dict | None:
    """Return a container's inspect reply once it has exited, else None."""
    info = inspect(name)
    if info is not None and info["State"]["Status"] == "exited":
        return info
    return None


def wait_for_log(dispatcher: RunningDispatcher, text: str) -> None:
    """Wait until ``text`` shows up in the dispatcher's log."""
    wait_for(lambda: text in dispatcher.log, timeout=10,
             message=f"{text!r} in the log")


def port_open(port: int) -> bool:
    """Return whether something accepts connections on a loopback port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


def refuse_connections(docker_proxy: DockerProxy) -> None:
    """Put a proxy in ``refuse`` mode and wait until it really refuses.

    A thread blocked in accept() keeps the closed listening socket alive
    until one more connection arrives; a probe takes that connection.
    """
    def refused() -> bool:
        if docker_proxy.unix_path:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = docker_proxy.unix_path
        else:
            probe = socket.socket()
            address = ("127.0.0.1", docker_proxy.port)
        probe.settimeout(2)
        try:
            probe.connect(address)
        except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError):
            return True
        finally:
            probe.close()
        return False

    docker_proxy.set_mode("refuse")
    wait_for(refused, timeout=10, message="the proxy to refuse connections")


def raw_request(port: int, data: bytes, half_close: bool = False) -> Reply:
    """Send raw bytes on a new connection and parse the HTTP reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return Reply(response.status, response.headers, response.read())


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes and return everything that comes back until close."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the dispatcher with a minimal environment; return what it did."""
    environment = {
        key: os.environ[key]
        for key in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH")
        if key in os.environ
    }
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, str(DISPATCHER), *args], env=environment,
        capture_output=True, text=True, timeout=10,
    )


def whole_seconds(docker_time: str) -> int:
    """Return the whole Unix seconds of a Docker RFC 3339 UTC time."""
    return int(datetime.fromisoformat(docker_time[:19] + "+00:00").timestamp())


def sha1(data) -> str:
    """Return the SHA-1 hex digest of bytes, or of a string's UTF-8."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha1(data).hexdigest()


def md5(data) -> str:
    """Return the MD5 hex digest of bytes, or of a string's UTF-8."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def jobs(start_dispatcher, namespace) -> RunningDispatcher:
    """Return a dispatcher with JOB_FILTER that never starts its jobs."""
    return start_dispatcher("-m", "0", job_filter(ROUTE_LABELS),
                            env={"NS": namespace})


@pytest.fixture
def make_container(image):
    """Return a function that creates a container directly; removed after."""
    created = []

    def make(name: str, labels: dict | None = None) -> str:
        status, reply = docker(
            "POST", "/containers/create", query={"name": name},
            body={"Image": image, "Cmd": ["true"], "Labels": labels or {}},
        )
        assert status == 201, reply
        created.append(reply["Id"])
        return reply["Id"]

    yield make
    for container in created:
        docker("DELETE", f"/containers/{container}", query={"force": 1})


# --- Command line ------------------------------------------------------------

BAD_VALUES = [
    ("-p", "PORT", "0", "-p/--port", "'0' is out of range (from 1 to 65535)"),
    ("-p", "PORT", "70000", "-p/--port",
     "'70000' is out of range (from 1 to 65535)"),
    ("-u", "UPKEEP_INTERVAL", "0", "-u/--upkeep-interval",
     "'0' must be at least 1"),
    ("-m", "MAX_CONCURRENT", "-1", "-m/--max-concurrent",
     "'-1' is out of range (at least 0)"),
    ("-k", "KEEP_EXITED_FOR", "-5", "-k/--keep-exited-for",
     "'-5' must be at least 0"),
    ("-t", "TRANSPORT", "bogus", "-t/--transport",
     "'bogus' is not one of socket, http, tls"),
    ("--log-level", "LOG_LEVEL", "nope", "--log-level",
     "'nope' is not one of TRACE, DEBUG, INFO, WARN, WARNING, ERROR"),
]

HELP_OPTIONS = [
    ("-f", "--from-file", "FROM_FILE"),
    ("-p", "--port", "PORT"),
    ("--host", None, "HOST"),
    ("-m", "--max-concurrent", "MAX_CONCURRENT"),
    ("-k", "--keep-exited-for", "KEEP_EXITED_FOR"),
    ("-u", "--upkeep-interval", "UPKEEP_INTERVAL"),
    ("-t", "--transport", "TRANSPORT"),
    ("-n", "--namespace", "NAMESPACE"),
    ("--log-level", None, "LOG_LEVEL"),
    ("--max-body", None, "MAX_BODY"),
    ("--max-connections", None, "MAX_CONNECTIONS"),
    ("--read-timeout", None, "READ_TIMEOUT"),
]


def help_entries(text: str) -> dict[str, str]:
    """Return each option's help entry, whitespace folded, by first flag."""
    entries = {}
    for entry in re.split(r"\n  (?=-)", text.split("options:", 1)[1]):
        folded = " ".join(entry.split())
        entries[re.split(r"[ ,]", folded, maxsplit=1)[0]] = folded
    return entries


class TestCommandLine:
    @pytest.mark.parametrize(
        "flag, variable, value, option, message", BAD_VALUES,
        ids=[f"{row[0]} {row[2]}" for row in BAD_VALUES],
    )
    def test_exit_2_on_bad_option(self, flag, variable, value, option, message):
        result = run_cli(flag, value)
        assert result.returncode == 2, result
        assert result.stderr.startswith("usage: docker-job-dispatcher")
        assert result.stderr.splitlines()[-1] == (
            f"docker-job-dispatcher: error: argument {option}: {message}"
        )

    @pytest.mark.parametrize(
        "flag, variable, value, option, message", BAD_VALUES,
        ids=[f"{row[1]}={row[2]}" for row in BAD_VALUES],
    )
    def test_exit_2_on_bad_environment_value(self, flag, variable, value,
                                             option, message):
        result = run_cli(env={variable: value})
        assert result.returncode == 2, result
        assert result.stderr.splitlines()[-1] == (
            f"docker-job-dispatcher: error: argument {option}: {message}"
        )

    def test_print_version_with_V(self):
        source = DISPATCHER.read_text()
        version = re.search(r'^__version__ = "([^"]+)"$', source, re.M).group(1)
        for flag in ("-V", "--version"):
            result = run_cli(flag)
            assert result.returncode == 0, result
            assert result.stdout == f"docker-job-dispatcher {version}\n"

    def test_list_every_option_and_variable_in_help(self):
        result = run_cli("-h")
        assert result.returncode == 0, result
        assert result.stdout.startswith("usage: docker-job-dispatcher")
        assert re.search(r"\n  FILTER +jq filter text", result.stdout)
        entries = help_entries(result.stdout)
        for first, second, variable in HELP_OPTIONS:
            assert first in entries, f"{first} missing from the help"
            entry = entries[first]
            if second:
                assert f", {second}" in entry, entry
            assert re.search(rf"\(env {variable}\b", entry), entry
        assert entries["-h"].startswith("-h, --help ")
        assert entries["-V"].startswith("-V, --version ")

    def test_exit_without_binding_on_filter_that_does_not_compile(
            self, start_dispatcher):
        dispatcher = start_dispatcher(".a |||", wait=False)

        def stopped():
            assert not port_open(dispatcher.port), "the port was bound"
            return dispatcher.process.poll() is not None

        wait_for(stopped, timeout=15, interval=0.02, message="the exit")
        assert dispatcher.process.returncode == 1
        assert not port_open(dispatcher.port)
        log = dispatcher.log
        assert (
            "ERROR The filter does not compile: jq: error: syntax error, "
            "unexpected '|' at <top-level>, line 1, column 5:" in log
        ), log
        assert "Listening" not in log
        assert "Traceback" not in log

        result = run_cli("--host", "127.0.0.1", "-p", str(dispatcher.port),
                         ".a |||")
        assert result.returncode == 1, result
        assert result.stdout == ""
        assert "jq: error: syntax error, unexpected '|'" in result.stderr

    def test_exit_on_unreadable_filter_file(self, tmp_path):
        missing = tmp_path / "missing.jq"
        result = run_cli("--host", "127.0.0.1", "-p", str(free_port()),
                         "-f", str(missing))
        assert result.returncode == 1, result
        assert "ERROR Cannot read the filter file: " in result.stderr
        assert str(missing) in result.stderr
        assert "Traceback" not in result.stderr

    def test_prefer_filter_file_over_positional_filter(
            self, start_dispatcher, namespace, tmp_path):
        path = tmp_path / "filter.jq"
        path.write_text(job_filter('{source: "file"}'))
        dispatcher = start_dispatcher(
            "-m", "0", "-f", str(path), job_filter('{source: "argument"}'),
            env={"NS": namespace})
        assert (
            "WARNING Both a filter and --from-file given; using the file"
            in dispatcher.log
        )
        reply = post(dispatcher, b'{"n": 1}')
        assert reply.status == 201, reply
        assert labels_of(job_name(namespace, 1))["source"] == "file"

    def test_read_filter_file_named_in_environment(
            self, start_dispatcher, namespace, tmp_path):
        path = tmp_path / "filter.jq"
        path.write_text(job_filter('{source: "file"}'))
        dispatcher = start_dispatcher(
            "-m", "0", env={"NS": namespace, "FROM_FILE": str(path)})
        assert "No filter given" not in dispatcher.log
        reply = post(dispatcher, b'{"n": 1}')
        assert reply.status == 201, reply
        assert labels_of(job_name(namespace, 1))["source"] == "file"

    def test_warn_when_no_filter_given(self, start_dispatcher):
        dispatcher = start_dispatcher()
        assert (
            "WARNING No filter given; using the built-in default filter"
            in dispatcher.log
        )


# --- Routes and replies ---------------------------------------------------------


class TestRoutes:
    def test_create_job_on_post_job(self, jobs, namespace):
        reply = post(jobs, b'{"n": 1}')
        assert reply.status == 201, reply
        assert reply.headers["Content-Type"] == "application/json"
        name = job_name(namespace, 1)
        assert reply.json == {"id": name}
        labels = labels_of(name)
        assert labels["path"] == "/job"
        assert labels[NAMESPACE_LABEL] == namespace

    def test_create_job_on_sub_path(self, jobs, namespace):
        reply = post(jobs, b'{"n": 1}', path="/job/a/b")
        assert reply.status == 201, reply
        name = job_name(namespace, 1, "/job/a/b")
        assert reply.json == {"id": name}
        assert labels_of(name)["path"] == "/job/a/b"

        reply = post(jobs, b'{"n": 2}', path="/job/a/b/")
        assert reply.status == 201, reply
        assert labels_of(job_name(namespace, 2, "/job/a/b"))["path"] == "/job/a/b"

    def test_describe_finished_job(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(job_filter(), env={"NS": namespace})
        name = job_name(namespace, 1)
        assert post(dispatcher, b'{"n": 1}').status == 201
        info = wait_for(lambda: exited(name), message=f"{name} to exit")

        reply = dispatcher.request("GET", f"/job/{name}")
        assert reply.status == 200, reply
        assert reply.headers["Content-Type"] == "application/json"
        job = reply.json
        assert set(job) == {"id", "created", "status", "state", "exit_code",
                            "started_at", "finished_at", "error"}
        assert job["id"] == name
        assert type(job["created"]) is int
        assert job["created"] == whole_seconds(info["Created"])
        assert job["status"].startswith("Exited (0) "), job
        assert job["status"].endswith(" ago"), job
        assert job["state"] == "exited"
        assert job["exit_code"] == 0
        assert job["started_at"] == info["State"]["StartedAt"]
        assert job["finished_at"] == info["State"]["FinishedAt"]
        assert job["error"] is None

    def test_describe_pending_job(self, jobs, namespace):
        name = job_name(namespace, 1)
        assert post(jobs, b'{"n": 1}').status == 201
        reply = jobs.request("GET", f"/job/{name}")
        assert reply.status == 200, reply
        job = reply.json
        assert job["id"] == name
        assert job["status"] == "Created"
        assert job["state"] == "created"
        assert job["exit_code"] is None
        assert job["started_at"] is None
        assert job["finished_at"] is None
        assert job["error"] is None

    def test_answer_204_on_health_routes(self, jobs):
        for path in ("/health/live", "/health/ready"):
            reply = jobs.request("GET", path)
            assert reply.status == 204, (path, reply)
            assert reply.body == b""

    def test_answer_404_on_unknown_route(self, jobs):
        expected = {"error": {"code": 404, "message": "Route not found"}}
        for method, path in [("GET", "/"), ("GET", "/nope"), ("POST", "/jobx"),
                             ("GET", "/health"), ("GET", "/health/livex"),
                             ("POST", "/job-a"), ("DELETE", "/nope/job")]:
            reply = jobs.request(method, path)
            assert_error(reply, 404)
            assert reply.json == expected, (method, path)

    def test_answer_405_on_wrong_method(self, jobs, namespace):
        cases = [("GET", "/job", "POST"), ("PUT", "/job/a/b", "POST"),
                 ("POST", "/health/live", "GET, HEAD"),
                 ("DELETE", "/health/ready", "GET, HEAD")]
        for method, path, allow in cases:
            reply = jobs.request(method, path)
            assert reply.headers["Allow"] == allow, (method, path)
            assert_error(reply, 405,
                         f"Method {method} is not allowed here; use {allow}")

        reply = jobs.request("PUT", f"/job/{job_name(namespace, 1)}")
        allow = reply.headers["Allow"]
        assert {"GET", "POST"} <= set(allow.split(", ")), allow
        assert "PUT" not in allow
        assert_error(reply, 405, f"Method PUT is not allowed here; use {allow}")

    def test_tolerate_trailing_slashes(self, jobs, namespace):
        reply = post(jobs, b'{"n": 1}', path="/job/")
        assert reply.status == 201, reply
        name = job_name(namespace, 1)
        assert reply.json == {"id": name}
        assert labels_of(name)["path"] == "/job"
        assert jobs.request("GET", f"/job/{name}/").json["id"] == name
        assert jobs.request("GET", "/health/live/").status == 204
        assert jobs.request("GET", "/health/ready/").status == 204

    def test_accept_body_whatever_its_content_type(self, jobs, namespace):
        types = [None, "text/plain", "application/x-www-form-urlencoded",
                 "application/json; charset=utf-8", "image/png"]
        for n, content_type in enumerate(types):
            headers = {"Content-Type": content_type} if content_type else {}
            reply = post(jobs, b'{"n": %d}' % n, headers=headers)
            assert reply.status == 201, (content_type, reply)
            assert reply.json == {"id": job_name(namespace, n)}

    def test_pass_null_to_filter_for_empty_body(self, jobs, namespace):
        assert post(jobs, b"", path="/job/empty").status == 201
        assert post(jobs, b" \r\n ", path="/job/blank").status == 201
        reply = raw_request(
            jobs.port,
            b"POST /job/nolength HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.status == 201, reply
        assert post(jobs, b'{"n": 1}').status == 201
        for path in ("/job/empty", "/job/blank", "/job/nolength"):
            assert labels_of(job_name(namespace, "null", path))["null_body"] == "true"
        assert labels_of(job_name(namespace, 1))["null_body"] == "false"

    def test_refuse_body_over_limit_with_413(self, jobs, namespace):
        message = f"The body is larger than {ONE_MIB} bytes"
        reply = raw_request(
            jobs.port,
            b"POST /job HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % (ONE_MIB + 1))
        assert_error(reply, 413, message)
        reply = raw_request(
            jobs.port,
            b"POST /job HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n%x\r\n" % (ONE_MIB + 1))
        assert_error(reply, 413, message)
        assert namespace_containers(namespace) == []

        start = b'{"n": 7, "pad": "'
        body = start + b"x" * (ONE_MIB - len(start) - 2) + b'"}'
        assert len(body) == ONE_MIB
        reply = post(jobs, body)
        assert reply.status == 201, reply
        assert reply.json == {"id": job_name(namespace, 7)}

    def test_refuse_invalid_json_with_400(self, jobs, namespace):
        for body in (b'{"n": ', b"{'n': 1}", b"NaN", b'{"n": 1} x', b"\xff\xfe"):
            message = assert_error(post(jobs, body), 400)
            assert message.startswith(("The body is not valid JSON: ",
                                       "The body is not valid UTF-8")), message
        assert namespace_containers(namespace) == []

    def test_refuse_conflicting_content_lengths(self, jobs, namespace):
        reply = raw_request(
            jobs.port,
            b"POST /job HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\n"
            b'{"n": 12}')
        assert_error(reply, 400)
        assert namespace_containers(namespace) == []

    def test_answer_404_for_id_that_is_not_a_container_name(self, jobs):
        for job_id in ("..", "a", "%2F", "a.b*", "-x", "a%20b", "%2e%2e"):
            reply = jobs.request("GET", f"/job/{job_id}")
            decoded = urllib.parse.unquote(job_id)
            assert_error(reply, 404, f"Job {decoded!r} not found")

    def test_answer_404_for_prefix_of_container_id(self, jobs, namespace):
        name = job_name(namespace, 1)
        assert post(jobs, b'{"n": 1}').status == 201
        container_id = inspect(name)["Id"]
        for job_id in (container_id[:12], container_id, name[:-1]):
            reply = jobs.request("GET", f"/job/{job_id}")
            assert_error(reply, 404, f"Job {job_id!r} not found")
        assert jobs.request("GET", f"/job/{name}").status == 200

    def test_answer_404_for_job_of_other_namespace(self, jobs, namespace,
                                                   make_container):
        foreign = namespace + "-foreign"
        make_container(foreign, {NAMESPACE_LABEL: namespace + "-other"})
        unlabelled = namespace + "-unlabelled"
        make_container(unlabelled)
        for name in (foreign, unlabelled):
            reply = jobs.request("GET", f"/job/{name}")
            assert_error(reply, 404, f"Job {name!r} not found")

    def test_answer_200_on_repeated_submission(self, jobs, namespace):
        name = job_name(namespace, 5)
        first = post(jobs, b'{"n": 5}')
        assert first.status == 201, first
        second = post(jobs, b'{"n": 5}')
        assert second.status == 200, second
        assert second.json == first.json == {"id": name}
        third = post(jobs, b'{ "n" : 5 }')
        assert third.status == 200, third
        assert [c["Names"] for c in namespace_containers(namespace)] == [
            ["/" + name]]

    def test_answer_409_on_name_of_foreign_container(self, jobs, namespace,
                                                     make_container):
        cases = [(8, None), (9, {NAMESPACE_LABEL: namespace + "-other"})]
        for n, labels in cases:
            name = job_name(namespace, n)
            make_container(name, labels)
            reply = post(jobs, b'{"n": %d}' % n)
            assert_error(
                reply, 409,
                f"A container named {name!r} exists but is not a job of "
                f"namespace {namespace!r}")
            info = inspect(name)
            assert (info["Config"]["Labels"] or {}) == (labels or {})
            assert info["State"]["Status"] == "created"
        assert namespace_containers(namespace) == []

    def test_answer_400_when_docker_refuses_manifest(self, jobs, namespace):
        reply = post(jobs, b'{"n": 1, "image": "no-such-image:nope"}')
        message = assert_error(reply, 400)
        assert message.startswith("Docker refused the job: "), message
        assert "no such image" in message.lower(), message
        assert "no-such-image" in message, message
        assert inspect(job_name(namespace, 1)) is None


# --- The jq layer ---------------------------------------------------------------

BAD_OUTPUT_FILTER = r"""
if .case == "empty" then empty
elif .case == "number" then 42
elif .case == "array" then [1]
elif .case == "string" then "job"
elif .case == "null" then null
elif .case == "no-name" then {Image: $ENV.JOB_IMAGE}
elif .case == "number-name" then {Name: 7, Image: $ENV.JOB_IMAGE}
elif .case == "null-name" then {Name: null, Image: $ENV.JOB_IMAGE}
elif .case == "name" then {Name: .name, Image: $ENV.JOB_IMAGE}
elif .case == "two" then
  ({Name: ($ENV.NS + "-first"), Image: $ENV.JOB_IMAGE, Cmd: ["true"]},
   {Name: ($ENV.NS + "-second"), Image: $ENV.JOB_IMAGE, Cmd: ["true"]})
elif .case == "error" then error("custom failure")
else {Name: ($ENV.NS + "-ok"), Image: $ENV.JOB_IMAGE, Cmd: ["true"]}
end
"""


def start_labels(start_dispatcher, namespace: str, labels: str,
                 env: dict | None = None) -> RunningDispatcher:
    """Start a dispatcher whose jobs carry ``labels`` and never start."""
    return start_dispatcher("-m", "0", job_filter(labels),
                            env={"NS": namespace, **(env or {})})


def submit_labels(dispatcher: RunningDispatcher, namespace: str, raw: bytes,
                  path: str = "/job") -> dict:
    """Submit ``raw``, which holds an "n", and return the job's labels."""
    reply = post(dispatcher, raw, path)
    assert reply.status == 201, reply
    n = json.loads(raw)["n"]
    return labels_of(job_name(namespace, n, path))


class TestJqLayer:
    def test_read_process_environment_with_env_and_dollar_env(
            self, start_dispatcher, namespace):
        dispatcher = start_labels(
            start_dispatcher, namespace,
            '{a: $ENV.DJD_PROBE, b: env.DJD_PROBE, ns: env.NS}',
            env={"DJD_PROBE": "wert ä 1"})
        labels = submit_labels(dispatcher, namespace, b'{"n": 1}')
        assert labels["a"] == "wert ä 1"
        assert labels["b"] == "wert ä 1"
        assert labels["ns"] == namespace

    def test_bind_request_path_without_trailing_slash(self, start_dispatcher,
                                                      namespace):
        dispatcher = start_labels(start_dispatcher, namespace, "{p: $PATH}")
        cases = [("/job", "/job"), ("/job/", "/job"), ("/job/x/y/", "/job/x/y"),
                 ("/job/z", "/job/z"), ("/job/q/?x=1", "/job/q")]
        for n, (path, expected) in enumerate(cases):
            reply = post(dispatcher, b'{"n": %d}' % n, path)
            assert reply.status == 201, (path, reply)
            assert labels_of(reply.json["id"])["p"] == expected

    def test_hash_input_with_sha1_and_md5(self, start_dispatcher, namespace):
        dispatcher = start_labels(start_dispatcher, namespace,
                                  "{s: @sha1, m: @md5}")
        compact = b'{"b":[1,2],"a":"x","n":1}'
        labels = submit_labels(dispatcher, namespace, compact)
        assert labels["s"] == sha1(compact)
        assert labels["m"] == md5(compact)

        spaced = b'{"b": [1, 2],\n "a": "x", "n": 2}'
        labels = submit_labels(dispatcher, namespace, spaced)
        assert labels["s"] == sha1(b'{"b":[1,2],"a":"x","n":2}')
        assert labels["m"] == md5(b'{"b":[1,2],"a":"x","n":2}')

    def test_hash_computed_values(self, start_dispatcher, namespace):
        dispatcher = start_labels(
            start_dispatcher, namespace,
            '{s: (("x" + .a) | @sha1), m: (("x" + .a) | @md5),'
            ' t: (.b | tostring | @sha1), o: (.o | @sha1), k: (.k | @md5)}')
        labels = submit_labels(
            dispatcher, namespace,
            b'{"n": 1, "a": "yz", "b": [1, 2], "o": {"z": 1, "y": [true, null]},'
            b' "k": 1.5}')
        assert labels["s"] == sha1("xyz")
        assert labels["m"] == md5("xyz")
        assert labels["t"] == sha1("[1,2]")
        assert labels["o"] == sha1('{"z":1,"y":[true,null]}')
        assert labels["k"] == md5("1.5")

    def test_hash_interpolated_values(self, start_dispatcher, namespace):
        dispatcher = start_labels(
            start_dispatcher, namespace,
            r'{s: @sha1 "x-\(.a)", m: @md5 "\(.a)/\(.c)", j: @sha1 "v\(.b)"}')
        labels = submit_labels(
            dispatcher, namespace, b'{"n": 1, "a": "abc", "c": "d", "b": [3]}')
        assert labels["s"] == "x-" + sha1("abc")
        assert labels["m"] == md5("abc") + "/" + md5("d")
        assert labels["j"] == "v" + sha1("[3]")

    def test_hash_inside_try_without_taking_catch(self, start_dispatcher,
                                                  namespace):
        dispatcher = start_labels(
            start_dispatcher, namespace,
            r'{p: (try (@sha1 "x-\(.a)" | .[0:8]) catch "fallback"),'
            r' q: (try (.a | @md5) catch "fallback"),'
            r' r: (try (.a | @sha1 | .[0:6]) catch "fallback"),'
            r' s: (try (("k" + .a) | @sha1 | ascii_upcase) catch "fallback"),'
            r' t: (try error("boom") catch "caught")}')
        labels = submit_labels(dispatcher, namespace,
                               '{"n": 1, "a": "héllo"}'.encode())
        assert labels["p"] == ("x-" + sha1("héllo"))[:8]
        assert labels["q"] == md5("héllo")
        assert labels["r"] == sha1("héllo")[:6]
        assert labels["s"] == sha1("khéllo").upper()
        assert labels["t"] == "caught"

    def test_hash_string_as_its_utf8_bytes(self, start_dispatcher, namespace):
        dispatcher = start_labels(start_dispatcher, namespace,
                                  "{s: (.a | @sha1), m: (.a | @md5), i: @sha1}")
        text = "héllo ✓ 日本 🎉"
        raw = json.dumps({"n": 1, "a": text}, ensure_ascii=False,
                         separators=(",", ":")).encode()
        labels = submit_labels(dispatcher, namespace, raw)
        assert labels["s"] == sha1(text.encode("utf-8"))
        assert labels["m"] == md5(text.encode("utf-8"))
        assert labels["i"] == sha1(raw)

        escaped = json.dumps({"n": 2, "a": text}, separators=(",", ":")).encode()
        assert b"\\u" in escaped
        labels = submit_labels(dispatcher, namespace, escaped)
        assert labels["s"] == sha1(text.encode("utf-8"))
        assert labels["i"] == sha1(json.dumps(
            {"n": 2, "a": text}, ensure_ascii=False,
            separators=(",", ":")).encode())

    def test_generate_fresh_cuid2_per_request(self, start_dispatcher,
                                              namespace):
        dispatcher = start_labels(start_dispatcher, namespace, "{c: cuid2}")
        ids = [submit_labels(dispatcher, namespace, b'{"n": %d}' % n)["c"]
               for n in range(3)]
        for value in ids:
            assert re.fullmatch(r"[a-z][0-9a-z]{23}", value), value
        assert len(set(ids)) == 3

    def test_refuse_filter_without_output(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(BAD_OUTPUT_FILTER, env={"NS": namespace})
        assert_error(post(dispatcher, b'{"case": "empty"}'), 400,
                     "The filter produced no output")
        assert namespace_containers(namespace) == []

    def test_refuse_output_that_is_not_an_object(self, start_dispatcher,
                                                 namespace):
        dispatcher = start_dispatcher(BAD_OUTPUT_FILTER, env={"NS": namespace})
        for case, kind in [("number", "a number"), ("array", "an array"),
                           ("string", "a string"), ("null", "null")]:
            reply = post(dispatcher, b'{"case": "%s"}' % case.encode())
            assert_error(reply, 400,
                         f"The filter's output must be an object, not {kind}")
        assert namespace_containers(namespace) == []

    def test_refuse_output_without_string_name(self, start_dispatcher,
                                               namespace):
        dispatcher = start_dispatcher(BAD_OUTPUT_FILTER, env={"NS": namespace})
        for case in ("no-name", "number-name", "null-name"):
            reply = post(dispatcher, b'{"case": "%s"}' % case.encode())
            assert_error(reply, 400, "The filter's output needs a string Name")
        assert namespace_containers(namespace) == []

    def test_refuse_invalid_name(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(BAD_OUTPUT_FILTER, env={"NS": namespace})
        for name in ("a", "-x", "a/b", "", ".x", "a b", "é1"):
            body = json.dumps({"case": "name", "name": name}).encode()
            assert_error(
                post(dispatcher, body), 400,
                f"The filter's Name {name!r} is not a valid container name "
                "(letters, digits, '_', '.', '-'; at least two characters)")
        assert namespace_containers(namespace) == []

    def test_refuse_filter_that_fails(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(BAD_OUTPUT_FILTER, env={"NS": namespace})
        assert_error(post(dispatcher, b'{"case": "error"}'), 400,
                     "The filter failed: custom failure")
        message = assert_error(post(dispatcher, b"[1]"), 400)
        assert message.startswith("The filter failed: Cannot index array"), message

    def test_use_first_of_several_outputs_with_warning(self, start_dispatcher,
                                                       namespace):
        dispatcher = start_dispatcher(BAD_OUTPUT_FILTER, env={"NS": namespace})
        reply = post(dispatcher, b'{"case": "two"}')
        assert reply.status == 201, reply
        assert reply.json == {"id": namespace + "-first"}
        assert inspect(namespace + "-first") is not None
        assert inspect(namespace + "-second") is None
        wait_for_log(
            dispatcher,
            "WARNING Filter produced more than one output; using the first")
        assert post(dispatcher, b'{"case": "ok"}').status == 201


# --- The manifest ---------------------------------------------------------------

MANIFEST_FILTER = job_filter(".labels") + (
    ' + (if has("platform") then {Platform: .platform} else {} end)')


def host_platform(image: str) -> str:
    """Return the platform of the test image, as os/architecture."""
    status, info = docker("GET", f"/images/{image}/json")
    assert status == 200, info
    return f"{info['Os']}/{info['Architecture']}"


class TestManifest:
    def test_send_platform_in_create_query(self, start_dispatcher, namespace,
                                           image):
        dispatcher = start_dispatcher("-m", "0", MANIFEST_FILTER,
                                      env={"NS": namespace})
        body = {"n": 1, "platform": host_platform(image)}
        reply = dispatcher.submit(body)
        assert reply.status == 201, reply
        assert inspect(job_name(namespace, 1)) is not None

        if not on_podman():  # Podman ignores a platform it does not know
            reply = dispatcher.submit({"n": 2, "platform": "nope"})
            message = assert_error(reply, 400)
            assert message.startswith("Docker refused the job: "), message
            assert '"nope": unknown operating system or architecture' in message
            assert inspect(job_name(namespace, 2)) is None

        for platform in (5, "linux amd64", "linux/amd64/v8/x", ""):
            reply = dispatcher.submit({"n": 3, "platform": platform})
            assert_error(reply, 400,
                         "The filter's Platform must be a string like linux/amd64")
        assert inspect(job_name(namespace, 3)) is None

    def test_put_namespace_label_over_filter_labels(self, start_dispatcher,
                                                    namespace):
        dispatcher = start_dispatcher("-m", "0", MANIFEST_FILTER,
                                      env={"NS": namespace})
        labels = {"team": "a", NAMESPACE_LABEL: "elsewhere"}
        reply = dispatcher.submit({"n": 1, "labels": labels})
        assert reply.status == 201, reply
        assert labels_of(job_name(namespace, 1)) == {
            "team": "a", NAMESPACE_LABEL: namespace, RESTART_LABEL: "no"}
        reply = dispatcher.request("GET", f"/job/{job_name(namespace, 1)}")
        assert reply.status == 200, reply

    def test_refuse_labels_that_are_not_strings(self, start_dispatcher,
                                                namespace):
        dispatcher = start_dispatcher("-m", "0", MANIFEST_FILTER,
                                      env={"NS": namespace})
        for labels in ({"a": 1}, ["a"], "a=b"):
            reply = dispatcher.submit({"n": 1, "labels": labels})
            assert_error(reply, 400,
                         "The filter's Labels must be an object of strings")
        assert namespace_containers(namespace) == []


# --- The default filter ---------------------------------------------------------


class TestDefaultFilter:
    def test_build_job_from_settings(self, start_dispatcher, namespace, image):
        dispatcher = start_dispatcher(env={
            "JOB_NAME_PREFIX": namespace + "-",
            "JOB_COMMAND": "echo",
            "JOB_TTL": "30",
            "JOB_ENV_FOO": "bar",
            "JOB_ENV_TWO_WORDS": "a b=c",
            "JOB_NETWORK": "none",
            "JOB_RETRIES": "4",
        })
        reply = dispatcher.submit({"id": "one", "args": ["hello", "world"]})
        assert reply.status == 201, reply
        name = namespace + "-one"
        assert reply.json == {"id": name}

        info = wait_for(lambda: exited(name), message=f"{name} to exit")
        config, host = info["Config"], info["HostConfig"]
        assert config["Image"] in (image, "docker.io/library/" + image)  # Podman
        assert config["Entrypoint"] == ["timeout", "30", "echo"]
        assert config["Cmd"] == ["hello", "world"]
        assert "FOO=bar" in config["Env"]
        assert "TWO_WORDS=a b=c" in config["Env"]
        assert not [e for e in config["Env"] if e.startswith("JOB_")]
        assert config["Labels"] == {
            NAMESPACE_LABEL: namespace, RESTART_LABEL: "on-failure"}
        assert host["NetworkMode"] == "none"
        assert host["RestartPolicy"] == {"Name": "on-failure",
                                         "MaximumRetryCount": 4}
        assert host["LogConfig"]["Type"] == "json-file"
        if not on_podman():  # Podman applies the size but does not show it
            assert host["LogConfig"]["Config"] == {"max-size": "10m", "max-file": "1"}
        assert info["State"]["ExitCode"] == 0
        status, output = docker("GET", f"/containers/{name}/logs",
                                query={"stdout": 1, "stderr": 1})
        assert status == 200
        assert "hello world\n" in output

    def test_use_defaults_without_settings(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher("-m", "0")
        reply = dispatcher.submit({"id": namespace, "args": ["x"]})
        assert reply.status == 201, reply
        name = "demo-job-" + namespace
        assert reply.json == {"id": name}
        info = inspect(name)
        assert info["Config"]["Entrypoint"] == ["echo"]
        assert info["Config"]["Cmd"] == ["x"]
        assert info["HostConfig"]["NetworkMode"] != "none"
        assert info["HostConfig"]["RestartPolicy"] == {
            "Name": "on-failure", "MaximumRetryCount": 2}
        assert info["HostConfig"]["LogConfig"]["Type"] == "json-file"
        if not on_podman():
            assert info["HostConfig"]["LogConfig"]["Config"] == {
                "max-size": "10m", "max-file": "1"}

    @pytest.mark.parametrize("ttl, entrypoint", [
        ("1.5m", ["timeout", "1.5m", "echo"]),
        ("soon", ["echo"]),
        ("", ["echo"]),
    ])
    def test_wrap_command_in_timeout_only_for_numeric_ttl(
            self, start_dispatcher, namespace, ttl, entrypoint):
        dispatcher = start_dispatcher(
            "-m", "0", env={"JOB_NAME_PREFIX": namespace + "-", "JOB_TTL": ttl})
        reply = dispatcher.submit({"id": "t", "args": []})
        assert reply.status == 201, reply
        assert inspect(namespace + "-t")["Config"]["Entrypoint"] == entrypoint

    def test_name_job_after_id_or_body_digest(self, start_dispatcher,
                                              namespace):
        dispatcher = start_dispatcher(
            "-m", "0", env={"JOB_NAME_PREFIX": namespace + "-"})
        reply = dispatcher.submit({"id": 42, "args": []})
        assert reply.status == 201, reply
        assert reply.json == {"id": namespace + "-42"}

        compact = b'{"args":["x","y"],"tag":"t"}'
        name = namespace + "-" + sha1(compact)
        reply = post(dispatcher, b'{"args": ["x", "y"],\n  "tag": "t"}')
        assert reply.status == 201, reply
        assert reply.json == {"id": name}
        assert inspect(name)["Config"]["Cmd"] == ["x", "y"]
        reply = post(dispatcher, compact)
        assert reply.status == 200, reply
        assert reply.json == {"id": name}


# --- Transports -----------------------------------------------------------------


def make_tls_files(root) -> None:
    """Make two CAs, a server and a client certificate with openssl."""
    def openssl(*args: str) -> None:
        result = subprocess.run(["openssl", *args], cwd=root,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *key, "-keyout", f"{ca}-key.pem",
                "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=djd {ca}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    extensions = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                  "extendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, text in extensions.items():
        (root / f"{name}.ext").write_text(text)
        openssl("req", "-new", *key, "-keyout", f"{name}-key.pem",
                "-out", f"{name}.csr", "-subj", f"/CN=djd {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
                "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
                "-out", f"{name}-cert.pem", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """Return a directory with CAs and certificates made for this run."""
    root = tmp_path_factory.mktemp("tls")
    make_tls_files(root)
    return root


def docker_cert_path(tls_files, target, ca: str = "ca",
                     client: bool = True) -> str:
    """Fill a DOCKER_CERT_PATH directory; return its path."""
    target.mkdir()
    shutil.copy(tls_files / f"{ca}.pem", target / "ca.pem")
    if client:
        shutil.copy(tls_files / "client-cert.pem", target / "cert.pem")
        shutil.copy(tls_files / "client-key.pem", target / "key.pem")
    return str(target)


@pytest.fixture
def tls_proxy(tls_files):
    """Return a TLS proxy that insists on a client certificate of our CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files / "server-cert.pem",
                            tls_files / "server-key.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(tls_files / "ca.pem")
    instance = DockerProxy(tls_context=context)
    yield instance
    instance.close()


@pytest.fixture
def unix_proxy():
    """Return a proxy on a unix socket of its own, closed afterwards."""
    directory = tempfile.mkdtemp(prefix="djd-")
    instance = DockerProxy(unix_path=os.path.join(directory, "docker.sock"))
    yield instance
    instance.close()
    shutil.rmtree(directory, ignore_errors=True)


def check_job_goes_through(dispatcher: RunningDispatcher, namespace: str,
                           docker_proxy: DockerProxy) -> None:
    """Submit a job, see it exist, and see the proxy is the way to Docker."""
    assert dispatcher.request("GET", "/health/ready").status == 204
    reply = post(dispatcher, b'{"n": 1}')
    assert reply.status == 201, reply
    info = inspect(job_name(namespace, 1))
    assert info is not None
    assert info["Config"]["Labels"][NAMESPACE_LABEL] == namespace
    refuse_connections(docker_proxy)
    assert dispatcher.request("GET", "/health/ready").status == 503
    docker_proxy.set_mode("pass")


class TestTransports:
    def test_submit_through_socket_transport(self, start_dispatcher,
                                             namespace, unix_proxy):
        dispatcher = start_dispatcher(
            "-t", "socket", job_filter(),
            env={"NS": namespace, "DOCKER_HOST": unix_proxy.docker_host})
        assert f"Docker at {unix_proxy.docker_host}" in dispatcher.log
        check_job_goes_through(dispatcher, namespace, unix_proxy)

    def test_submit_through_http_transport(self, start_dispatcher, namespace,
                                           proxy):
        dispatcher = start_dispatcher(
            "-t", "http", job_filter(),
            env={"NS": namespace, "DOCKER_HOST": proxy.docker_host})
        assert f"Docker at http://127.0.0.1:{proxy.port}" in dispatcher.log
        check_job_goes_through(dispatcher, namespace, proxy)

    def test_take_transport_from_environment(self, start_dispatcher,
                                             namespace, proxy):
        dispatcher = start_dispatcher(job_filter(), env={
            "NS": namespace, "TRANSPORT": "http",
            "DOCKER_HOST": proxy.docker_host})
        check_job_goes_through(dispatcher, namespace, proxy)

    def test_submit_through_tls_transport(self, start_dispatcher, namespace,
                                          tls_proxy, tls_files, tmp_path):
        dispatcher = start_dispatcher("-t", "tls", job_filter(), env={
            "NS": namespace,
            "DOCKER_HOST": tls_proxy.docker_host,
            "DOCKER_CERT_PATH": docker_cert_path(tls_files, tmp_path / "certs"),
            "DOCKER_TLS_VERIFY": "1",
        })
        assert f"Docker at https://127.0.0.1:{tls_proxy.port}" in dispatcher.log
        check_job_goes_through(dispatcher, namespace, tls_proxy)

    @pytest.mark.parametrize("ca, client", [("other-ca", True), ("ca", False)],
                             ids=["unknown-daemon-ca", "no-client-cert"])
    def test_refuse_tls_peer_that_fails_verification(
            self, start_dispatcher, namespace, tls_proxy, tls_files, tmp_path,
            ca, client):
        dispatcher = start_dispatcher("-t", "tls", job_filter(), env={
            "NS": namespace,
            "DOCKER_HOST": tls_proxy.docker_host,
            "DOCKER_CERT_PATH": docker_cert_path(
                tls_files, tmp_path / "certs", ca=ca, client=client),
            "DOCKER_TLS_VERIFY": "1",
        })
        assert_error(dispatcher.request("GET", "/health/ready"), 503)
        assert_error(post(dispatcher, b'{"n": 1}'), 502)
        assert namespace_containers(namespace) == []


# --- Daemon down ----------------------------------------------------------------


def timed(function, *args, **kwargs):
    """Return what ``function`` returns and the seconds it took."""
    started = time.monotonic()
    result = function(*args, **kwargs)
    return result, time.monotonic() - started


class TestDaemonDown:
    @pytest.fixture
    def dispatcher(self, start_dispatcher, namespace, proxy):
        return start_dispatcher(
            "-t", "http", job_filter(),
            env={"NS": namespace, "DOCKER_HOST": proxy.docker_host})

    def test_answer_502_and_503_while_daemon_refuses(self, dispatcher,
                                                     namespace, proxy):
        assert post(dispatcher, b'{"n": 1}').status == 201
        refuse_connections(proxy)

        for method, path, raw, status in [
                ("POST", "/job", b'{"n": 2}', 502),
                ("GET", f"/job/{job_name(namespace, 1)}", None, 502),
                ("GET", "/health/ready", None, 503)]:
            reply, elapsed = timed(dispatcher.request, method, path, raw=raw,
                                   timeout=10)
            message = assert_error(reply, status)
            assert message.startswith("Docker is unavailable: "), message
            assert elapsed < 5, (path, elapsed)
        assert dispatcher.request("GET", "/health/live").status == 204
        assert inspect(job_name(namespace, 2)) is None

    def test_answer_503_promptly_while_daemon_hangs(self, dispatcher, proxy):
        assert dispatcher.request("GET", "/health/ready").status == 204
        proxy.set_mode("hang")
        # Pooled connections cut by the mode change may fail first, and
        # fast; every try answers promptly, and one meets the hang.
        timeout_message = "Docker is unavailable: Docker did not answer within 3 s"
        messages = []
        while timeout_message not in messages and len(messages) < 3:
            reply, elapsed = timed(dispatcher.request, "GET", "/health/ready",
                                   timeout=10)
            messages.append(assert_error(reply, 503))
            assert elapsed < 6, elapsed
        assert messages[-1] == timeout_message, messages
        assert dispatcher.request("GET", "/health/live").status == 204

        proxy.set_mode("pass")
        assert dispatcher.request("GET", "/health/ready").status == 204

    def test_answer_at_once_after_daemon_restart(self, start_dispatcher,
                                                 namespace, proxy):
        dispatcher = start_dispatcher(
            "-t", "http", "-m", "0", job_filter(),
            env={"NS": namespace, "DOCKER_HOST": proxy.docker_host})
        bodies = [b'{"n": %d}' % n for n in range(8)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda body: post(dispatcher, body), bodies))
        assert [reply.status for reply in replies] == [201] * len(bodies)

        proxy.drop()
        assert dispatcher.request("GET", "/health/ready").status == 204
        reply = dispatcher.request("GET", f"/job/{job_name(namespace, 1)}")
        assert reply.status == 200, reply
        reply = post(dispatcher, b'{"n": 9}')
        assert reply.status == 201, reply

    def test_work_again_once_daemon_is_back(self, dispatcher, namespace,
                                            proxy):
        refuse_connections(proxy)
        assert_error(post(dispatcher, b'{"n": 1}'), 502)
        assert_error(dispatcher.request("GET", "/health/ready"), 503)

        proxy.set_mode("pass")
        assert dispatcher.request("GET", "/health/ready").status == 204
        reply = post(dispatcher, b'{"n": 1}')
        assert reply.status == 201, reply
        name = job_name(namespace, 1)
        wait_for(lambda: exited(name), message=f"{name} to exit")
        reply = dispatcher.request("GET", f"/job/{name}")
        assert reply.status == 200, reply
        assert reply.json["exit_code"] == 0
        assert dispatcher.process.poll() is None
        assert dispatcher.log.count("Listening on") == 1


# --- Logging --------------------------------------------------------------------

BAD_REQUESTS = [
    (b"POST /job HTTP/1.1\r\nContent-Length: 2\r\n\r\n{x", 400),
    (b"POST /job HTTP/1.1\r\nContent-Length: 2\r\n\r\n\xff\xfe", 400),
    (b"POST /job HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /job HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /job HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
     413),
    (b"POST /job HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /job HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST /job HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX",
     400),
    (b"POST /job HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n", 400),
    (b"POST /job HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", 400),
    (b'POST /job HTTP/1.1\r\nContent-Length: 3\r\n\r\n"s"', 400),
    (b"POST /job HTTP/1.1\r\nContent-Length: 9\r\n\r\n" + b"[" * 9, 400),
    (b'POST /job HTTP/1.1\r\nContent-Length: 12\r\n\r\n{"n": "a/b"}', 400),
    (b"GET /job/%00 HTTP/1.1\r\n\r\n", 404),
    (b"GET /job/" + b"x" * 300 + b" HTTP/1.1\r\n\r\n", 404),
    (b"PUT /job HTTP/1.1\r\n\r\n", 405),
    (b"BLAH /job HTTP/1.1\r\n\r\n", 501),
]


class TestLogging:
    def test_log_creation_and_start(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(job_filter(), env={"NS": namespace})
        assert post(dispatcher, b'{"n": 1}').status == 201
        name = job_name(namespace, 1)
        wait_for_log(dispatcher, f"INFO Created job {name!r}\n")
        wait_for_log(dispatcher, f"INFO Started job {name!r}\n")

    def test_log_existing_job_on_resubmission(self, jobs, namespace):
        assert post(jobs, b'{"n": 1}').status == 201
        assert post(jobs, b'{"n": 1}').status == 200
        wait_for_log(jobs, f"INFO Found existing job {job_name(namespace, 1)!r}\n")

    def test_log_no_traceback_after_bad_inputs(self, jobs, namespace):
        for request, status in BAD_REQUESTS:
            head, _, rest = request.partition(b"\r\n")
            data = head + b"\r\nHost: x\r\nConnection: close\r\n" + rest
            reply = raw_request(jobs.port, data, half_close=True)
            assert reply.status == status, (request[:60], reply)
            assert reply.json["error"]["code"] == status
        deep = b"[" * 200000 + b"]" * 200000
        assert_error(post(jobs, deep), 400)
        assert_error(post(jobs, b'{"n": 1, "image": "no-such-image:nope"}'), 400)
        garbage = raw_exchange(jobs.port, b"GARBAGE\r\n\r\n")
        assert b'"code": 400' in garbage, garbage

        assert jobs.request("GET", "/health/live").status == 204
        assert jobs.process.poll() is None
        assert namespace_containers(namespace) == []
        log = jobs.log
        assert "Traceback" not in log, log
        assert " with 500 " not in log, log


# --- Python 3.9 --------------------------------------------------------------------

VERMIN = ("import sys; from vermin import main; sys.argv[0] = 'vermin'; "
          "sys.exit(main())")


def run_vermin(path) -> subprocess.CompletedProcess:
    """Run vermin on ``path``, targeting Python 3.9 and older."""
    return subprocess.run(
        [sys.executable, "-c", VERMIN, "-t=3.9-", "--violations", "--no-tips",
         str(path)],
        capture_output=True, text=True, timeout=120,
    )


class TestPython39:
    def test_pass_vermin_for_python_3_9(self):
        import vermin  # noqa: F401

        result = run_vermin(DISPATCHER)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_flag_code_that_needs_newer_python(self, tmp_path):
        newer = tmp_path / "newer.py"
        newer.write_text("import tomllib\n\nprint(tomllib.loads(''))\n")
        result = run_vermin(newer)
        assert result.returncode != 0, result.stdout
        assert "tomllib" in result.stdout


# === Upkeep: concurrency control, cleaning, resilience =====================


UPKEEP_JOB_FILTER = '{Name: .name, Image: $ENV.JOB_IMAGE, Cmd: ["sh", "-c", .cmd]}'
POISON_FILTER = (
    UPKEEP_JOB_FILTER
    + ' + (if .poison then {Entrypoint: ["/no/such/binary"]} else {} end)'
)


# --- Helpers ---------------------------------------------------------------


def job(name: str, cmd: str, **extra) -> dict:
    """Return a request body for UPKEEP_JOB_FILTER."""
    return {"name": name, "cmd": cmd, **extra}


def docker_time(text: str | None) -> float | None:
    """Return a Docker RFC 3339 time as Unix seconds; None if never set."""
    if not text or text.startswith("0001-01-01"):
        return None
    match = re.match(
        r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text
    )
    assert match, f"unexpected Docker time {text!r}"
    whole, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    moment = datetime.fromisoformat(whole + zone).timestamp()
    return moment + float("0." + (fraction or "0"))


def state(name: str) -> dict | None:
    """Return the State of a container, or None when it does not exist."""
    info = inspect(name)
    return None if info is None else info["State"]


def status_of(name: str) -> str | None:
    """Return a container's Docker status word, or None if it is gone."""
    return (state(name) or {}).get("Status")


def wait_exited(name: str, timeout: float = 30) -> dict:
    """Wait until a container has exited; return its inspect reply."""

    def exited():
        info = inspect(name)
        if info is not None and info["State"]["Status"] == "exited":
            return info
        return None

    return wait_for(exited, timeout, message=f"job {name!r} to exit")


def wait_status(name: str, status: str, timeout: float = 30) -> dict:
    """Wait until a container has Docker status ``status``; return State."""

    def reached():
        current = state(name)
        return current if (current or {}).get("Status") == status else None

    return wait_for(reached, timeout, message=f"job {name!r} to be {status}")


def run_interval(info: dict) -> tuple[float, float]:
    """Return a finished container's (StartedAt, FinishedAt) in seconds."""
    started = docker_time(info["State"]["StartedAt"])
    finished = docker_time(info["State"]["FinishedAt"])
    assert started is not None, f"{info['Name']} never started"
    assert finished is not None, f"{info['Name']} never finished"
    return started, finished


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Return the largest number of intervals that overlap at one moment."""
    edges = sorted(
        [(start, 1) for start, _ in intervals]
        + [(end, -1) for _, end in intervals]
    )
    current = peak = 0
    for _, delta in edges:
        current += delta
        peak = max(peak, current)
    return peak


def running_jobs(namespace: str) -> list[str]:
    """Return the names of the namespace's containers running right now.

    The list may still show a container that has just died as running;
    each listed one is confirmed by inspecting it.
    """
    names = []
    for container in namespace_containers(namespace, ["running"]):
        info = inspect(container["Id"])
        if info is not None and info["State"]["Running"]:
            names.append(info["Name"].lstrip("/"))
    return names


def container_output(name: str) -> str:
    """Return everything a container wrote, over all its runs."""
    status, output = docker(
        "GET", f"/containers/{name}/logs", query={"stdout": 1, "stderr": 1}
    )
    assert status == 200, output
    return output if isinstance(output, str) else json.dumps(output)


def let_time_pass(dispatcher: RunningDispatcher, seconds: float) -> None:
    """Give the upkeep loop ``seconds`` to act; fail if the process dies."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert dispatcher.process.poll() is None, (
            f"dispatcher exited:\n{dispatcher.log}"
        )
        time.sleep(0.1)


def wait_logged(dispatcher: RunningDispatcher, predicate, timeout: float,
                message: str):
    """Like wait_for, with the dispatcher's log in the failure message."""
    try:
        return wait_for(predicate, timeout, message=message)
    except AssertionError as error:
        raise AssertionError(f"{error}; log:\n{dispatcher.log}") from None


def log_lines(dispatcher: RunningDispatcher, text: str) -> list[str]:
    """Return the dispatcher's log lines that contain ``text``."""
    return [line for line in dispatcher.log.splitlines() if text in line]


def warnings_about(dispatcher: RunningDispatcher, text: str) -> list[str]:
    """Return the dispatcher's warning lines that contain ``text``."""
    return [line for line in log_lines(dispatcher, text) if line.startswith("WARN")]


def submit_concurrently(dispatcher: RunningDispatcher, bodies: list[dict]):
    """Send all submissions at once from threads; return the replies."""
    barrier = threading.Barrier(len(bodies))
    replies: list = [None] * len(bodies)

    def send(index: int, body: dict) -> None:
        barrier.wait()
        try:
            replies[index] = dispatcher.submit(body)
        except OSError as error:
            replies[index] = error

    threads = [
        threading.Thread(target=send, args=(index, body))
        for index, body in enumerate(bodies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return replies


def create_container(name: str, labels: dict, cmd: list[str], image: str) -> str:
    """Create and start a container outside the dispatcher; return its id."""
    status, reply = docker(
        "POST", "/containers/create", query={"name": name},
        body={"Image": image, "Cmd": cmd, "Labels": labels},
    )
    assert status == 201, reply
    status, reply = docker("POST", f"/containers/{reply['Id']}/start")
    assert status == 204, reply
    return name




def answers_requests(port: int) -> bool:
    """Return whether a new connection gets an answer to a health check."""
    try:
        probe = socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return False
    try:
        probe.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return probe.recv(64).startswith(b"HTTP/1.1 204")
    except OSError:
        return False
    finally:
        probe.close()


def refuses_connections(port: int) -> bool:
    """Return whether nothing listens on ``port`` any more."""
    try:
        probe = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    probe.close()
    return False


def remove_container(name: str) -> None:
    docker("DELETE", f"/containers/{name}", query={"force": 1})


# --- Concurrency limit -----------------------------------------------------


class TestConcurrencyLimit:
    def test_burst_never_exceeds_limit(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher("-m", "2", "-u", "1", UPKEEP_JOB_FILTER)
        names = [f"{namespace}-burst-{index}" for index in range(8)]
        replies = []
        sender = threading.Thread(target=lambda: replies.extend(
            submit_concurrently(dispatcher, [job(n, "sleep 1") for n in names])
        ))
        sender.start()

        peak = samples = 0
        deadline = time.monotonic() + 90
        while True:
            running = running_jobs(namespace)
            assert len(running) <= 2, f"more than 2 jobs running: {running}"
            peak = max(peak, len(running))
            samples += 1
            exited = namespace_containers(namespace, ["exited"])
            if len(exited) == len(names):
                break
            assert time.monotonic() < deadline, (
                f"the burst did not drain:\n{dispatcher.log}"
            )
            time.sleep(0.02)
        sender.join(30)

        assert [getattr(reply, "status", reply) for reply in replies] == [201] * 8
        assert samples > 10
        assert peak >= 1
        infos = [inspect(name) for name in names]
        for info in infos:
            assert info["State"]["ExitCode"] == 0, info["State"]
            assert docker_time(info["State"]["StartedAt"]) is not None
            assert info["RestartCount"] == 0
        assert max_overlap([run_interval(info) for info in infos]) == 2

    def test_pending_jobs_start_in_submission_order(
        self, start_dispatcher, namespace
    ):
        dispatcher = start_dispatcher("-m", "1", "-u", "1", UPKEEP_JOB_FILTER)
        first = f"{namespace}-order-first"
        assert dispatcher.submit(job(first, "sleep 2")).status == 201
        wait_status(first, "running", timeout=15)

        # Names in an order of their own, so that sorting by name or id
        # cannot pass for sorting by creation.
        names = [f"{namespace}-order-{tag}" for tag in "dbeac"]
        for name in names:
            reply = dispatcher.submit(job(name, "true"))
            assert reply.status == 201, reply
            assert status_of(name) == "created"

        infos = [wait_exited(name) for name in [first, *names]]
        started = [docker_time(info["State"]["StartedAt"]) for info in infos]
        assert started == sorted(started), [
            (info["Name"], info["State"]["StartedAt"]) for info in infos
        ]
        assert max_overlap([run_interval(info) for info in infos]) == 1


class TestNoStartLimit:
    def test_zero_limit_never_starts_jobs(self, start_dispatcher, namespace):
        dispatcher = start_dispatcher("-m", "0", "-u", "1", UPKEEP_JOB_FILTER)
        warnings = warnings_about(dispatcher, "max-concurrent is 0")
        assert len(warnings) == 1, dispatcher.log

        name = f"{namespace}-never"
        reply = dispatcher.submit(job(name, "true"))
        assert reply.status == 201, reply
        let_time_pass(dispatcher, 2.5)

        current = state(name)
        assert current["Status"] == "created", current
        assert docker_time(current["StartedAt"]) is None
        reply = dispatcher.request("GET", f"/job/{name}")
        assert reply.status == 200, reply
        assert reply.json["status"] == "Created"
        assert not log_lines(dispatcher, "Started job")


# --- Starting without waiting for a tick -----------------------------------


class TestFastPath:
    def test_submission_starts_without_waiting_for_tick(
        self, start_dispatcher, namespace
    ):
        dispatcher = start_dispatcher("-m", "2", "-u", "30", UPKEEP_JOB_FILTER)
        names = [f"{namespace}-fast-{index}" for index in range(2)]
        for name in names:
            submitted = time.time()
            assert dispatcher.submit(job(name, "sleep 3")).status == 201
            current = wait_logged(
                dispatcher,
                lambda: status_of(name) == "running" and state(name),
                timeout=10, message=f"{name} to run",
            )
            started = docker_time(current["StartedAt"])
            assert started - submitted < 5, (
                f"{name} started {started - submitted:.1f} s after submission"
                f":\n{dispatcher.log}"
            )

    def test_freed_slot_filled_without_waiting_for_tick(
        self, start_dispatcher, namespace
    ):
        dispatcher = start_dispatcher("-m", "1", "-u", "30", UPKEEP_JOB_FILTER)
        first, second = f"{namespace}-slot-1", f"{namespace}-slot-2"
        assert dispatcher.submit(job(first, "sleep 1")).status == 201
        assert dispatcher.submit(job(second, "true")).status == 201

        first_info = wait_exited(first, timeout=15)
        second_info = wait_exited(second, timeout=15)
        first_started, first_finished = run_interval(first_info)
        second_started, _ = run_interval(second_info)
        assert first_started < second_started
        assert second_started >= first_finished
        assert second_started - first_finished < 5, (
            f"the freed slot stayed empty for "
            f"{second_started - first_finished:.1f} s:\n{dispatcher.log}"
        )


# --- Jobs that Docker refuses to start -------------------------------------


class TestPoisonJobs:
    def test_refused_start_does_not_block_queue(
        self, start_dispatcher, namespace
    ):
        dispatcher = start_dispatcher("-m", "1", "-u", "1", POISON_FILTER)
        poison = f"{namespace}-poison"
        good = [f"{namespace}-good-{index}" for index in range(2)]
        reply = dispatcher.submit(job(poison, "true", poison=True))
        assert reply.status == 201, reply
        for name in good:
            assert dispatcher.submit(job(name, "echo fine")).status == 201

        for name in good:
            info = wait_exited(name, timeout=20)
            assert info["State"]["ExitCode"] == 0
        let_time_pass(dispatcher, 3)

        failures = log_lines(dispatcher, f"Failed to start job '{poison}'")
        assert len(failures) == 1, dispatcher.log
        reply = dispatcher.request("GET", f"/job/{poison}")
        assert reply.status == 200, reply
        assert reply.json["state"] == "failed", reply.json
        assert reply.json["error"], reply.json
        assert status_of(poison) == "created"
        assert dispatcher.process.poll() is None
        assert dispatcher.request("GET", "/health/live").status == 204


# --- Cleaning --------------------------------------------------------------


class TestCleaning:
    def test_exited_job_removed_after_keep_period(
        self, start_dispatcher, namespace, image
    ):
        other = f"{namespace}-other-ns"
        unlabelled = f"{namespace}-unlabelled"
        try:
            create_container(other, {NAMESPACE_LABEL: namespace + "-other"},
                             ["true"], image)
            create_container(unlabelled, {}, ["true"], image)
            wait_exited(other)
            wait_exited(unlabelled)

            dispatcher = start_dispatcher("-k", "2", "-u", "1", UPKEEP_JOB_FILTER)
            long_job, short_job = f"{namespace}-long", f"{namespace}-short"
            assert dispatcher.submit(job(long_job, "sleep 30")).status == 201
            assert dispatcher.submit(job(short_job, "true")).status == 201
            finished = docker_time(
                wait_exited(short_job)["State"]["FinishedAt"]
            )

            wait_for(lambda: inspect(short_job) is None, timeout=15,
                     interval=0.02, message="the exited job to be removed")
            gone_at = time.time()
            assert gone_at - finished > 2, (
                f"removed {gone_at - finished:.2f} s after it finished"
            )
            assert gone_at - finished < 8, (
                f"removed only {gone_at - finished:.2f} s after it finished"
            )

            let_time_pass(dispatcher, 2.5)
            assert status_of(long_job) == "running", dispatcher.log
            assert status_of(other) == "exited", "another namespace's job"
            assert status_of(unlabelled) == "exited", "a container not a job"
        finally:
            remove_container(other)
            remove_container(unlabelled)

    def test_exited_jobs_kept_without_keep_option(
        self, start_dispatcher, namespace
    ):
        dispatcher = start_dispatcher("-m", "4", "-u", "1", UPKEEP_JOB_FILTER)
        warnings = warnings_about(dispatcher, "exited jobs are kept")
        assert len(warnings) == 1, dispatcher.log

        name = f"{namespace}-kept"
        assert dispatcher.submit(job(name, "true")).status == 201
        wait_exited(name, timeout=15)
        let_time_pass(dispatcher, 3)
        assert status_of(name) == "exited"
        assert len(namespace_containers(namespace)) == 1


# --- Losing the daemon -----------------------------------------------------


class TestDaemonOutage:
    def test_refused_connections_recover_quietly(
        self, start_dispatcher, namespace, proxy
    ):
        dispatcher = start_dispatcher(
            "-t", "http", "-m", "1", "-u", "1", UPKEEP_JOB_FILTER,
            env={"DOCKER_HOST": proxy.docker_host},
        )
        assert dispatcher.request("GET", "/health/ready").status == 204
        running, pending = f"{namespace}-before", f"{namespace}-pending"
        assert dispatcher.submit(job(running, "sleep 2")).status == 201
        assert dispatcher.submit(job(pending, "true")).status == 201
        wait_status(running, "running", timeout=15)

        refuse_connections(proxy)
        logged_before = len(dispatcher.log.splitlines())
        assert dispatcher.request("GET", "/health/ready").status == 503
        reply = dispatcher.submit(job(f"{namespace}-during", "true"))
        assert reply.status == 502, reply
        wait_for(lambda: log_lines(dispatcher, "Upkeep failed"), timeout=10,
                 message="the upkeep failure to be logged")
        let_time_pass(dispatcher, 6.5)
        assert dispatcher.request("GET", "/health/ready").status == 503
        assert status_of(pending) == "created"
        failures = log_lines(dispatcher, "Upkeep failed")
        assert 1 <= len(failures) <= 2, dispatcher.log
        during = dispatcher.log.splitlines()[logged_before:]
        complaints = [line for line in during if line.startswith(("ERROR", "WARN"))]
        assert len(complaints) <= 3, dispatcher.log

        proxy.set_mode("pass")
        wait_for(
            lambda: dispatcher.request("GET", "/health/ready").status == 204,
            timeout=10, message="readiness after the outage",
        )
        after = f"{namespace}-after"
        assert dispatcher.submit(job(after, "true")).status == 201
        for name in (pending, after):
            assert wait_exited(name, timeout=20)["State"]["ExitCode"] == 0
        wait_for(lambda: log_lines(dispatcher, "Upkeep recovered"), timeout=5,
                 message="the recovery to be logged")
        assert dispatcher.process.poll() is None

    def test_dropped_connections_keep_scheduling(
        self, start_dispatcher, namespace, proxy
    ):
        dispatcher = start_dispatcher(
            "-t", "http", "-m", "1", "-u", "30", UPKEEP_JOB_FILTER,
            env={"DOCKER_HOST": proxy.docker_host},
        )
        first, second = f"{namespace}-drop-1", f"{namespace}-drop-2"
        assert dispatcher.submit(job(first, "sleep 2")).status == 201
        assert dispatcher.submit(job(second, "true")).status == 201
        wait_status(first, "running", timeout=15)
        assert status_of(second) == "created"

        proxy.drop()
        first_info = wait_exited(first, timeout=15)
        second_info = wait_exited(second, timeout=15)
        _, first_finished = run_interval(first_info)
        second_started, _ = run_interval(second_info)
        assert 0 <= second_started - first_finished < 5, dispatcher.log

        third = f"{namespace}-drop-3"
        assert dispatcher.submit(job(third, "true")).status == 201
        assert wait_exited(third, timeout=10)["State"]["ExitCode"] == 0
        assert dispatcher.request("GET", "/health/ready").status == 204


# --- Restarts and signals --------------------------------------------------


class TestRestartSafety:
    def test_sigkill_restart_runs_each_job_once(
        self, start_dispatcher, namespace
    ):
        options = ("-m", "1", "-u", "1", UPKEEP_JOB_FILTER)
        dispatcher = start_dispatcher(*options)
        names = [f"{namespace}-restart-{index}" for index in range(3)]
        for name in names:
            reply = dispatcher.submit(job(name, "echo ran-once; sleep 1.5"))
            assert reply.status == 201, reply
        wait_for(lambda: running_jobs(namespace), timeout=15,
                 message="a job to run")
        assert dispatcher.stop(signal.SIGKILL) == -signal.SIGKILL
        assert namespace_containers(namespace, ["created"]), "none pending"
        successor = start_dispatcher(*options)

        infos = [wait_exited(name, timeout=30) for name in names]
        for info in infos:
            assert info["State"]["ExitCode"] == 0, info["State"]
            assert info["RestartCount"] == 0
            output = container_output(info["Name"].lstrip("/"))
            assert output.count("ran-once") == 1, output
        assert max_overlap([run_interval(info) for info in infos]) == 1
        containers = namespace_containers(namespace)
        assert sorted(c["Names"][0].lstrip("/") for c in containers) == names
        assert successor.process.poll() is None


class TestSignals:
    def test_sigterm_answers_request_in_flight(
        self, start_dispatcher, namespace
    ):
        dispatcher = start_dispatcher(UPKEEP_JOB_FILTER)
        name = f"{namespace}-in-flight"
        body = json.dumps(job(name, "true")).encode()
        head = (
            "POST /job HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: application/json\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        client = socket.create_connection(("127.0.0.1", dispatcher.port),
                                          timeout=30)
        try:
            reader = client.makefile("rb")
            client.sendall(head)
            # The interim answer means the request is being served.
            assert reader.readline().startswith(b"HTTP/1.1 100"), "no 100"
            assert reader.readline() == b"\r\n"

            dispatcher.process.send_signal(signal.SIGTERM)
            wait_logged(dispatcher,
                        lambda: log_lines(dispatcher, "Stopping on SIGTERM"),
                        timeout=10, message="the stop to be logged")
            # Once new requests go unanswered the server loop has ended; a
            # stop that did not wait for requests in flight would exit
            # within the second given here, before the body arrives.
            wait_logged(dispatcher,
                        lambda: not answers_requests(dispatcher.port),
                        timeout=10, message="the server loop to end")
            time.sleep(1)

            client.sendall(body)
            status_line = reader.readline()
            assert status_line.startswith(b"HTTP/1.1 201"), (
                f"{status_line!r}\n{dispatcher.log}"
            )
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(reader.read(length)) == {"id": name}
        finally:
            client.close()
        assert dispatcher.process.wait(15) == 0
        assert log_lines(dispatcher, "Stopped")
        assert inspect(name) is not None

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    def test_signal_stops_promptly_with_idle_connection(
        self, start_dispatcher, signum
    ):
        dispatcher = start_dispatcher("-m", "1", "-u", "1", UPKEEP_JOB_FILTER)
        idle = http.client.HTTPConnection("127.0.0.1", dispatcher.port,
                                          timeout=30)
        try:
            idle.request("GET", "/health/live")
            response = idle.getresponse()
            response.read()
            assert response.status == 204
            stopped = time.monotonic()
            dispatcher.process.send_signal(signum)
            assert dispatcher.process.wait(10) == 0, dispatcher.log
            assert time.monotonic() - stopped < 5
        finally:
            idle.close()
        name = signal.Signals(signum).name
        assert log_lines(dispatcher, f"Stopping on {name}"), dispatcher.log
        assert log_lines(dispatcher, "Stopped"), dispatcher.log


# === Watching and steering jobs: metrics, API description, logs, ... ========


FILTER = '{Name: .name, Image: $ENV.JOB_IMAGE, Cmd: ["sh", "-c", .cmd]}'
FILTER_WITH_ENTRYPOINT = (
    '{Name: .name, Image: $ENV.JOB_IMAGE, Cmd: ["sh", "-c", .cmd]}'
    " + if .entrypoint then {Entrypoint: .entrypoint} else {} end"
)
FILTER_WITH_PATH = (
    '{Name: .name, Image: $ENV.JOB_IMAGE, Cmd: ["sh", "-c", .cmd],'
    " Labels: {path: $PATH}}"
)

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
OPENMETRICS_ACCEPT = {"Accept": "application/openmetrics-text; version=1.0.0"}
TEXT_TYPE = "text/plain; charset=utf-8"
ZERO_TIME = "0001-01-01T00:00:00Z"
RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)"


# --- Helpers ------------------------------------------------------------------


def unique_name(tag: str) -> str:
    """Return a container name no other test or run uses."""
    return f"{tag}-{RUN_ID}-{uuid.uuid4().hex[:6]}"


def submit_job(dispatcher, cmd: str, tag: str = "job", status: int = 201,
               **fields) -> str:
    """Submit a job running ``cmd`` with sh; return its name."""
    name = unique_name(tag)
    reply = dispatcher.submit({"name": name, "cmd": cmd, **fields})
    assert reply.status == status, reply
    if status in (200, 201):
        assert reply.json == {"id": name}
    return name


def docker_state(name: str) -> str | None:
    """Return Docker's state word for a container, None if absent."""
    info = inspect(name)
    return info["State"]["Status"] if info else None


def wait_state(name: str, state: str, timeout: float = 20) -> None:
    """Wait until Docker reports ``state`` for a container."""
    wait_for(lambda: docker_state(name) == state, timeout,
             message=f"{name} to be {state}")


def settle(probe, expected, timeout: float = 15):
    """Poll ``probe`` until it returns ``expected``; assert on the last value."""
    seen = []

    def matches():
        seen.append(probe())
        return seen[-1] == expected

    try:
        wait_for(matches, timeout, interval=0.1, message=repr(expected))
    except AssertionError:
        pass
    assert seen[-1] == expected
    return seen[-1]


def check_error(reply, status: int) -> None:
    """Assert that a reply is the JSON error shape with ``status``."""
    assert reply.status == status, reply
    assert reply.headers["Content-Type"].startswith("application/json"), reply
    body = reply.json
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def timed_request(dispatcher, method: str, path: str, **kwargs):
    """Send a request; return the reply and the seconds it took."""
    started = time.monotonic()
    reply = dispatcher.request(method, path, **kwargs)
    return reply, time.monotonic() - started


def scrape(dispatcher, openmetrics: bool = False):
    """Fetch /metrics and parse it with prometheus_client's own parser."""
    headers = OPENMETRICS_ACCEPT if openmetrics else {}
    reply = dispatcher.request("GET", "/metrics", headers=headers)
    assert reply.status == 200, reply
    text = reply.body.decode("utf-8")
    if openmetrics:
        assert reply.headers["Content-Type"] == OPENMETRICS_TYPE
        assert text.endswith("# EOF\n")
        return list(openmetrics_parser.text_string_to_metric_families(text))
    assert reply.headers["Content-Type"] == PROMETHEUS_TYPE
    assert "# EOF" not in text
    return list(prometheus_parser.text_string_to_metric_families(text))


def samples(families, name: str) -> list:
    """Return the samples called ``name`` across all families."""
    return [sample for family in families for sample in family.samples
            if sample.name == name]


def job_counts(dispatcher, namespace: str, openmetrics: bool = False) -> dict:
    """Return jobs_total as {(action, status): value}."""
    counts = {}
    for sample in samples(scrape(dispatcher, openmetrics), "jobs_total"):
        assert sample.labels["namespace"] == namespace, sample
        counts[(sample.labels["action"], sample.labels["status"])] = sample.value
    return counts


def gauges(dispatcher, namespace: str, openmetrics: bool = False) -> dict:
    """Return the jobs_running and jobs_pending gauges."""
    families = scrape(dispatcher, openmetrics)
    values = {}
    for name in ("jobs_running", "jobs_pending"):
        found = samples(families, name)
        assert [sample.labels for sample in found] == [{"namespace": namespace}]
        values[name] = found[0].value
    return values


def request_count(dispatcher, route: str, method: str, code: str) -> float:
    """Return one sample of http_requests_total, 0 when absent."""
    for sample in samples(scrape(dispatcher), "http_requests_total"):
        if sample.labels == {"route": route, "method": method, "code": code}:
            return sample.value
    return 0


def create_labelled_container(name: str, labels: dict, cmd: list[str], image: str,
                     start: bool = False) -> str:
    """Create (and maybe start) a container straight through Docker."""
    status, reply = docker("POST", "/containers/create", query={"name": name},
                           body={"Image": image, "Cmd": cmd, "Labels": labels})
    assert status == 201, reply
    if start:
        status, reply = docker("POST", f"/containers/{reply['Id']}/start")
        assert status == 204, reply
    return name


def open_stream(dispatcher, path: str):
    """Send a GET; return the connection and the response, body unread."""
    connection = http.client.HTTPConnection("127.0.0.1", dispatcher.port,
                                            timeout=20)
    connection.request("GET", path)
    return connection, connection.getresponse()


# --- Metrics ------------------------------------------------------------------


class TestMetrics:
    def test_jobs_total_counts_create_start_and_die_with_status(
            self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(FILTER)
        settle(lambda: job_counts(dispatcher, namespace), {})
        for cmd in ("exit 0", "exit 3"):
            wait_state(submit_job(dispatcher, cmd), "exited")
        expected = {("create", ""): 2, ("start", ""): 2,
                    ("die", "0"): 1, ("die", "3"): 1}
        settle(lambda: job_counts(dispatcher, namespace), expected)
        settle(lambda: job_counts(dispatcher, namespace, True), expected)

    def test_jobs_total_survives_a_lost_event_stream(
            self, start_dispatcher, namespace, image, proxy):
        dispatcher = start_dispatcher(
            FILTER, "-t", "http", env={"DOCKER_HOST": proxy.docker_host})
        wait_state(submit_job(dispatcher, "exit 0"), "exited")
        settle(lambda: job_counts(dispatcher, namespace).get(("die", "0")), 1)

        proxy.set_mode("error")
        missed = create_labelled_container(unique_name("missed"),
                                  {NAMESPACE_LABEL: namespace},
                                  ["sh", "-c", "exit 3"], image, start=True)
        wait_state(missed, "exited")
        proxy.set_mode("pass")
        expected = {("create", ""): 2, ("start", ""): 2,
                    ("die", "0"): 1, ("die", "3"): 1}
        settle(lambda: job_counts(dispatcher, namespace), expected)

        wait_state(submit_job(dispatcher, "exit 5"), "exited")
        expected = {("create", ""): 3, ("start", ""): 3,
                    ("die", "0"): 1, ("die", "3"): 1, ("die", "5"): 1}
        settle(lambda: job_counts(dispatcher, namespace), expected)

    def test_jobs_total_family_is_a_counter_in_both_formats(
            self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(FILTER)
        wait_state(submit_job(dispatcher, "true"), "exited")
        settle(lambda: job_counts(dispatcher, namespace).get(("die", "0")), 1)
        for openmetrics in (False, True):
            kinds = {family.name: family.type
                     for family in scrape(dispatcher, openmetrics)}
            assert kinds["jobs"] == "counter"
            assert kinds["http_requests"] == "counter"
            assert kinds["jobs_running"] == "gauge"
            assert kinds["jobs_pending"] == "gauge"
            assert kinds["http_request_duration_seconds"] == "histogram"

    def test_request_labels_are_route_templates_not_paths(
            self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        raw = f"some-name-{uuid.uuid4().hex[:8]}"
        assert dispatcher.request("GET", f"/job/{raw}").status == 404
        assert dispatcher.request("GET", f"/job/{raw}/logs").status == 404
        assert dispatcher.request("DELETE", f"/job/{raw}").status == 404
        dry = dispatcher.submit({"name": "dry-" + raw, "cmd": "true"},
                                path=f"/job/{raw}/deeper?dry_run=true")
        assert dry.status == 200, dry
        assert dispatcher.request("GET", f"/{raw}").status == 404
        expected = [("/job/{id}", "GET", "404"), ("/job/{id}/logs", "GET", "404"),
                    ("/job/{id}", "DELETE", "404"), ("/job/{path}", "POST", "200")]
        for openmetrics in (False, True):
            def labels_seen():
                found = samples(scrape(dispatcher, openmetrics),
                                "http_requests_total")
                return {(s.labels["route"], s.labels["method"], s.labels["code"])
                        for s in found}
            wait_for(lambda: set(expected) <= labels_seen(), 10,
                     message=f"route templates in {labels_seen()}")
            for family in scrape(dispatcher, openmetrics):
                for sample in family.samples:
                    for value in sample.labels.values():
                        assert raw not in value, sample

    @pytest.mark.parametrize("openmetrics", [False, True],
                             ids=["prometheus", "openmetrics"])
    def test_duration_histogram_has_buckets_count_and_sum(
            self, start_dispatcher, openmetrics):
        dispatcher = start_dispatcher(FILTER)
        route = "/health/live"
        before = request_count(dispatcher, route, "GET", "204")
        for _ in range(5):
            assert dispatcher.request("GET", route).status == 204
        settle(lambda: request_count(dispatcher, route, "GET", "204"), before + 5)
        assert request_count(dispatcher, "/job/{id}", "GET", "200") == 0

        families = scrape(dispatcher, openmetrics)
        name = "http_request_duration_seconds"
        buckets = [s for s in samples(families, name + "_bucket")
                   if s.labels["route"] == route]
        counts = [s.value for s in samples(families, name + "_count")
                  if s.labels == {"route": route}]
        sums = [s.value for s in samples(families, name + "_sum")
                if s.labels == {"route": route}]
        assert len(buckets) >= 2
        bounds = [float(s.labels["le"]) for s in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")
        values = [s.value for s in buckets]
        assert values == sorted(values)
        assert len(counts) == 1 and len(sums) == 1
        assert counts[0] >= before + 5
        assert values[-1] == counts[0]
        assert 0 < sums[0] < 60

    def test_running_jobs_at_start_count_as_created_and_started(
            self, start_dispatcher, namespace, image):
        first = start_dispatcher(FILTER)
        running = submit_job(first, "sleep 30", tag="running")
        exited = submit_job(first, "true", tag="exited")
        pending = create_labelled_container(unique_name("pending"),
                                   {NAMESPACE_LABEL: namespace}, ["true"], image)
        wait_state(running, "running")
        wait_state(exited, "exited")
        assert docker_state(pending) == "created"

        second = start_dispatcher(FILTER, "-m", "0")
        expected = {("create", ""): 2, ("start", ""): 1}
        settle(lambda: job_counts(second, namespace), expected)
        settle(lambda: job_counts(second, namespace, openmetrics=True), expected)

    def test_gauges_follow_running_and_pending_jobs(
            self, start_dispatcher, namespace):
        starter = start_dispatcher(FILTER)
        settle(lambda: gauges(starter, namespace),
               {"jobs_running": 0, "jobs_pending": 0})
        running = submit_job(starter, "sleep 30", tag="running")
        wait_state(running, "running")
        settle(lambda: gauges(starter, namespace),
               {"jobs_running": 1, "jobs_pending": 0})

        holder = start_dispatcher(FILTER, "-m", "0")
        submit_job(holder, "true", tag="pending")
        settle(lambda: gauges(holder, namespace, openmetrics=True),
               {"jobs_running": 1, "jobs_pending": 1})

        assert starter.request("DELETE", f"/job/{running}?timeout=0").status == 204
        settle(lambda: gauges(holder, namespace),
               {"jobs_running": 0, "jobs_pending": 1})

    def test_pending_gauge_leaves_out_failed_jobs(
            self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(FILTER_WITH_ENTRYPOINT)
        failed = submit_job(dispatcher, "true", tag="failed", status=502,
                            entrypoint=["/no/such/binary"])
        listed = dispatcher.request("GET", "/jobs?state=failed").json["jobs"]
        assert [job["id"] for job in listed] == [failed]
        assert dispatcher.request("GET", "/jobs?state=pending").json == {
            "jobs": []}
        settle(lambda: gauges(dispatcher, namespace),
               {"jobs_running": 0, "jobs_pending": 0}, timeout=5)


# --- The API description --------------------------------------------------------


def inline_refs(schema, document):
    """Return a schema with its #/components references replaced."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = document
            for part in schema["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return inline_refs(target, document)
        return {key: inline_refs(value, document) for key, value in schema.items()}
    if isinstance(schema, list):
        return [inline_refs(item, document) for item in schema]
    return schema


def operation_for(document, method: str, path: str):
    """Return (template, operation) of the document that serves a request."""
    found = []
    for template, operations in document["paths"].items():
        pattern = re.escape(template)
        pattern = pattern.replace(re.escape("{path}"), ".+")
        pattern = re.sub(r"\\\{[A-Za-z_]+\\\}", "[^/]+", pattern)
        if re.fullmatch(pattern, path) and method.lower() in operations:
            found.append((template, operations[method.lower()]))
    assert found, f"{method} {path} is not in the API description"
    found.sort(key=lambda item: item[0].count("{"))
    return found[0]


class TestApiDescription:
    def test_openapi_document_is_valid(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        reply = dispatcher.request("GET", "/openapi.json")
        assert reply.status == 200, reply
        assert reply.headers["Content-Type"].startswith("application/json")
        document = reply.json
        assert document["openapi"] == "3.0.3"
        validate_spec(document)

    def test_every_answered_route_is_described(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        document = dispatcher.request("GET", "/openapi.json").json
        job = unique_name("described")
        other = unique_name("described")
        unknown = unique_name("unknown")
        exchanges = [
            ("POST", "/job", {"name": job, "cmd": "echo hi"}),
            ("POST", "/job", {"name": job, "cmd": "echo hi"}),
            ("POST", "/job?dry_run=true", {"name": other, "cmd": "true"}),
            ("POST", "/job", {"cmd": "no name"}),
            ("POST", "/job/a/b", {"name": other, "cmd": "true"}),
            ("GET", f"/job/{job}?wait=10", None),
            ("GET", f"/job/{job}", None),
            ("GET", f"/job/{job}?wait=abc", None),
            ("GET", f"/job/{unknown}", None),
            ("GET", f"/job/{job}/logs", None),
            ("GET", f"/job/{job}/logs?stdout=0&stderr=0", None),
            ("GET", f"/job/{unknown}/logs", None),
            ("GET", "/jobs", None),
            ("GET", "/jobs?limit=0", None),
            ("DELETE", f"/job/{job}", None),
            ("DELETE", f"/job/{unknown}", None),
            ("DELETE", f"/job/{other}?timeout=abc", None),
            ("GET", "/health/live", None),
            ("GET", "/health/ready", None),
            ("GET", "/metrics", None),
            ("GET", "/openapi.json", None),
            ("GET", "/docs", None),
        ]
        for method, target, body in exchanges:
            reply = dispatcher.request(method, target, body=body)
            path = urllib.parse.urlsplit(target).path
            template, operation = operation_for(document, method, path)
            where = f"{method} {target} -> {reply.status} ({template})"
            responses = operation["responses"]
            assert str(reply.status) in responses, where
            content = responses[str(reply.status)].get("content")
            if reply.status == 204:
                assert not reply.body, where
                continue
            media = reply.headers["Content-Type"].split(";")[0].strip()
            assert content and media in content, where
            if media == "application/json":
                schema = inline_refs(content[media]["schema"], document)
                OAS30Validator(schema).validate(reply.json)

    def test_docs_page_shows_routes_without_external_resources(
            self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        reply = dispatcher.request("GET", "/docs")
        assert reply.status == 200, reply
        assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
        page = reply.body.decode("utf-8")
        assert page.lstrip().lower().startswith("<!doctype html>")
        document = dispatcher.request("GET", "/openapi.json").json
        for template in document["paths"]:
            assert template in page, template
        lowered = page.lower()
        for external in ('src="http', "src='http", 'href="http', "href='http",
                         "//cdn", "@import", "url(http", "url(//", "<link",
                         'src="//', 'href="//'):
            assert external not in lowered, external
        assert not re.search(r"<script[^>]*\bsrc\s*=", lowered)

    def test_docs_page_embeds_the_description(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        page = dispatcher.request("GET", "/docs").body.decode("utf-8")
        match = re.search(
            r'<script id="spec" type="application/json">(.*?)</script>',
            page, re.S)
        assert match, page[:500]
        embedded = json.loads(match.group(1))
        assert embedded == dispatcher.request("GET", "/openapi.json").json


# --- Logs ---------------------------------------------------------------------


class TestLogs:
    @pytest.fixture
    def finished_job(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "echo out; echo err >&2; sleep 0.3; "
                          "echo last", tag="logs")
        wait_state(name, "exited")
        return dispatcher, name

    def logs(self, dispatcher, name: str, query: str = "") -> str:
        reply = dispatcher.request("GET", f"/job/{name}/logs{query}")
        assert reply.status == 200, reply
        assert reply.headers["Content-Type"] == TEXT_TYPE
        return reply.body.decode("utf-8")

    def test_logs_by_default_have_both_streams(self, finished_job):
        dispatcher, name = finished_job
        text = self.logs(dispatcher, name)
        assert sorted(text.splitlines()) == ["err", "last", "out"]
        assert text.endswith("last\n")

    def test_logs_without_stderr_have_only_stdout(self, finished_job):
        dispatcher, name = finished_job
        assert self.logs(dispatcher, name, "?stderr=false") == "out\nlast\n"

    def test_logs_without_stdout_have_only_stderr(self, finished_job):
        dispatcher, name = finished_job
        assert self.logs(dispatcher, name, "?stdout=false") == "err\n"

    def test_logs_without_either_stream_answer_400(self, finished_job):
        dispatcher, name = finished_job
        reply = dispatcher.request(
            "GET", f"/job/{name}/logs?stdout=false&stderr=false")
        check_error(reply, 400)

    def test_logs_with_tail_give_the_last_lines(self, finished_job):
        dispatcher, name = finished_job
        assert self.logs(dispatcher, name, "?tail=1") == "last\n"
        assert len(self.logs(dispatcher, name, "?tail=all").splitlines()) == 3

    def test_logs_with_invalid_option_answer_400(self, finished_job):
        dispatcher, name = finished_job
        for query in ("?tail=abc", "?tail=-1", "?timestamps=maybe",
                      "?follow=2", "?stdout=nope"):
            reply = dispatcher.request("GET", f"/job/{name}/logs{query}")
            check_error(reply, 400)

    def test_logs_with_timestamps_prefix_rfc3339_times(self, finished_job):
        dispatcher, name = finished_job
        lines = self.logs(dispatcher, name, "?timestamps=true").splitlines()
        assert len(lines) == 3
        for line in lines:
            assert re.fullmatch(RFC3339 + r" (out|err|last)", line), line

    def test_logs_of_unknown_job_answer_404(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        reply = dispatcher.request("GET", f"/job/{unique_name('nothing')}/logs")
        check_error(reply, 404)

    def test_follow_streams_until_the_job_exits(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "echo a; sleep 2; echo b", tag="follow")
        connection, response = open_stream(dispatcher,
                                           f"/job/{name}/logs?follow=true")
        try:
            assert response.status == 200
            assert response.getheader("Content-Type") == TEXT_TYPE
            assert response.getheader("Transfer-Encoding") == "chunked"
            first = response.read1(65536)
            state_then = dispatcher.request("GET", f"/job/{name}").json["state"]
            rest = response.read()
        finally:
            connection.close()
        assert first.startswith(b"a\n") and b"b" not in first
        assert state_then == "running"
        assert (first + rest) == b"a\nb\n"
        wait_state(name, "exited", timeout=5)

    def test_follow_of_a_finished_job_ends_at_once(self, finished_job):
        dispatcher, name = finished_job
        started = time.monotonic()
        connection, response = open_stream(dispatcher,
                                           f"/job/{name}/logs?follow=1")
        try:
            assert response.getheader("Transfer-Encoding") == "chunked"
            text = response.read().decode()
            assert time.monotonic() - started < 5
            connection.request("GET", "/health/live")
            again = connection.getresponse()
            again.read()
            assert again.status == 204
        finally:
            connection.close()
        assert sorted(text.splitlines()) == ["err", "last", "out"]

    def test_head_of_follow_answers_without_waiting_for_the_job(
            self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "echo a; sleep 30", tag="head")
        started = time.monotonic()
        try:
            reply = dispatcher.request("HEAD", f"/job/{name}/logs?follow=true",
                                       timeout=5)
        except TimeoutError:
            reply = None
        elapsed = time.monotonic() - started
        assert reply is not None, f"no answer after {elapsed:.1f} s"
        assert reply.status == 200 and reply.body == b""
        assert reply.headers["Content-Type"] == TEXT_TYPE

    def test_follower_that_leaves_early_frees_its_request(
            self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "echo a; sleep 30", tag="leaver")
        client = socket.create_connection(("127.0.0.1", dispatcher.port),
                                          timeout=10)
        try:
            client.sendall(f"GET /job/{name}/logs?follow=true HTTP/1.1\r\n"
                           f"Host: test\r\n\r\n".encode())
            received = b""
            while b"a\n" not in received:
                data = client.recv(4096)
                assert data, received
                received += data
            assert received.startswith(b"HTTP/1.1 200")
        finally:
            client.close()

        assert dispatcher.request("GET", "/health/live", timeout=5).status == 204
        wait_for(lambda: request_count(dispatcher, "/job/{id}/logs", "GET", "200"),
                 timeout=10, message="the follow request to complete")
        assert f"Answered GET '/job/{name}/logs'" in dispatcher.log
        assert docker_state(name) == "running"


# --- Waiting for a job -------------------------------------------------------------


class TestWait:
    def test_wait_returns_once_a_short_job_exits(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "sleep 1", tag="short")
        reply, elapsed = timed_request(dispatcher, "GET", f"/job/{name}?wait=10")
        assert reply.status == 200, reply
        assert reply.json["state"] == "exited"
        assert reply.json["exit_code"] == 0
        assert elapsed < 5

    def test_wait_on_long_job_returns_running_when_time_is_up(
            self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "sleep 30", tag="long")
        reply, elapsed = timed_request(dispatcher, "GET", f"/job/{name}?wait=1")
        assert reply.status == 200, reply
        assert reply.json["state"] == "running"
        assert reply.json["exit_code"] is None
        assert 0.9 <= elapsed < 3

    def test_wait_on_finished_job_answers_at_once(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "exit 4", tag="done")
        wait_state(name, "exited")
        reply, elapsed = timed_request(dispatcher, "GET", f"/job/{name}?wait=30")
        assert reply.status == 200, reply
        assert reply.json["state"] == "exited"
        assert reply.json["exit_code"] == 4
        assert elapsed < 1.5

    def test_wait_beyond_max_wait_is_capped(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER, "--max-wait", "2")
        name = submit_job(dispatcher, "sleep 30", tag="capped")
        reply, elapsed = timed_request(dispatcher, "GET", f"/job/{name}?wait=60")
        assert reply.status == 200, reply
        assert reply.json["state"] == "running"
        assert 1.8 <= elapsed < 5

    def test_wait_on_failed_job_answers_at_once(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER_WITH_ENTRYPOINT)
        name = submit_job(dispatcher, "true", tag="failed", status=502,
                          entrypoint=["/no/such/binary"])
        reply, elapsed = timed_request(dispatcher, "GET", f"/job/{name}?wait=30")
        assert reply.status == 200, reply
        assert reply.json["state"] == "failed"
        assert reply.json["error"]
        assert elapsed < 1.5

    def test_wait_invalid_answers_400(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "true", tag="invalid")
        for wait in ("-1", "abc", "nan", ""):
            reply = dispatcher.request("GET", f"/job/{name}?wait={wait}")
            check_error(reply, 400)

    def test_wait_on_unknown_job_answers_404(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        reply, elapsed = timed_request(dispatcher, "GET",
                               f"/job/{unique_name('nothing')}?wait=5")
        check_error(reply, 404)
        assert elapsed < 2

    def test_wait_on_job_deleted_meanwhile_returns_early(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "sleep 30", tag="vanishing")
        result = {}

        def waiter():
            result["reply"] = dispatcher.request("GET", f"/job/{name}?wait=20")

        thread = threading.Thread(target=waiter)
        started = time.monotonic()
        thread.start()
        time.sleep(0.5)
        assert dispatcher.request("DELETE", f"/job/{name}?timeout=0").status == 204
        thread.join(25)
        reply = result["reply"]
        if reply.status == 200:
            assert reply.json["state"] == "exited", reply
        else:
            check_error(reply, 404)
        assert time.monotonic() - started < 10


# --- Deleting a job ----------------------------------------------------------------


class TestDelete:
    def test_delete_running_job_stops_and_removes_it(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "sleep 60", tag="running")
        wait_state(name, "running")
        reply, elapsed = timed_request(dispatcher, "DELETE", f"/job/{name}?timeout=1")
        assert reply.status == 204, reply
        assert reply.body == b""
        wait_for(lambda: inspect(name) is None, timeout=5,
                 message=f"{name} to be removed")
        assert elapsed < 8
        check_error(dispatcher.request("GET", f"/job/{name}"), 404)

    def test_delete_exited_job_removes_it(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "true", tag="exited")
        wait_state(name, "exited")
        assert dispatcher.request("DELETE", f"/job/{name}").status == 204
        wait_for(lambda: inspect(name) is None, timeout=5,
                 message=f"{name} to be removed")

    def test_delete_pending_job_removes_it_unstarted(
            self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(FILTER, "-m", "0")
        name = submit_job(dispatcher, "echo started", tag="pending")
        info = inspect(name)
        assert info["State"]["Status"] == "created"
        assert info["State"]["StartedAt"] == ZERO_TIME
        since = int(time.time()) - 5
        reply = dispatcher.request("DELETE", f"/job/{name}?timeout=1")
        assert reply.status == 204, reply
        wait_for(lambda: inspect(name) is None, timeout=5,
                 message=f"{name} to be removed")
        status, events = docker("GET", "/events", query={
            "since": since, "until": int(time.time()) + 1,
            "filters": {"type": ["container"], "container": [info["Id"]]}})
        assert status == 200
        actions = [json.loads(line)["Action"]
                   for line in events.splitlines() if line.strip()]
        assert "destroy" in actions or "remove" in actions  # Podman: remove
        assert "start" not in actions

    def test_delete_unknown_job_answers_404(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        check_error(dispatcher.request("DELETE", f"/job/{unique_name('no')}"), 404)

    def test_delete_with_invalid_timeout_answers_400(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "true", tag="kept")
        for timeout in ("abc", "-1", "1.5", "3601"):
            reply = dispatcher.request("DELETE", f"/job/{name}?timeout={timeout}")
            check_error(reply, 400)
        assert inspect(name) is not None

    def test_delete_by_container_id_answers_404(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = submit_job(dispatcher, "sleep 30", tag="by-id")
        container_id = inspect(name)["Id"]
        for key in (container_id[:12], container_id):
            check_error(dispatcher.request("GET", f"/job/{key}"), 404)
            check_error(dispatcher.request("GET", f"/job/{key}/logs"), 404)
            reply = dispatcher.request("DELETE", f"/job/{key}?timeout=0")
            check_error(reply, 404)
        assert docker_state(name) == "running"

    @pytest.mark.parametrize("labels", ["other-namespace", "no-label"])
    def test_container_outside_namespace_is_404_on_every_job_route(
            self, start_dispatcher, namespace, image, labels):
        dispatcher = start_dispatcher(FILTER)
        name = unique_name("foreign")
        chosen = {"other-namespace": {NAMESPACE_LABEL: namespace + "-other"},
                  "no-label": {}}[labels]
        create_labelled_container(name, chosen, ["sh", "-c", "echo foreign; sleep 30"],
                         image, start=True)
        try:
            wait_state(name, "running")
            for method, target in (
                    ("GET", f"/job/{name}"),
                    ("GET", f"/job/{name}?wait=1"),
                    ("GET", f"/job/{name}/logs"),
                    ("GET", f"/job/{name}/logs?follow=true"),
                    ("DELETE", f"/job/{name}?timeout=0")):
                check_error(dispatcher.request(method, target), 404)
            listed = dispatcher.request("GET", "/jobs").json["jobs"]
            assert name not in [job["id"] for job in listed]
            assert docker_state(name) == "running"
        finally:
            docker("DELETE", f"/containers/{name}", query={"force": 1})


# --- Listing jobs ----------------------------------------------------------------


class TestList:
    @pytest.fixture
    def four_jobs(self, start_dispatcher):
        """Return a dispatcher (-m 1) and jobs exited, running, pending, failed."""
        dispatcher = start_dispatcher(FILTER_WITH_ENTRYPOINT, "-m", "1")
        exited = submit_job(dispatcher, "true", tag="exited")
        wait_state(exited, "exited")
        running = submit_job(dispatcher, "sleep 30", tag="running")
        wait_state(running, "running")
        pending = submit_job(dispatcher, "true", tag="pending")
        unlimited = start_dispatcher(FILTER_WITH_ENTRYPOINT)
        failed = submit_job(unlimited, "true", tag="failed", status=502,
                            entrypoint=["/no/such/binary"])
        info = inspect(failed)
        assert info["State"]["Status"] == "created"
        assert info["State"]["Error"] or on_podman()  # Podman keeps no trace
        return dispatcher, {"exited": exited, "running": running,
                            "pending": pending, "failed": failed}

    def test_list_gives_jobs_newest_first_as_job_lookups(self, four_jobs):
        dispatcher, names = four_jobs
        reply = dispatcher.request("GET", "/jobs")
        assert reply.status == 200, reply
        assert set(reply.json) == {"jobs"}
        jobs = reply.json["jobs"]
        assert [job["id"] for job in jobs] == [
            names["failed"], names["pending"], names["running"], names["exited"]]
        created = [job["created"] for job in jobs]
        assert created == sorted(created, reverse=True)
        for job in jobs:
            single = dispatcher.request("GET", f"/job/{job['id']}").json
            assert set(job) == set(single)
            for key in job:
                if key != "status":
                    assert job[key] == single[key], key
            assert job["status"].split()[0] == single["status"].split()[0]
        assert [job["state"] for job in jobs] == [
            "failed", "created", "running", "exited"]

    def test_list_filters_by_state(self, four_jobs):
        dispatcher, names = four_jobs
        for state in ("exited", "running", "pending", "failed"):
            reply = dispatcher.request("GET", f"/jobs?state={state}")
            assert reply.status == 200, reply
            found = [job["id"] for job in reply.json["jobs"]]
            assert found == [names[state]], state

    def test_list_with_limit_gives_the_newest(self, four_jobs):
        dispatcher, names = four_jobs
        reply = dispatcher.request("GET", "/jobs?limit=1")
        assert reply.status == 200, reply
        assert [job["id"] for job in reply.json["jobs"]] == [names["failed"]]
        reply = dispatcher.request("GET", "/jobs?limit=2&state=running")
        assert [job["id"] for job in reply.json["jobs"]] == [names["running"]]
        reply = dispatcher.request("GET", "/jobs?limit=1000")
        assert len(reply.json["jobs"]) == 4

    def test_list_with_invalid_query_answers_400(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        for query in ("state=bogus", "state=", "state=RUNNING", "limit=0",
                      "limit=1001", "limit=abc", "limit=-1", "limit=1.5"):
            check_error(dispatcher.request("GET", f"/jobs?{query}"), 400)

    def test_list_of_empty_namespace_is_empty(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        reply = dispatcher.request("GET", "/jobs")
        assert reply.status == 200, reply
        assert reply.json == {"jobs": []}


# --- Dry runs ----------------------------------------------------------------------


class TestDryRun:
    @pytest.mark.parametrize("path", ["/job", "/job/a/b", "/job/a/b/"])
    def test_dry_run_describes_the_job_and_creates_nothing(
            self, start_dispatcher, namespace, image, path):
        dispatcher = start_dispatcher(FILTER_WITH_PATH)
        name = unique_name("dry")
        reply = dispatcher.submit({"name": name, "cmd": "echo hi"},
                                  path=f"{path}?dry_run=true")
        assert reply.status == 200, reply
        assert reply.json == {
            "name": name,
            "platform": None,
            "config": {
                "Image": image,
                "Cmd": ["sh", "-c", "echo hi"],
                "Labels": {"path": path.rstrip("/"), NAMESPACE_LABEL: namespace,
                           RESTART_LABEL: "no"},
            },
        }
        assert inspect(name) is None
        assert namespace_containers(namespace) == []
        check_error(dispatcher.request("GET", f"/job/{name}"), 404)

    def test_dry_run_reports_the_platform(self, start_dispatcher):
        dispatcher = start_dispatcher(
            '{Name: .name, Image: "x", Platform: "linux/arm64"}')
        name = unique_name("dry")
        reply = dispatcher.submit({"name": name}, path="/job?dry_run=1")
        assert reply.status == 200, reply
        assert reply.json["platform"] == "linux/arm64"
        assert "Platform" not in reply.json["config"]
        assert "Name" not in reply.json["config"]
        assert inspect(name) is None

    def test_dry_run_of_unusable_output_answers_400(
            self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(FILTER)
        reply = dispatcher.submit({"cmd": "true"}, path="/job?dry_run=true")
        check_error(reply, 400)
        assert namespace_containers(namespace) == []

    def test_dry_run_false_creates_the_job(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        name = unique_name("real")
        reply = dispatcher.submit({"name": name, "cmd": "true"},
                                  path="/job?dry_run=false")
        assert reply.status == 201, reply
        assert inspect(name) is not None


# --- Reloading the filter ------------------------------------------------------------


class TestReload:
    @staticmethod
    def filter_text(prefix: str) -> str:
        return ('{Name: ("%s" + .name), Image: $ENV.JOB_IMAGE,'
                ' Cmd: ["sh", "-c", .cmd]}' % prefix)

    @staticmethod
    def dry_name(dispatcher, name: str) -> str:
        reply = dispatcher.submit({"name": name, "cmd": "true"},
                                  path="/job?dry_run=true")
        assert reply.status == 200, reply
        return reply.json["name"]

    def test_sighup_reloads_the_filter_file(self, start_dispatcher, tmp_path):
        path = tmp_path / "filter.jq"
        path.write_text(self.filter_text("one-"))
        dispatcher = start_dispatcher("-f", str(path))
        name = unique_name("reload")
        assert self.dry_name(dispatcher, name) == "one-" + name

        path.write_text(self.filter_text("two-"))
        dispatcher.process.send_signal(signal.SIGHUP)
        settle(lambda: self.dry_name(dispatcher, name), "two-" + name, timeout=10)
        reply = dispatcher.submit({"name": name, "cmd": "true"})
        assert reply.status == 201, reply
        assert reply.json == {"id": "two-" + name}
        assert inspect("two-" + name) is not None

    def test_sighup_with_broken_file_keeps_the_old_filter(
            self, start_dispatcher, tmp_path):
        path = tmp_path / "filter.jq"
        path.write_text(self.filter_text("good-"))
        dispatcher = start_dispatcher("-f", str(path))
        path.write_text(self.filter_text("better-"))
        dispatcher.process.send_signal(signal.SIGHUP)
        name = unique_name("kept")
        settle(lambda: self.dry_name(dispatcher, name), "better-" + name,
               timeout=10)

        path.write_text('{Name: ("broken-" + .name, Image: ')
        dispatcher.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "Kept the old filter" in dispatcher.log, timeout=10,
                 message="the reload to be refused")
        assert dispatcher.process.poll() is None
        reply = dispatcher.submit({"name": name, "cmd": "true"})
        assert reply.status == 201, reply
        assert reply.json == {"id": "better-" + name}
        assert self.dry_name(dispatcher, name) == "better-" + name

    def test_sighup_with_missing_file_keeps_the_old_filter(
            self, start_dispatcher, tmp_path):
        path = tmp_path / "filter.jq"
        path.write_text(self.filter_text("still-"))
        dispatcher = start_dispatcher("-f", str(path))
        path.unlink()
        dispatcher.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "Kept the old filter" in dispatcher.log, timeout=10,
                 message="the reload to be refused")
        name = unique_name("missing")
        assert self.dry_name(dispatcher, name) == "still-" + name

    def test_sighup_without_filter_file_keeps_serving(self, start_dispatcher):
        dispatcher = start_dispatcher(FILTER)
        dispatcher.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "Reload asked" in dispatcher.log, timeout=10,
                 message="the reload to be declined")
        assert dispatcher.process.poll() is None
        name = unique_name("same")
        assert self.dry_name(dispatcher, name) == name


# === Hardening: tokens, hostile requests, Docker faults, load ==============



# The hostile dispatcher closes connections that send too slowly after this.
READ_TIMEOUT = 2.0

# How long after the read timeout a slow connection may still be open:
# the reaper looks every half second, and a busy machine adds some more.
READ_TIMEOUT_SLACK = 3.0

# Longest any reply may take in these tests, whatever goes wrong.
CLIENT_TIMEOUT = 10.0


# --- Helpers: dispatchers shared by a class --------------------------------


@dataclass
class SharedDispatcher:
    """A dispatcher shared by the tests of a class, with its namespace."""

    process: RunningDispatcher
    namespace: str
    prefix: str

    @property
    def port(self) -> int:
        return self.process.port


def launch_shared(image_name: str, directory, *args: str,
                  env: dict | None = None) -> SharedDispatcher:
    """Start a dispatcher in a namespace of its own and wait until it answers."""
    name = f"djd-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    prefix = f"h{RUN_ID}{uuid.uuid4().hex[:4]}-"
    port = free_port()
    environment = dispatcher_environment(image_name, {"JOB_PREFIX": prefix,
                                                      **(env or {})})
    process = RunningDispatcher(
        ["--host", "127.0.0.1", "-p", str(port), "-n", name, *args],
        environment, port, directory / "dispatcher.log",
    )
    try:
        process.wait_ready()
    except BaseException:
        process.stop(signal.SIGKILL)
        raise
    return SharedDispatcher(process, name, prefix)


def stop_shared(shared: SharedDispatcher) -> None:
    """Stop a shared dispatcher and remove every container of its namespace."""
    shared.process.stop(signal.SIGKILL)
    remove_namespace(shared.namespace)


# --- Helpers: replies -------------------------------------------------------


def assert_json_error(reply: Reply, statuses, keyword: str = "") -> str:
    """Check a JSON error reply and its message; return the message."""
    if isinstance(statuses, int):
        statuses = (statuses,)
    assert reply.status in statuses, reply
    assert reply.headers.get("Content-Type") == "application/json", reply.headers
    body = reply.json
    assert isinstance(body, dict) and list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"code", "message"}, body
    assert error["code"] == reply.status, body
    assert isinstance(error["message"], str) and error["message"].strip(), body
    if keyword:
        assert re.search(keyword, error["message"], re.IGNORECASE), (
            f"{keyword!r} not in {error['message']!r}"
        )
    return error["message"]


def container_names(namespace_name: str) -> set[str]:
    """Return the names of the containers of a namespace."""
    return {
        container["Names"][0].lstrip("/")
        for container in namespace_containers(namespace_name)
    }


def assert_alive(process: RunningDispatcher) -> None:
    """Check that the dispatcher runs and answers its liveness probe."""
    assert process.process.poll() is None, process.log
    reply = process.request("GET", "/health/live", timeout=CLIENT_TIMEOUT)
    assert reply.status == 204, reply


def proc_status_kib(pid: int, field_name: str) -> int:
    """Return a memory figure (VmRSS, VmHWM) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field_name} for process {pid}")


# --- Helpers: raw HTTP --------------------------------------------------------


def as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def http_request(method: str, target, body: bytes | None = None,
                 headers=(), close: bool = True, length: bool = True,
                 version: str = "HTTP/1.1") -> bytes:
    """Return the bytes of an HTTP request, written as asked.

    ``length`` adds a Content-Length for the body; ``close`` asks the
    server to close the connection after its reply.
    """
    lines = [b"%s %s %s" % (as_bytes(method), as_bytes(target),
                            as_bytes(version)), b"Host: localhost"]
    if body is not None and length:
        lines.append(b"Content-Length: %d" % len(body))
    lines += [as_bytes(header) for header in headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunked(*parts: bytes, trailer: bytes = b"") -> bytes:
    """Return ``parts`` in chunked encoding, ended by a zero chunk."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return out + b"0\r\n" + trailer + b"\r\n"


@dataclass
class Exchange:
    """What came back on a raw connection."""

    replies: list[Reply]
    interim: list[int]
    closed: bool
    leftover: bytes
    elapsed: float


def parse_replies(data: bytes):
    """Split raw reply bytes into final replies, 1xx statuses and the rest."""
    replies, interim = [], []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return replies, interim, data
        head = data[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = http.client.parse_headers(
            io.BytesIO(("\r\n".join(head[1:]) + "\r\n\r\n").encode("latin-1"))
        )
        if 100 <= status < 200:
            interim.append(status)
            data = data[end + 4:]
            continue
        length = int(headers.get("Content-Length") or 0)
        if len(data) < end + 4 + length:
            return replies, interim, data
        replies.append(Reply(status, headers, data[end + 4:end + 4 + length]))
        data = data[end + 4 + length:]


class RawConnection:
    """A client socket that sends bytes as they are and collects replies."""

    def __init__(self, port: int):
        self.started = time.monotonic()
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=CLIENT_TIMEOUT)
        self.data = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.closed = True

    def receive(self, timeout: float, until=None, quiet: float = 1.0) -> None:
        """Read until the server closes, ``until(parsed)`` holds or time is up.

        Once a whole reply is in that does not announce a close, reading
        goes on for ``quiet`` seconds more, to catch a reply nobody asked for.
        """
        deadline = time.monotonic() + timeout
        while not self.closed:
            replies, interim, rest = parse_replies(self.data)
            if until is not None and until(replies, interim):
                return
            wait = deadline - time.monotonic()
            if replies and not rest and not any(
                reply.headers.get("Connection", "").lower() == "close"
                for reply in replies
            ):
                wait = min(wait, quiet)
            if wait <= 0:
                return
            self.sock.settimeout(wait)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return
            except ConnectionResetError:
                self.closed = True
                return
            if not chunk:
                self.closed = True
                return
            self.data += chunk

    def drip(self, data: bytes, interval: float, timeout: float) -> None:
        """Send one byte per ``interval`` until sent, answered or closed."""
        deadline = time.monotonic() + timeout
        for index in range(len(data)):
            self.send(data[index:index + 1])
            if self.closed or time.monotonic() > deadline:
                return
            readable, _, _ = select.select([self.sock], [], [], interval)
            if readable:
                return

    def result(self) -> Exchange:
        replies, interim, rest = parse_replies(self.data)
        return Exchange(replies, interim, self.closed, rest,
                        time.monotonic() - self.started)

    def close(self) -> None:
        self.sock.close()


def exchange(port: int, request: bytes, half_close: bool = False) -> Exchange:
    """Send a request as it is and collect what comes back."""
    connection = RawConnection(port)
    try:
        connection.send(request)
        if half_close:
            connection.half_close()
        connection.receive(CLIENT_TIMEOUT)
        return connection.result()
    finally:
        connection.close()


# --- Authentication -----------------------------------------------------------

TOKEN = "tok-" + uuid.uuid4().hex + "-Zq9"
WRONG_TOKEN = "tok-" + uuid.uuid4().hex + "-Wx7"

AUTH_FILTER = r"""
{Name: ($ENV.JOB_PREFIX + (.name // "x")), Image: $ENV.JOB_IMAGE, Cmd: ["true"],
 HostConfig: {NetworkMode: "none"}}
"""

PROTECTED_ROUTES = [
    ("POST", "/job"),
    ("POST", "/job/sub/path"),
    ("GET", "/job/some-job"),
    ("DELETE", "/job/some-job"),
    ("GET", "/job/some-job/logs"),
    ("GET", "/jobs"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/no-such-route"),
]

BAD_CREDENTIALS = [
    pytest.param(None, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("Bearer", id="scheme-only"),
    pytest.param("Bearer ", id="scheme-and-space"),
    pytest.param(TOKEN, id="no-scheme"),
    pytest.param("Basic " + TOKEN, id="basic-scheme"),
    pytest.param("Token " + TOKEN, id="token-scheme"),
    pytest.param("Bearer " + WRONG_TOKEN, id="wrong-token"),
    pytest.param("Bearer " + TOKEN[:-1], id="token-prefix"),
    pytest.param("Bearer " + TOKEN + "x", id="token-with-suffix"),
    pytest.param("Bearer " + TOKEN.upper(), id="token-in-upper-case"),
    pytest.param("Bearer " + TOKEN + " " + TOKEN, id="token-twice"),
    pytest.param("Bearer\t" + TOKEN, id="tab-separator"),
]


@pytest.fixture(scope="class")
def guarded(image, tmp_path_factory):
    """A dispatcher that needs TOKEN, logging at the finest level."""
    shared = launch_shared(
        image, tmp_path_factory.mktemp("guarded"), AUTH_FILTER,
        "--token", TOKEN, "--log-level", "TRACE",
    )
    yield shared
    stop_shared(shared)


def authorization(credentials: str | None) -> dict:
    return {} if credentials is None else {"Authorization": credentials}


def assert_unauthorized(reply: Reply) -> None:
    """Check a 401 reply: challenge, JSON error, and no token inside."""
    assert_json_error(reply, 401, "token")
    challenge = reply.headers.get("WWW-Authenticate", "")
    assert challenge.startswith("Bearer"), reply.headers
    assert TOKEN not in reply.body.decode("utf-8", "replace")
    assert TOKEN not in str(reply.headers)


class TestAuthentication:
    @pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
    def test_refuse_every_route_with_401_when_token_is_wrong(self, guarded,
                                                             credentials):
        before = container_names(guarded.namespace)
        for method, path in PROTECTED_ROUTES:
            body = b'{"name": "unauthorized"}' if method == "POST" else None
            reply = guarded.process.request(
                method, path, raw=body, headers=authorization(credentials),
                timeout=CLIENT_TIMEOUT,
            )
            assert_unauthorized(reply)
        assert container_names(guarded.namespace) == before
        assert_alive(guarded.process)

    def test_refuse_raw_authorization_header_variants_with_401(self, guarded):
        for header in (b"Authorization: Bearer " + TOKEN.encode() + b"\xff",
                       b"Authorization: Bearer \xe9" + TOKEN.encode(),
                       b"Authorization: " + b"Bearer " * 2000,
                       b"Authorization:Bearer"):
            result = exchange(guarded.port, http_request(
                "GET", "/jobs", headers=[header]))
            assert len(result.replies) == 1, result
            assert_unauthorized(result.replies[0])

    def test_answer_health_routes_without_token(self, guarded):
        for path in ("/health/live", "/health/ready"):
            reply = guarded.process.request("GET", path, timeout=CLIENT_TIMEOUT)
            assert reply.status == 204, reply
            reply = guarded.process.request(
                "GET", path, headers=authorization("Bearer " + WRONG_TOKEN),
                timeout=CLIENT_TIMEOUT,
            )
            assert reply.status == 204, reply

    def test_accept_right_token_on_every_route(self, guarded):
        right = authorization("Bearer " + TOKEN)
        name = "authorized-" + uuid.uuid4().hex[:6]
        reply = guarded.process.request(
            "POST", "/job", body={"name": name}, headers=right,
            timeout=CLIENT_TIMEOUT)
        assert reply.status == 201, reply
        job = guarded.prefix + name
        assert reply.json == {"id": job}
        assert inspect(job) is not None
        for path in (f"/job/{job}", "/jobs", "/metrics", "/openapi.json", "/docs",
                     f"/job/{job}/logs"):
            reply = guarded.process.request("GET", path, headers=right,
                                            timeout=CLIENT_TIMEOUT)
            assert reply.status == 200, (path, reply)
            assert TOKEN not in reply.body.decode("utf-8", "replace")
        reply = guarded.process.request(
            "GET", f"/job/{job}", headers={"Authorization": "bearer " + TOKEN},
            timeout=CLIENT_TIMEOUT)
        assert reply.status == 200, reply
        reply = guarded.process.request(
            "DELETE", f"/job/{job}", headers=right, timeout=CLIENT_TIMEOUT)
        assert reply.status == 204, reply
        wait_for(lambda: inspect(job) is None, timeout=15,
                 message="the job to be removed")

    def test_refuse_expect_continue_without_token_before_body(self, guarded):
        connection = RawConnection(guarded.port)
        try:
            connection.send(http_request(
                "POST", "/job", headers=["Content-Length: 20",
                                         "Expect: 100-continue"], close=False))
            connection.receive(CLIENT_TIMEOUT)
            result = connection.result()
        finally:
            connection.close()
        assert result.interim == [], result
        assert len(result.replies) == 1, result
        assert_unauthorized(result.replies[0])

    def test_keep_token_out_of_log(self, guarded):
        attempts = [authorization("Bearer " + WRONG_TOKEN),
                    authorization("Bearer " + TOKEN), authorization(TOKEN),
                    authorization("Basic " + TOKEN)]
        for headers in attempts:
            for method, path in PROTECTED_ROUTES:
                body = {"name": "log-check"} if method == "POST" else None
                reply = guarded.process.request(method, path, body=body,
                                                headers=headers,
                                                timeout=CLIENT_TIMEOUT)
                assert TOKEN not in reply.body.decode("utf-8", "replace")
        log_text = wait_for(
            lambda: "/no-such-route" in guarded.process.log and guarded.process.log,
            timeout=10, message="the requests in the log")
        assert "Answered" in log_text
        assert "Creating job" in log_text
        for secret in (TOKEN, WRONG_TOKEN, TOKEN[4:20], WRONG_TOKEN[4:20]):
            assert secret not in log_text

    def test_read_token_from_token_file(self, start_dispatcher, tmp_path):
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        dispatcher = start_dispatcher(AUTH_FILTER, "--token-file", str(token_file))
        assert_unauthorized(dispatcher.request("GET", "/jobs"))
        assert_unauthorized(dispatcher.request(
            "GET", "/jobs", headers=authorization("Bearer " + WRONG_TOKEN)))
        reply = dispatcher.request("GET", "/jobs",
                                   headers=authorization("Bearer " + TOKEN))
        assert reply.status == 200, reply
        assert TOKEN not in dispatcher.log

    @pytest.mark.parametrize("variable", ["TOKEN", "TOKEN_FILE"])
    def test_read_token_from_environment(self, start_dispatcher, tmp_path,
                                         variable):
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        value = TOKEN if variable == "TOKEN" else str(token_file)
        dispatcher = start_dispatcher(AUTH_FILTER, env={variable: value})
        assert_unauthorized(dispatcher.request("GET", "/metrics"))
        reply = dispatcher.request("GET", "/metrics",
                                   headers=authorization("Bearer " + TOKEN))
        assert reply.status == 200, reply
        assert dispatcher.request("GET", "/health/ready").status == 204

    @pytest.mark.parametrize("contents", ["", "  \n"])
    def test_exit_2_on_empty_token_file(self, start_dispatcher, tmp_path,
                                        contents):
        token_file = tmp_path / "token"
        token_file.write_text(contents)
        dispatcher = start_dispatcher(AUTH_FILTER, "--token-file",
                                      str(token_file), wait=False)
        assert dispatcher.process.wait(timeout=15) == 2
        assert "token" in dispatcher.log

    def test_exit_2_on_both_token_and_token_file(self, start_dispatcher,
                                                 tmp_path):
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        dispatcher = start_dispatcher(AUTH_FILTER, "--token", WRONG_TOKEN,
                                      "--token-file", str(token_file), wait=False)
        assert dispatcher.process.wait(timeout=15) == 2
        assert "token" in dispatcher.log
        assert TOKEN not in dispatcher.log

    def test_warn_about_open_api_on_all_interfaces(self, start_dispatcher):
        dispatcher = start_dispatcher(AUTH_FILTER, "--host", "0.0.0.0")
        wait_for(lambda: "No --token" in dispatcher.log, timeout=10,
                 message="the open API warning")
        line = next(line for line in dispatcher.log.splitlines()
                    if "No --token" in line)
        assert line.startswith("WARNING"), line
        assert str(dispatcher.port) in line

    @pytest.mark.parametrize("host, token", [
        ("127.0.0.1", None), ("localhost", None), ("0.0.0.0", TOKEN),
    ])
    def test_stay_quiet_about_open_api_when_closed(self, start_dispatcher,
                                                   host, token):
        args = ["--host", host] + (["--token", token] if token else [])
        dispatcher = start_dispatcher(AUTH_FILTER, *args)
        wait_for(lambda: "Listening on" in dispatcher.log, timeout=10,
                 message="the start to be logged")
        assert "No --token" not in dispatcher.log


# --- Hostile and malformed requests -------------------------------------------

# The job is named after the body's "name", or after the path below /job/
# when the body has none; "case" picks a misbehaviour.
HOSTILE_FILTER = r"""
def job_name:
  if .name == null then
    (if $PATH == "/job" then null
     else $ENV.JOB_PREFIX + ($PATH | ltrimstr("/job/")) end)
  elif (.name | type) == "string" then $ENV.JOB_PREFIX + .name
  else .name end;
def job: {Name: job_name, Image: $ENV.JOB_IMAGE, Cmd: ["true"],
          HostConfig: {NetworkMode: "none"}};
(.case // "job") as $case
| if $case == "loop" then last(range(1e10))
  elif $case == "boom" then error("boom")
  elif $case == "error-object" then error({reason: "boom"})
  elif $case == "huge-output" then job + {Cmd: [range(1e7)]}
  elif $case == "output-over-limit" then job + {Cmd: [range(3e5) | tostring]}
  elif $case == "exhaust-memory" then [range(1e9)]
  elif $case == "deep-output" then reduce range(5000) as $i (0; [.])
  elif $case == "image-number" then job + {Image: 42}
  elif $case == "cmd-string" then job + {Cmd: "true"}
  elif $case == "cmd-number" then job + {Cmd: 5}
  elif $case == "cmd-object" then job + {Cmd: {run: "true"}}
  elif $case == "bad-name" then job + {Name: "bad name!"}
  elif $case == "no-image" then job + {Image: "no-such:image"}
  elif $case == "host-config-type" then job + {HostConfig: {Memory: "lots"}}
  elif $case == "host-config-string" then job + {HostConfig: "none"}
  elif $case == "restart-policy" then
    job + {HostConfig: {RestartPolicy: {Name: "bogus"}}}
  elif $case == "labels" then job + {Labels: {count: 1}}
  elif $case == "platform" then job + {Platform: 5}
  elif $case == "array" then [job]
  elif $case == "nothing" then empty
  elif $case == "halt" then halt
  else job end
"""


HEAD_ONLY = "head-only"
HALF_CLOSE = "half-close"
STALL = "stall"
DRIP = "drip"
CONTINUE = "continue"

# Said by a case where closing without any reply is a correct outcome.
CLOSED = None


@dataclass
class Case:
    """One hostile request and what may come back.

    ``build(name)`` returns the request bytes; ``name`` is the case's id,
    which names the job the request creates if it succeeds. ``statuses``
    are the acceptable statuses (CLOSED: the server may close without a
    reply); ``keyword`` is a regular expression the error message must
    contain. ``mode`` says how the request is sent (see run_case).
    ``bare`` accepts an HTTP/0.9 reply, a body without status line, to
    a request in HTTP/0.9 form.
    """

    id: str
    build: object
    statuses: tuple
    keyword: str = ""
    mode: str = ""
    bare: bool = False

    def param(self):
        return pytest.param(self, id=self.id)


def fixed(data: bytes):
    """Return a request builder that ignores the job name."""
    return lambda name: data


def raw_post(body: bytes | None, target="/job", headers=(), **options) -> bytes:
    return http_request("POST", target, body, headers, **options)


def named(name: str, members: str = "") -> bytes:
    """Return a JSON object text: "name", then the given members text."""
    return ('{"name": "%s"%s}' % (name, ", " + members if members else "")).encode()


def filter_case(case_name: str, statuses: tuple, keyword: str = "") -> Case:
    """Return a case that makes the filter misbehave as ``case_name`` says."""
    return Case(f"filter-{case_name}",
                lambda name: raw_post(named(name, f'"case": "{case_name}"')),
                statuses, keyword)


def chunked_post(body: bytes, **options) -> bytes:
    return raw_post(body, headers=["Transfer-Encoding: chunked"], length=False,
                **options)


LIMIT = ONE_MIB
DEEP = 100_000

JSON_CASES = [
    Case("truncated-object", fixed(raw_post(b'{"case": "job", "na')), (400,), "JSON"),
    Case("truncated-string", fixed(raw_post(b'"abc')), (400,), "JSON"),
    Case("truncated-array", fixed(raw_post(b"[1, 2")), (400,), "JSON"),
    Case("extra-brace", lambda n: raw_post(named(n) + b"}"), (400,), "Extra data"),
    Case("trailing-garbage", lambda n: raw_post(named(n) + b" junk"), (400,),
         "Extra data"),
    Case("two-documents", lambda n: raw_post(named(n) + named(n)), (400,),
         "Extra data"),
    Case("single-quotes", fixed(raw_post(b"{'name': 'x'}")), (400,), "JSON"),
    Case("comment", fixed(raw_post(b'{/* note */ "name": "x"}')), (400,), "JSON"),
    Case("trailing-comma", lambda n: raw_post(named(n, '"a": 1,')), (400,), "JSON"),
    Case("bare-word", fixed(raw_post(b"hello")), (400,), "JSON"),
    Case("nan", lambda n: raw_post(named(n, '"n": NaN')), (400,), "NaN"),
    Case("infinity", lambda n: raw_post(named(n, '"n": -Infinity')), (400,),
         "Infinity"),
    Case("control-character", fixed(raw_post(b'{"name": "a\x01b"}')), (400,),
         "control"),
    Case("nul-byte", fixed(raw_post(b'{"name": "a\x00b"}')), (400,), "control"),
    Case("invalid-utf8", fixed(raw_post(b'{"name": "\xff\xfe"}')), (400,), "UTF-8"),
    Case("overlong-utf8", fixed(raw_post(b'{"name": "\xc0\xaf"}')), (400,), "UTF-8"),
    Case("utf8-surrogate", fixed(raw_post(b'{"name": "\xed\xa0\x80"}')), (400,),
         "UTF-8"),
    Case("truncated-utf8", fixed(raw_post(b'{"name": "\xe2\x82"}')), (400,), "UTF-8"),
    Case("utf16-body", fixed(raw_post('{"name": "x"}'.encode("utf-16"))), (400,),
         "UTF-8"),
    Case("escaped-lone-surrogate", lambda n: raw_post(named(n, '"pad": "\\ud800"')),
         (201, 400), "surrogate"),
    Case("byte-order-mark", lambda n: raw_post(b"\xef\xbb\xbf" + named(n)), (201,)),
    Case("deep-unclosed-arrays", fixed(raw_post(b"[" * DEEP)), (400,), "deep"),
    Case("deep-closed-arrays", fixed(raw_post(b"[" * DEEP + b"]" * DEEP)), (400,),
         "deep"),
    Case("deep-objects", fixed(raw_post(b'{"a":' * DEEP + b"1" + b"}" * DEEP)),
         (400,), "deep"),
    Case("moderately-deep-arrays", fixed(raw_post(b"[" * 500 + b"]" * 500)), (400,),
         "Cannot index array"),
    Case("huge-exponent", lambda n: raw_post(named(n, '"n": 1e999999')), (201,)),
    Case("huge-negative-exponent", lambda n: raw_post(named(n, '"n": -1e999999')),
         (201,)),
    Case("tiny-exponent", lambda n: raw_post(named(n, '"n": 1e-999999')), (201,)),
    Case("huge-exponent-body", fixed(raw_post(b"1e999999")), (400,),
         "Cannot index number"),
    Case("400-digit-integer",
         lambda n: raw_post(named(n, '"n": 1%s' % ("0" * 400))), (201,)),
    Case("400-digit-name", fixed(raw_post(b'{"name": 1%s}' % (b"7" * 400))), (400,),
         "string Name"),
    Case("huge-exponent-name", fixed(raw_post(b'{"name": 1e999999}')), (400,),
         "string Name"),
    Case("5000-digit-integer",
         lambda n: raw_post(named(n, '"n": 1%s' % ("0" * 5000))), (201, 400),
         "digits"),
    Case("duplicate-keys",
         lambda n: raw_post(b'{"name": "first", "name": "%s"}' % n.encode()), (201,)),
    Case("many-duplicate-keys",
         lambda n: raw_post(b"{" + b'"name": "other", ' * 20000
                        + b'"name": "%s"}' % n.encode()), (201,)),
    Case("giant-string-under-limit",
         lambda n: raw_post(named(n, '"pad": "%s"' % ("x" * (LIMIT - 200)))), (201,)),
    Case("many-keys-under-limit",
         lambda n: raw_post(named(n, ", ".join(f'"k{i}": {i}' for i in range(60000)))),
         (201,)),
    Case("body-over-limit",
         fixed(raw_post(b"", headers=[f"Content-Length: {LIMIT + 1}"], length=False)),
         (413,), "larger", HEAD_ONLY),
    Case("body-array", fixed(raw_post(b"[1, 2]")), (400,), "Cannot index array"),
    Case("body-string", fixed(raw_post(b'"hello"')), (400,), "Cannot index string"),
    Case("body-boolean", fixed(raw_post(b"true")), (400,), "Cannot index boolean"),
    Case("body-whitespace", fixed(raw_post(b" \r\n\t ")), (400,), "string Name"),
    Case("body-empty-object", fixed(raw_post(b"{}")), (400,), "string Name"),
]

LENGTH_CASES = [
    Case("no-length-on-post-path", lambda n: raw_post(None, f"/job/{n}"), (201,)),
    Case("no-length-on-post-job", fixed(raw_post(None)), (400,), "string Name"),
    Case("zero-length-on-post-path", lambda n: raw_post(b"", f"/job/{n}"), (201,)),
    Case("negative-length",
         fixed(raw_post(b"", headers=["Content-Length: -1"], length=False)),
         (400,), "Content-Length"),
    Case("non-numeric-length",
         fixed(raw_post(b"", headers=["Content-Length: abc"], length=False)),
         (400,), "Content-Length"),
    Case("hex-length",
         fixed(raw_post(b"", headers=["Content-Length: 0x10"], length=False)),
         (400,), "Content-Length"),
    Case("plus-sign-length",
         fixed(raw_post(b"{}", headers=["Content-Length: +2"], length=False)),
         (400,), "Content-Length"),
    Case("superscript-digit-length",
         fixed(raw_post(b"{}", headers=[b"Content-Length: \xb2"], length=False)),
         (400,), "Content-Length"),
    Case("superscript-digit-length-with-expect",
         fixed(raw_post(b"", headers=[b"Content-Length: \xb2", "Expect: 100-continue"],
                    length=False)), (400, 413), "Content-Length|larger", HEAD_ONLY),
    Case("huge-length",
         fixed(raw_post(b"", headers=["Content-Length: " + "9" * 30], length=False)),
         (413,), "larger", HEAD_ONLY),
    Case("conflicting-lengths",
         lambda n: raw_post(named(n), headers=["Content-Length: 100"]),
         (400,), "Content-Length"),
    Case("longer-length-than-sent",
         lambda n: raw_post(named(n), headers=["Content-Length: 100"], length=False,
                        close=False), (400, 408, CLOSED), "shorter|time", STALL),
    Case("longer-length-then-half-close",
         lambda n: raw_post(named(n), headers=["Content-Length: 100"], length=False),
         (400, CLOSED), "shorter", HALF_CLOSE),
    Case("length-then-chunked",
         lambda n: raw_post(chunked(named(n)), headers=["Transfer-Encoding: chunked"]),
         (400,), "Transfer-Encoding"),
    Case("chunked-then-length",
         lambda n: raw_post(chunked(named(n)), length=False,
                        headers=["Transfer-Encoding: chunked", "Content-Length: 5"]),
         (400,), "Transfer-Encoding"),
    Case("chunked", lambda n: chunked_post(chunked(named(n))), (201,)),
    Case("chunked-bytewise",
         lambda n: chunked_post(chunked(*[bytes([c]) for c in named(n)])), (201,)),
    Case("chunked-extension-and-trailer",
         lambda n: chunked_post(b"1;ext=1\r\n{\r\n%x\r\n%s\r\n"
                                % (len(named(n)) - 1, named(n)[1:])
                                + b"0\r\nX-Trailer: 1\r\n\r\n"), (201,)),
    Case("chunked-bad-size", fixed(chunked_post(b"zz\r\n{}\r\n0\r\n\r\n")),
         (400,), "chunked"),
    Case("chunked-negative-size", fixed(chunked_post(b"-2\r\n{}\r\n0\r\n\r\n")),
         (400,), "chunked"),
    Case("chunked-empty-size", fixed(chunked_post(b"\r\n{}\r\n0\r\n\r\n")),
         (400,), "chunked"),
    Case("chunked-missing-crlf", fixed(chunked_post(b"2\r\n{}XY0\r\n\r\n")),
         (400,), "chunked"),
    Case("chunked-cut-short", fixed(chunked_post(b"20\r\n{}")), (400, CLOSED),
         "chunked", HALF_CLOSE),
    Case("chunked-stalls", fixed(chunked_post(b"2\r\n{}\r\n", close=False)),
         (400, 408, CLOSED), "chunked|time", STALL),
    Case("chunked-over-limit", fixed(chunked_post(b"%x\r\n" % (2 * LIMIT))),
         (413,), "larger", HEAD_ONLY),
    Case("chunked-huge-size", fixed(chunked_post(b"f" * 40 + b"\r\n")),
         (413,), "larger", HEAD_ONLY),
    Case("chunked-sum-over-limit",
         fixed(chunked_post(b"%x\r\n%s\r\n%x\r\n" % (LIMIT - 8, b" " * (LIMIT - 8),
                                                    64))),
         (413,), "larger", HEAD_ONLY),
    Case("gzip-transfer-encoding",
         fixed(raw_post(b"", headers=["Transfer-Encoding: gzip"], length=False)),
         (501, 400), "Transfer-Encoding"),
    Case("expect-continue-over-limit",
         fixed(raw_post(b"", headers=[f"Content-Length: {LIMIT + 1}",
                                  "Expect: 100-continue"], length=False)),
         (413,), "larger", HEAD_ONLY),
    Case("expect-continue",
         lambda n: raw_post(named(n), headers=["Expect: 100-continue"]), (201,), "",
         CONTINUE),
]

SMUGGLED = b"POST /job HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"

METHOD_CASES = [
    Case("put-job", fixed(http_request("PUT", "/job", b"{}")), (405,), "POST"),
    Case("patch-job", fixed(http_request("PATCH", "/job", b"{}")), (405,), "POST"),
    Case("delete-job", fixed(http_request("DELETE", "/job")), (405,), "POST"),
    Case("options-job", fixed(http_request("OPTIONS", "/job")), (405,), "POST"),
    Case("post-health-live", fixed(http_request("POST", "/health/live")), (405,),
         "GET"),
    Case("put-job-smuggling-a-post",
         lambda n: http_request("PUT", "/job", SMUGGLED % (len(named(n)), named(n)),
                                close=False), (405,), "POST"),
    Case("post-health-smuggling-a-get",
         fixed(http_request("POST", "/health/live",
                            b"GET /jobs HTTP/1.1\r\nHost: x\r\n\r\n", close=False)),
         (405,), "GET"),
    Case("trace-job", fixed(http_request("TRACE", "/job")), (501, 405), "method"),
    Case("unknown-method", fixed(http_request("BREW", "/job")), (501, 405),
         "method"),
    Case("lower-case-method", fixed(http_request("post", "/job", b"{}")),
         (501, 405), "method"),
]

ID_CASES = [
    Case("get-dot-dot", fixed(http_request("GET", "/job/..")), (404,), "not found"),
    Case("get-dot-dot-path", fixed(http_request("GET", "/job/../jobs")),
         (404, 405), "not found|POST"),
    Case("get-encoded-slash", fixed(http_request("GET", "/job/a%2Fb")), (404,),
         "not found"),
    Case("get-encoded-nul", fixed(http_request("GET", "/job/a%00b")), (404,),
         "not found"),
    Case("get-regex-any", fixed(http_request("GET", "/job/.*")), (404,),
         "not found"),
    Case("get-regex-alternative", fixed(http_request("GET", "/job/a|b")), (404,),
         "not found"),
    Case("get-regex-anchors", fixed(http_request("GET", "/job/^x$")), (404,),
         "not found"),
    Case("get-overlong-id", fixed(http_request("GET", "/job/" + "x" * 300)),
         (404,), "not found"),
    Case("get-encoded-unicode-id", fixed(http_request("GET", "/job/%C3%A9t%C3%A9")),
         (404,), "not found"),
    Case("get-raw-unicode-id",
         fixed(http_request("GET", "/job/été".encode())), (404,), "not found"),
    Case("get-invalid-wait", fixed(http_request("GET", "/job/abc?wait=nan")),
         (400,), "wait"),
    Case("delete-invalid-timeout",
         fixed(http_request("DELETE", "/job/abc?timeout=-5")), (400,), "timeout"),
    Case("post-dot-dot-path", fixed(raw_post(None, "/job/a/../b")), (400,),
         "container name"),
    Case("post-encoded-slash-path", fixed(raw_post(None, "/job/..%2F..")), (400,),
         "container name"),
    Case("post-encoded-nul-path", fixed(raw_post(None, "/job/a%00b")), (400,),
         "container name"),
    Case("post-name-dot-dot", fixed(raw_post(b'{"name": "../x"}')), (400,),
         "container name"),
    Case("post-name-slash", fixed(raw_post(b'{"name": "a/b"}')), (400,),
         "container name"),
    Case("post-name-regex-any", fixed(raw_post(b'{"name": ".*"}')), (400,),
         "container name"),
    Case("post-name-regex-alternative", fixed(raw_post(b'{"name": "a|b"}')), (400,),
         "container name"),
    Case("post-name-regex-anchors", fixed(raw_post(b'{"name": "^x$"}')), (400,),
         "container name"),
    Case("post-name-unicode", fixed(raw_post('{"name": "été"}'.encode())), (400,),
         "container name"),
    Case("post-name-newline", fixed(raw_post(b'{"name": "a\\nb"}')), (400,),
         "container name"),
    Case("post-name-300-chars", lambda n: raw_post(named(n + "-" + "x" * 300)),
         (201,)),
]

PROTOCOL_CASES = [
    Case("request-line-over-64k",
         fixed(http_request("GET", "/job/" + "x" * (64 * 1024 + 100))), (414,),
         "URI|long"),
    Case("too-many-headers",
         fixed(http_request("GET", "/jobs",
                            headers=[f"X-H{i}: {i}" for i in range(120)])),
         (431,), "headers"),
    Case("header-line-over-64k",
         fixed(http_request("GET", "/jobs",
                            headers=["X-Long: " + "y" * (64 * 1024 + 100)])),
         (431,), "long"),
    Case("http-version-2", fixed(http_request("GET", "/jobs", version="HTTP/2.0")),
         (505,), "version"),
    Case("http-version-garbage",
         fixed(http_request("GET", "/jobs", version="HTTP/x.y")), (400,),
         "version"),
    Case("http-0.9-post", fixed(b"POST /job\r\n\r\n"), (400,), "0.9|request",
         bare=True),
    Case("tls-hello", fixed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
         (400,), "request"),
    Case("idle-connection", fixed(b""), (CLOSED,), "", STALL),
    Case("partial-request-line", fixed(b"GET /health/li"), (CLOSED,), "", STALL),
    Case("idle-after-keep-alive-reply",
         fixed(http_request("GET", "/health/live", close=False)), (204,), "", STALL),
    Case("headers-one-byte-at-a-time",
         fixed(http_request("GET", "/health/live") + b"X" * 100), (CLOSED, 204, 408),
         "", DRIP),
]

FILTER_CASES = [
    filter_case("loop", (400,), "longer than 1 s"),
    filter_case("boom", (400,), "boom"),
    filter_case("error-object", (400,), "boom"),
    filter_case("huge-output", (400,), "longer than|larger than|died"),
    filter_case("output-over-limit", (400,), "larger than|longer than"),
    filter_case("exhaust-memory", (400,), "longer than|died"),
    filter_case("deep-output", (400,), "deep"),
    filter_case("image-number", (400, 422), "Image"),
    filter_case("cmd-string", (201,)),
    filter_case("cmd-number", (400, 422), "Cmd"),
    filter_case("cmd-object", (400, 422), "Cmd"),
    filter_case("bad-name", (400,), "container name"),
    filter_case("no-image", (400, 404, 422), "no-such:image"),
    filter_case("host-config-type", (400, 422), "Memory|HostConfig"),
    filter_case("host-config-string", (400, 422), "HostConfig"),
    filter_case("restart-policy", (400, 422), "restart policy"),
    filter_case("labels", (400,), "Labels"),
    filter_case("platform", (400,), "Platform"),
    filter_case("array", (400,), "object"),
    filter_case("nothing", (400,), "no output"),
    filter_case("halt", (400,), "no output|halt"),
]

HOSTILE_CASES = (JSON_CASES + LENGTH_CASES + METHOD_CASES + ID_CASES
                 + PROTOCOL_CASES + FILTER_CASES)


def run_case(port: int, case: Case) -> Exchange:
    """Send a case's request the way its mode says and collect the reply.

    HEAD_ONLY requests carry no body at all; HALF_CLOSE ends the sending
    side after the request; STALL keeps the connection open and silent;
    DRIP sends one byte at a time; CONTINUE waits for 100 Continue before
    sending the body.
    """
    request = case.build(case.id)
    connection = RawConnection(port)
    try:
        if case.mode == DRIP:
            connection.drip(request, 0.25, READ_TIMEOUT * 5)
            connection.receive(CLIENT_TIMEOUT, quiet=CLIENT_TIMEOUT)
        elif case.mode == CONTINUE:
            head, _, body = request.partition(b"\r\n\r\n")
            connection.send(head + b"\r\n\r\n")
            connection.receive(CLIENT_TIMEOUT,
                               until=lambda replies, interim: replies or interim)
            if not connection.result().replies:
                connection.send(body)
                connection.receive(CLIENT_TIMEOUT)
        else:
            connection.send(request)
            if case.mode == HALF_CLOSE:
                connection.half_close()
            quiet = CLIENT_TIMEOUT if case.mode == STALL else 1.0
            connection.receive(CLIENT_TIMEOUT, quiet=quiet)
        return connection.result()
    finally:
        connection.close()


@pytest.fixture(scope="class")
def hostile(image, tmp_path_factory):
    """The dispatcher that answers the hostile requests."""
    shared = launch_shared(
        image, tmp_path_factory.mktemp("hostile"), HOSTILE_FILTER,
        "--read-timeout", str(READ_TIMEOUT), "--filter-timeout", "1",
        "--max-body", str(LIMIT),
    )
    yield shared
    stop_shared(shared)


class TestHostileRequests:
    @pytest.mark.parametrize("case", [case.param() for case in HOSTILE_CASES])
    def test_answer_hostile_request_cleanly(self, hostile, case):
        before = container_names(hostile.namespace)
        result = run_case(hostile.port, case)

        assert len(result.replies) <= 1, f"answered more than asked: {result}"
        if case.bare and result.leftover and not result.replies:
            result.replies = [Reply(json.loads(result.leftover)["error"]["code"],
                                    {"Content-Type": "application/json"},
                                    result.leftover)]
            result.leftover = b""
        assert result.leftover == b"", result
        assert result.interim == ([100] if case.mode == CONTINUE else []), result
        if result.replies:
            reply = result.replies[0]
            assert reply.status in case.statuses, reply
            if reply.status >= 400:
                assert_json_error(reply, reply.status, case.keyword)
            elif reply.status == 201:
                assert reply.json["id"].startswith(hostile.prefix + case.id), reply
        else:
            assert CLOSED in case.statuses, f"closed without a reply: {result}"
            assert result.closed, result
        if case.mode in (STALL, DRIP):
            assert result.closed, "the slow connection was left open"
            assert result.elapsed < READ_TIMEOUT + READ_TIMEOUT_SLACK, result

        created = container_names(hostile.namespace) - before
        if result.replies and result.replies[0].status == 201:
            assert created == {result.replies[0].json["id"]}
        else:
            assert created == set(), f"created {created}"
        assert_alive(hostile.process)

    def test_keep_memory_bounded_after_hostile_requests(self, hostile):
        assert_alive(hostile.process)
        pid = hostile.process.process.pid
        resident = proc_status_kib(pid, "VmRSS")
        peak = proc_status_kib(pid, "VmHWM")
        print(f"\nHostile dispatcher after the table: VmRSS {resident / 1024:.1f}"
              f" MiB, VmHWM {peak / 1024:.1f} MiB")
        assert resident * 1024 < 150e6, f"VmRSS {resident} KiB"


# --- Filter limits ------------------------------------------------------------


class TestFilterLimits:
    def test_answer_400_when_filter_worker_runs_out_of_memory(
            self, start_dispatcher, namespace):
        dispatcher = start_dispatcher(HOSTILE_FILTER, "--filter-timeout", "120",
                                      env={"JOB_PREFIX": f"m{RUN_ID}-"})
        reply = dispatcher.request(
            "POST", "/job", body={"case": "exhaust-memory"}, timeout=150)
        assert_json_error(reply, 400, "died")
        reply = dispatcher.request("POST", "/job", body={"name": "after-oom"},
                                   timeout=CLIENT_TIMEOUT)
        assert reply.status == 201, reply
        assert container_names(namespace) == {f"m{RUN_ID}-after-oom"}
        resident = proc_status_kib(dispatcher.process.pid, "VmHWM")
        assert resident * 1024 < 150e6, f"VmHWM {resident} KiB"
        assert_alive(dispatcher)

    def test_answer_other_requests_while_filter_loops(self, start_dispatcher,
                                                      namespace):
        dispatcher = start_dispatcher(
            HOSTILE_FILTER, "--filter-timeout", "6", "--filter-workers", "2",
            env={"JOB_PREFIX": f"w{RUN_ID}-"})
        outcome = {}

        def loop():
            began = time.monotonic()
            outcome["reply"] = dispatcher.request(
                "POST", "/job", body={"case": "loop"}, timeout=30)
            outcome["elapsed"] = time.monotonic() - began

        looping = threading.Thread(target=loop)
        looping.start()
        try:
            time.sleep(0.5)
            began = time.monotonic()
            assert dispatcher.request("GET", "/health/live").status == 204
            reply = dispatcher.request("POST", "/job", body={"name": "beside-loop"},
                                       timeout=CLIENT_TIMEOUT)
            assert reply.status == 201, reply
            assert time.monotonic() - began < 4, "a looping filter held others up"
            assert "reply" not in outcome, "the loop ended too early"
        finally:
            looping.join(60)
        assert_json_error(outcome["reply"], 400, "longer than 6 s")
        assert 5 < outcome["elapsed"] < 20, outcome
        assert container_names(namespace) == {f"w{RUN_ID}-beside-loop"}
        assert_alive(dispatcher)


# --- Docker faults ------------------------------------------------------------

FAULT_FILTER = r"""
{Name: ($ENV.JOB_PREFIX + .name), Image: $ENV.JOB_IMAGE, Cmd: (.cmd // ["true"]),
 HostConfig: {NetworkMode: "none"}}
"""




def job_events(dispatcher: RunningDispatcher, action: str) -> int:
    """Return the dispatcher's count of Docker events ``action`` for its jobs."""
    reply = dispatcher.request("GET", "/metrics", timeout=CLIENT_TIMEOUT)
    assert reply.status == 200, reply
    total = 0
    for line in reply.body.decode().splitlines():
        if line.startswith("jobs_total{") and f'action="{action}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def docker_time_ns(text: str) -> int:
    """Return a Docker RFC 3339 time (UTC, up to nanoseconds) in nanoseconds."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$", text)
    assert match, text
    whole = datetime.fromisoformat(match[1] + "+00:00").timestamp()
    return int(whole) * 10**9 + int((match[2] or "0").ljust(9, "0")[:9])


def ran_once(name: str) -> dict | None:
    """Return a job's inspect reply once it has run to a clean exit."""
    info = inspect(name)
    if info is None or info["State"]["Status"] != "exited":
        return None
    state = info["State"]
    assert state["ExitCode"] == 0, state
    assert not state["StartedAt"].startswith("0001"), state
    assert info["RestartCount"] == 0, info
    return info


# A silent event stream is opened again after this long (the dispatcher's
# EVENTS_IDLE_TIMEOUT), so after a hang the events may lag this much.
EVENTS_IDLE_TIMEOUT = getattr(
    importlib.import_module("docker_job_dispatcher"), "EVENTS_IDLE_TIMEOUT", 60.0)


def follow_events_again(dispatcher: RunningDispatcher) -> list[str]:
    """Wait until new jobs' Docker events are counted again; return the probes.

    A probe job is submitted every few seconds until its creation shows up
    in the metrics. Only new events count: the daemon replays no more than
    its last few hundred events after a reconnection, fewer than a busy
    shared daemon makes during a long outage.
    """
    probes: list[str] = []
    deadline = time.monotonic() + EVENTS_IDLE_TIMEOUT + 20
    while True:
        before = job_events(dispatcher, "create")
        probes.append(f"probe-{len(probes)}")
        reply = dispatcher.submit({"name": probes[-1]})
        assert reply.status == 201, reply
        try:
            wait_for(lambda: job_events(dispatcher, "create") > before,
                     timeout=5, interval=0.25)
            return probes
        except AssertionError:
            if time.monotonic() > deadline:
                lines = [line for line in dispatcher.log.splitlines()
                         if not line.startswith("INFO Answered")]
                raise AssertionError(
                    "Docker's events are not followed again; log:\n"
                    + "\n".join(lines[-30:])) from None


def fault_dispatcher(start_dispatcher, docker_proxy: DockerProxy, *args: str):
    """Start a dispatcher that reaches Docker through ``docker_proxy``."""
    prefix = f"f{RUN_ID}{uuid.uuid4().hex[:4]}-"
    dispatcher = start_dispatcher(
        FAULT_FILTER, "-t", "http", "--docker-timeout", "3", "-m", "1", *args,
        env={"DOCKER_HOST": docker_proxy.docker_host, "JOB_PREFIX": prefix})
    wait_for(lambda: dispatcher.request("GET", "/health/ready").status == 204,
             timeout=15, message="the dispatcher to be ready")
    return dispatcher, prefix


class TestDockerFaults:
    @pytest.mark.parametrize("mode", ["refuse", "hang", "error", "cut"])
    def test_answer_502_and_recover_when_docker_fails(
            self, start_dispatcher, proxy, namespace, mode):
        dispatcher, prefix = fault_dispatcher(start_dispatcher, proxy, "-u", "1")
        blocker, pending = prefix + "blocker", prefix + "pending"
        reply = dispatcher.submit({"name": "blocker", "cmd": ["sleep", "3"]})
        assert reply.status == 201, reply
        reply = dispatcher.submit({"name": "pending"})
        assert reply.status == 201, reply
        wait_for(lambda: (inspect(blocker) or {}).get("State", {})
                 .get("Status") == "running", timeout=15,
                 message="the blocker to run")
        assert inspect(pending)["State"]["Status"] == "created"
        wait_for(lambda: job_events(dispatcher, "create") >= 2, timeout=15,
                 message="the creations to be counted")

        if mode == "refuse":
            refuse_connections(proxy)
        else:
            proxy.set_mode(mode)
        for method, path, body in (
            ("POST", "/job", {"name": "during"}),
            ("GET", f"/job/{blocker}", None),
            ("GET", f"/job/{pending}", None),
            ("DELETE", f"/job/{pending}", None),
        ):
            began = time.monotonic()
            reply = dispatcher.request(method, path, body=body,
                                       timeout=CLIENT_TIMEOUT)
            assert_json_error(reply, 502, "Docker")
            assert time.monotonic() - began < CLIENT_TIMEOUT
        reply = dispatcher.request("GET", "/health/ready", timeout=CLIENT_TIMEOUT)
        assert_json_error(reply, 503, "Docker")
        assert_alive(dispatcher)
        if mode != "cut":
            assert inspect(prefix + "during") is None
            assert inspect(pending)["State"]["Status"] == "created"

        wait_for(lambda: (inspect(blocker) or {}).get("State", {})
                 .get("Status") == "exited", timeout=20,
                 message="the blocker to exit")
        proxy.set_mode("pass")
        wait_for(lambda: dispatcher.request(
            "GET", "/health/ready", timeout=CLIENT_TIMEOUT).status == 204,
            timeout=20, message="readiness after the fault")
        reply = dispatcher.submit({"name": "after"})
        assert reply.status == 201, reply
        for name in (blocker, pending, prefix + "after"):
            wait_for(lambda: ran_once(name), timeout=30,
                     message=f"{name} to run after the fault")
        reply = dispatcher.request("GET", f"/job/{prefix}after")
        assert reply.status == 200 and reply.json["state"] == "exited", reply
        probes = follow_events_again(dispatcher)
        assert container_names(namespace) <= {
            blocker, pending, prefix + "after", prefix + "during",
            *(prefix + probe for probe in probes)}
        assert_alive(dispatcher)

    def test_start_pending_jobs_when_event_stream_drops(
            self, start_dispatcher, proxy, namespace):
        dispatcher, prefix = fault_dispatcher(start_dispatcher, proxy, "-u", "5")
        names = [prefix + name for name in ("blocker", "first", "second")]
        reply = dispatcher.submit({"name": "blocker", "cmd": ["sleep", "1"]})
        assert reply.status == 201, reply
        for name in ("first", "second"):
            assert dispatcher.submit({"name": name}).status == 201
        wait_for(lambda: (inspect(names[0]) or {}).get("State", {})
                 .get("Status") == "running", timeout=15,
                 message="the blocker to run")

        ends = time.monotonic() + 3
        while time.monotonic() < ends:
            proxy.drop()
            time.sleep(0.2)

        runs = [wait_for(lambda: ran_once(name), timeout=30,
                         message=f"{name} to run") for name in names]
        spans = sorted((docker_time_ns(run["State"]["StartedAt"]),
                        docker_time_ns(run["State"]["FinishedAt"])) for run in runs)
        for (_, finished), (started, _) in zip(spans, spans[1:]):
            assert started >= finished, f"two jobs ran at once with -m 1: {spans}"
        assert dispatcher.request("GET", "/health/ready").status == 204
        reply = dispatcher.request("GET", f"/job/{names[1]}")
        assert reply.status == 200, reply
        wait_for(lambda: job_events(dispatcher, "die") >= 3, timeout=20,
                 message="every death to be seen in Docker's events")
        assert container_names(namespace) == set(names)
        assert_alive(dispatcher)


# --- Load ---------------------------------------------------------------------

LOAD_FILTER = r"""
{Name: ($ENV.JOB_PREFIX + .id), Image: $ENV.JOB_IMAGE, Cmd: ["true"],
 HostConfig: {NetworkMode: "none"}}
"""

FULL_LOAD = os.environ.get("DJD_BENCHMARK") == "1"
LOAD_SUBMISSIONS = 1000 if FULL_LOAD else 200
LOAD_LOOKUPS = 5000 if FULL_LOAD else 1000
LOAD_CLIENTS = 32
LOAD_CONCURRENCY = 4


class PeakMemory:
    """Samples a process's peak resident memory (VmHWM) in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            try:
                self.peak_kib = max(self.peak_kib,
                                    proc_status_kib(self.pid, "VmHWM"))
            except (OSError, AssertionError):
                return
            if self._stop.wait(0.2):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def submission_plan(count: int, seed: int = 7) -> list[dict]:
    """Return ``count`` bodies; every tenth repeats an earlier one."""
    rng = random.Random(seed)
    bodies: list[dict] = []
    distinct = 0
    for index in range(count):
        if index % 10 == 9:
            bodies.append(bodies[rng.randrange(len(bodies))])
        else:
            bodies.append({"id": f"j{distinct}"})
            distinct += 1
    return bodies


def submit_all(port: int, bodies: list[dict], clients: int) -> list:
    """Send every body from ``clients`` threads on keep-alive connections.

    Returns (status, reply JSON) per body, or the exception that broke it.
    """
    results: list = [None] * len(bodies)
    cursor = iter(range(len(bodies)))
    lock = threading.Lock()

    def work() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while True:
                with lock:
                    index = next(cursor, None)
                if index is None:
                    return
                try:
                    connection.request(
                        "POST", "/job", body=json.dumps(bodies[index]).encode(),
                        headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = response.read()
                    results[index] = (response.status, json.loads(payload))
                    if response.will_close:
                        connection.close()
                except (OSError, http.client.HTTPException, ValueError) as error:
                    results[index] = error
                    connection.close()
        finally:
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


async def lookup(port: int, job: str) -> int | Exception:
    """GET /job/<job> on a connection of its own; return the status."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET /job/{job} HTTP/1.1\r\nHost: x\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
        replies, _, _ = parse_replies(data)
        if len(replies) != 1:
            return AssertionError(f"no whole reply: {data[:200]!r}")
        reply = replies[0]
        if reply.status == 200 and reply.json["id"] != job:
            return AssertionError(f"wrong job: {reply.body[:200]!r}")
        return reply.status
    except (OSError, ValueError) as error:
        return error


async def lookup_all(port: int, jobs: list[str], timeout: float) -> list:
    """Look every job up at once, each on its own connection."""
    return await asyncio.wait_for(
        asyncio.gather(*(lookup(port, job) for job in jobs)), timeout)


def raise_open_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


def most_at_once(spans: list[tuple[int, int]]) -> int:
    """Return the most intervals that overlap at any moment."""
    moments = sorted([(start, 1) for start, _ in spans]
                     + [(end, -1) for _, end in spans], key=lambda m: (m[0], m[1]))
    running = most = 0
    for _, step in moments:
        running += step
        most = max(most, running)
    return most


class TestConcurrentSubmissions:
    def test_answer_200_to_every_concurrent_repeat_of_a_body(
            self, start_dispatcher, namespace):
        prefix = f"c{RUN_ID}{uuid.uuid4().hex[:4]}-"
        dispatcher = start_dispatcher(LOAD_FILTER, "-m", "0",
                                      env={"JOB_PREFIX": prefix})
        senders = 16
        for round_number in range(5):
            body = json.dumps({"id": f"same-{round_number}"}).encode()
            barrier = threading.Barrier(senders)
            statuses: list = []

            def send() -> None:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", dispatcher.port, timeout=CLIENT_TIMEOUT)
                try:
                    connection.connect()
                    barrier.wait()
                    connection.request("POST", "/job", body=body)
                    response = connection.getresponse()
                    statuses.append((response.status, response.read()))
                finally:
                    connection.close()

            threads = [threading.Thread(target=send) for _ in range(senders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            codes = sorted(status for status, _ in statuses)
            assert codes == [200] * (senders - 1) + [201], statuses
        assert len(namespace_containers(namespace)) == 5


class TestConnectionLimits:
    def test_answer_503_when_every_connection_slot_stays_taken(
            self, start_dispatcher):
        dispatcher = start_dispatcher("--max-connections", "2",
                                      "--read-timeout", "20")
        holders = [socket.create_connection(("127.0.0.1", dispatcher.port))
                   for _ in range(2)]
        try:
            time.sleep(0.5)
            began = time.monotonic()
            result = exchange(dispatcher.port, http_request("GET", "/health/live"))
            waited = time.monotonic() - began
            assert len(result.replies) == 1, result
            assert_json_error(result.replies[0], 503, "busy")
            assert 1.5 < waited < CLIENT_TIMEOUT, waited
            holders.pop().close()
            reply = wait_for(lambda: dispatcher.request(
                "GET", "/health/live", timeout=CLIENT_TIMEOUT), timeout=10)
            assert reply.status == 204, reply
        finally:
            for holder in holders:
                holder.close()
        assert_alive(dispatcher)

    def test_close_connections_that_send_too_slowly(self, start_dispatcher):
        dispatcher = start_dispatcher("--read-timeout", "1")
        began = time.monotonic()
        connection = RawConnection(dispatcher.port)
        try:
            connection.drip(b"GET /health/live HTTP/1.1\r\n" + b"X" * 200, 0.2, 20)
            connection.receive(CLIENT_TIMEOUT, quiet=CLIENT_TIMEOUT)
        finally:
            connection.close()
        assert connection.closed
        assert time.monotonic() - began < 1 + READ_TIMEOUT_SLACK
        assert_alive(dispatcher)


class TestLoad:
    def test_lose_no_submission_or_lookup_under_load(self, start_dispatcher,
                                                     namespace):
        prefix = f"l{RUN_ID}{uuid.uuid4().hex[:4]}-"
        dispatcher = start_dispatcher(LOAD_FILTER, "-m", str(LOAD_CONCURRENCY),
                                      env={"JOB_PREFIX": prefix})
        memory = PeakMemory(dispatcher.process.pid)
        bodies = submission_plan(LOAD_SUBMISSIONS)
        distinct = {prefix + body["id"] for body in bodies}
        problems: list[str] = []
        try:
            began = time.monotonic()
            results = submit_all(dispatcher.port, bodies, LOAD_CLIENTS)
            submit_seconds = time.monotonic() - began

            failures = [(bodies[i], r) for i, r in enumerate(results)
                        if not isinstance(r, tuple) or r[0] not in (200, 201)]
            if failures:
                problems.append(f"{len(failures)} submissions failed, e.g. "
                                f"{failures[:3]}")
            answered = [(body, r) for body, r in zip(bodies, results)
                        if isinstance(r, tuple)]
            wrong_ids = [(body, reply) for body, (status, reply) in answered
                         if status in (200, 201)
                         and reply != {"id": prefix + body["id"]}]
            if wrong_ids:
                problems.append(f"wrong ids: {wrong_ids[:3]}")
            statuses = [r[0] if isinstance(r, tuple) else None for r in results]
            if statuses.count(201) != len(distinct):
                problems.append(f"{statuses.count(201)} created for "
                                f"{len(distinct)} distinct bodies")
            names = [c["Names"][0].lstrip("/")
                     for c in namespace_containers(namespace)]
            if len(names) != len(distinct) or set(names) != distinct:
                problems.append(f"{len(names)} containers for {len(distinct)} "
                                f"names; missing {sorted(distinct - set(names))[:5]}")

            def everything_ran() -> bool:
                return all(container["State"] in ("exited", "dead")
                           for container in namespace_containers(namespace))

            wait_for(everything_ran, timeout=120 + LOAD_SUBMISSIONS * 0.5,
                     interval=1, message="every job to run")
            run_seconds = time.monotonic() - began
            with ThreadPoolExecutor(16) as pool:
                infos = list(pool.map(inspect, sorted(distinct)))
            spans = []
            for name, info in zip(sorted(distinct), infos):
                state = (info or {}).get("State") or {}
                if not (state.get("Status") == "exited"
                        and state.get("ExitCode") == 0
                        and not state.get("StartedAt", "0001").startswith("0001")
                        and info.get("RestartCount") == 0):
                    problems.append(f"{name} did not run exactly once: {state}")
                    continue
                spans.append((docker_time_ns(state["StartedAt"]),
                              docker_time_ns(state["FinishedAt"])))
            if most_at_once(spans) > LOAD_CONCURRENCY:
                problems.append(f"{most_at_once(spans)} jobs ran at once")

            raise_open_file_limit(LOAD_LOOKUPS + 1000)
            targets = [sorted(distinct)[i % len(distinct)]
                       for i in range(LOAD_LOOKUPS)]
            began = time.monotonic()
            answers = asyncio.run(lookup_all(dispatcher.port, targets, 300))
            lookup_seconds = time.monotonic() - began
            wrong = [answer for answer in answers if answer != 200]
            if wrong:
                problems.append(f"{len(wrong)} lookups failed, e.g. {wrong[:5]}")
            assert_alive(dispatcher)
            peak = memory.stop()
            print(
                f"\nLoad: {LOAD_SUBMISSIONS} submissions ({len(distinct)} distinct)"
                f" from {LOAD_CLIENTS} clients in {submit_seconds:.1f} s ="
                f" {LOAD_SUBMISSIONS / submit_seconds:.1f} submissions/s;"
                f" all run with -m {LOAD_CONCURRENCY} after {run_seconds:.1f} s"
                f"\nLoad: {LOAD_LOOKUPS} concurrent lookups in"
                f" {lookup_seconds:.1f} s = {LOAD_LOOKUPS / lookup_seconds:.1f}"
                f" lookups/s\nLoad: dispatcher peak memory (VmHWM)"
                f" {peak / 1024:.1f} MiB"
                f"{'' if FULL_LOAD else ' (reduced run; DJD_BENCHMARK=1 for full)'}"
            )
        finally:
            memory.stop()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda c: docker(
                    "DELETE", f"/containers/{c['Id']}", query={"force": 1}),
                    namespace_containers(namespace)))
        assert not problems, "\n".join(problems)


# === The swarm backend: jobs as replicated-job services ====================


HOLD_CONSTRAINT = "node.id==docker-job-dispatcher-held"

# Put on the swarms the tests make, so that a run can tell them apart.
TEST_SWARM_LABEL = "docker-job-dispatcher.test-swarm"

# The body's "spec" is used as a native service spec; otherwise the body
# gives a shell script (or an entrypoint and a command) for the test image.
SWARM_FILTER = r"""
($ENV.NS + "-" + (.name // "job")) as $name
| if .spec then .spec + {Name: $name}
  else {
    Name: $name,
    Image: $ENV.JOB_IMAGE,
    Entrypoint: (.entrypoint // ["sh", "-c"]),
    Cmd: (if .script then [.script] else .cmd end),
    Env: .env,
    Labels: .labels,
    HostConfig: {
      RestartPolicy: {
        Name: (.restart // "no"),
        MaximumRetryCount: (.retries // 0)
      }
    }
  } | with_entries(select(.value != null))
  end
"""

# Long enough for swarm to schedule, start and report a task.
SWARM_WAIT = 60


# --- Helpers ---------------------------------------------------------------


def swarm_info() -> dict:
    """Return the Swarm part of the daemon's /info."""
    status, info = docker("GET", "/info")
    assert status == 200, info
    return info.get("Swarm") or {}


def service(name: str) -> dict | None:
    """Return Docker's description of a service, or None if absent."""
    status, info = docker("GET", f"/services/{name}")
    return info if status == 200 else None


def namespace_services(namespace: str) -> list[dict]:
    """Return the services labelled with a namespace or named after it."""
    found = {}
    for filters in ({"label": [f"{NAMESPACE_LABEL}={namespace}"]},
                    {"name": [namespace]}):
        status, services = docker("GET", "/services", query={"filters": filters})
        assert status == 200, services
        found.update({item["ID"]: item for item in services})
    return list(found.values())


def remove_services(namespace: str) -> None:
    """Remove the services of a namespace (swarm stops their tasks)."""
    for item in namespace_services(namespace):
        docker("DELETE", f"/services/{item['ID']}")


def service_tasks(service_ids: list[str]) -> list[dict]:
    """Return the swarm tasks of some services (none if no id is given)."""
    if not service_ids:
        return []
    status, tasks = docker("GET", "/tasks",
                           query={"filters": {"service": service_ids}})
    assert status == 200, tasks
    return tasks


def running_tasks(namespace: str) -> list[dict]:
    """Return the namespace's tasks whose container starts or runs now."""
    ids = [item["ID"] for item in namespace_services(namespace)]
    return [task for task in service_tasks(ids)
            if (task.get("Status") or {}).get("State") in ("starting", "running")]


def sleeper(seconds: int) -> str:
    """Return a script that sleeps, and ends at once when asked to stop."""
    return f"trap 'exit 143' TERM; sleep {seconds} & wait"


def job_name_swarm(namespace: str, name: str) -> str:
    return f"{namespace}-{name}"


def get_job(dispatcher: RunningDispatcher, name: str) -> dict:
    reply = dispatcher.request("GET", f"/job/{name}")
    assert reply.status == 200, reply
    return reply.json


def wait_state_swarm(dispatcher: RunningDispatcher, name: str, *states: str,
               timeout: float = SWARM_WAIT) -> dict:
    """Poll a job until its state is one of ``states``; return its summary."""
    def reached():
        job = get_job(dispatcher, name)
        return job if job["state"] in states else None

    return wait_for(reached, timeout=timeout, interval=0.1,
                    message=f"job {name} to be {' or '.join(states)}")


def submit(dispatcher: RunningDispatcher, namespace: str, name: str,
           status: int = 201, **body) -> str:
    """Submit a job of the swarm filter; check the reply, return the id."""
    reply = dispatcher.submit({"name": name, **body})
    assert reply.status == status, reply
    assert reply.json == {"id": job_name_swarm(namespace, name)}
    return job_name_swarm(namespace, name)


def parse_time(text: str) -> float:
    """Return a Docker RFC 3339 time (nanoseconds and all) as Unix seconds."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$",
                     text)
    assert match, text
    whole, fraction, zone = match.groups()
    moment = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return moment.timestamp() + float(fraction or 0)


def metric_lines(dispatcher: RunningDispatcher) -> list[str]:
    reply = dispatcher.request("GET", "/metrics")
    assert reply.status == 200, reply
    return reply.body.decode().splitlines()


# --- Fixtures: the swarm and the dispatchers --------------------------------


def network_names() -> set[str]:
    status, networks = docker("GET", "/networks")
    assert status == 200, networks
    return {network["Name"] for network in networks}


@pytest.fixture(scope="module")
def swarm(image):
    """Make the daemon a single-node swarm for these tests, then leave it.

    A daemon that is in a swarm already (one made by another run, in
    progress or crashed, or one of its own) is left alone: the swarm
    tests are skipped.
    """
    state = swarm_info()
    if state.get("LocalNodeState") != "inactive":
        status, spec = docker("GET", "/swarm")
        labels = (spec.get("Spec") or {}).get("Labels") if status == 200 else None
        owner = (labels or {}).get(TEST_SWARM_LABEL)
        whose = (f"made by another test run ({owner}), still running or crashed"
                 if owner else "not made by these tests")
        pytest.skip(
            f"the Docker daemon is in a swarm already ({whose}; node state "
            f"{state.get('LocalNodeState')!r}): swarm tests skipped. Leave it with "
            "'docker swarm leave --force' to run them")
    networks_before = network_names()
    status, reply = docker("POST", "/swarm/init", body={
        "ListenAddr": "127.0.0.1:2377",
        "AdvertiseAddr": "127.0.0.1",
        "Spec": {"Labels": {TEST_SWARM_LABEL: RUN_ID}},
    })
    if status in (404, 405, 501) or (status == 503 and "not support" in str(reply)):
        # Podman, for one, answers 503 "Podman does not support service".
        pytest.skip(f"the daemon has no swarm mode ({status} {reply}): "
                    "swarm tests skipped")
    if status == 503 and "already part of a swarm" in str(reply):
        pytest.skip("the Docker daemon joined a swarm meanwhile: swarm tests skipped")
    assert status == 200, reply
    try:
        wait_for(lambda: swarm_info().get("ControlAvailable"), timeout=30,
                 message="the swarm manager to be ready")
        yield swarm_info()["NodeID"]
    finally:
        status, reply = docker("POST", "/swarm/leave", query={"force": 1})
        assert status == 200, reply
        # Swarm leaves its gateway bridge behind; remove it if it is ours.
        if "docker_gwbridge" not in networks_before:
            docker("DELETE", "/networks/docker_gwbridge")


@pytest.fixture
def services(swarm, namespace):
    """Return the test's namespace; its services are removed afterwards."""
    yield namespace
    remove_services(namespace)


@pytest.fixture
def start_swarm(start_dispatcher, services):
    """Return a function that starts a swarm dispatcher with the test filter.

    ``start_swarm(*args, env={...})`` adds ``--backend swarm``, a one-second
    upkeep interval and the filter above; ``job_filter=None`` leaves the
    built-in filter.
    """
    def start(*args: str, env: dict | None = None,
              job_filter: str | None = SWARM_FILTER) -> RunningDispatcher:
        if job_filter is not None:
            args = (job_filter, *args)
        return start_dispatcher(
            "--backend", "swarm", "-u", "1", *args,
            env={"NS": services, **(env or {})})

    return start


# --- Tests -------------------------------------------------------------------


class TestSwarmFixture:
    def test_init_makes_a_single_node_manager(self, swarm):
        state = swarm_info()
        assert state["LocalNodeState"] == "active"
        assert state["ControlAvailable"] is True
        assert state["NodeID"] == swarm
        status, spec = docker("GET", "/swarm")
        assert status == 200, spec
        assert spec["Spec"]["Labels"].get(TEST_SWARM_LABEL) == RUN_ID


class TestSwarmSubmission:
    def test_submit_creates_a_replicated_job_service(self, start_swarm, services,
                                                     image):
        dispatcher = start_swarm(
            job_filter=None,
            env={"JOB_COMMAND": "echo", "JOB_ENV_GREETING": "hello",
                 "JOB_RETRIES": "1", "JOB_NAME_PREFIX": services + "-"})
        reply = dispatcher.submit({"id": "spec", "args": ["a", "b"]})
        assert reply.status == 201, reply
        name = job_name_swarm(services, "spec")
        assert reply.json == {"id": name}

        info = service(name)
        assert info is not None, f"no service {name}"
        spec = info["Spec"]
        assert spec["Name"] == name
        assert spec["Mode"] == {
            "ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
        assert spec["Labels"][NAMESPACE_LABEL] == services
        template = spec["TaskTemplate"]
        container = template["ContainerSpec"]
        assert container["Image"] == image
        assert container["Command"] == ["echo"]
        assert container["Args"] == ["a", "b"]
        assert "GREETING=hello" in container["Env"]
        assert container["Labels"][NAMESPACE_LABEL] == services
        assert template["RestartPolicy"]["Condition"] == "on-failure"
        assert template["RestartPolicy"]["MaxAttempts"] == 1
        assert template["LogDriver"]["Name"] == "json-file"
        assert template["LogDriver"]["Options"]["max-size"] == "10m"
        constraints = (template.get("Placement") or {}).get("Constraints") or []
        assert HOLD_CONSTRAINT not in constraints

        job = wait_state_swarm(dispatcher, name, "exited")
        assert job["exit_code"] == 0
        logs = dispatcher.request("GET", f"/job/{name}/logs")
        assert logs.status == 200, logs
        assert logs.body == b"a b\n"

    def test_submit_labels_the_job_container(self, start_swarm, services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "labels", script=sleeper(30),
                      labels={"team": "blue"})
        wait_state_swarm(dispatcher, name, "running")
        containers = namespace_containers(services, ["running"])
        assert len(containers) == 1, containers
        labels = containers[0]["Labels"]
        assert labels[NAMESPACE_LABEL] == services
        assert labels["team"] == "blue"
        assert labels["com.docker.swarm.service.name"] == name
        assert service(name)["Spec"]["Labels"]["team"] == "blue"

    @pytest.mark.parametrize("policy, condition", [
        ("no", "none"), ("on-failure", "on-failure"), ("always", "any"),
        ("unless-stopped", "any"),
    ])
    def test_dry_run_maps_restart_policy_to_condition(self, start_swarm, services,
                                                      policy, condition):
        dispatcher = start_swarm()
        reply = dispatcher.request(
            "POST", "/job?dry_run=true",
            body={"name": "restart", "script": "true", "restart": policy,
                  "retries": 4})
        assert reply.status == 200, reply
        template = reply.json["config"]["TaskTemplate"]
        assert template["RestartPolicy"]["Condition"] == condition
        assert template["RestartPolicy"]["MaxAttempts"] == 4

    def test_resubmit_answers_200_with_the_same_id(self, start_swarm, services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "twice", script=sleeper(30))
        first = service(name)
        assert first is not None
        assert submit(dispatcher, services, "twice", status=200,
                      script=sleeper(30)) == name
        assert [item["ID"] for item in namespace_services(services)] == [first["ID"]]
        assert service(name)["Version"] == first["Version"]

    def test_submit_name_of_a_foreign_service_answers_409(self, start_swarm,
                                                          services, image):
        name = job_name_swarm(services, "foreign")
        status, created = docker("POST", "/services/create", body={
            "Name": name,
            "Labels": {"owner": "someone-else"},
            "TaskTemplate": {
                "ContainerSpec": {"Image": image, "Args": ["true"]},
                "Placement": {"Constraints": [HOLD_CONSTRAINT]},
            },
            "Mode": {"ReplicatedJob": {}},
        })
        assert status == 201, created
        dispatcher = start_swarm()
        reply = dispatcher.submit({"name": "foreign", "script": "true"})
        assert reply.status == 409, reply
        assert name in reply.json["error"]["message"]
        assert service(name)["ID"] == created["ID"]
        assert service(name)["Spec"]["Labels"] == {"owner": "someone-else"}
        assert dispatcher.request("GET", f"/job/{name}").status == 404
        assert dispatcher.request("DELETE", f"/job/{name}").status == 404
        assert service(name) is not None

    def test_submit_name_swarm_refuses_answers_400(self, start_swarm, services):
        dispatcher = start_swarm()
        reply = dispatcher.submit({"name": "dot.ted", "script": "true"})
        assert reply.status == 400, reply
        assert namespace_services(services) == []


class TestSwarmJobState:
    def test_get_shows_running_then_exited_with_exit_code(self, start_swarm,
                                                          services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "three", script="sleep 3; exit 3")
        job = wait_state_swarm(dispatcher, name, "running", "exited")
        assert job["state"] == "running", job
        assert job["id"] == name
        assert job["started_at"] is not None
        assert job["finished_at"] is None
        assert job["exit_code"] is None
        assert job["status"].startswith("Up ")
        assert job["created"] is not None
        assert abs(job["created"] - time.time()) < 60

        job = wait_state_swarm(dispatcher, name, "exited", "failed")
        assert job["state"] == "exited", job
        assert job["exit_code"] == 3
        assert job["error"] is None
        assert job["status"].startswith("Exited (3) ")
        started = parse_time(job["started_at"])
        finished = parse_time(job["finished_at"])
        assert 2.5 <= finished - started < 30, job

    def test_get_shows_exit_code_0_after_success(self, start_swarm, services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "zero", script="true")
        job = wait_state_swarm(dispatcher, name, "exited", "failed")
        assert job["state"] == "exited", job
        assert job["exit_code"] == 0

    def test_get_answers_404_for_unknown_job(self, start_swarm, services):
        dispatcher = start_swarm()
        reply = dispatcher.request("GET", f"/job/{job_name_swarm(services, 'nobody')}")
        assert reply.status == 404, reply

    def test_wait_returns_once_the_job_finished(self, start_swarm, services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "waited", script="sleep 2; exit 5")
        began = time.monotonic()
        reply = dispatcher.request("GET", f"/job/{name}?wait=60", timeout=90)
        elapsed = time.monotonic() - began
        assert reply.status == 200, reply
        assert reply.json["state"] == "exited", reply
        assert reply.json["exit_code"] == 5
        assert 2 <= elapsed < 50, elapsed

    def test_wait_returns_after_the_wait_on_a_held_job(self, start_swarm,
                                                       services):
        dispatcher = start_swarm("-m", "0")
        name = submit(dispatcher, services, "held", script="true")
        began = time.monotonic()
        reply = dispatcher.request("GET", f"/job/{name}?wait=2")
        assert reply.status == 200, reply
        assert reply.json["state"] == "created"
        assert 1.5 <= time.monotonic() - began < 10

    def test_wait_returns_after_the_last_restart(self, start_swarm, services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "retried", script="exit 4",
                      restart="on-failure", retries=1)
        reply = dispatcher.request("GET", f"/job/{name}?wait=60", timeout=90)
        assert reply.status == 200, reply
        assert reply.json["state"] == "exited", reply
        assert reply.json["exit_code"] == 4
        # One run and one restart: both are over once the wait returns.
        tasks = service_tasks([service(name)["ID"]])
        assert len(tasks) == 2, [task["Status"] for task in tasks]
        assert all(task["Status"]["State"] == "failed" for task in tasks), tasks


class TestSwarmLogs:
    @pytest.fixture
    def finished(self, start_swarm, services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "talker",
                      script="echo out; echo err >&2; echo more")
        wait_state_swarm(dispatcher, name, "exited")
        return dispatcher, name

    def logs(self, dispatcher: RunningDispatcher, name: str, query: str = "",
             expected: bytes | None = None) -> Reply:
        """Return the job's logs; wait until they equal ``expected``."""
        def fetch():
            reply = dispatcher.request("GET", f"/job/{name}/logs{query}")
            assert reply.status == 200, reply
            return reply if expected is None or reply.body == expected else None
        try:
            return wait_for(fetch, timeout=15, interval=0.2, message="the logs")
        except AssertionError:
            reply = dispatcher.request("GET", f"/job/{name}/logs{query}")
            assert reply.body == expected
            raise

    def test_get_logs_gives_stdout_and_stderr(self, finished):
        dispatcher, name = finished
        reply = self.logs(dispatcher, name)
        assert reply.headers["Content-Type"].startswith("text/plain")
        lines = reply.body.decode().splitlines()
        assert sorted(lines) == ["err", "more", "out"]
        assert lines.index("out") < lines.index("more")

    def test_get_logs_gives_stdout_only_without_stderr(self, finished):
        dispatcher, name = finished
        self.logs(dispatcher, name, "?stderr=false", b"out\nmore\n")

    def test_get_logs_gives_stderr_only_without_stdout(self, finished):
        dispatcher, name = finished
        self.logs(dispatcher, name, "?stdout=false", b"err\n")

    def test_get_logs_gives_the_last_lines_with_tail(self, finished):
        dispatcher, name = finished
        self.logs(dispatcher, name, "?stderr=false&tail=1", b"more\n")

    def test_get_logs_answers_404_for_unknown_job(self, start_swarm, services):
        dispatcher = start_swarm()
        reply = dispatcher.request("GET", f"/job/{job_name_swarm(services, 'x')}/logs")
        assert reply.status == 404, reply

    def test_follow_logs_ends_when_the_job_has_finished(self, finished):
        dispatcher, name = finished
        self.logs(dispatcher, name, "?stderr=false", b"out\nmore\n")
        try:
            reply = dispatcher.request(
                "GET", f"/job/{name}/logs?follow=true&stderr=false", timeout=15)
        except (socket.timeout, TimeoutError):
            pytest.fail("following the logs of a finished job did not end in 15 s")
        assert reply.status == 200, reply
        assert reply.body == b"out\nmore\n"


class TestSwarmDelete:
    def test_delete_stops_and_removes_a_running_job(self, start_swarm, services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "doomed", script=sleeper(60))
        wait_state_swarm(dispatcher, name, "running")
        wait_for(lambda: len(running_tasks(services)) == 1, timeout=SWARM_WAIT,
                 message="the job's task to run")

        reply = dispatcher.request("DELETE", f"/job/{name}")
        assert reply.status == 204, reply
        assert service(name) is None
        assert dispatcher.request("GET", f"/job/{name}").status == 404
        assert dispatcher.request("DELETE", f"/job/{name}").status == 404
        # The job stops on TERM at once; Docker's grace period is 10 s.
        wait_for(lambda: not namespace_containers(services, ["running"]),
                 timeout=20, interval=0.2,
                 message="the deleted job's container to stop")

    def test_delete_removes_a_held_job(self, start_swarm, services):
        dispatcher = start_swarm("-m", "0")
        name = submit(dispatcher, services, "held", script="true")
        assert dispatcher.request("DELETE", f"/job/{name}").status == 204
        assert service(name) is None


class TestSwarmList:
    def test_list_filters_by_state(self, start_swarm, services):
        dispatcher = start_swarm()
        slow = submit(dispatcher, services, "slow", script=sleeper(60))
        quick = submit(dispatcher, services, "quick", script="exit 2")
        wait_state_swarm(dispatcher, slow, "running")
        wait_state_swarm(dispatcher, quick, "exited")

        def ids(query: str = "") -> list[str]:
            reply = dispatcher.request("GET", "/jobs" + query)
            assert reply.status == 200, reply
            return [job["id"] for job in reply.json["jobs"]]

        assert sorted(ids()) == sorted([slow, quick])
        assert ids("?state=running") == [slow]
        assert ids("?state=exited") == [quick]
        assert ids("?state=pending") == []
        assert ids("?state=failed") == []
        assert len(ids("?limit=1")) == 1
        jobs = dispatcher.request("GET", "/jobs?state=exited").json["jobs"]
        assert jobs[0]["exit_code"] == 2

    def test_list_shows_held_jobs_as_pending(self, start_swarm, services):
        dispatcher = start_swarm("-m", "0")
        name = submit(dispatcher, services, "held", script="true")
        reply = dispatcher.request("GET", "/jobs?state=pending")
        assert reply.status == 200, reply
        assert [job["id"] for job in reply.json["jobs"]] == [name]
        assert reply.json["jobs"][0]["state"] == "created"
        assert dispatcher.request("GET", "/jobs?state=running").json["jobs"] == []

    def test_list_leaves_out_other_namespaces(self, start_swarm, services, image):
        status, created = docker("POST", "/services/create", body={
            "Name": job_name_swarm(services, "other"),
            "Labels": {NAMESPACE_LABEL: services + "-other"},
            "TaskTemplate": {
                "ContainerSpec": {"Image": image, "Args": ["true"]},
                "Placement": {"Constraints": [HOLD_CONSTRAINT]},
            },
            "Mode": {"ReplicatedJob": {}},
        })
        assert status == 201, created
        dispatcher = start_swarm("-m", "0")
        name = submit(dispatcher, services, "mine", script="true")
        jobs = dispatcher.request("GET", "/jobs").json["jobs"]
        assert [job["id"] for job in jobs] == [name]


class TestSwarmDryRun:
    def test_dry_run_returns_the_spec_and_creates_nothing(self, start_swarm,
                                                           services, image):
        dispatcher = start_swarm()
        reply = dispatcher.request(
            "POST", "/job?dry_run=1",
            body={"name": "dry", "script": "echo hi", "env": ["A=1"]})
        assert reply.status == 200, reply
        name = job_name_swarm(services, "dry")
        assert reply.json["name"] == name
        config = reply.json["config"]
        assert config["Name"] == name
        assert config["Labels"][NAMESPACE_LABEL] == services
        assert config["Mode"] == {
            "ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
        container = config["TaskTemplate"]["ContainerSpec"]
        assert container["Image"] == image
        assert container["Command"] == ["sh", "-c"]
        assert container["Args"] == ["echo hi"]
        assert container["Env"] == ["A=1"]
        time.sleep(1)
        assert service(name) is None
        assert namespace_services(services) == []

    def test_dry_run_with_a_limit_shows_the_hold(self, start_swarm, services):
        dispatcher = start_swarm("-m", "1")
        reply = dispatcher.request("POST", "/job?dry_run=1",
                                   body={"name": "dry", "script": "true"})
        assert reply.status == 200, reply
        placement = reply.json["config"]["TaskTemplate"]["Placement"]
        assert placement["Constraints"] == [HOLD_CONSTRAINT]
        assert namespace_services(services) == []


class TestSwarmNativeSpec:
    def native(self, image: str) -> dict:
        return {
            "TaskTemplate": {
                "ContainerSpec": {
                    "Image": image,
                    "Command": ["sh", "-c"],
                    "Args": ["echo native $WHO; exit 6"],
                    "Env": ["WHO=spec"],
                    "Hostname": "native-host",
                    "Labels": {"kind": "native"},
                },
                "RestartPolicy": {"Condition": "none"},
                "Resources": {"Limits": {"Pids": 64}},
            },
            "Mode": {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
        }

    def test_submit_uses_a_native_spec_as_it_is(self, start_swarm, services, image):
        dispatcher = start_swarm()
        native = self.native(image)
        name = submit(dispatcher, services, "native", spec=native)
        spec = service(name)["Spec"]
        assert spec["Name"] == name
        assert spec["Labels"][NAMESPACE_LABEL] == services
        assert spec["Mode"] == native["Mode"]
        container = spec["TaskTemplate"]["ContainerSpec"]
        wanted = native["TaskTemplate"]["ContainerSpec"]
        for key in ("Image", "Command", "Args", "Env", "Hostname"):
            assert container[key] == wanted[key], key
        assert container["Labels"]["kind"] == "native"
        assert container["Labels"][NAMESPACE_LABEL] == services
        assert spec["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"
        assert spec["TaskTemplate"]["Resources"]["Limits"] == {"Pids": 64}

        job = wait_state_swarm(dispatcher, name, "exited", "failed")
        assert job["state"] == "exited", job
        assert job["exit_code"] == 6
        reply = dispatcher.request("GET", f"/job/{name}/logs")
        assert reply.body == b"native spec\n"

    def test_dry_run_returns_a_native_spec(self, start_swarm, services,
                                                 image):
        dispatcher = start_swarm()
        native = self.native(image)
        reply = dispatcher.request("POST", "/job?dry_run=1",
                                   body={"name": "native", "spec": native})
        assert reply.status == 200, reply
        config = reply.json["config"]
        assert config["Mode"] == native["Mode"]
        template = native["TaskTemplate"]
        assert config["TaskTemplate"]["Resources"] == template["Resources"]
        assert config["TaskTemplate"]["ContainerSpec"]["Args"] == [
            "echo native $WHO; exit 6"]
        assert namespace_services(services) == []


class TestSwarmMetrics:
    def test_count_create_start_and_die_in_metrics(self, start_swarm, services):
        dispatcher = start_swarm()
        good = submit(dispatcher, services, "good", script="true")
        bad = submit(dispatcher, services, "bad", script="exit 3")
        wait_state_swarm(dispatcher, good, "exited")
        wait_state_swarm(dispatcher, bad, "exited")
        prefix = f'jobs_total{{namespace="{services}",'
        wanted = {
            prefix + 'action="create",status=""} 2',
            prefix + 'action="start",status=""} 2',
            prefix + 'action="die",status="0"} 1',
            prefix + 'action="die",status="3"} 1',
        }
        try:
            wait_for(lambda: wanted <= set(metric_lines(dispatcher)), timeout=15,
                     interval=0.2, message="the job counters")
        except AssertionError:
            counters = [line for line in metric_lines(dispatcher)
                        if line.startswith("jobs_total{")]
            assert wanted <= set(counters), dispatcher.log
            raise
        lines = metric_lines(dispatcher)
        assert f'jobs_running{{namespace="{services}"}} 0' in lines
        assert f'jobs_pending{{namespace="{services}"}} 0' in lines

    def test_gauge_running_and_held_jobs_in_metrics(self, start_swarm,
                                                        services):
        dispatcher = start_swarm("-m", "1")
        first = submit(dispatcher, services, "first", script=sleeper(30))
        submit(dispatcher, services, "second", script=sleeper(30))
        wait_state_swarm(dispatcher, first, "running")
        running = f'jobs_running{{namespace="{services}"}} 1'
        pending = f'jobs_pending{{namespace="{services}"}} 1'
        wait_for(lambda: {running, pending} <= set(metric_lines(dispatcher)),
                 timeout=15, interval=0.2, message="the gauges")


class TestSwarmScheduler:
    def test_run_one_job_at_a_time_with_limit_1(self, start_swarm, services):
        dispatcher = start_swarm("-m", "1")
        names = [submit(dispatcher, services, f"queued-{n}", script="sleep 2")
                 for n in range(3)]
        for name in names[1:]:
            constraints = service(name)["Spec"]["TaskTemplate"]["Placement"].get(
                "Constraints") or []
            assert HOLD_CONSTRAINT in constraints, name

        most = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            most = max(most, len(running_tasks(services)))
            assert most <= 1, "more than one job ran at once"
            states = [get_job(dispatcher, name)["state"] for name in names]
            if all(state in ("exited", "failed") for state in states):
                break
            time.sleep(0.1)
        jobs = [get_job(dispatcher, name) for name in names]
        assert [job["state"] for job in jobs] == ["exited"] * 3, jobs
        assert [job["exit_code"] for job in jobs] == [0, 0, 0]
        assert most == 1

        # Released oldest first, each after the one before had finished.
        for before, after in zip(jobs, jobs[1:]):
            assert parse_time(after["started_at"]) >= parse_time(
                before["finished_at"]), (before, after)
        for name in names:
            constraints = service(name)["Spec"]["TaskTemplate"]["Placement"].get(
                "Constraints") or []
            assert HOLD_CONSTRAINT not in constraints

    def test_hold_every_job_with_limit_0(self, start_swarm, services):
        dispatcher = start_swarm("-m", "0")
        name = submit(dispatcher, services, "held", script="true")
        spec = service(name)["Spec"]
        assert HOLD_CONSTRAINT in spec["TaskTemplate"]["Placement"]["Constraints"]
        time.sleep(3)
        job = get_job(dispatcher, name)
        assert job["state"] == "created", job
        assert job["status"] == "Created"
        assert job["started_at"] is None
        assert namespace_containers(services) == []

    def test_run_two_jobs_at_once_with_limit_2(self, start_swarm, services):
        dispatcher = start_swarm("-m", "2")
        names = [submit(dispatcher, services, f"pair-{n}", script=sleeper(30))
                 for n in range(3)]
        wait_state_swarm(dispatcher, names[0], "running")
        wait_state_swarm(dispatcher, names[1], "running")
        time.sleep(3)
        assert len(running_tasks(services)) == 2
        assert get_job(dispatcher, names[2])["state"] == "created"
        assert dispatcher.request("DELETE", f"/job/{names[0]}").status == 204
        wait_state_swarm(dispatcher, names[2], "running")

    def test_run_later_jobs_when_one_fails_to_start(self, start_swarm, services):
        dispatcher = start_swarm("-m", "1")
        broken = submit(dispatcher, services, "broken", entrypoint=["/no/such"])
        after = submit(dispatcher, services, "after", script="echo fine")
        job = wait_state_swarm(dispatcher, broken, "failed", "exited")
        assert job["state"] == "failed", job
        assert "/no/such" in job["error"], job
        assert job["started_at"] is None
        job = wait_state_swarm(dispatcher, after, "exited", "failed")
        assert job["state"] == "exited", job
        assert job["exit_code"] == 0
        failed = dispatcher.request("GET", "/jobs?state=failed").json["jobs"]
        assert [item["id"] for item in failed] == [broken]

    def test_get_shows_failed_when_the_command_is_missing(self, start_swarm, services):
        dispatcher = start_swarm()
        name = submit(dispatcher, services, "broken", entrypoint=["/no/such"])
        job = wait_state_swarm(dispatcher, name, "failed", "exited")
        assert job["state"] == "failed", job
        assert job["error"]
        reply = dispatcher.request("GET", f"/job/{name}?wait=30", timeout=60)
        assert reply.json["state"] == "failed"


class TestSwarmCleaning:
    def test_clean_finished_jobs_with_keep_2(self, start_swarm, services):
        dispatcher = start_swarm("-k", "2")
        done = submit(dispatcher, services, "done", script="true")
        busy = submit(dispatcher, services, "busy", script=sleeper(60))
        job = wait_state_swarm(dispatcher, done, "exited")
        finished = parse_time(job["finished_at"])
        wait_for(lambda: service(done) is None, timeout=30, interval=0.2,
                 message="the finished job to be removed")
        assert time.time() - finished >= 2
        assert dispatcher.request("GET", f"/job/{done}").status == 404
        assert service(busy) is not None
        assert get_job(dispatcher, busy)["state"] == "running"

    def test_clean_failed_jobs_with_keep_2(self, start_swarm, services):
        dispatcher = start_swarm("-k", "2")
        name = submit(dispatcher, services, "broken", entrypoint=["/no/such"])
        wait_state_swarm(dispatcher, name, "failed")
        wait_for(lambda: service(name) is None, timeout=30, interval=0.2,
                 message="the failed job to be removed")

    def test_keep_held_jobs_with_keep_2(self, start_swarm, services):
        dispatcher = start_swarm("-m", "0", "-k", "2")
        name = submit(dispatcher, services, "held", script="true")
        time.sleep(4)
        assert service(name) is not None
        assert get_job(dispatcher, name)["state"] == "created"


# === Benchmarks, run with DJD_BENCHMARK=1 ==================================


benchmark = pytest.mark.skipif(
    os.environ.get("DJD_BENCHMARK") != "1",
    reason="benchmarks run only with DJD_BENCHMARK=1",
)

BENCH_FILTER_TRUE = '{Name: .name, Image: $ENV.JOB_IMAGE, Cmd: ["true"]}'
BENCH_FILTER_SLEEP = '{Name: .name, Image: $ENV.JOB_IMAGE, Cmd: ["sleep", "0.5"]}'

SUBMISSION_JOBS = 48
ROUND_JOBS = 8
SUBMISSION_CLIENTS = (1, 8)
LOOKUPS = 500
STARTUP_SAMPLES = 5
QUEUE_JOBS = 50
QUEUE_LIMIT = 4
PACED_JOBS = 12
PACED_SPACING = 0.4
DIRECT_START_SAMPLES = 4

DOCKER_TIME = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$"
)


# --- Measuring helpers ------------------------------------------------------


def parse_rfc3339(text: str) -> float:
    """Return a Docker time (nanoseconds, Z or offset) as Unix seconds.

    ``datetime.fromisoformat`` before Python 3.11 takes neither ``Z`` nor
    more than six fraction digits, so both are normalised first.
    """
    match = DOCKER_TIME.match(text or "")
    if not match or text.startswith("0001-01-01"):
        raise ValueError(f"not a set Docker time: {text!r}")
    whole, fraction, zone = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]
    zone = "+00:00" if zone == "Z" else zone
    moment = datetime.fromisoformat(f"{whole}.{micro}{zone}")
    return moment.timestamp()


def percentile(values: list[float], fraction: float) -> float:
    """Return the ``fraction`` quantile by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = math.ceil(position)
    weight = position - low
    return ordered[low] * (1 - weight) + ordered[high] * weight


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a table with aligned columns, the first one left-aligned."""
    widths = [
        max(len(str(row[column])) for row in [header] + rows)
        for column in range(len(header))
    ]

    def line(cells: list[str]) -> str:
        parts = []
        for column, cell in enumerate(cells):
            text = str(cell)
            parts.append(
                text.ljust(widths[column]) if column == 0
                else text.rjust(widths[column])
            )
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(header))
    print()
    print(title)
    print(rule)
    print(line(header))
    print(rule)
    for row in rows:
        print(line(row))
    print(rule)


def resident_kib(pid: int) -> int:
    """Return a process's resident set size (VmRSS) in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def child_pids(pid: int) -> list[int]:
    """Return the ids of a process's direct children (its filter workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def memory_figures(pid: int) -> tuple[int, int, int]:
    """Return the VmRSS in KiB of a process, of its children, and their count."""
    children = child_pids(pid)
    return resident_kib(pid), sum(resident_kib(child) for child in children), len(
        children
    )


def bare_interpreter_kib() -> int:
    """Return the VmRSS of an interpreter that imports nothing of its own."""
    output = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/status').read())"],
        capture_output=True, text=True, check=True,
    ).stdout
    for line in output.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in the bare interpreter's status")


def memory_text(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB = {kib * 1024 / 1e6:.1f} MB"


class KeepAliveClient:
    """One persistent HTTP connection, to the dispatcher or the daemon."""

    def __init__(self, port: int | None = None, socket_path: str | None = None):
        if socket_path is not None:
            self.connection = UnixConnection(socket_path, timeout=60)
        else:
            self.connection = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=60
            )
        self.connection.connect()

    def call(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        payload = response.read()
        if response.will_close:
            raise AssertionError(f"{path} closed the connection: {payload!r}")
        return response.status, payload

    def refresh(self) -> None:
        """Reconnect, outside any timing, if the server closed the idle line."""
        sock = self.connection.sock
        if sock is not None and not select.select([sock], [], [], 0)[0]:
            return
        self.connection.close()
        self.connection.connect()

    def close(self) -> None:
        self.connection.close()


def docker_api_prefix() -> str:
    """Return the versioned API prefix the dispatcher would negotiate."""
    client = KeepAliveClient(socket_path=DOCKER_SOCKET)
    try:
        client.connection.request("GET", "/_ping")
        response = client.connection.getresponse()
        response.read()
        return "/v" + response.headers["Api-Version"]
    finally:
        client.close()


def job_config(image_name: str, namespace_name: str, command: list[str]):
    """Return the create-container body the benchmark filters produce."""
    return {
        "Image": image_name,
        "Cmd": command,
        "Labels": {NAMESPACE_LABEL: namespace_name},
    }


def direct_create(client: KeepAliveClient, prefix: str, name: str, config) -> str:
    """Create a container on the daemon and return its id."""
    status, payload = client.call(
        "POST", f"{prefix}/containers/create?name={name}", config
    )
    assert status == 201, payload
    return json.loads(payload)["Id"]


def direct_start(client: KeepAliveClient, prefix: str, container: str) -> None:
    status, payload = client.call("POST", f"{prefix}/containers/{container}/start")
    assert status == 204, payload


def run_clients(
    clients: list[KeepAliveClient],
    names: list[str],
    submit_one,
) -> tuple[list[float], float]:
    """Submit ``names`` from one thread per client, all starting together.

    The clients' connections are open already and stay open. Returns each
    job's latency and the wall time from the first request to the last
    answer.
    """
    shares = [names[index::len(clients)] for index in range(len(clients))]
    barrier = threading.Barrier(len(clients))
    latencies: list[float] = []
    spans: list[tuple[float, float]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def work(client: KeepAliveClient, share: list[str]) -> None:
        try:
            barrier.wait()
            mine = []
            began = time.perf_counter()
            for name in share:
                sent = time.perf_counter()
                submit_one(client, name)
                mine.append(time.perf_counter() - sent)
            ended = time.perf_counter()
            with lock:
                latencies.extend(mine)
                spans.append((began, ended))
        except BaseException as error:
            with lock:
                failures.append(error)
            barrier.abort()

    threads = [
        threading.Thread(target=work, args=(client, share))
        for client, share in zip(clients, shares)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return latencies, wall


def wait_until_ready(process, poll: float = 0.002, timeout: float = 15) -> None:
    """Poll /health/live with fresh connections until it answers 204."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise AssertionError(f"dispatcher exited:\n{process.log}")
        connection = http.client.HTTPConnection(
            "127.0.0.1", process.port, timeout=1
        )
        try:
            connection.request("GET", "/health/live")
            if connection.getresponse().status == 204:
                return
        except OSError:
            time.sleep(poll)
        finally:
            connection.close()
    raise AssertionError(f"dispatcher did not start:\n{process.log}")


def print_conditions(load_at_start: float) -> None:
    """Print what else shaped the figures: the machine's load and Docker."""
    status, version = docker("GET", "/version")
    server = version.get("Version", "?") if status == 200 else "?"
    print(
        f"Conditions: {os.cpu_count()} CPUs, load average (1 min) "
        f"{load_at_start:.2f} at the start and {os.getloadavg()[0]:.2f} at the "
        f"end, Docker {server}, Python {sys.version.split()[0]}"
    )


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def memory_rows(moment: str, figures: tuple[int, int, int]) -> list[list[str]]:
    """Return the table rows for one memory reading of the dispatcher."""
    own, children, count = figures
    rows = [[f"VmRSS {moment}, main process", memory_text(own),
             f"< 30 MB: {verdict(own * 1024 < 30e6)}"]]
    if count:
        rows.append([f"VmRSS {moment}, {count} child processes",
                     memory_text(children), ""])
        rows.append([f"VmRSS {moment}, total", memory_text(own + children), ""])
    return rows


# --- Benchmark A: submission, lookup, memory, startup -------------------------


def measure_startup(start_dispatcher, samples: int) -> list[float]:
    """Return, per start, the time from launch to the first /health/live."""
    times = []
    for _ in range(samples):
        began = time.monotonic()
        process = start_dispatcher(BENCH_FILTER_TRUE, wait=False)
        wait_until_ready(process)
        times.append(time.monotonic() - began)
        process.stop()
    return times


def measure_submissions(dispatcher, namespace_name: str, prefix: str, config):
    """Submit jobs through the dispatcher and directly; return table rows.

    For each client count, each path keeps one connection per client for
    the whole measurement and submits one warm-up job per client. Then
    rounds of ROUND_JOBS jobs alternate in the order direct, dispatcher,
    dispatcher, direct, and so on, so that a drift of the daemon weighs
    on both paths alike. Every job must be answered as created and
    started. Returns the rows and the number of measured jobs.
    """

    def submit_dispatcher(client: KeepAliveClient, name: str) -> None:
        status, payload = client.call("POST", "/job", {"name": name})
        assert status == 201, payload

    def submit_direct(client: KeepAliveClient, name: str) -> None:
        container = direct_create(client, prefix, name, config)
        direct_start(client, prefix, container)

    paths = {
        "direct": (
            lambda: KeepAliveClient(socket_path=DOCKER_SOCKET), submit_direct
        ),
        "dispatcher": (
            lambda: KeepAliveClient(port=dispatcher.port), submit_dispatcher
        ),
    }
    rounds_per_path = SUBMISSION_JOBS // ROUND_JOBS
    rows = []
    created = 0
    for clients in SUBMISSION_CLIENTS:
        pools = {
            path: [connect() for _ in range(clients)]
            for path, (connect, _) in paths.items()
        }
        latencies = {path: [] for path in paths}
        walls = {path: 0.0 for path in paths}
        try:
            for path, (_, submit_one) in paths.items():
                names = [f"bw-{RUN_ID}-{path}-c{clients}-{i}" for i in range(clients)]
                run_clients(pools[path], names, submit_one)
            for number in range(rounds_per_path):
                order = ["direct", "dispatcher"]
                if number % 2:
                    order.reverse()
                for path in order:
                    for client in pools[path]:
                        client.refresh()
                    names = [
                        f"b-{RUN_ID}-{path}-c{clients}-r{number}-{i}"
                        for i in range(ROUND_JOBS)
                    ]
                    measured, wall = run_clients(pools[path], names, paths[path][1])
                    latencies[path] += measured
                    walls[path] += wall
        finally:
            for pool in pools.values():
                for client in pool:
                    client.close()

        for path in paths:
            count = len(latencies[path])
            assert count == rounds_per_path * ROUND_JOBS
            created += count
            rows.append([
                str(clients), path, ms(median(latencies[path])),
                ms(percentile(latencies[path], 0.95)),
                f"{count / walls[path]:.1f}", "",
            ])
        ratio_median = median(latencies["dispatcher"]) / median(latencies["direct"])
        ratio_p95 = percentile(latencies["dispatcher"], 0.95) / percentile(
            latencies["direct"], 0.95
        )
        rows.append([
            str(clients), "dispatcher/direct", f"{ratio_median:.3f}x",
            f"{ratio_p95:.3f}x", f"{walls['direct'] / walls['dispatcher']:.3f}x",
            f"median <= 1.05x: {verdict(ratio_median <= 1.05)}",
        ])
        remove_namespace(namespace_name)
    return rows, created


def measure_lookups(dispatcher, prefix: str, name: str) -> dict[str, list[float]]:
    """Look a job up through the dispatcher and the daemon, interleaved.

    Each side keeps one connection; the first 20 rounds are a warm-up.
    """
    calls = {
        "dispatcher": (KeepAliveClient(port=dispatcher.port), f"/job/{name}"),
        "direct": (
            KeepAliveClient(socket_path=DOCKER_SOCKET),
            f"{prefix}/containers/{name}/json",
        ),
    }
    lookups = {path: [] for path in calls}
    warm_up = 20
    for index in range(warm_up + LOOKUPS):
        order = ("dispatcher", "direct") if index % 2 else ("direct", "dispatcher")
        for path in order:
            client, url = calls[path]
            sent = time.perf_counter()
            status, payload = client.call("GET", url)
            elapsed = time.perf_counter() - sent
            assert status == 200, payload
            if index >= warm_up:
                lookups[path].append(elapsed)
    for client, _ in calls.values():
        client.close()
    return lookups


@benchmark
def test_benchmark_submission_and_lookup(start_dispatcher, namespace, image):
    load_at_start = os.getloadavg()[0]
    prefix = docker_api_prefix()
    config = job_config(image, namespace, ["true"])

    startup_times = measure_startup(start_dispatcher, STARTUP_SAMPLES)

    dispatcher = start_dispatcher(BENCH_FILTER_TRUE, wait=False)
    wait_until_ready(dispatcher)
    time.sleep(1.0)
    memory_start = memory_figures(dispatcher.process.pid)

    submission_rows, created = measure_submissions(
        dispatcher, namespace, prefix, config
    )

    lookup_name = f"lookup-{RUN_ID}"
    client = KeepAliveClient(port=dispatcher.port)
    status, payload = client.call("POST", "/job", {"name": lookup_name})
    client.close()
    assert status == 201, payload
    wait_for(lambda: (inspect(lookup_name) or {}).get("State", {})
             .get("Status") == "exited", message="the lookup job to exit")
    lookups = measure_lookups(dispatcher, prefix, lookup_name)

    time.sleep(1.0)
    memory_after = memory_figures(dispatcher.process.pid)
    bare_kib = bare_interpreter_kib()

    print_table(
        f"Benchmark A1: submission, create + start, {SUBMISSION_JOBS} jobs "
        f"per row, in alternating rounds of {ROUND_JOBS}",
        ["clients", "path", "median ms", "p95 ms", "jobs/s", "target"],
        submission_rows,
    )
    difference = median(lookups["dispatcher"]) - median(lookups["direct"])
    difference_p95 = percentile(lookups["dispatcher"], 0.95) - percentile(
        lookups["direct"], 0.95
    )
    print_table(
        f"Benchmark A2: lookup, {LOOKUPS} sequential keep-alive requests each "
        "(interleaved)",
        ["request", "median ms", "p95 ms", "target"],
        [
            ["GET /containers/<name>/json (daemon)",
             ms(median(lookups["direct"])),
             ms(percentile(lookups["direct"], 0.95)), ""],
            ["GET /job/<id> (dispatcher)",
             ms(median(lookups["dispatcher"])),
             ms(percentile(lookups["dispatcher"], 0.95)), ""],
            ["difference", ms(difference), ms(difference_p95),
             f"median <= daemon + 1 ms: {verdict(difference <= 0.001)}"],
        ],
    )
    ready = median(startup_times)
    print_table(
        "Benchmark A3: dispatcher process",
        ["figure", "value", "target"],
        [
            *memory_rows("idle after startup", memory_start),
            *memory_rows("idle after the load", memory_after),
            ["VmRSS of a bare interpreter, for scale", memory_text(bare_kib), ""],
            [f"start to first /health/live, median of {STARTUP_SAMPLES}",
             f"{ms(ready)} ms", f"< 500 ms: {verdict(ready < 0.5)}"],
            ["start to first /health/live, min .. max",
             f"{ms(min(startup_times))} .. {ms(max(startup_times))} ms", ""],
        ],
    )
    print_conditions(load_at_start)
    assert created == 2 * SUBMISSION_JOBS * len(SUBMISSION_CLIENTS)
    assert len(lookups["dispatcher"]) == len(lookups["direct"]) == LOOKUPS


# --- Benchmark B: scheduling with a concurrency limit ------------------------


def job_times(name: str) -> tuple[float, float]:
    """Return a finished container's StartedAt and FinishedAt, Unix seconds."""
    info = inspect(name)
    assert info is not None, name
    state = info["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    return parse_rfc3339(state["StartedAt"]), parse_rfc3339(state["FinishedAt"])


def run_to_exit(
    client: KeepAliveClient, prefix: str, container: str
) -> tuple[float, float]:
    """Start a created container and wait for its exit.

    Returns when the start call was made and when the wait call returned.
    """
    called = time.time()
    direct_start(client, prefix, container)
    status, payload = client.call("POST", f"{prefix}/containers/{container}/wait")
    assert status == 200, payload
    return called, time.time()


def direct_runs(prefix: str, config, label: str, count: int):
    """Run ``count`` containers directly, one at a time, each to its exit.

    Returns (start call to StartedAt, start call to FinishedAt) per run.
    """
    client = KeepAliveClient(socket_path=DOCKER_SOCKET)
    runs = []
    try:
        for index in range(count):
            name = f"bq-{RUN_ID}-direct-{label}-{index}"
            container = direct_create(client, prefix, name, config)
            called, _ = run_to_exit(client, prefix, container)
            started, finished = job_times(name)
            runs.append((started - called, finished - called))
    finally:
        client.close()
    return runs


def direct_slots(prefix: str, config, names: list[str], slots: int):
    """Drain pre-created containers directly with ``slots`` busy at a time.

    Each slot is a thread that starts its next container as soon as the
    previous one exited: the best a scheduler on the client side can do.
    Returns the start call and wait return times of each container by name.
    """
    client = KeepAliveClient(socket_path=DOCKER_SOCKET)
    try:
        containers = {
            name: direct_create(client, prefix, name, config) for name in names
        }
    finally:
        client.close()
    moments = {}
    lock = threading.Lock()

    def drain(client: KeepAliveClient, name: str) -> None:
        moment = run_to_exit(client, prefix, containers[name])
        with lock:
            moments[name] = moment

    clients = [KeepAliveClient(socket_path=DOCKER_SOCKET) for _ in range(slots)]
    try:
        run_clients(clients, names, drain)
    finally:
        for client in clients:
            client.close()
    return moments


def wait_all_exited(namespace_name: str, names: list[str], timeout: float):
    wanted = set(names)

    def exited() -> bool:
        done = {
            job["Names"][0].lstrip("/")
            for job in namespace_containers(namespace_name, ["exited"])
        }
        return wanted <= done

    wait_for(exited, timeout=timeout, interval=0.2,
             message=f"{len(names)} jobs to exit")


def refill_gaps(times: list[tuple[float, float]], slots: int) -> list[float]:
    """Return, for each slot freed, the time until the next job started.

    With every slot busy, the k-th job to finish frees the slot that the
    (k + slots)-th job to start takes.
    """
    starts = sorted(started for started, _ in times)
    finishes = sorted(finished for _, finished in times)
    return [
        starts[index + slots] - finishes[index]
        for index in range(len(times) - slots)
    ]


def most_at_once_bench(intervals: list[tuple[float, float]]) -> int:
    """Return the most intervals that overlap at any moment."""
    edges = sorted(
        [(start, 1) for start, _ in intervals]
        + [(end, -1) for _, end in intervals],
        key=lambda edge: (edge[0], edge[1]),
    )
    current = highest = 0
    for _, step in edges:
        current += step
        highest = max(highest, current)
    return highest


@benchmark
def test_benchmark_scheduling(start_dispatcher, namespace, image):
    load_at_start = os.getloadavg()[0]
    prefix = docker_api_prefix()
    config = job_config(image, namespace, ["sleep", "0.5"])

    single = direct_runs(prefix, config, "before", DIRECT_START_SAMPLES)

    loop_names = [f"bq-{RUN_ID}-slots-{i:02d}" for i in range(QUEUE_JOBS)]
    loop_moments = direct_slots(prefix, config, loop_names, QUEUE_LIMIT)
    loop_times = {name: job_times(name) for name in loop_names}
    remove_namespace(namespace)

    dispatcher = start_dispatcher(
        "-m", str(QUEUE_LIMIT), "-u", "30", BENCH_FILTER_SLEEP
    )
    client = KeepAliveClient(port=dispatcher.port)
    queue_names = [f"bq-{RUN_ID}-queue-{i:02d}" for i in range(QUEUE_JOBS)]
    accepted = {}
    first_sent = time.time()
    for name in queue_names:
        status, payload = client.call("POST", "/job", {"name": name})
        assert status == 201, payload
        accepted[name] = time.time()
    submitted_all = time.time()
    wait_all_exited(namespace, queue_names, timeout=120)

    paced_names = [f"bq-{RUN_ID}-paced-{i:02d}" for i in range(PACED_JOBS)]
    for name in paced_names:
        status, payload = client.call("POST", "/job", {"name": name})
        assert status == 201, payload
        accepted[name] = time.time()
        time.sleep(PACED_SPACING)
    client.close()
    wait_all_exited(namespace, paced_names, timeout=60)

    single += direct_runs(prefix, config, "after", DIRECT_START_SAMPLES)

    times = {name: job_times(name) for name in queue_names + paced_names}
    queue_times = [times[name] for name in queue_names]
    queue_waits = [times[name][0] - accepted[name] for name in queue_names]
    paced_waits = [times[name][0] - accepted[name] for name in paced_names]
    single_start = [started for started, _ in single]
    single_run = [finished for _, finished in single]
    loop_start = [
        loop_times[name][0] - loop_moments[name][0] for name in loop_names
    ]
    loop_exit = [
        loop_moments[name][1] - loop_times[name][1] for name in loop_names
    ]
    one_job = median(single_run)
    ideal_drain = QUEUE_JOBS / QUEUE_LIMIT * one_job
    drain = max(finished for _, finished in queue_times) - first_sent
    loop_drain = (
        max(finished for _, finished in loop_times.values())
        - min(called for called, _ in loop_moments.values())
    )

    def row(label: str, values: list[float], note: str = "") -> list[str]:
        return [label, str(len(values)), ms(median(values)),
                ms(percentile(values, 0.95)), note]

    print_table(
        f"Benchmark B1: scheduling {QUEUE_JOBS} queued jobs of sleep 0.5 "
        f"with -m {QUEUE_LIMIT} -u 30",
        ["figure", "n", "median ms", "p95 ms", "note"],
        [
            row("Docker: start call -> StartedAt, one at a time", single_start,
                "Docker's own start time"),
            row(f"Docker: start call -> StartedAt, {QUEUE_LIMIT} slots busy",
                loop_start, "same, under the queue's load"),
            row("Docker: start call -> FinishedAt, one at a time", single_run,
                "one job, start to exit"),
            row(f"Docker: FinishedAt -> wait returns, {QUEUE_LIMIT} slots busy",
                loop_exit, "Docker's exit handling"),
            row(f"dispatcher: 201 -> StartedAt, first {QUEUE_LIMIT} jobs",
                queue_waits[:QUEUE_LIMIT], "a slot was free"),
            row(f"dispatcher: 201 -> StartedAt, one every {PACED_SPACING:g} s",
                paced_waits, "a slot was always free"),
            row("dispatcher: 201 -> StartedAt, all queued jobs", queue_waits,
                "includes the wait in the queue"),
            row("dispatcher: FinishedAt -> next StartedAt",
                refill_gaps(queue_times, QUEUE_LIMIT),
                "slot refill, Docker's start included"),
            row(f"direct {QUEUE_LIMIT} slots: FinishedAt -> next StartedAt",
                refill_gaps(list(loop_times.values()), QUEUE_LIMIT),
                "the same with start-wait loops"),
        ],
    )
    print_table(
        f"Benchmark B2: draining the queue of {QUEUE_JOBS}",
        ["figure", "value", "vs ideal"],
        [
            ["dispatcher: submitting all jobs took",
             f"{ms(submitted_all - first_sent)} ms", ""],
            ["dispatcher: first POST -> last FinishedAt", f"{drain:.2f} s",
             f"{drain / ideal_drain:.3f}x"],
            [f"direct {QUEUE_LIMIT} slots: first start -> last FinishedAt",
             f"{loop_drain:.2f} s", f"{loop_drain / ideal_drain:.3f}x"],
            [f"ideal: {QUEUE_JOBS} / {QUEUE_LIMIT} x {ms(one_job)} ms",
             f"{ideal_drain:.2f} s", "1.000x"],
            ["dispatcher: most jobs running at once",
             str(most_at_once_bench(queue_times)), f"limit {QUEUE_LIMIT}"],
        ],
    )
    print_conditions(load_at_start)
    jobs = {
        job["Names"][0].lstrip("/") for job in namespace_containers(namespace)
    }
    assert set(queue_names + paced_names) <= jobs
    assert len(times) == QUEUE_JOBS + PACED_JOBS
    assert len(loop_times) == QUEUE_JOBS
