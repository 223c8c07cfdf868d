#!/usr/bin/env python3
"""docker-job-dispatcher: an HTTP API that turns requests into Docker jobs.

Each request body is fed to a jq filter whose first output is a container
manifest in the Docker Engine's "create container" shape plus a ``Name``.
The dispatcher creates that container, labels it with a namespace, starts it
(or leaves it to the scheduler when a concurrency limit is set) and lets
clients look the job up by name. All state lives in Docker.

Run it next to a Docker daemon::

    pip install jq && python3 docker_job_dispatcher.py

Every option also reads an environment variable of its name in upper case;
``--help`` lists them. The Docker connection follows the Docker client
conventions: ``DOCKER_HOST``, ``DOCKER_CERT_PATH`` and ``DOCKER_TLS_VERIFY``.

It also runs against Podman's Docker-compatible API, and with ``--backend
swarm`` runs each job as a swarm ``replicated-job`` service instead.

Known limitations:

- A jq evaluation holds Python's global interpreter lock and cannot be
  interrupted, so filters run in worker processes that can be killed; with
  ``--filter-workers 0`` a filter that loops stalls every other request.
- ``cuid2`` gives one fresh id per evaluation: calling it twice in the same
  filter run returns the same id.
- A job that Docker refused to start has no finish time in Docker; the
  cleaner counts it as finished when this process first saw it fail, so a
  restart of the dispatcher restarts that clock. Podman keeps no trace of
  the refusal at all: after a restart such a job shows as created again.
- On a swarm, ``jobs_total`` sees only the containers of the manager's own
  node, and a task whose container is starting shows as running.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import http.server
import json
import logging
import os
import re
import resource
import select
import signal
import socket
import ssl
import string
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import datetime
from typing import Any, Iterator

import jq

__version__ = "0.5.0"


# --- Constants and the default filter -------------------------------------

log = logging.getLogger("docker-job-dispatcher")

# Docker's rule for container names; also the rule for job ids we accept.
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")

# A decimal number as HTTP and our query parameters take it (ASCII only).
DIGITS = re.compile(r"^\s*[0-9]+\s*$")

# A platform as Docker takes it: os[/architecture[/variant]].
PLATFORM_PATTERN = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+){0,2}$")

# The label that groups every job of one dispatcher (or a fleet of them).
NAMESPACE_LABEL = "docker-job-dispatcher.namespace"

# The label that repeats a job's restart policy, for Docker's die events.
RESTART_LABEL = "docker-job-dispatcher.restart-policy"

# The oldest Engine API whose fields and behaviour we rely on.
MIN_API_VERSION = (1, 41)

# Docker's way of saying "this time was never set".
ZERO_TIME = "0001-01-01T00:00:00Z"

# How long a taken name may take to show its container (see _existing_job).
NAME_SETTLE_TIME = 2.0

# How long one ordinary Docker call may take before the daemon counts as down.
DOCKER_TIMEOUT = 30.0

# A silent event stream is opened again after this many seconds, so that a
# daemon that hangs is noticed.
EVENTS_IDLE_TIMEOUT = 20.0

# Readiness probes answer quickly, whatever the daemon does.
PING_TIMEOUT = 3.0

# Largest request body accepted by default; bigger ones get 413 unread.
DEFAULT_MAX_BODY = 1024 * 1024

# How long a new connection may wait for a free slot before it gets 503.
SLOT_WAIT = 2.0

# How often the server looks for clients that send too slowly.
REAPER_INTERVAL = 0.5

# How long a stop waits for the requests in flight.
STOP_GRACE = 30.0

# How often a followed log stream that does not end by itself is checked.
LOG_FOLLOW_CHECK = 5.0

# A filter may need this many computed digests before we give up on it.
MAX_DIGEST_ROUNDS = 32

# Longest computed text whose digest is found by probing (see JobFilter).
MAX_PROBED_TEXT = 256

# Largest manifest a filter may produce, as JSON.
MAX_FILTER_OUTPUT = 1024 * 1024

# How a filter worker starts: it imports this file as a module, so that
# Python's bytecode cache spares it compiling the whole file again.
FILTER_WORKER_BOOT = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location("
    "'docker_job_dispatcher', sys.argv[1]); "
    "module = importlib.util.module_from_spec(spec); "
    "spec.loader.exec_module(module); "
    "sys.exit(module.run_filter_worker())"
)

# Address space a filter worker may use; beyond it the worker dies alone.
FILTER_MEMORY_LIMIT = 1024 * 1024 * 1024

TRACE = 5
LOG_LEVELS = {
    "TRACE": TRACE,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}

DEFAULT_FILTER = r"""
# The built-in job: run $JOB_COMMAND with the body's "args" in $JOB_IMAGE.
# The job is named after the body's "id", or after the SHA-1 of the whole
# body, so that sending the same body twice names the same job.
def setting($name; $fallback):
  $ENV[$name] // "" | if . == "" then $fallback else . end;

setting("JOB_TTL"; "") as $ttl
| setting("JOB_NETWORK"; "") as $network
| {
    Name: (setting("JOB_NAME_PREFIX"; "demo-job-")
           + (if .id == null then @sha1 else .id | tostring end)),
    Image: setting("JOB_IMAGE"; "debian:stable-slim"),
    Entrypoint: (
      (if $ttl | test("^[0-9]+(\\.[0-9]+)?[smhd]?$")
       then ["timeout", $ttl] else [] end)
      + [setting("JOB_COMMAND"; "echo")]
    ),
    Cmd: .args,
    Env: [
      $ENV | to_entries[] | select(.key | startswith("JOB_ENV_"))
      | "\(.key | ltrimstr("JOB_ENV_"))=\(.value)"
    ],
    HostConfig: ({
      LogConfig: {
        Type: "json-file",
        Config: {"max-size": "10m", "max-file": "1"}
      },
      RestartPolicy: {
        Name: "on-failure",
        MaximumRetryCount: (setting("JOB_RETRIES"; "2") | tonumber)
      }
    } + if $network == "" then {} else {NetworkMode: $network} end)
  }
"""


class DispatcherError(Exception):
    """An error with the HTTP status and message the client should see."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --- Docker client ---------------------------------------------------------


class DockerError(Exception):
    """Docker answered with an error status; carries Docker's message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class DockerUnavailable(Exception):
    """The daemon could not be reached, or did not answer in time."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix socket.

    The host name only fills the Host header; Docker ignores it, and a socket
    path there would make an invalid header.
    """

    def __init__(self, socket_path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        """Open the unix socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def docker_address(transport: str, environ: dict[str, str]) -> dict[str, Any]:
    """Return where and how to reach the daemon, as the Docker CLI would.

    Raises ValueError for a ``DOCKER_HOST`` that does not fit the transport.
    """
    docker_host = environ.get("DOCKER_HOST", "").strip()
    if transport == "socket":
        path = "/var/run/docker.sock"
        if docker_host.startswith("unix://"):
            path = docker_host[len("unix://"):] or path
            if not path.startswith("/"):
                path = "/" + path
        return {"transport": "socket", "path": path}

    default_port = 2375 if transport == "http" else 2376
    host, port = "localhost", default_port
    if docker_host and not docker_host.startswith("unix://"):
        parsed = urllib.parse.urlsplit(
            docker_host if "://" in docker_host else "tcp://" + docker_host
        )
        if parsed.scheme not in ("tcp", "http", "https"):
            raise ValueError(f"DOCKER_HOST {docker_host!r} is not a tcp:// address")
        host = parsed.hostname or "localhost"
        port = parsed.port or default_port
    address = {"transport": transport, "host": host, "port": port}
    if transport == "tls":
        cert_path = environ.get("DOCKER_CERT_PATH") or os.path.join(
            os.path.expanduser("~"), ".docker"
        )
        address["cert_path"] = cert_path
        address["verify"] = bool(environ.get("DOCKER_TLS_VERIFY"))
    return address


def tls_context(cert_path: str, verify: bool) -> ssl.SSLContext:
    """Return a client TLS context with the certificates in ``cert_path``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    ca_file = os.path.join(cert_path, "ca.pem")
    if verify:
        context.load_verify_locations(ca_file)
    else:
        # As the Docker CLI does without DOCKER_TLS_VERIFY: encrypt, but
        # take the daemon's certificate on trust.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    cert_file = os.path.join(cert_path, "cert.pem")
    key_file = os.path.join(cert_path, "key.pem")
    if os.path.exists(cert_file) and os.path.exists(key_file):
        context.load_cert_chain(cert_file, key_file)
    return context


class DockerClient:
    """A small Docker Engine API client over ``http.client``.

    Connections are kept and reused; every call is thread-safe. The API
    version is negotiated with the daemon on first contact.
    """

    def __init__(self, address: dict[str, Any], timeout: float = DOCKER_TIMEOUT):
        self.address = address
        self.timeout = timeout
        self.api_prefix = ""
        self.podman = False
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl_context = None
        if address["transport"] == "tls":
            self._ssl_context = tls_context(address["cert_path"], address["verify"])

    def describe(self) -> str:
        """Return the daemon's address for log lines."""
        if self.address["transport"] == "socket":
            return "unix://" + self.address["path"]
        scheme = "https" if self.address["transport"] == "tls" else "http"
        return f"{scheme}://{self.address['host']}:{self.address['port']}"

    # -- connections and requests --

    def _new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        """Return a new, unconnected connection to the daemon."""
        if self.address["transport"] == "socket":
            return UnixHTTPConnection(self.address["path"], timeout)
        if self.address["transport"] == "tls":
            return http.client.HTTPSConnection(
                self.address["host"],
                self.address["port"],
                timeout=timeout,
                context=self._ssl_context,
            )
        return http.client.HTTPConnection(
            self.address["host"], self.address["port"], timeout=timeout
        )

    def _checkout(self, timeout: float | None) -> tuple[Any, bool]:
        """Return a connection and whether it was reused from the pool."""
        with self._lock:
            if self._idle:
                connection = self._idle.pop()
                connection.timeout = timeout
                if connection.sock is not None:
                    connection.sock.settimeout(timeout)
                return connection, True
        return self._new_connection(timeout), False

    def close_idle(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _checkin(self, connection: http.client.HTTPConnection) -> None:
        """Put a connection whose reply was read in full back in the pool."""
        with self._lock:
            if len(self._idle) < 32:
                self._idle.append(connection)
                return
        connection.close()

    def _send(
        self, method: str, path: str, body: bytes | None, timeout: float | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request and return the connection and its reply headers.

        A pooled connection the daemon closed while idle is replaced once;
        the request had not reached the daemon in that case.
        """
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):
            connection, reused = self._checkout(timeout)
            try:
                connection.request(method, path, body=body, headers=headers)
                return connection, connection.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as error:
                connection.close()
                if reused and attempt == 1:
                    # The daemon dropped its connections, so the other idle
                    # ones are dead too: retry once on a new connection.
                    self.close_idle()
                    continue
                raise DockerUnavailable(
                    f"Docker closed the connection: {error}"
                ) from error
            except socket.timeout as error:
                connection.close()
                raise DockerUnavailable(
                    f"Docker did not answer within {timeout:g} s"
                ) from error
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise DockerUnavailable(
                    f"cannot reach Docker at {self.describe()}: {error}"
                ) from error
        raise AssertionError("unreachable")

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = -1,
    ) -> tuple[int, Any]:
        """Call the API and return the status and the decoded JSON reply.

        Raises DockerError for an error status and DockerUnavailable when
        the daemon cannot be reached or does not answer in time.
        """
        if timeout == -1:
            timeout = self.timeout
        url = self._url(path, query)
        payload = None if body is None else json.dumps(body).encode()
        connection, response = self._send(method, url, payload, timeout)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise DockerUnavailable(f"Docker's reply broke off: {error}") from error
        if response.getheader("Content-Length") is None and not response.chunked and (
            response.status not in (204, 304)
        ):
            # Docker always gives a length or chunks: the headers were cut.
            connection.close()
            raise DockerUnavailable("Docker's reply broke off in its headers")
        if response.will_close:
            connection.close()
        else:
            self._checkin(connection)
        log.log(TRACE, "Docker %s %s answered %s", method, url, response.status)
        if response.status >= 400:
            message = error_message(data, response.status)
            if response.status == 500 and "no such container" in message.lower():
                # Podman's answer for a container on its way out.
                raise DockerError(404, message)
            raise DockerError(response.status, message)
        if not data:
            return response.status, None
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode("utf-8", "replace")

    def stream(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Open a long reply on a connection of its own and return both.

        The caller reads the reply and closes the connection. Raises as
        ``request`` does when the reply is an error.
        """
        url = self._url(path, query)
        connection = self._new_connection(timeout)
        try:
            connection.request(method, url)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise DockerUnavailable(f"cannot reach Docker: {error}") from error
        if response.status >= 400:
            data = response.read()
            connection.close()
            raise DockerError(response.status, error_message(data, response.status))
        return connection, response

    def _url(self, path: str, query: dict[str, Any] | None) -> str:
        """Return the versioned URL for ``path`` with ``query`` encoded."""
        if not self.api_prefix and path != "/_ping":
            self.negotiate()
        url = (self.api_prefix if path != "/_ping" else "") + path
        if query:
            pairs = []
            for key, value in query.items():
                if value is None:
                    continue
                if isinstance(value, (dict, list)):
                    value = json.dumps(value, separators=(",", ":"))
                elif isinstance(value, bool):
                    value = "1" if value else "0"
                pairs.append((key, str(value)))
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        return url

    # -- the calls the dispatcher makes --

    def negotiate(self) -> str:
        """Agree on the API version with the daemon and return it."""
        connection, response = self._send("GET", "/_ping", None, PING_TIMEOUT)
        response.read()
        self._checkin(connection)
        version = response.headers.get("Api-Version", "")
        try:
            numbers = tuple(int(part) for part in version.split("."))
        except ValueError:
            numbers = ()
        if len(numbers) != 2:
            raise DockerUnavailable(f"Docker sent no usable API version ({version!r})")
        if numbers < MIN_API_VERSION:
            raise DockerUnavailable(
                f"Docker speaks API {version}; at least "
                f"{MIN_API_VERSION[0]}.{MIN_API_VERSION[1]} is needed"
            )
        self.podman = "Libpod-Api-Version" in response.headers
        if self.api_prefix != "/v" + version:
            log.info(
                "Connected to %s at %s, API %s",
                "Podman" if self.podman else "Docker", self.describe(), version,
            )
        self.api_prefix = "/v" + version
        return version

    def ping(self) -> None:
        """Raise unless the daemon answers a ping promptly."""
        reply = self.request("GET", "/_ping", timeout=PING_TIMEOUT)[1]
        if reply != "OK":
            raise DockerUnavailable(f"Docker's ping answered {reply!r}")

    def create_container(
        self, name: str, config: dict[str, Any], platform: str | None
    ) -> dict[str, Any]:
        """Create a container and return Docker's reply (``Id``).

        A taken name raises DockerError 409, from Podman too, which
        answers 500 there.
        """
        query = {"name": name, "platform": platform}
        try:
            reply = self.request("POST", "/containers/create", query, body=config)[1]
        except DockerError as error:
            if error.status == 500 and "already in use" in error.message:
                raise DockerError(409, error.message) from None
            raise
        if not isinstance(reply, dict) or "Id" not in reply:
            raise DockerUnavailable("Docker's reply to the create call was cut short")
        return reply

    def start_container(self, container: str) -> None:
        """Start a created container."""
        self.request("POST", f"/containers/{quote(container)}/start")

    def inspect_container(self, container: str) -> dict[str, Any]:
        """Return the container's full description."""
        return self.request("GET", f"/containers/{quote(container)}/json")[1]

    def list_containers(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Return the summaries of all containers matching ``filters``."""
        if not self.api_prefix:
            self.negotiate()
        if self.podman and "status" in filters:
            # Podman refuses these state words, and has no such states.
            statuses = [s for s in filters["status"] if s not in ("restarting", "dead")]
            filters = {**filters, "status": statuses}
        query = {"all": True, "filters": filters}
        return self.request("GET", "/containers/json", query)[1] or []

    def stop_container(self, container: str, grace: int) -> None:
        """Stop a container, killing it after ``grace`` seconds."""
        self.request(
            "POST",
            f"/containers/{quote(container)}/stop",
            {"t": grace},
            timeout=grace + self.timeout,
        )

    def remove_container(self, container: str, force: bool = False) -> None:
        """Remove a container and its anonymous volumes."""
        query = {"force": force, "v": True}
        self.request("DELETE", f"/containers/{quote(container)}", query)

    # -- swarm services, for the swarm backend --

    def create_service(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create a swarm service and return Docker's reply (``ID``)."""
        return self.request("POST", "/services/create", body=spec)[1]

    def inspect_service(self, service: str) -> dict[str, Any]:
        """Return a service's description, its spec and version included."""
        return self.request("GET", f"/services/{quote(service)}")[1]

    def update_service(self, service: str, version: int, spec: dict[str, Any]) -> None:
        """Replace a service's spec; ``version`` guards against lost updates."""
        path = f"/services/{quote(service)}/update"
        self.request("POST", path, {"version": version}, body=spec)

    def remove_service(self, service: str) -> None:
        """Remove a service and stop its tasks."""
        self.request("DELETE", f"/services/{quote(service)}")

    def list_services(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Return the services matching ``filters``."""
        return self.request("GET", "/services", {"filters": filters})[1] or []

    def list_tasks(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Return the swarm tasks matching ``filters``."""
        return self.request("GET", "/tasks", {"filters": filters})[1] or []


def quote(text: str) -> str:
    """Return ``text`` escaped for one URL path segment."""
    return urllib.parse.quote(text, safe="")


def error_message(data: bytes, status: int) -> str:
    """Return the message in a Docker error body, or its text."""
    try:
        message = json.loads(data).get("message")
        if message:
            return str(message)
    except (ValueError, AttributeError):
        pass
    text = data.decode("utf-8", "replace").strip()
    return text or f"Docker answered {status}"


# --- The jq layer -------------------------------------------------------------

# A digest the filter needs but that was not handed to it travels out of jq
# as this marker: base64 keeps the text intact wherever it ends up.
DIGEST_MARKER = re.compile(r"\x01([A-Za-z0-9+/=]+)\x02")

# The program around the user's filter. The input is an array: the request
# body, the request path, the digests known so far, what to do with an
# unknown digest, and a fresh cuid2. The filter's outputs are followed by a
# final marker, so that a halt (no marker) tells apart from an empty result.
FILTER_PRELUDE = (
    "def djd_builtin_format($name): format($name); "
    ". as [$djd_body, $PATH, $djd_digests, $djd_unknown, $djd_cuid] "
    "| def format($name): "
    "if $name == \"sha1\" or $name == \"md5\" then "
    "(if type == \"string\" then . else tojson end) as $text "
    "| $djd_digests[$name + \":\" + $text] // ("
    "(\"\\u0001\" + ([$name, $text] | tojson | @base64) + \"\\u0002\") as $marker "
    "| if $djd_unknown == \"halt\" then halt "
    "elif $djd_unknown == \"error\" then error($marker) "
    "elif ($djd_unknown | type) == \"object\" and $text < $djd_unknown.below "
    "then halt "
    "else $marker end) "
    "else djd_builtin_format($name) end; "
    "def cuid2: $djd_cuid; "
    "$djd_body | (\n"
)
FILTER_EPILOGUE = "\n), {\"djd_end\": true}"
END_MARKER = {"djd_end": True}

CUID_ALPHABET = string.digits + string.ascii_lowercase


def new_cuid2() -> str:
    """Return a fresh 24-character cuid2-style id: a letter, then base 36."""
    entropy = os.urandom(32) + str(time.time_ns()).encode()
    number = int.from_bytes(hashlib.sha3_512(entropy).digest(), "big")
    number, letter = divmod(number, 26)
    digits = [string.ascii_lowercase[letter]]
    while len(digits) < 24:
        number, digit = divmod(number, 36)
        digits.append(CUID_ALPHABET[digit])
    return "".join(digits)


def digest(name: str, text: str) -> str:
    """Return the lowercase hex digest ``name`` of the UTF-8 of ``text``."""
    return hashlib.new(name, text.encode("utf-8")).hexdigest()


class JobFilter:
    """A compiled jq filter with the dispatcher's extensions.

    ``$PATH``, ``cuid2``, ``@sha1`` and ``@md5`` are not part of jq: the
    filter runs inside a small program that defines them. jq cannot hash,
    so digests are computed here. A digest of a value the filter computes
    is not known before the run; the run then halts at once (a halt cannot
    be caught by the filter's ``try``), a discovery run learns the text to
    hash, and the filter runs again with it, so a digest is never wrong.
    """

    def __init__(self, text: str):
        self.text = text
        self._source = FILTER_PRELUDE + text + FILTER_EPILOGUE
        self._programs = [self._compile()]
        self._lock = threading.Lock()

    def _compile(self) -> Any:
        """Return a fresh compiled program; raise ValueError with jq's words."""
        try:
            return jq.compile(self._source)
        except ValueError as error:
            raise ValueError(str(error).strip()) from None

    def _run(self, input_text: str, limit: int) -> tuple[list[Any], bool]:
        """Return up to ``limit`` outputs and whether the run reached its end.

        Each thread takes a compiled program of its own, because a program
        in use by one thread would be compiled again by the next.
        """
        with self._lock:
            program = self._programs.pop() if self._programs else None
        if program is None:
            program = self._compile()
        outputs = []
        finished = False
        try:
            for value in program.input_text(input_text):
                if value == END_MARKER:
                    finished = True
                    break
                outputs.append(value)
                if len(outputs) >= limit:
                    break
        except ValueError:
            if not outputs:
                raise
            # Only the first output counts; a later error does not matter.
            finished = True
        finally:
            with self._lock:
                self._programs.append(program)
        return outputs, finished

    def evaluate(self, body_text: str, path: str, limit: int = 2) -> list[Any]:
        """Run the filter on a JSON body text and return its first outputs.

        Raises ValueError with jq's message when the filter fails.
        """
        digests: dict[str, str] = {}
        cuid = new_cuid2()

        def run(unknown: Any) -> tuple[list[Any], bool]:
            tail = json.dumps([path, digests, unknown, cuid])
            return self._run("[" + body_text + "," + tail[1:], limit)

        for _ in range(MAX_DIGEST_ROUNDS):
            outputs, finished = run("halt")
            if outputs or finished:
                return outputs

            # The run halted: an unknown digest, or the filter's own halt.
            # A marker returned as a value shows up in the outputs; one that
            # got lost on the way may escape as an error instead.
            try:
                found, finished = run("value")
                wanted = markers_in(found)
            except ValueError as error:
                finished = True
                wanted = markers_in(str(error))
            if not wanted and finished:
                try:
                    run("error")
                except ValueError as error:
                    wanted = markers_in(str(error))
            if not wanted and finished:
                wanted = self._smallest_unknown(run)
            if not wanted:
                return []
            for name, text in wanted:
                digests[f"{name}:{text}"] = digest(name, text)
        raise ValueError(
            f"the filter needs more than {MAX_DIGEST_ROUNDS} computed digests"
        )

    def _smallest_unknown(self, run) -> set[tuple[str, str]]:
        """Find an unknown digest's text by asking only yes-or-no questions.

        A run halts at the first unknown text below a bound and returns
        markers for the others, so it halts exactly when the smallest
        unknown text is below the bound. That text is found one character
        at a time by bisection; this is slow, and only used when the
        filter hid every marker behind ``try`` and string operations.
        """
        def below(bound: str) -> bool:
            try:
                outputs, finished = run({"below": bound})
            except ValueError:
                return False
            return not finished

        prefix = ""
        while not below(prefix + "\x00"):
            if len(prefix) >= MAX_PROBED_TEXT:
                raise ValueError(
                    "the filter hides a digest of a long computed text "
                    "behind try; compute it outside try"
                )
            low, high = 0, sys.maxunicode
            while low < high:
                middle = (low + high + 1) // 2
                if 0xD800 <= middle <= 0xDFFF:
                    middle = 0xE000
                if below(prefix + chr(middle)):
                    high = middle - 1 if middle != 0xE000 else 0xD7FF
                else:
                    low = middle
            prefix += chr(low)
        # The probe only tells which text; each digest name is then tried.
        return {(name, prefix) for name in ("sha1", "md5")}


def markers_in(value: Any) -> set[tuple[str, str]]:
    """Return the (digest name, text) pairs of all markers inside ``value``."""
    found = set()
    if isinstance(value, str):
        for match in DIGEST_MARKER.finditer(value):
            try:
                name, text = json.loads(base64.b64decode(match.group(1)))
            except ValueError:
                continue
            found.add((name, text))
    elif isinstance(value, dict):
        for key, item in value.items():
            found |= markers_in(key) | markers_in(item)
    elif isinstance(value, list):
        for item in value:
            found |= markers_in(item)
    return found


def compile_filter(text: str) -> JobFilter:
    """Return the compiled filter; raise ValueError with jq's message.

    jq's line numbers are those of the filter as written.
    """
    try:
        return JobFilter(text)
    except ValueError as error:
        message = re.sub(r"\n?jq: \d+ compile errors?$", "", str(error))
        if "djd_end" in message:
            # jq read past the filter into the program around it.
            message = "jq: error: syntax error: the filter ends too early"
            message += " (an unclosed bracket, parenthesis or string?)"
        # The filter starts on the second line of the program around it.
        message = re.sub(
            r"line (\d+)", lambda match: f"line {int(match.group(1)) - 1}", message
        )
        raise ValueError(message) from None


class FilterWorkers:
    """Runs filter evaluations in worker processes, with a time limit.

    A jq evaluation cannot be interrupted from Python and holds the
    interpreter lock while it runs, so a filter that loops, or builds a
    huge value, on some input would stall or kill the whole server. Here
    each evaluation runs in a small worker process instead: one that takes
    longer than the limit is killed, one that runs out of memory dies on
    its own, and the request gets a 400 while the server carries on.
    """

    def __init__(self, text: str, size: int, timeout: float, max_output: int):
        self.text = text
        self.size = size
        self.timeout = timeout
        self.max_output = max_output
        self._idle: list[subprocess.Popen] = []
        self._count = 0
        self._closed = False
        self._available = threading.Condition()

    def _spawn(self) -> subprocess.Popen:
        """Start a worker and hand it the filter."""
        worker = subprocess.Popen(
            [sys.executable, "-c", FILTER_WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        setup = {"filter": self.text, "max_output": self.max_output}
        worker.stdin.write(json.dumps(setup).encode() + b"\n")
        worker.stdin.flush()
        return worker

    def warm(self) -> None:
        """Start all workers now rather than on the first requests."""
        started = []
        for _ in range(self.size):
            with self._available:
                if self._count >= self.size or self._closed:
                    break
                self._count += 1
            try:
                started.append(self._spawn())
            except OSError as error:
                with self._available:
                    self._count -= 1
                log.error("Cannot start a filter worker: %s", error)
                break
        for worker in started:
            self._checkin(worker)

    def _checkout(self, deadline: float) -> subprocess.Popen:
        """Return an idle worker, starting one if the pool is not full."""
        with self._available:
            while not self._idle and self._count >= self.size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ValueError("no filter worker became free in time; retry")
                self._available.wait(remaining)
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            return self._spawn()
        except OSError:
            with self._available:
                self._count -= 1
                self._available.notify()
            raise

    def _checkin(self, worker: subprocess.Popen) -> None:
        """Return a healthy worker to the pool."""
        with self._available:
            if not self._closed:
                self._idle.append(worker)
                self._available.notify()
                return
            self._count -= 1
        worker.stdin.close()

    def _discard(self, worker: subprocess.Popen) -> None:
        """Kill a worker that misbehaved and make room for a new one."""
        worker.kill()
        worker.wait()
        for stream in (worker.stdin, worker.stdout):
            try:
                stream.close()
            except OSError:
                pass
        with self._available:
            self._count -= 1
            self._available.notify()

    def evaluate(self, body_text: str, path: str) -> list[Any]:
        """Return the filter's first output (and a second if there are more).

        Raises ValueError with a message for the client when the filter
        fails, runs too long or dies.
        """
        deadline = time.monotonic() + self.timeout
        worker = self._checkout(deadline)
        try:
            worker.stdin.write(json.dumps([body_text, path]).encode() + b"\n")
            worker.stdin.flush()
            line = read_line(worker.stdout, deadline)
        except OSError:
            line = None
        if line is None or not line.endswith(b"\n"):
            self._discard(worker)
            if time.monotonic() >= deadline:
                raise ValueError(f"the filter ran longer than {self.timeout:g} s")
            raise ValueError("the filter's process died (out of memory?)")
        self._checkin(worker)

        answer = json.loads(line)
        if "error" in answer:
            raise ValueError(answer["error"])
        return answer["outputs"]

    def close(self) -> None:
        """Stop the idle workers; busy ones stop when they are done."""
        with self._available:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.stdin.close()


def read_line(stream: Any, deadline: float) -> bytes | None:
    """Return one line from a pipe, or what came before the deadline."""
    descriptor = stream.fileno()
    data = bytearray()
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(data) if data else None
        readable, _, _ = select.select([descriptor], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(descriptor, 1 << 16)
        if not chunk:
            return bytes(data) if data else None
        data += chunk
    return bytes(data)


def run_filter_worker() -> int:
    """Evaluate requests from standard input until it closes.

    The first line holds the filter; each further line a request body and
    path. Each answer is one line: the outputs, or the error.
    """
    resource.setrlimit(resource.RLIMIT_AS, (FILTER_MEMORY_LIMIT, FILTER_MEMORY_LIMIT))
    setup = json.loads(sys.stdin.buffer.readline())
    job_filter = JobFilter(setup["filter"])
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        body_text, path = json.loads(line)
        try:
            outputs = job_filter.evaluate(body_text, path)
            answer = json.dumps({"outputs": outputs})
            if len(answer) > setup["max_output"]:
                answer = json.dumps({
                    "error": f"the output is larger than {setup['max_output']} bytes"
                })
        except ValueError as error:
            answer = json.dumps({"error": str(error)})
        except RecursionError:
            answer = json.dumps({"error": "the output is nested too deeply"})
        out.write(answer.encode() + b"\n")
        out.flush()
    return 0


# --- Jobs ---------------------------------------------------------------------


def parse_docker_time(text: str | None) -> float | None:
    """Return a Docker RFC 3339 time as Unix seconds, or None if never set."""
    if not text or text.startswith("0001-01-01"):
        return None
    match = re.match(
        r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text
    )
    if not match:
        return None
    whole, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    moment = datetime.fromisoformat(whole + zone)
    return moment.timestamp() + float("0." + (fraction or "0"))


def human_duration(seconds: float) -> str:
    """Return a duration in the words the Docker CLI uses."""
    if seconds < 1:
        return "Less than a second"
    if int(seconds) == 1:
        return "1 second"
    if seconds < 60:
        return f"{int(seconds)} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def human_status(state: dict[str, Any], now: float) -> str:
    """Return Docker's human status line ("Up 3 seconds") for a state."""
    started = parse_docker_time(state.get("StartedAt"))
    finished = parse_docker_time(state.get("FinishedAt"))
    word = state.get("Status")
    exit_code = state.get("ExitCode", 0)
    if word == "restarting":
        return f"Restarting ({exit_code}) {human_duration(now - (finished or now))} ago"
    if word in ("running", "paused"):
        up = "Up " + human_duration(now - (started or now))
        return up + " (Paused)" if word == "paused" else up
    if word == "removing":
        return "Removal In Progress"
    if word == "dead":
        return "Dead"
    if started is None:
        return "Created"
    if finished is None:
        return ""
    return f"Exited ({exit_code}) {human_duration(now - finished)} ago"


def job_summary(info: dict[str, Any]) -> dict[str, Any]:
    """Return the API's description of a job from Docker's inspect reply."""
    state = info.get("State") or {}
    word = state.get("Status")
    if word == "created" and state.get("Error"):
        word = "failed"
    created = parse_docker_time(info.get("Created"))
    ran = word in ("exited", "failed", "dead") or (
        word == "restarting" and parse_docker_time(state.get("FinishedAt"))
    )
    return {
        "id": info.get("Name", "").lstrip("/"),
        "created": int(created) if created is not None else None,
        "status": human_status(state, time.time()),
        "state": word,
        "exit_code": state.get("ExitCode") if ran else None,
        "started_at": none_if_zero(state.get("StartedAt")),
        "finished_at": none_if_zero(state.get("FinishedAt")),
        "error": state.get("Error") or None,
    }


def none_if_zero(text: str | None) -> str | None:
    """Return a Docker time string, or None where the time was never set."""
    return None if parse_docker_time(text) is None else text


class Dispatcher:
    """The job logic: submissions and lookups, on top of Docker."""

    def __init__(
        self,
        docker: DockerClient,
        job_filter: JobFilter,
        namespace: str,
        max_concurrent: int | None,
    ):
        self.docker = docker
        self.job_filter = job_filter
        self.namespace = namespace
        self.max_concurrent = max_concurrent
        self.scheduler: Upkeep | None = None
        self.metrics = Metrics(namespace)
        self.stopping = False
        # Whether Docker ends a followed log stream when the job ends, and
        # gives the last lines of a log reliably.
        self.log_streams_end = True
        self.log_tail_by_docker = True
        # Notified whenever a job may have finished; waiters re-check.
        self.job_changed = threading.Condition()

    # -- submission --

    def build_manifest(self, body_text: str, path: str) -> dict[str, Any]:
        """Run the filter on a request and return the checked manifest.

        Raises DispatcherError (400) when the filter fails or its output
        is not a usable manifest.
        """
        try:
            outputs = self.job_filter.evaluate(body_text, path)
        except ValueError as error:
            raise DispatcherError(400, f"The filter failed: {error}") from None
        if not outputs:
            raise DispatcherError(400, "The filter produced no output")
        if len(outputs) > 1:
            log.warning("Filter produced more than one output; using the first")
        manifest = outputs[0]
        if not isinstance(manifest, dict):
            raise DispatcherError(
                400, f"The filter's output must be an object, not {json_type(manifest)}"
            )
        name = manifest.get("Name")
        if not isinstance(name, str):
            raise DispatcherError(400, "The filter's output needs a string Name")
        if not NAME_PATTERN.match(name):
            raise DispatcherError(
                400,
                f"The filter's Name {name!r} is not a valid container name "
                "(letters, digits, '_', '.', '-'; at least two characters)",
            )
        platform = manifest.get("Platform")
        if platform is not None and not (
            isinstance(platform, str) and PLATFORM_PATTERN.match(platform)
        ):
            raise DispatcherError(
                400, "The filter's Platform must be a string like linux/amd64"
            )
        labels = manifest.get("Labels")
        if labels is None:
            labels = {}
        if not isinstance(labels, dict) or not all(
            isinstance(value, str) for value in labels.values()
        ):
            raise DispatcherError(
                400, "The filter's Labels must be an object of strings"
            )
        host = manifest.get("HostConfig")
        if host is not None and not isinstance(host, dict):
            raise DispatcherError(400, "The filter's HostConfig must be an object")
        manifest = dict(manifest)
        restart = (host or {}).get("RestartPolicy")
        restart = restart if isinstance(restart, dict) else {}
        manifest["Labels"] = {
            **labels,
            NAMESPACE_LABEL: self.namespace,
            RESTART_LABEL: str(restart.get("Name") or "no"),
        }
        return manifest

    def submit(self, body_text: str, path: str) -> tuple[int, dict[str, Any]]:
        """Create the job a request describes; return the status and reply."""
        manifest = self.build_manifest(body_text, path)
        name = manifest.pop("Name")
        platform = manifest.pop("Platform", None)
        log.debug("Creating job %r from %s", name, json.dumps(manifest))

        try:
            created = self.docker.create_container(name, manifest, platform)
        except DockerError as error:
            if error.status == 409:
                return self._existing_job(name)
            if error.status in (400, 404) or error.message.startswith(
                "json: cannot unmarshal"  # Docker's 500 for a field of the wrong type
            ):
                log.warning("Refused job %r: %s", name, error.message)
                raise DispatcherError(400, f"Docker refused the job: {error.message}")
            raise DispatcherError(502, f"Docker failed to create the job: {error}")
        log.info("Created job %r", name)

        if self.max_concurrent is None:
            self.start_job(created["Id"], name)
        elif self.scheduler is not None:
            self.scheduler.wake()
        return 201, {"id": name}

    def _existing_job(self, name: str) -> tuple[int, dict[str, Any]]:
        """Answer a submission whose name is taken: 200 if it is our job.

        A concurrent submission of the same job may hold the name before its
        container can be inspected: the lookup is tried again briefly.
        """
        deadline = time.monotonic() + NAME_SETTLE_TIME
        while True:
            try:
                info = self.docker.inspect_container(name)
                break
            except DockerError as error:
                if error.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if not self.is_our_job(info, name):
            raise DispatcherError(
                409,
                f"A container named {name!r} exists but is not a job of "
                f"namespace {self.namespace!r}",
            )
        log.info("Found existing job %r", name)
        state = info.get("State") or {}
        if (
            self.max_concurrent is None
            and state.get("Status") == "created"
            and not state.get("Error")
        ):
            # Created by an earlier request that could not start it.
            self.start_job(info["Id"], name)
        return 200, {"id": name}

    def start_job(self, container_id: str, name: str) -> None:
        """Start a created job; raise DispatcherError (502) if Docker fails."""
        try:
            self.docker.start_container(container_id)
        except (DockerError, DockerUnavailable) as error:
            log.warning("Failed to start job %r: %s", name, error)
            if isinstance(error, DockerError) and self.scheduler is not None:
                self.scheduler.note_refusal(container_id, name, error.message)
            raise DispatcherError(
                502, f"The job {name!r} was created but not started: {error}"
            ) from None
        log.info("Started job %r", name)

    def summarize(self, info: dict[str, Any]) -> dict[str, Any]:
        """Return a job's summary, with any refused start Docker forgot.

        Podman keeps no trace of a refused start; the dispatcher does.
        """
        summary = job_summary(info)
        refusal = self.scheduler.refusal(info.get("Id", "")) if self.scheduler else None
        if refusal and summary["state"] == "created":
            summary.update(state="failed", error=refusal)
        return summary

    # -- lookups --

    def inspect_job(self, job_id: str) -> dict[str, Any] | None:
        """Return Docker's description of a job of our namespace, or None.

        Raises DispatcherError (502) when Docker cannot be asked.
        """
        if not NAME_PATTERN.match(job_id):
            return None
        try:
            info = self.docker.inspect_container(job_id)
        except DockerError as error:
            if error.status == 404:
                return None
            raise DispatcherError(502, f"Docker failed to look up the job: {error}")
        return info if self.is_our_job(info, job_id) else None

    def is_our_job(self, info: dict[str, Any], name: str) -> bool:
        """Return whether an inspected container is the job of that name here.

        Docker also finds containers by id prefix: the name must match.
        """
        labels = (info.get("Config") or {}).get("Labels") or {}
        return (
            info.get("Name") == "/" + name
            and labels.get(NAMESPACE_LABEL) == self.namespace
        )

    def get_job(self, job_id: str) -> dict[str, Any]:
        """Return the summary of a job; raise DispatcherError (404) if none."""
        info = self.inspect_job(job_id)
        if info is None:
            raise DispatcherError(404, f"Job {job_id!r} not found")
        log.info("Fetched job %r", job_id)
        return self.summarize(info)

    def job_gauges(self) -> dict[str, int | None]:
        """Return the numbers of running and pending jobs, None if unknown."""
        try:
            containers = self.docker.list_containers({
                "label": [f"{NAMESPACE_LABEL}={self.namespace}"],
                "status": ["created", "running", "restarting"],
            })
        except (DockerError, DockerUnavailable):
            return {"jobs_running": None, "jobs_pending": None}
        failed = self.scheduler.failed_ids() if self.scheduler else set()
        running = sum(1 for c in containers if c["State"] != "created")
        pending = sum(
            1 for c in containers if c["State"] == "created" and c["Id"] not in failed
        )
        return {"jobs_running": running, "jobs_pending": pending}

    def dry_run(self, body_text: str, path: str) -> dict[str, Any]:
        """Return what a submission would send to Docker, creating nothing."""
        manifest = self.build_manifest(body_text, path)
        name = manifest.pop("Name")
        platform = manifest.pop("Platform", None)
        return {"name": name, "platform": platform, "config": manifest}

    def notify_job_changed(self) -> None:
        """Wake the requests that wait for a job to finish."""
        with self.job_changed:
            self.job_changed.notify_all()

    def wait_job(self, job_id: str, timeout: float) -> dict[str, Any]:
        """Return a job's summary once it has finished or ``timeout`` passed.

        Docker's die events and refused starts wake the waiters; a check
        every second covers anything the event stream missed.
        """
        deadline = time.monotonic() + timeout
        while True:
            summary = self.get_job(job_id)
            remaining = deadline - time.monotonic()
            if summary["state"] in FINISHED_STATES or remaining <= 0 or self.stopping:
                return summary
            with self.job_changed:
                self.job_changed.wait(min(remaining, 1.0))

    def delete_job(self, job_id: str, grace: int) -> None:
        """Stop a job if it runs, then remove it; raise 404 if none."""
        info = self.inspect_job(job_id)
        if info is None:
            raise DispatcherError(404, f"Job {job_id!r} not found")
        try:
            if info["State"].get("Status") in ("running", "restarting", "paused"):
                self.docker.stop_container(info["Id"], grace)
            self.docker.remove_container(info["Id"], force=True)
        except DockerError as error:
            if error.status != 404:
                raise DispatcherError(
                    502, f"Docker failed to remove the job: {error}"
                ) from None
        log.info("Deleted job %r", job_id)

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Return the summaries of the namespace's jobs, newest first."""
        statuses = {
            "pending": ["created"],
            "failed": ["created"],
            "running": ["running", "restarting", "paused"],
            "exited": ["exited", "dead"],
        }.get(state or "")
        filters = {"label": [f"{NAMESPACE_LABEL}={self.namespace}"]}
        if statuses:
            filters["status"] = statuses
        containers = self.docker.list_containers(filters)
        containers.sort(key=lambda container: container["Created"], reverse=True)

        summaries = []
        for container in containers:
            if len(summaries) >= limit:
                break
            try:
                info = self.docker.inspect_container(container["Id"])
            except DockerError:
                continue  # removed meanwhile
            summary = self.summarize(info)
            if state in ("pending", "failed") and (
                (summary["state"] == "failed") != (state == "failed")
            ):
                continue
            summaries.append(summary)
        summaries.sort(key=lambda summary: summary["created"] or 0, reverse=True)
        return summaries

    def open_logs(
        self, job_id: str, options: dict[str, Any]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, bool]:
        """Open a job's log stream; return it and whether it is multiplexed."""
        info = self.inspect_job(job_id)
        if info is None:
            raise DispatcherError(404, f"Job {job_id!r} not found")
        tty = bool((info.get("Config") or {}).get("Tty"))
        path = f"/containers/{quote(info['Id'])}/logs"
        return self.open_log_stream(path, options, tty)

    def open_log_stream(
        self, path: str, options: dict[str, Any], tty: bool
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, bool]:
        """Open Docker's log stream at ``path``; return it and its framing."""
        try:
            connection, response = self.docker.stream(
                "GET",
                path,
                options,
                timeout=None if options.get("follow") else self.docker.timeout,
            )
        except DockerError as error:
            raise DispatcherError(
                400 if error.status == 400 else 502,
                f"Docker failed to give the logs: {error}",
            ) from None
        return connection, response, not tty


def log_chunks(
    response: http.client.HTTPResponse, multiplexed: bool
) -> Iterator[bytes]:
    """Yield a Docker log stream's payload, with the frame headers removed."""
    if not multiplexed:
        while True:
            data = response.read1(65536)
            if not data:
                return
            yield data
    while True:
        header = response.read(8)
        if len(header) < 8:
            return
        size = int.from_bytes(header[4:8], "big")
        payload = response.read(size)
        if payload:
            yield payload
        if len(payload) < size:
            return


FINISHED_STATES = ("exited", "dead", "failed")


def json_type(value: Any) -> str:
    """Return the jq name of a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"



# --- The swarm backend ----------------------------------------------------------

# A placement constraint no node satisfies: it holds a job's task pending
# until the scheduler lifts it.
HOLD_CONSTRAINT = "node.id==docker-job-dispatcher-held"

# Task states before a job's container runs, and while it runs.
PENDING_TASK_STATES = (
    "new", "allocated", "pending", "assigned", "accepted", "preparing", "ready",
)
RUNNING_TASK_STATES = ("starting", "running")

# Seconds after a container's death at which the swarm scheduler looks again.
SWARM_SETTLE_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)

# How the container restart policies of a manifest map onto a task's.
RESTART_CONDITIONS = {
    "on-failure": "on-failure", "always": "any", "unless-stopped": "any"
}


def task_template(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return a swarm task template that runs a container manifest's job."""
    host = manifest.get("HostConfig") or {}
    container = {"Image": manifest.get("Image"), "Labels": manifest["Labels"]}
    for source, target in (
        ("Entrypoint", "Command"), ("Cmd", "Args"), ("Env", "Env"),
        ("User", "User"), ("WorkingDir", "Dir"), ("Tty", "TTY"),
        ("Hostname", "Hostname"), ("StopSignal", "StopSignal"),
    ):
        if manifest.get(source) not in (None, "", []):
            container[target] = manifest[source]
    for source, target in (
        ("ReadonlyRootfs", "ReadOnly"), ("Init", "Init"), ("CapAdd", "CapabilityAdd"),
        ("CapDrop", "CapabilityDrop"), ("Sysctls", "Sysctls"),
    ):
        if host.get(source) not in (None, "", []):
            container[target] = host[source]

    restart = host.get("RestartPolicy") or {}
    template: dict[str, Any] = {
        "ContainerSpec": container,
        "RestartPolicy": {
            "Condition": RESTART_CONDITIONS.get(restart.get("Name", ""), "none"),
            "MaxAttempts": restart.get("MaximumRetryCount", 0),
        },
    }
    limits = {}
    for source, target in (
        ("Memory", "MemoryBytes"), ("NanoCpus", "NanoCPUs"), ("PidsLimit", "Pids"),
    ):
        if host.get(source):
            limits[target] = host[source]
    if limits:
        template["Resources"] = {"Limits": limits}
    log_config = host.get("LogConfig") or {}
    if log_config.get("Type"):
        template["LogDriver"] = {
            "Name": log_config["Type"], "Options": log_config.get("Config") or {}
        }
    network = host.get("NetworkMode")
    if network and network not in ("default", "bridge"):
        template["Networks"] = [{"Target": network}]
    return template


def latest_task(
    service: dict[str, Any], tasks: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Return the task of a job's current run, or None before it exists.

    Every update of a job service starts a new run (iteration); tasks of
    earlier runs, such as the one held back, no longer count.
    """
    iteration = ((service.get("JobStatus") or {}).get("JobIteration") or {}).get(
        "Index", 0
    )
    current = [
        task for task in tasks
        if (task.get("JobIteration") or {}).get("Index", 0) == iteration
    ]
    if not current:
        return None
    return max(current, key=lambda task: task.get("CreatedAt", ""))


def is_held(service: dict[str, Any]) -> bool:
    """Return whether a job service waits for the scheduler."""
    template = (service.get("Spec") or {}).get("TaskTemplate") or {}
    placement = template.get("Placement") or {}
    return HOLD_CONSTRAINT in (placement.get("Constraints") or [])


def task_state(service: dict[str, Any], task: dict[str, Any] | None) -> dict[str, Any]:
    """Return a container-like state for a job service and its current task.

    The fields are those of Docker's container state, so that the summary
    and status line read the same for both backends.
    """
    status = (task or {}).get("Status") or {}
    word = status.get("State", "new")
    moment = status.get("Timestamp") or ZERO_TIME
    state = {"Status": "created", "StartedAt": ZERO_TIME, "FinishedAt": ZERO_TIME,
             "ExitCode": 0, "Error": ""}
    if is_held(service) or task is None or word in PENDING_TASK_STATES:
        return state
    if word in RUNNING_TASK_STATES:
        return {**state, "Status": "running", "StartedAt": moment}

    # The run is over: it exited, or it never got its container going.
    error = status.get("Err") or ""
    exit_code = (status.get("ContainerStatus") or {}).get("ExitCode", 0)
    if word != "complete" and not error.startswith("task: non-zero exit") and word in (
        "failed", "rejected"
    ):
        return {**state, "ExitCode": exit_code, "Error": error or f"task {word}"}
    return {**state, "Status": "exited", "StartedAt": moment, "FinishedAt": moment,
            "ExitCode": exit_code}


def warn_unless_swarm_manager(docker: DockerClient) -> None:
    """Log a warning when the daemon cannot manage swarm services."""
    try:
        swarm = docker.request("GET", "/info")[1].get("Swarm") or {}
    except (DockerError, DockerUnavailable):
        return
    if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
        log.warning(
            "Docker at %s is not a swarm manager: jobs cannot be created until it is",
            docker.describe(),
        )


class SwarmDispatcher(Dispatcher):
    """Jobs as swarm ``replicated-job`` services, one task each.

    The filter's container manifest is mapped onto the service's task
    template (a filter may give a native service spec instead, with a
    ``TaskTemplate``). With a concurrency limit a job is created with a
    placement constraint no node meets, and the scheduler lifts it.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.log_streams_end = False
        self.log_tail_by_docker = False

    def service_spec(self, manifest: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Return a job's name and the service spec for its manifest."""
        manifest = dict(manifest)
        name = manifest.pop("Name")
        platform = manifest.pop("Platform", None)
        labels = manifest.pop("Labels")
        if "TaskTemplate" in manifest:
            spec = manifest
            template = spec["TaskTemplate"] = dict(spec["TaskTemplate"] or {})
            container = dict(template.get("ContainerSpec") or {})
            container["Labels"] = {**(container.get("Labels") or {}), **labels}
            template["ContainerSpec"] = container
        else:
            spec = {
                "TaskTemplate": task_template({**manifest, "Labels": labels}),
                "Mode": {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
            }
        spec["Name"] = name
        spec["Labels"] = labels
        placement = spec["TaskTemplate"].setdefault("Placement", {})
        if platform:
            os_name, _, architecture = platform.partition("/")
            placement["Platforms"] = [
                {"OS": os_name, "Architecture": architecture.split("/")[0]}
            ]
        if self.max_concurrent is not None:
            placement["Constraints"] = (placement.get("Constraints") or []) + [
                HOLD_CONSTRAINT
            ]
        return name, spec

    def dry_run(self, body_text: str, path: str) -> dict[str, Any]:
        """Return the service spec a submission would create, creating nothing."""
        manifest = self.build_manifest(body_text, path)
        platform = manifest.get("Platform")
        name, spec = self.service_spec(manifest)
        return {"name": name, "platform": platform, "config": spec}

    def submit(self, body_text: str, path: str) -> tuple[int, dict[str, Any]]:
        """Create the job service a request describes."""
        name, spec = self.service_spec(self.build_manifest(body_text, path))
        log.debug("Creating job %r from %s", name, json.dumps(spec))
        try:
            self.docker.create_service(spec)
        except DockerError as error:
            if error.status == 409:
                if self.inspect_job(name) is None:
                    raise DispatcherError(
                        409,
                        f"A service named {name!r} exists but is not a job of "
                        f"namespace {self.namespace!r}",
                    ) from None
                log.info("Found existing job %r", name)
                return 200, {"id": name}
            if error.status == 400:
                raise DispatcherError(400, f"Docker refused the job: {error.message}")
            raise DispatcherError(502, f"Docker failed to create the job: {error}")
        log.info("Created job %r", name)
        if self.max_concurrent is not None and self.scheduler is not None:
            self.scheduler.wake()
        return 201, {"id": name}

    def release_job(self, name: str) -> bool:
        """Lift a held job's constraint so that swarm runs it; return success."""
        try:
            service = self.docker.inspect_service(name)
            spec = service["Spec"]
            placement = spec["TaskTemplate"].setdefault("Placement", {})
            placement["Constraints"] = [
                constraint for constraint in placement.get("Constraints") or []
                if constraint != HOLD_CONSTRAINT
            ]
            self.docker.update_service(service["ID"], service["Version"]["Index"], spec)
        except (DockerError, DockerUnavailable) as error:
            log.warning("Failed to start job %r: %s", name, error)
            return False
        log.info("Started job %r", name)
        return True

    def inspect_job(self, job_id: str) -> dict[str, Any] | None:
        """Return a job service of our namespace with its tasks, or None."""
        if not NAME_PATTERN.match(job_id):
            return None
        try:
            service = self.docker.inspect_service(job_id)
            spec = service.get("Spec") or {}
            if spec.get("Name") != job_id or (spec.get("Labels") or {}).get(
                NAMESPACE_LABEL
            ) != self.namespace:
                return None
            service["Tasks"] = self.docker.list_tasks({"service": [service["ID"]]})
        except DockerError as error:
            if error.status == 404:
                return None
            raise DispatcherError(502, f"Docker failed to look up the job: {error}")
        return service

    def get_job(self, job_id: str) -> dict[str, Any]:
        """Return the summary of a job service; raise 404 if none."""
        service = self.inspect_job(job_id)
        if service is None:
            raise DispatcherError(404, f"Job {job_id!r} not found")
        log.info("Fetched job %r", job_id)
        return self.summary(service, service["Tasks"])

    def summary(
        self, service: dict[str, Any], tasks: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Return the API's description of a job service."""
        task = latest_task(service, tasks)
        state = task_state(service, task)
        status = (task or {}).get("Status") or {}
        container_id = (status.get("ContainerStatus") or {}).get("ContainerID")
        if container_id and state["Status"] != "created":
            # The container gives exact times when it runs on this node.
            try:
                exact = self.docker.inspect_container(container_id)["State"]
                state["StartedAt"] = exact.get("StartedAt") or state["StartedAt"]
                if state["Status"] == "exited":
                    state["FinishedAt"] = exact.get("FinishedAt") or state["FinishedAt"]
            except (DockerError, DockerUnavailable):
                pass
        info = {
            "Name": "/" + service["Spec"]["Name"],
            "Created": service.get("CreatedAt"),
            "State": state,
        }
        return job_summary(info)

    def delete_job(self, job_id: str, grace: int) -> None:
        """Stop a job service's task, then remove the service.

        Removing a running job service alone leaves its task running on
        Docker before 24, so the job is first held back: that ends its run,
        with the spec's StopGracePeriod set to ``grace``.
        """
        service = self.inspect_job(job_id)
        if service is None:
            raise DispatcherError(404, f"Job {job_id!r} not found")
        task = latest_task(service, service["Tasks"])
        if task is not None and task["Status"]["State"] in RUNNING_TASK_STATES:
            spec = service["Spec"]
            spec["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] = grace * 10**9
            placement = spec["TaskTemplate"].setdefault("Placement", {})
            placement["Constraints"] = (placement.get("Constraints") or []) + [
                HOLD_CONSTRAINT
            ]
            self.docker.update_service(service["ID"], service["Version"]["Index"], spec)
            deadline = time.monotonic() + grace + 5
            while time.monotonic() < deadline and any(
                t["Status"]["State"] in RUNNING_TASK_STATES
                for t in self.docker.list_tasks({"service": [service["ID"]]})
            ):
                time.sleep(0.2)
        try:
            self.docker.remove_service(service["ID"])
        except DockerError as error:
            if error.status != 404:
                raise DispatcherError(502, f"Docker failed to remove the job: {error}")
        log.info("Deleted job %r", job_id)

    def namespace_jobs(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Return the namespace's job services, each with its tasks."""
        services = self.docker.list_services(
            {"label": [f"{NAMESPACE_LABEL}={self.namespace}"]}
        )
        by_service: dict[str, list[dict[str, Any]]] = {}
        if services:
            for task in self.docker.list_tasks({}):
                by_service.setdefault(task.get("ServiceID", ""), []).append(task)
        return [(service, by_service.get(service["ID"], [])) for service in services]

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Return the summaries of the namespace's jobs, newest first."""
        jobs = self.namespace_jobs()
        summaries = [self.summary(service, tasks) for service, tasks in jobs]
        wanted = {
            "pending": ("created",), "failed": ("failed",),
            "running": ("running",), "exited": ("exited",),
        }.get(state or "")
        if wanted:
            summaries = [summary for summary in summaries if summary["state"] in wanted]
        summaries.sort(key=lambda summary: summary["created"] or 0, reverse=True)
        return summaries[:limit]

    def job_gauges(self) -> dict[str, int | None]:
        """Return the numbers of running and held jobs across the swarm."""
        try:
            jobs = self.namespace_jobs()
        except (DockerError, DockerUnavailable):
            return {"jobs_running": None, "jobs_pending": None}
        states = [
            task_state(service, latest_task(service, tasks)) for service, tasks in jobs
        ]
        return {
            "jobs_running": sum(1 for state in states if state["Status"] == "running"),
            "jobs_pending": sum(
                1 for state in states
                if state["Status"] == "created" and not state["Error"]
            ),
        }

    def open_logs(
        self, job_id: str, options: dict[str, Any]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, bool]:
        """Open a job service's log stream."""
        service = self.inspect_job(job_id)
        if service is None:
            raise DispatcherError(404, f"Job {job_id!r} not found")
        container = service["Spec"]["TaskTemplate"].get("ContainerSpec") or {}
        path = f"/services/{quote(service['ID'])}/logs"
        return self.open_log_stream(path, options, bool(container.get("TTY")))


# --- Upkeep: scheduling and cleaning ----------------------------------------


def is_final_death(attributes: dict[str, str]) -> bool:
    """Return whether a die event's container can no longer restart.

    The restart policy comes from the label the dispatcher puts on every
    job; without it, the death is not taken as final.
    """
    policy = attributes.get(RESTART_LABEL)
    if policy in ("", "no"):
        return True
    return policy == "on-failure" and attributes.get("exitCode") == "0"


class Upkeep:
    """Starts pending jobs within the limit and removes old exited jobs.

    One thread runs the passes, so they never overlap. It wakes on a
    ``threading.Timer`` every interval, and at once when a job is submitted
    or Docker reports that a job of the namespace died, so that a free slot
    is filled without waiting for the next tick. Start calls run in threads
    of their own and count as occupied slots until Docker answers.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        interval: float,
        keep_exited_for: float | None,
    ):
        self.dispatcher = dispatcher
        self.docker = dispatcher.docker
        self.interval = interval
        self.keep_exited_for = keep_exited_for
        self.label = f"{NAMESPACE_LABEL}={dispatcher.namespace}"
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._clean_due = True
        self._timer: threading.Timer | None = None
        self._threads: list[threading.Thread] = []
        self._events_connection: http.client.HTTPConnection | None = None
        # Start calls in flight, by container id.
        self._starting: dict[str, str] = {}
        # Jobs whose die event came in lately, by container id: when, and
        # whether the death is final (no restart can follow).
        self._died: dict[str, tuple[float, bool]] = {}
        # Jobs Docker refused to start: when we saw it, and Docker's reason.
        self._failed: dict[str, tuple[float, str]] = {}
        # Creation and finish times, which never change once known.
        self._created: dict[str, float] = {}
        self._finished: dict[str, float] = {}
        self._failing_since: float | None = None
        self._events_failing = False
        # Event actions already counted from the list made at start.
        self._counted_at_start: dict[str, set[str]] = {}
        self._listed_at_start = 0.0

    # -- the loop --

    def start(self) -> None:
        """Start the upkeep thread, the event stream and the timer."""
        for target, name in (
            (self._run_passes, "upkeep"),
            (self._follow_events, "docker-events"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._arm_timer()
        self.wake()

    def stop(self) -> None:
        """Stop the loop and the event stream, and wait for them briefly."""
        self._stopping.set()
        if self._timer is not None:
            self._timer.cancel()
        self._wake.set()
        connection = self._events_connection
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)

    def wake(self) -> None:
        """Ask for a scheduling pass as soon as possible."""
        self._wake.set()

    def failed_ids(self) -> set[str]:
        """Return the ids of the jobs Docker refused to start."""
        with self._lock:
            return set(self._failed)

    def note_refusal(self, container_id: str, name: str, message: str) -> None:
        """Remember a start that Docker refused at submission."""
        self._mark_failed(container_id, name, message, announce=False)
        self.wake()

    def refusal(self, container_id: str) -> str | None:
        """Return Docker's reason for refusing to start a job, if it did."""
        with self._lock:
            failed = self._failed.get(container_id)
        return failed[1] if failed else None

    def _arm_timer(self) -> None:
        """Schedule the next tick."""
        if self._stopping.is_set():
            return
        self._timer = threading.Timer(self.interval, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        """Ask for a full pass, cleaning included, and arm the next tick."""
        self._clean_due = True
        self._wake.set()
        self._arm_timer()

    def _run_passes(self) -> None:
        """Run a pass each time the loop is woken, until stopped."""
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            self.run_pass()

    def run_pass(self) -> None:
        """Schedule, then clean when due; log a failure once, and recovery."""
        try:
            self.schedule()
            if self._clean_due:
                self._clean_due = False
                self.clean()
        except (DockerError, DockerUnavailable) as error:
            if self._failing_since is None:
                log.error(
                    "Upkeep failed, retrying every %g s: %s", self.interval, error
                )
                self._failing_since = time.monotonic()
            return
        except Exception:
            if self._failing_since is None:
                log.exception("Upkeep failed unexpectedly")
                self._failing_since = time.monotonic()
            return
        if self._failing_since is not None:
            log.info(
                "Upkeep recovered after %.1f s",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None

    # -- scheduling --

    def schedule(self) -> None:
        """Start the oldest pending jobs while slots are free.

        Without a limit jobs start at submission; the pass then only looks
        for jobs whose start Docker refused, which are not pending.
        """
        limit = self.dispatcher.max_concurrent
        if limit is None:
            self._find_failed_starts()
        if not limit:
            return

        # Count the occupied slots: start calls in flight, plus what Docker
        # lists as running. A container listed as running after its die
        # event may be dead already: ask Docker about it directly.
        with self._lock:
            starting = dict(self._starting)
            died = dict(self._died)
        active = self.docker.list_containers(
            {"label": [self.label], "status": ["running", "restarting"]}
        )
        occupied = len(starting)
        for container in active:
            container_id = container["Id"]
            if container_id in starting:
                continue
            if container_id in died:
                # Docker may still list a dead container as running; a death
                # it cannot come back from is trusted, others are checked.
                _, final = died[container_id]
                if final or not self._still_active(container_id):
                    continue
            occupied += 1
        free = limit - occupied
        if free <= 0:
            return

        # Pick the oldest pending jobs that are not known to be broken.
        pending = [
            container
            for container in self.docker.list_containers(
                {"label": [self.label], "status": ["created"]}
            )
            if container["Id"] not in starting and container["Id"] not in self._failed
        ]
        for container in self._oldest(pending, free):
            name = container["Names"][0].lstrip("/")
            with self._lock:
                self._starting[container["Id"]] = name
            thread = threading.Thread(
                target=self._start_job,
                args=(container["Id"], name),
                name=f"start-{name}",
                daemon=True,
            )
            thread.start()

    def _still_active(self, container_id: str) -> bool:
        """Return whether a container is really running or restarting."""
        try:
            info = self.docker.inspect_container(container_id)
        except DockerError as error:
            if error.status == 404:
                return False
            raise
        return info["State"]["Status"] in ("running", "restarting")

    def _oldest(
        self, pending: list[dict[str, Any]], count: int
    ) -> list[dict[str, Any]]:
        """Return up to ``count`` pending jobs in creation order.

        The list gives creation times in whole seconds; the precise time of
        the jobs that may be chosen comes from inspecting them once. Jobs
        whose start Docker refused before are set aside on the way.
        """
        pending.sort(key=lambda container: container["Created"])
        if len(pending) > count:
            cutoff = pending[count - 1]["Created"]
            pending = [c for c in pending if c["Created"] <= cutoff]
        chosen = []
        for container in pending:
            container_id = container["Id"]
            if container_id not in self._created:
                try:
                    info = self.docker.inspect_container(container_id)
                except DockerError as error:
                    if error.status == 404:
                        continue
                    raise
                if info["State"].get("Error"):
                    self._mark_failed(container_id, info["Name"].lstrip("/"),
                                      info["State"]["Error"])
                    continue
                self._created[container_id] = parse_docker_time(info["Created"]) or 0.0
            chosen.append(container)
        chosen.sort(
            key=lambda container: (
                self._created[container["Id"]], container["Names"][0]
            )
        )
        return chosen[:count]

    def _start_job(self, container_id: str, name: str) -> None:
        """Start one job, note a refusal, and free its slot afterwards."""
        try:
            self.docker.start_container(container_id)
            log.info("Started job %r", name)
        except DockerError as error:
            self._mark_failed(container_id, name, error.message)
        except DockerUnavailable as error:
            log.warning("Failed to start job %r, will retry: %s", name, error)
        finally:
            with self._lock:
                self._starting.pop(container_id, None)
                self._created.pop(container_id, None)
            self.wake()

    def _mark_failed(
        self, container_id: str, name: str, message: str, announce: bool = True
    ) -> None:
        """Remember that Docker refused to start a job, and say so once."""
        with self._lock:
            if container_id in self._failed:
                return
            self._failed[container_id] = (time.time(), message)
        if announce:
            log.warning("Failed to start job %r, not retrying: %s", name, message)
        self.dispatcher.notify_job_changed()

    # -- Docker's event stream --

    def _count_existing_jobs(self) -> float:
        """Count the jobs found at start in the metrics; return the time.

        Running jobs count as created and started, pending ones as created.
        """
        now = time.time()
        containers = self.docker.list_containers(
            {"label": [self.label], "status": ["created", "running", "restarting"]}
        )
        for container in containers:
            counted = {"create"} if container["State"] == "created" else {
                "create", "start"}
            for action in counted:
                self.dispatcher.metrics.count_job(action)
            # The stream replays events from before the list: skip those.
            self._counted_at_start[container["Id"]] = counted
        self._listed_at_start = time.time()
        return now

    def _follow_events(self) -> None:
        """Follow the namespace's container events, reconnecting as needed.

        After a reconnection the stream resumes from the last event seen,
        so no event is lost or counted twice.
        """
        backoff = 0.1
        last_seen = 0
        while not self._stopping.is_set():
            try:
                if not last_seen:
                    last_seen = int(self._count_existing_jobs() * 1e9)
                seconds, nanoseconds = divmod(last_seen, 10**9)
                connection, response = self.docker.stream(
                    "GET",
                    "/events",
                    {
                        "since": f"{seconds}.{nanoseconds:09d}",
                        "filters": {"type": ["container"], "label": [self.label]},
                    },
                    timeout=EVENTS_IDLE_TIMEOUT,
                )
            except (DockerError, DockerUnavailable) as error:
                if not self._events_failing:
                    log.warning("Lost Docker's event stream, reconnecting: %s", error)
                    self._events_failing = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self._events_connection = connection
            if self._events_failing:
                log.info("Following Docker's event stream again")
                self._events_failing = False
                self.wake()
            backoff = 0.1
            try:
                while not self._stopping.is_set():
                    line = response.readline()
                    if not line:
                        break
                    event = json.loads(line)
                    moment = int(event.get("timeNano") or 0)
                    if moment and moment <= last_seen:
                        continue  # replayed after a reconnection
                    last_seen = max(last_seen, moment)
                    self._on_event(event)
            except socket.timeout:
                # A quiet stream, or a daemon that hangs: open it again, and
                # the reconnection tells which.
                connection.close()
                self._events_connection = None
                continue
            except (OSError, ValueError, http.client.HTTPException) as error:
                log.debug("Docker's event stream broke: %s", error)
            finally:
                connection.close()
                self._events_connection = None
            if not self._stopping.is_set() and not self._events_failing:
                log.warning("Lost Docker's event stream, reconnecting")
                self._events_failing = True

    def _on_event(self, event: dict[str, Any]) -> None:
        """Count a job event; on a death, wake the scheduler and waiters."""
        action = event.get("Action") or event.get("status") or ""
        actor = event.get("Actor") or {}
        counted = self._counted_at_start.get(actor.get("ID") or "", set())
        moment = int(event.get("timeNano") or 0) / 1e9
        if action in counted and moment <= self._listed_at_start:
            counted.discard(action)
        elif action in ("create", "start", "die"):
            exit_code = (actor.get("Attributes") or {}).get("exitCode", "")
            self.dispatcher.metrics.count_job(
                action, exit_code if action == "die" else ""
            )
        if action in ("die", "destroy", "remove"):  # Podman says remove
            self.dispatcher.notify_job_changed()
        if action == "start":
            with self._lock:  # restarted: it takes a slot again
                self._died.pop(actor.get("ID") or "", None)
        if action != "die":
            return
        container_id = actor.get("ID") or event.get("id") or ""
        attributes = actor.get("Attributes") or {}
        now = time.time()
        with self._lock:
            self._died[container_id] = (now, is_final_death(attributes))
            for known, (when, _) in list(self._died.items()):
                if now - when > 60:
                    del self._died[known]
        log.debug(
            "Job %r died with exit code %s",
            attributes.get("name"),
            attributes.get("exitCode"),
        )
        self.wake()

    # -- cleaning --

    def clean(self) -> None:
        """Remove the namespace's jobs that finished long enough ago."""
        keep = self.keep_exited_for
        if keep is None:
            return
        now = time.time()

        exited = self.docker.list_containers(
            {"label": [self.label], "status": ["exited", "dead"]}
        )
        finished = {}
        for container in exited:
            container_id = container["Id"]
            when = self._finished.get(container_id)
            if when is None:
                try:
                    info = self.docker.inspect_container(container_id)
                except DockerError as error:
                    if error.status == 404:
                        continue
                    raise
                when = parse_docker_time(info["State"].get("FinishedAt")) or now
            finished[container_id] = when
        self._finished = finished

        # Jobs that Docker refused to start have no finish time of their
        # own: they count as finished when the refusal was seen.
        with self._lock:
            failed = {key: when for key, (when, _) in self._failed.items()}
        for container_id, when in list(finished.items()) + list(failed.items()):
            if now - when <= keep:
                continue
            try:
                self.docker.remove_container(container_id, force=True)
                log.info("Removed job %r", container_id[:12])
            except DockerError as error:
                if error.status != 404:
                    log.warning("Failed to remove job %r: %s", container_id[:12], error)
                    continue
            self._finished.pop(container_id, None)
            with self._lock:
                self._failed.pop(container_id, None)

    def _find_failed_starts(self) -> None:
        """Note created jobs whose start Docker refused earlier."""
        created = self.docker.list_containers(
            {"label": [self.label], "status": ["created"]}
        )
        for container in created:
            if container["Id"] in self._failed:
                continue
            try:
                info = self.docker.inspect_container(container["Id"])
            except DockerError:
                continue
            if info["State"].get("Error"):
                # Said when the submission failed, or before a restart.
                self._mark_failed(
                    container["Id"], info["Name"].lstrip("/"), info["State"]["Error"],
                    announce=False,
                )


class SwarmUpkeep(Upkeep):
    """Scheduling and cleaning for job services across a swarm.

    The limit counts the namespace's jobs whose current task has not
    finished, on any node; held jobs are released oldest first.
    """

    def __init__(self, dispatcher: SwarmDispatcher, interval: float,
                 keep_exited_for: float | None):
        super().__init__(dispatcher, interval, keep_exited_for)
        # Released jobs whose new run swarm has not begun yet, by service id.
        self._released: dict[str, int] = {}

    def schedule(self) -> None:
        """Release the oldest held jobs while slots are free."""
        limit = self.dispatcher.max_concurrent
        if not limit:
            return
        with self._lock:
            starting = dict(self._starting)
        occupied = len(starting)
        held = []
        for service, tasks in self.dispatcher.namespace_jobs():
            service_id = service["ID"]
            if service_id in starting:
                continue
            if is_held(service):
                held.append(service)
                continue
            iteration = (service.get("JobStatus") or {}).get("JobIteration") or {}
            if self._released.get(service_id) == iteration.get("Index", 0):
                occupied += 1  # released, new run not begun yet
                continue
            self._released.pop(service_id, None)
            task = latest_task(service, tasks)
            if task is None or task["Status"]["State"] in (
                PENDING_TASK_STATES + RUNNING_TASK_STATES
            ):
                occupied += 1
        free = limit - occupied
        if free <= 0:
            return

        held.sort(
            key=lambda service: (service.get("CreatedAt", ""), service["Spec"]["Name"])
        )
        for service in held[:free]:
            name = service["Spec"]["Name"]
            iteration = (service.get("JobStatus") or {}).get("JobIteration") or {}
            with self._lock:
                self._starting[service["ID"]] = name
            self._released[service["ID"]] = iteration.get("Index", 0)
            threading.Thread(
                target=self._release_job, args=(service["ID"], name), daemon=True
            ).start()

    def _on_event(self, event: dict[str, Any]) -> None:
        """As for containers; a death also wakes the scheduler a few times more.

        Swarm reports a task as finished a moment after its container
        died, so the first pass after the event may find no free slot.
        """
        super()._on_event(event)
        if (event.get("Action") or event.get("status")) == "die":
            for delay in SWARM_SETTLE_DELAYS:
                timer = threading.Timer(delay, self.wake)
                timer.daemon = True
                timer.start()

    def _release_job(self, service_id: str, name: str) -> None:
        """Release one held job, then free its in-flight mark."""
        try:
            if not self.dispatcher.release_job(name):
                self._released.pop(service_id, None)
        finally:
            with self._lock:
                self._starting.pop(service_id, None)
            self.wake()

    def clean(self) -> None:
        """Remove the namespace's job services that finished long enough ago."""
        keep = self.keep_exited_for
        if keep is None:
            return
        now = time.time()
        for service, tasks in self.dispatcher.namespace_jobs():
            task = latest_task(service, tasks)
            if is_held(service) or task is None:
                continue
            state = task_state(service, task)
            if state["Status"] != "exited" and not state["Error"]:
                continue
            finished = parse_docker_time(task["Status"].get("Timestamp")) or now
            if now - finished <= keep:
                continue
            try:
                self.docker.remove_service(service["ID"])
                log.info("Removed job %r", service["Spec"]["Name"])
            except DockerError as error:
                if error.status != 404:
                    log.warning(
                        "Failed to remove job %r: %s", service["Spec"]["Name"], error
                    )


# --- Metrics and the API description -----------------------------------------

# Upper bounds of the request duration histogram, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class Metrics:
    """Counters of job events and HTTP requests, rendered for Prometheus."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], int] = {}
        self._requests: dict[tuple[str, str, str], int] = {}
        self._durations: dict[str, list[float]] = {}

    def count_job(self, action: str, status: str = "") -> None:
        """Count one job event (create, start or die with its exit code)."""
        with self._lock:
            key = (action, status)
            self._jobs[key] = self._jobs.get(key, 0) + 1

    def observe_request(
        self, route: str, method: str, status: int, seconds: float
    ) -> None:
        """Count one answered request and its duration."""
        with self._lock:
            key = (route, method, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            # Per route: one count per bucket, then the sum and the count.
            series = self._durations.setdefault(
                route, [0.0] * (len(DURATION_BUCKETS) + 2)
            )
            for index, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    series[index] += 1
            series[-2] += seconds
            series[-1] += 1

    def render(self, openmetrics: bool, gauges: dict[str, int | None]) -> str:
        """Return the text exposition, in OpenMetrics 1.0 or Prometheus 0.0.4."""
        with self._lock:
            jobs = dict(self._jobs)
            requests = dict(self._requests)
            durations = {
                route: list(series) for route, series in self._durations.items()
            }
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            if openmetrics and kind == "counter":
                name = name[: -len("_total")]
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("jobs_total", "counter", "Job events seen in Docker, by action.")
        for (action, status), count in sorted(jobs.items()):
            labels = metric_labels(
                namespace=self.namespace, action=action, status=status
            )
            lines.append(f"jobs_total{labels} {count}")

        for name, help_text in (
            ("jobs_running", "Jobs of the namespace running now."),
            ("jobs_pending", "Jobs of the namespace waiting for a slot."),
        ):
            family(name, "gauge", help_text)
            if gauges.get(name) is not None:
                labels = metric_labels(namespace=self.namespace)
                lines.append(f"{name}{labels} {gauges[name]}")

        family("http_requests_total", "counter", "HTTP requests answered.")
        for (route, method, status), count in sorted(requests.items()):
            labels = metric_labels(route=route, method=method, code=status)
            lines.append(f"http_requests_total{labels} {count}")

        name = "http_request_duration_seconds"
        family(name, "histogram", "Time to answer HTTP requests.")
        for route, series in sorted(durations.items()):
            for bound, count in zip(DURATION_BUCKETS, series):
                labels = metric_labels(route=route, le=repr(bound))
                lines.append(f"{name}_bucket{labels} {int(count)}")
            labels = metric_labels(route=route, le="+Inf")
            lines.append(f"{name}_bucket{labels} {int(series[-1])}")
            lines.append(f"{name}_sum{metric_labels(route=route)} {series[-2]!r}")
            lines.append(f"{name}_count{metric_labels(route=route)} {int(series[-1])}")

        if openmetrics:
            lines.append("# EOF")
        return "\n".join(lines) + "\n"


def metric_labels(**labels: str) -> str:
    """Return a label set in the exposition format, values escaped."""
    parts = []
    for key, value in labels.items():
        value = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{key}="{value}"')
    return "{" + ",".join(parts) + "}"


def wants_openmetrics(accept: str | None) -> bool:
    """Return whether an Accept header asks for OpenMetrics."""
    return "application/openmetrics-text" in (accept or "")


def schema_ref(name: str) -> dict[str, str]:
    """Return a reference to a schema of the API description."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    """Return an OpenAPI content map for a JSON body of ``schema``."""
    return {"application/json": {"schema": schema}}


def error_responses(*statuses: int) -> dict[str, Any]:
    """Return OpenAPI responses for JSON errors with the given statuses."""
    meanings = {
        400: "The request or the filter's output is not usable",
        401: "A bearer token is needed",
        404: "No such job in this namespace",
        405: "The path does not take this method",
        409: "The name is taken by a container that is not a job here",
        413: "The body is too large",
        502: "Docker failed or cannot be reached",
        503: "Docker is unavailable or the server is busy",
    }
    return {
        str(status): {
            "description": meanings[status],
            "content": json_content(schema_ref("Error")),
        }
        for status in statuses
    }


def query_parameter(
    name: str, schema: dict[str, Any], description: str
) -> dict[str, Any]:
    """Return an OpenAPI query parameter."""
    return {"name": name, "in": "query", "required": False,
            "schema": schema, "description": description}


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI 3 description of every route the server answers."""
    job_id = {"name": "id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": NAME_PATTERN.pattern},
              "description": "The job's name, as returned on creation"}
    sub_path = {"name": "path", "in": "path", "required": True,
                "schema": {"type": "string"},
                "description": "Any sub-path; the filter sees it in $PATH"}
    dry_run = query_parameter(
        "dry_run", {"type": "boolean", "default": False},
        "Run the filter and checks only; answer with what would go to Docker",
    )
    body = {
        "required": False,
        "description": "Any JSON value, whatever the content type; empty means null",
        "content": {"application/json": {"schema": {}}, "*/*": {"schema": {}}},
    }
    created = {
        "201": {
            "description": "Job created", "content": json_content(schema_ref("JobId"))
        },
        "200": {
            "description": "The job existed already, or the dry run's result",
            "content": json_content(
                {"oneOf": [schema_ref("JobId"), schema_ref("DryRun")]}
            ),
        },
        **error_responses(400, 401, 409, 413, 502, 503),
    }
    submit = {"summary": "Create a job from the request body",
              "parameters": [dry_run], "requestBody": body, "responses": created}
    boolean = {"type": "boolean"}
    health = {"204": {"description": "Yes"}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "docker-job-dispatcher",
            "version": __version__,
            "description": "Turns HTTP requests into Docker containers acting as jobs.",
        },
        "paths": {
            "/job": {"post": {**submit, "operationId": "createJob"}},
            "/job/{path}": {"post": {
                **submit, "operationId": "createJobAtPath",
                "parameters": [sub_path, dry_run],
            }},
            "/job/{id}": {
                "get": {
                    "operationId": "getJob",
                    "summary": "Describe a job, optionally once it has finished",
                    "parameters": [job_id, query_parameter(
                        "wait", {"type": "number", "minimum": 0},
                        "Wait up to this many seconds for the job to finish",
                    )],
                    "responses": {
                        "200": {"description": "The job",
                                "content": json_content(schema_ref("Job"))},
                        **error_responses(400, 401, 404, 502, 503),
                    },
                },
                "delete": {
                    "operationId": "deleteJob",
                    "summary": "Stop the job if it runs, then remove it",
                    "parameters": [job_id, query_parameter(
                        "timeout", {"type": "integer", "minimum": 0, "default": 10},
                        "Seconds between SIGTERM and SIGKILL",
                    )],
                    "responses": {"204": {"description": "Removed"},
                                  **error_responses(400, 401, 404, 502, 503)},
                },
            },
            "/job/{id}/logs": {"get": {
                "operationId": "getJobLogs",
                "summary": "The job's output",
                "parameters": [
                    job_id,
                    query_parameter("stdout", {**boolean, "default": True},
                                    "Include standard output"),
                    query_parameter("stderr", {**boolean, "default": True},
                                    "Include standard error"),
                    query_parameter("tail", {"type": "string", "default": "all"},
                                    "Number of lines from the end, or all"),
                    query_parameter("timestamps", {**boolean, "default": False},
                                    "Prefix each line with its time"),
                    query_parameter("follow", {**boolean, "default": False},
                                    "Keep streaming until the job exits"),
                ],
                "responses": {
                    "200": {"description": "The output",
                            "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **error_responses(400, 401, 404, 502, 503),
                },
            }},
            "/jobs": {"get": {
                "operationId": "listJobs",
                "summary": "The namespace's jobs, newest first",
                "parameters": [
                    query_parameter("state", {"type": "string", "enum": [
                        "pending", "running", "exited", "failed"]}, "Only this state"),
                    query_parameter("limit", {"type": "integer", "minimum": 1,
                                              "maximum": 1000, "default": 100},
                                    "At most this many jobs"),
                ],
                "responses": {
                    "200": {"description": "The jobs", "content": json_content(
                        {"type": "object", "required": ["jobs"], "properties": {
                            "jobs": {"type": "array", "items": schema_ref("Job")}}})},
                    **error_responses(400, 401, 502, 503),
                },
            }},
            "/health/live": {"get": {
                "operationId": "live", "summary": "Is the server up",
                "security": [], "responses": health,
            }},
            "/health/ready": {"get": {
                "operationId": "ready", "summary": "Does Docker answer", "security": [],
                "responses": {**health, **error_responses(503)},
            }},
            "/metrics": {"get": {
                "operationId": "metrics",
                "summary": "Prometheus or OpenMetrics text, by the Accept header",
                "responses": {
                    "200": {"description": "The metrics", "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    }},
                    **error_responses(401, 503),
                },
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This description",
                "responses": {"200": {"description": "OpenAPI 3",
                                      "content": json_content({"type": "object"})},
                              **error_responses(401, 503)},
            }},
            "/docs": {"get": {
                "operationId": "docs", "summary": "A page to browse and try the API",
                "responses": {"200": {"description": "HTML", "content": {
                    "text/html": {"schema": {"type": "string"}}}},
                    **error_responses(401, 503)},
            }},
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "Needed when the server runs with --token",
            }},
            "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "object", "required": ["code", "message"],
                          "properties": {"code": {"type": "integer"},
                                         "message": {"type": "string"}}}}},
            "JobId": {"type": "object", "required": ["id"],
                      "properties": {"id": {"type": "string"}}},
            "DryRun": {"type": "object", "required": ["name", "platform", "config"],
                       "properties": {"name": {"type": "string"},
                                      "platform": {"type": "string", "nullable": True},
                                      "config": {"type": "object"}}},
            "Job": {"type": "object", "required": [
                "id", "created", "status", "state", "exit_code", "started_at",
                "finished_at", "error"], "properties": {
                "id": {"type": "string"},
                "created": {"type": "integer", "description": "Unix seconds"},
                "status": {"type": "string", "example": "Exited (0) 5 seconds ago"},
                "state": {"type": "string", "example": "exited"},
                "exit_code": {"type": "integer", "nullable": True},
                "started_at": {"type": "string", "nullable": True},
                "finished_at": {"type": "string", "nullable": True},
                "error": {"type": "string", "nullable": True},
            }},
            },
        },
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>docker-job-dispatcher API</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em;
       padding: 0 1em; color: #222; }
section { border: 1px solid #ccc; border-radius: 6px; margin: 1em 0;
          padding: .6em 1em; }
.method { font-weight: bold; display: inline-block; min-width: 4.5em; }
code, textarea, pre { font-family: ui-monospace, monospace; font-size: 13px; }
textarea { width: 100%; height: 6em; }
pre { background: #f4f4f4; padding: .6em; white-space: pre-wrap; }
table { border-collapse: collapse; } td { padding: 0 .8em 0 0; vertical-align: top; }
</style></head>
<body>
<h1>docker-job-dispatcher</h1>
<p id="about"></p>
<p><label>Bearer token (if the server needs one):
<input id="token" type="password" size="40"></label></p>
<div id="routes"></div>
<script id="spec" type="application/json">__SPEC__</script>
<script>
"use strict";
const spec = JSON.parse(document.getElementById("spec").textContent);
document.getElementById("about").textContent = spec.info.description +
  " Version " + spec.info.version + ".";
const routes = document.getElementById("routes");
function element(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}
for (const [path, operations] of Object.entries(spec.paths)) {
  for (const [method, operation] of Object.entries(operations)) {
    const section = element("section");
    const title = element("div");
    title.append(element("span", method.toUpperCase()), element("code", path));
    title.firstChild.className = "method";
    section.append(title, element("p", operation.summary));
    const table = element("table");
    const inputs = {};
    for (const parameter of operation.parameters || []) {
      const row = element("tr");
      const input = element("input");
      input.placeholder = parameter.in === "path" ? "required" : "";
      inputs[parameter.name] = [parameter, input];
      const cell = element("td");
      cell.append(input);
      row.append(element("td", parameter.name), cell,
                 element("td", parameter.description || ""));
      table.append(row);
    }
    section.append(table);
    let body = null;
    if (operation.requestBody) {
      body = element("textarea");
      body.value = '{"args": ["hello", "world"]}';
      section.append(body);
    }
    const button = element("button", "Send");
    const output = element("pre");
    output.hidden = true;
    button.onclick = async () => {
      let url = path;
      const query = new URLSearchParams();
      for (const [name, [parameter, input]] of Object.entries(inputs)) {
        if (parameter.in === "path") {
          url = url.replace("{" + name + "}", parameter.name === "path"
            ? input.value : encodeURIComponent(input.value));
        } else if (input.value !== "") {
          query.set(name, input.value);
        }
      }
      if ([...query].length) url += "?" + query;
      output.hidden = false;
      output.textContent = method.toUpperCase() + " " + url + " ...";
      try {
        const token = document.getElementById("token").value;
        const reply = await fetch(url, {method: method.toUpperCase(),
          headers: token ? {"Authorization": "Bearer " + token} : {},
          body: body ? body.value : undefined});
        const text = await reply.text();
        output.textContent = reply.status + " " + reply.statusText + "\\n" + text;
      } catch (error) {
        output.textContent = String(error);
      }
    };
    section.append(button, output);
    routes.append(section);
  }
}
</script>
</body></html>
"""


def docs_page() -> str:
    """Return the self-contained HTML page that presents the API."""
    spec = json.dumps(openapi_document()).replace("</", "<\\/")
    return DOCS_PAGE.replace("__SPEC__", spec)


# --- HTTP handler ---------------------------------------------------------------


class RequestError(DispatcherError):
    """A malformed request; the connection is closed after the answer."""


class MethodNotAllowed(DispatcherError):
    """A known path asked with a method it does not take."""

    def __init__(self, allowed: tuple[str, ...], message: str):
        super().__init__(405, message)
        self.headers = {"Allow": ", ".join(allowed)}


# The challenge sent with every 401.
AUTHENTICATE = 'Bearer realm="docker-job-dispatcher"'


class Unauthorized(RequestError):
    """A request without the right token; its body is never read."""

    def __init__(self):
        super().__init__(401, "A valid bearer token is needed")
        self.headers = {"WWW-Authenticate": AUTHENTICATE}


class RawReply:
    """A reply body that is not JSON, with its content type."""

    def __init__(self, data: bytes, content_type: str):
        self.data = data
        self.content_type = content_type


# Said by a route that has written its reply itself.
STREAMED = object()


class DispatcherServer(http.server.HTTPServer):
    """An HTTP server with a thread per connection, up to a limit.

    Beyond the limit a new connection waits briefly for a slot, then gets
    a 503. A stop lets the requests in flight finish.
    """

    request_queue_size = 1024

    def __init__(self, address, dispatcher: Dispatcher, options: argparse.Namespace):
        self.dispatcher = dispatcher
        self.options = options
        self.upkeep: Upkeep | None = None
        self.token: str | None = options.token
        self.stopping = False
        self._slots = threading.BoundedSemaphore(options.max_connections)
        self._connections: dict[socket.socket, DispatcherHandler] = {}
        self._threads: set[threading.Thread] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, DispatcherHandler)
        threading.Thread(target=self._reap_slow_clients, name="reaper",
                         daemon=True).start()

    def _reap_slow_clients(self) -> None:
        """Close connections whose request has taken too long to arrive.

        The socket timeout alone bounds each read, not the whole request:
        a client sending a byte every few seconds would hold its thread
        forever. An idle keep-alive connection is closed the same way.
        """
        limit = self.options.read_timeout
        while not self.stopping:
            time.sleep(REAPER_INTERVAL)
            now = time.monotonic()
            with self._connections_lock:
                handlers = list(self._connections.items())
            for request, handler in handlers:
                since = handler.reading_since
                if since is not None and now - since > limit:
                    handler.reading_since = None
                    try:
                        request.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def server_bind(self) -> None:
        """Bind; on an IPv6 address accept IPv4 clients as well."""
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request, client_address) -> None:
        """Serve the connection in a thread, or turn it away when full."""
        if not self._slots.acquire(timeout=SLOT_WAIT):
            try:
                request.sendall(
                    plain_response(503, "The server is busy; try again shortly")
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            daemon=True,
        )
        with self._connections_lock:
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._connections_lock:
                self._threads.discard(thread)
            self._slots.release()
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        """Serve one connection, then give its slot back."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._connections_lock:
                self._connections.pop(request, None)
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """Log a connection that failed outside any request, briefly."""
        log.debug("Connection from %s failed", client_address[0], exc_info=True)

    def wait_for_requests(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the connections to finish."""
        deadline = time.monotonic() + timeout
        with self._connections_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def track(self, request: socket.socket, handler: Any) -> None:
        """Remember an open connection, so that a stop can close it."""
        with self._connections_lock:
            self._connections[request] = handler

    def close_idle_connections(self) -> None:
        """End the connections that wait for a request; busy ones finish."""
        self.stopping = True
        with self._connections_lock:
            handlers = list(self._connections.items())
        for request, handler in handlers:
            if not handler.busy or handler.streaming:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def plain_response(status: int, message: str) -> bytes:
    """Return a whole HTTP response carrying a JSON error, as bytes."""
    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    reason = http.HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class DispatcherHandler(http.server.BaseHTTPRequestHandler):
    """Answers the API's routes; every error is a JSON body."""

    server: DispatcherServer
    server_version = f"docker-job-dispatcher/{__version__}"
    protocol_version = "HTTP/1.1"
    # One write per reply, sent at once: headers and body in separate
    # small writes would wait for the client's delayed ACK (about 40 ms).
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024
    busy = False
    body_read = False
    streaming = False
    reading_since: float | None = None

    def setup(self) -> None:
        """Apply the read timeout and register the connection."""
        self.timeout = self.server.options.read_timeout
        super().setup()
        self.server.track(self.request, self)

    def handle_one_request(self) -> None:
        """Serve one request; mark the connection busy while doing so."""
        if self.server.stopping:
            self.close_connection = True
            return
        self.reading_since = time.monotonic()
        try:
            super().handle_one_request()
        except socket.timeout:
            self.close_connection = True
        finally:
            self.busy = False
            self.reading_since = None

    def handle_expect_100(self) -> bool:
        """Refuse a body before the client sends it, when we can tell."""
        length = self.headers.get("Content-Length", "")
        if length and not DIGITS.match(length):
            self.send_error(400, f"Invalid Content-Length {length!r}")
            return False
        if DIGITS.match(length) and int(length) > self.server.options.max_body:
            limit = self.server.options.max_body
            self.send_error(413, f"The body is larger than {limit} bytes")
            return False
        if self.server.token and not self.authorized():
            self.send_error(401, "A valid bearer token is needed")
            return False
        super().handle_expect_100()
        self.wfile.flush()  # the client waits for it before sending the body
        return True

    def parse_request(self) -> bool:
        """Parse the request line and headers, then count as busy."""
        self.busy = True
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        """Send http.server's own messages to our log, at debug level."""
        log.debug("HTTP %s: %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain=None) -> None:
        """Answer protocol errors found by http.server in JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            # http.server's default before the version is parsed; it would
            # leave out the status line and headers.
            self.request_version = "HTTP/1.1"
        headers = {"WWW-Authenticate": AUTHENTICATE} if code == 401 else {}
        self.reply(code, error_body(code, message or http.HTTPStatus(code).phrase),
                   headers)

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def do_OPTIONS(self) -> None:
        self.dispatch("OPTIONS")

    def dispatch(self, method: str) -> None:
        """Route one request, answer it, count it and log the outcome."""
        started = time.perf_counter()
        target = urllib.parse.urlsplit(self.path)
        path = target.path.rstrip("/") or "/"
        self.query = urllib.parse.parse_qs(target.query, keep_blank_values=True)
        self.route_template = "other"
        self.body_read = False
        has_body = bool(self.headers.get("Transfer-Encoding")) or (
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
        )
        if not has_body:
            self.reading_since = None
        try:
            if self.server.token and not path.startswith("/health/"):
                if not self.authorized():
                    raise Unauthorized()
            status, payload, headers = self.route(method, path)
        except DispatcherError as error:
            if isinstance(error, RequestError):
                self.close_connection = True
            status, headers = error.status, getattr(error, "headers", {})
            payload = error_body(error.status, error.message)
        except DockerUnavailable as error:
            status, headers = 502, {}
            payload = error_body(502, f"Docker is unavailable: {error}")
        except DockerError as error:
            status, headers = 502, {}
            payload = error_body(502, f"Docker failed: {error}")
        except Exception:
            log.exception("Request %s %r failed", method, path)
            status, payload, headers = 500, error_body(500, "Internal error"), {}
        if has_body and not self.body_read:
            # An unread body must not be taken for the next request.
            self.close_connection = True
        if payload is not STREAMED:
            self.reply(status, payload, headers, head_only=method == "HEAD")

        elapsed = time.perf_counter() - started
        self.server.dispatcher.metrics.observe_request(
            self.route_template, method, status, elapsed
        )
        log.info("Answered %s %r with %d in %.1f ms", method, path, status,
                 elapsed * 1000)

    def authorized(self) -> bool:
        """Return whether the request carries the right bearer token."""
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(
            credentials.strip().encode(), self.server.token.encode()
        )

    def route(self, method: str, path: str) -> tuple[int, Any, dict[str, str]]:
        """Return the status, reply and extra headers for a request.

        Sets ``route_template`` to the route's name for the metrics.
        """
        dispatcher = self.server.dispatcher
        if path == "/job" or path.startswith("/job/"):
            return self.route_job(method, path)

        if path == "/jobs":
            self.route_template = path
            self.expect(method, "GET", "HEAD")
            state = self.query_value("state")
            if state not in (None, "pending", "running", "exited", "failed"):
                raise DispatcherError(
                    400, "state must be one of pending, running, exited, failed"
                )
            limit = self.query_number("limit", 100, 1, 1000, whole=True)
            return 200, {"jobs": dispatcher.list_jobs(state, int(limit))}, {}

        if path in ("/health/live", "/health/ready"):
            self.route_template = path
            self.expect(method, "GET", "HEAD")
            if path == "/health/live":
                return 204, None, {}
            try:
                dispatcher.docker.ping()
            except (DockerError, DockerUnavailable) as error:
                return 503, error_body(503, f"Docker is unavailable: {error}"), {}
            return 204, None, {}

        if path == "/metrics":
            self.route_template = path
            self.expect(method, "GET", "HEAD")
            openmetrics = wants_openmetrics(self.headers.get("Accept"))
            text = dispatcher.metrics.render(openmetrics, dispatcher.job_gauges())
            content_type = OPENMETRICS_TYPE if openmetrics else PROMETHEUS_TYPE
            return 200, RawReply(text.encode(), content_type), {}

        if path == "/openapi.json":
            self.route_template = path
            self.expect(method, "GET", "HEAD")
            return 200, openapi_document(), {}

        if path == "/docs":
            self.route_template = path
            self.expect(method, "GET", "HEAD")
            return 200, RawReply(docs_page().encode(), "text/html; charset=utf-8"), {}

        self.discard_body()
        return 404, error_body(404, "Route not found"), {}

    def route_job(self, method: str, path: str) -> tuple[int, Any, dict[str, str]]:
        """Answer the routes under /job."""
        dispatcher = self.server.dispatcher
        rest = path[len("/job/"):]
        if method == "POST":
            self.route_template = "/job/{path}" if rest else "/job"
            body = self.read_body()
            if self.query_flag("dry_run", False):
                return 200, dispatcher.dry_run(body, path), {}
            status, reply = dispatcher.submit(body, path)
            return status, reply, {}

        if rest.endswith("/logs") and "/" not in rest[: -len("/logs")]:
            self.route_template = "/job/{id}/logs"
            self.expect(method, "GET", "HEAD")
            job_id = urllib.parse.unquote(rest[: -len("/logs")])
            return self.stream_logs(job_id, method == "HEAD")

        if not rest or "/" in rest:
            self.route_template = "/job/{path}" if rest else "/job"
            self.expect(method, "POST")
        # Path segments are split first, then decoded: "%2F" is no separator.
        job_id = urllib.parse.unquote(rest)

        self.route_template = "/job/{id}"
        self.expect(method, "GET", "HEAD", "POST", "DELETE")
        if method == "DELETE":
            grace = self.query_number("timeout", 10, 0, 3600, whole=True)
            dispatcher.delete_job(job_id, int(grace))
            return 204, None, {}
        wait = self.query_number("wait", None, 0, None)
        if wait is None:
            return 200, dispatcher.get_job(job_id), {}
        ceiling = self.server.options.max_wait
        return 200, dispatcher.wait_job(job_id, min(wait, ceiling)), {}

    def stream_logs(
        self, job_id: str, head_only: bool
    ) -> tuple[int, Any, dict[str, str]]:
        """Send a job's output as text; with follow, stream it until it ends."""
        stdout = self.query_flag("stdout", True)
        stderr = self.query_flag("stderr", True)
        if not stdout and not stderr:
            raise DispatcherError(400, "At least one of stdout and stderr must be true")
        tail = self.query_value("tail") or "all"
        if tail != "all" and not DIGITS.match(tail):
            raise DispatcherError(400, "tail must be a number of lines or 'all'")
        follow = self.query_flag("follow", False)
        dispatcher = self.server.dispatcher
        # Docker's tail of a service's logs sometimes gives nothing at all.
        tail_here = tail != "all" and not follow and not dispatcher.log_tail_by_docker
        options = {
            "stdout": stdout,
            "stderr": stderr,
            "tail": "all" if tail_here else tail,
            "timestamps": self.query_flag("timestamps", False),
            "follow": follow,
        }
        content_type = "text/plain; charset=utf-8"
        if head_only:
            dispatcher.get_job(job_id)  # 404 for an unknown job
            return 200, RawReply(b"", content_type), {}
        connection, response, multiplexed = dispatcher.open_logs(job_id, options)
        try:
            if not follow:
                data = b"".join(log_chunks(response, multiplexed))
                if tail_here:
                    lines = data.splitlines(keepends=True)
                    count = int(tail)
                    data = b"".join(lines[-count:]) if count else b""
                return 200, RawReply(data, content_type), {}
            self.streaming = True
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            threading.Thread(
                target=self.close_when_client_leaves, args=(connection,), daemon=True
            ).start()
            job_finished = threading.Event()
            if not dispatcher.log_streams_end:
                threading.Thread(
                    target=self.close_when_job_finishes,
                    args=(connection, job_id, job_finished),
                    daemon=True,
                ).start()
            try:
                try:
                    for chunk in log_chunks(response, multiplexed):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                except (OSError, http.client.HTTPException):
                    if not job_finished.is_set():
                        raise
                self.wfile.write(b"0\r\n\r\n")
            except (OSError, http.client.HTTPException, ValueError):
                self.close_connection = True
            return 200, STREAMED, {}
        finally:
            connection.close()

    def close_when_job_finishes(
        self,
        connection: http.client.HTTPConnection,
        job_id: str,
        finished: threading.Event,
    ) -> None:
        """Close a followed log stream that Docker keeps open after the job.

        Docker's service logs never end by themselves.
        """
        dispatcher = self.server.dispatcher
        while connection.sock is not None:
            try:
                state = dispatcher.wait_job(job_id, LOG_FOLLOW_CHECK)["state"]
            except DispatcherError:
                state = "exited"  # removed meanwhile
            if state in FINISHED_STATES or dispatcher.stopping:
                time.sleep(LOG_FOLLOW_CHECK / 5)  # let the last lines through
                break
        finished.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close_when_client_leaves(self, connection: http.client.HTTPConnection) -> None:
        """Close a log stream from Docker as soon as our client hangs up.

        Without this, a follower that went away would hold its thread for
        as long as the job stays silent.
        """
        while connection.sock is not None:
            try:
                readable, _, _ = select.select([self.connection], [], [], 1.0)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    break
            except (OSError, ValueError):
                break
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- query parameters --

    def query_value(self, name: str) -> str | None:
        """Return the last value of a query parameter, or None."""
        values = self.query.get(name)
        return values[-1] if values else None

    def query_flag(self, name: str, default: bool) -> bool:
        """Return a boolean query parameter; raise 400 for other words."""
        value = self.query_value(name)
        if value is None:
            return default
        word = value.strip().lower()
        if word in ("", "1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off", "none"):
            return False
        raise DispatcherError(400, f"{name} must be true or false, not {value!r}")

    def query_number(
        self,
        name: str,
        default: float | None,
        minimum: float,
        maximum: float | None,
        whole: bool = False,
    ) -> float | None:
        """Return a numeric query parameter within bounds; raise 400 otherwise."""
        value = self.query_value(name)
        if value is None:
            return default
        try:
            number = int(value) if whole else float(value)
        except ValueError:
            kind = "a whole number" if whole else "a number"
            message = f"{name} must be {kind}, not {value!r}"
            raise DispatcherError(400, message) from None
        if number != number or number < minimum or (
            maximum is not None and number > maximum
        ):
            span = f"from {minimum:g} to {maximum:g}" if maximum is not None else (
                f"at least {minimum:g}")
            raise DispatcherError(400, f"{name} must be {span}, not {value!r}")
        return number

    def expect(self, method: str, *allowed: str) -> None:
        """Raise 405 unless the path takes ``method``; drop unwanted bodies."""
        if method not in allowed:
            message = f"Method {method} is not allowed here; use {', '.join(allowed)}"
            raise MethodNotAllowed(allowed, message)
        if method != "POST":
            self.discard_body()

    # -- bodies --

    def read_body(self) -> str:
        """Return the request body as checked JSON text ("null" if empty).

        Raises RequestError for a body that is too large, cut short or not
        JSON; bodies over the limit are refused before they are read.
        """
        limit = self.server.options.max_body
        raw = self.read_raw_body(limit)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DispatcherError(
                400, f"The body is not valid UTF-8 (byte {error.start})"
            ) from None
        text = text.lstrip("\ufeff")
        if not text.strip():
            return "null"
        try:
            json.loads(text, parse_constant=reject_constant)
        except ValueError as error:
            raise DispatcherError(400, f"The body is not valid JSON: {error}") from None
        except RecursionError:
            raise DispatcherError(400, "The body is nested too deeply") from None
        return text

    def read_raw_body(self, limit: int) -> bytes:
        """Return the raw body bytes, reading at most ``limit`` of them."""
        try:
            data = self._read_raw_body(limit)
            self.body_read = True
            return data
        except (socket.timeout, ConnectionError) as error:
            raise RequestError(408, "The body did not arrive in time") from error

    def _read_raw_body(self, limit: int) -> bytes:
        """Read the body as ``read_raw_body`` does, socket errors unhandled."""
        length = self.headers.get("Content-Length")
        encoding = self.headers.get("Transfer-Encoding")
        if len(set(self.headers.get_all("Content-Length") or [])) > 1:
            raise RequestError(400, "Conflicting Content-Length headers")
        if encoding is not None:
            if length is not None:
                raise RequestError(400, "Content-Length and Transfer-Encoding together")
            if encoding.strip().lower() != "chunked":
                message = f"Transfer-Encoding {encoding!r} is not supported"
                raise RequestError(501, message)
            return self.read_chunked(limit)
        if length is None:
            return b""
        if not DIGITS.match(length):
            raise RequestError(400, f"Invalid Content-Length {length!r}")
        size = int(length)
        if size > limit:
            raise RequestError(413, f"The body is larger than {limit} bytes")
        data = self.rfile.read(size)
        if len(data) < size:
            raise RequestError(400, "The body is shorter than its Content-Length")
        self.reading_since = None
        return data

    def read_chunked(self, limit: int) -> bytes:
        """Return a chunked body, refusing it once it passes ``limit``."""
        parts = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise RequestError(400, "Malformed chunked body") from None
            if size < 0:
                raise RequestError(400, "Malformed chunked body")
            if size == 0:
                break
            total += size
            if total > limit:
                raise RequestError(413, f"The body is larger than {limit} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.read(2) != b"\r\n":
                raise RequestError(400, "The chunked body was cut short")
            parts.append(chunk)
        while True:
            trailer = self.rfile.readline(1024)
            if trailer in (b"\r\n", b"\n", b""):
                break
        self.reading_since = None
        return b"".join(parts)

    def discard_body(self) -> None:
        """Read and drop a body sent where none is expected."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or (
            length is not None and length.strip() not in ("", "0")
        ):
            self.read_raw_body(self.server.options.max_body)

    # -- replies --

    def reply(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        head_only: bool = False,
    ) -> None:
        """Send a reply: JSON, or a RawReply as it is (no body for 204)."""
        content_type = "application/json"
        if isinstance(payload, RawReply):
            body, content_type = payload.data, payload.content_type
        elif payload is None:
            body = b""
        else:
            body = (json.dumps(payload) + "\n").encode()
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if status != 204:
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if body and not head_only:
                self.wfile.write(body)
        except OSError:
            self.close_connection = True


def error_body(status: int, message: str) -> dict[str, Any]:
    """Return the JSON shape of every error reply."""
    return {"error": {"code": status, "message": message}}


def reject_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


# --- Command line and main ---------------------------------------------------


def from_env(name: str, fallback: str | None = None) -> str | None:
    """Return an environment variable, or ``fallback`` when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value if value else fallback


def whole_number(minimum: int, maximum: int | None = None):
    """Return an argparse type for whole numbers in a range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            message = f"{text!r} is not a whole number"
            raise argparse.ArgumentTypeError(message) from None
        if value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({span})")
        return value

    return parse


def seconds(minimum: float, inclusive: bool = True):
    """Return an argparse type for a number of seconds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            message = f"{text!r} is not a number of seconds"
            raise argparse.ArgumentTypeError(message) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
        if value < minimum or (not inclusive and value == minimum):
            bound = "at least" if inclusive else "more than"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound} {minimum:g}")
        return value

    return parse


def one_of(*choices: str, fold=str.lower):
    """Return an argparse type that takes one of ``choices``."""

    def parse(text: str) -> str:
        value = fold(text.strip())
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(choices)}"
            )
        return value

    return parse


def namespace_name(text: str) -> str:
    """Return a namespace name; any non-empty label value is fine."""
    if not text or "\n" in text:
        raise argparse.ArgumentTypeError("the namespace must be a non-empty line")
    return text


def is_loopback(host: str) -> bool:
    """Return whether a bind address is reachable from this machine only."""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; defaults come from the environment."""
    parser = argparse.ArgumentParser(
        prog="docker-job-dispatcher",
        description=(
            "An HTTP API that turns requests into Docker containers acting as "
            "jobs. Each request body goes through a jq filter whose first "
            "output is the container to create."
        ),
        epilog=(
            "Every option also reads the environment variable named in its "
            "help. Docker is reached as the Docker CLI does, through "
            "DOCKER_HOST, DOCKER_CERT_PATH and DOCKER_TLS_VERIFY."
        ),
    )

    def option(*flags: str, env: str, default: str | None = None,
               shown: str | None = None, help: str, **details: Any) -> None:
        shown = shown or default
        parser.add_argument(
            *flags, default=from_env(env, default), **details,
            help=f"{help} (env {env}" + (f", default {shown})" if shown else ")"),
        )

    parser.add_argument(
        "filter", nargs="?", metavar="FILTER",
        help="jq filter text (default: the built-in demo filter)",
    )
    option("-f", "--from-file", env="FROM_FILE", metavar="PATH",
           help="read the filter from a file; wins over FILTER")
    option("-p", "--port", env="PORT", default="8000", type=whole_number(1, 65535),
           help="TCP port to listen on")
    option("--host", env="HOST", default="", shown="all interfaces", metavar="ADDRESS",
           help="address to bind")
    option("-m", "--max-concurrent", env="MAX_CONCURRENT", shown="unlimited",
           type=whole_number(0), metavar="N",
           help="most jobs running at once; 0 never starts jobs")
    option("-k", "--keep-exited-for", env="KEEP_EXITED_FOR", shown="keep forever",
           type=seconds(0), metavar="SECONDS",
           help="remove exited jobs this long after they finished")
    option("-u", "--upkeep-interval", env="UPKEEP_INTERVAL", default="3",
           type=seconds(1), metavar="SECONDS",
           help="seconds between scheduling and cleaning passes, at least 1")
    option("-t", "--transport", env="TRANSPORT", default="socket",
           type=one_of("socket", "http", "tls"),
           help="how to reach Docker: socket, http or tls")
    option("--backend", env="BACKEND", default="containers",
           type=one_of("containers", "swarm"),
           help="run jobs as containers of this daemon, or as swarm "
           "replicated-job services across a swarm")
    option("-n", "--namespace", env="NAMESPACE", default="default",
           type=namespace_name, metavar="NAME",
           help=f"value of the {NAMESPACE_LABEL} label on every job")
    option("--log-level", env="LOG_LEVEL", default="INFO",
           type=one_of(*LOG_LEVELS, fold=str.upper), metavar="LEVEL",
           help="TRACE, DEBUG, INFO, WARN or ERROR")
    option("--token", env="TOKEN", metavar="TOKEN",
           help="require 'Authorization: Bearer TOKEN' on every route but "
           "/health/*; prefer --token-file, which stays out of ps")
    option("--token-file", env="TOKEN_FILE", metavar="PATH",
           help="read the token from a file")
    option("--docker-timeout", env="DOCKER_TIMEOUT", default="15",
           type=seconds(0, inclusive=False), metavar="SECONDS",
           help="longest wait for an answer from Docker before a 502")
    option("--max-body", env="MAX_BODY", default=str(DEFAULT_MAX_BODY),
           type=whole_number(1), metavar="BYTES",
           help="largest request body accepted")
    option("--max-connections", env="MAX_CONNECTIONS", default="256",
           type=whole_number(1), metavar="N",
           help="connections served at once; more wait briefly, then get 503")
    option("--read-timeout", env="READ_TIMEOUT", default="15",
           type=seconds(0, inclusive=False), metavar="SECONDS",
           help="close a connection whose request has not arrived whole after "
           "this long, or that sits idle this long")
    option("--filter-workers", env="FILTER_WORKERS", default="2",
           type=whole_number(0), metavar="N",
           help="worker processes that run the filter, so that a filter that "
           "loops or eats memory cannot stall the server; 0 runs it in-process "
           "without limits")
    option("--filter-timeout", env="FILTER_TIMEOUT", default="2",
           type=seconds(0, inclusive=False), metavar="SECONDS",
           help="longest a filter may run on one request; longer gets 400")
    option("--max-wait", env="MAX_WAIT", default="300",
           type=seconds(0), metavar="SECONDS",
           help="longest wait a GET /job/<id>?wait= may ask for")
    parser.add_argument(
        "-V", "--version", action="version", version=f"%(prog)s {__version__}"
    )
    return parser


def read_filter(options: argparse.Namespace) -> str:
    """Return the filter text the options ask for; raise OSError if unreadable."""
    if options.from_file:
        if options.filter:
            log.warning("Both a filter and --from-file given; using the file")
        with open(options.from_file, encoding="utf-8") as file:
            return file.read()
    if options.filter:
        return options.filter
    log.warning("No filter given; using the built-in default filter")
    return DEFAULT_FILTER


def make_filter(text: str, options: argparse.Namespace) -> Any:
    """Return the evaluator for a filter text; raise ValueError if it fails.

    The filter is compiled here first, so that a broken one is reported at
    once, then handed to the worker processes unless they are turned off.
    """
    compiled = compile_filter(text)
    if not options.filter_workers:
        return compiled
    workers = FilterWorkers(
        text, options.filter_workers, options.filter_timeout, MAX_FILTER_OUTPUT
    )
    threading.Thread(target=workers.warm, name="filter-workers", daemon=True).start()
    return workers


def reload_filter(dispatcher: Dispatcher, options: argparse.Namespace) -> None:
    """Read --from-file again; keep the old filter if the new one fails."""
    if not options.from_file:
        log.warning("Reload asked, but the filter does not come from a file")
        return
    try:
        with open(options.from_file, encoding="utf-8") as file:
            new_filter = make_filter(file.read(), options)
    except (OSError, ValueError) as error:
        log.error("Kept the old filter; the new one failed: %s", error)
        return
    old_filter, dispatcher.job_filter = dispatcher.job_filter, new_filter
    if isinstance(old_filter, FilterWorkers):
        old_filter.close()
    log.info("Reloaded the filter from %r", options.from_file)


def configure_logging(level: str) -> None:
    """Send log lines to standard error, without timestamps."""
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(LOG_LEVELS[level])
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run the dispatcher until SIGTERM or SIGINT; return the exit status."""
    parser = build_parser()
    options = parser.parse_args(argv)
    configure_logging(options.log_level)
    if options.token_file:
        if options.token:
            parser.error("give --token or --token-file, not both")
        try:
            with open(options.token_file, encoding="utf-8") as file:
                options.token = file.read().strip()
        except OSError as error:
            parser.error(f"argument --token-file: {error}")
    if options.token is not None and not options.token.strip():
        parser.error("the token is empty")

    try:
        job_filter = make_filter(read_filter(options), options)
    except OSError as error:
        log.error("Cannot read the filter file: %s", error)
        return 1
    except ValueError as error:
        log.error("The filter does not compile: %s", error)
        return 1
    try:
        docker = DockerClient(
            docker_address(options.transport, dict(os.environ)),
            timeout=options.docker_timeout,
        )
    except (ValueError, OSError, ssl.SSLError) as error:
        log.error("Cannot set up the Docker connection: %s", error)
        return 1

    swarm = options.backend == "swarm"
    dispatcher = (SwarmDispatcher if swarm else Dispatcher)(
        docker, job_filter, options.namespace, options.max_concurrent
    )
    upkeep = (SwarmUpkeep if swarm else Upkeep)(
        dispatcher, options.upkeep_interval, options.keep_exited_for
    )
    if swarm:
        threading.Thread(target=warn_unless_swarm_manager, args=(docker,),
                         daemon=True).start()
    dispatcher.scheduler = upkeep
    if options.max_concurrent == 0:
        log.warning("--max-concurrent is 0: no job will ever be started")
    if options.keep_exited_for is None:
        log.warning("No --keep-exited-for: exited jobs are kept until removed by hand")
    if not options.token and not is_loopback(options.host):
        log.warning(
            "No --token: anyone who can reach port %d can create containers, "
            "which is root on this host", options.port,
        )

    try:
        server = DispatcherServer((options.host, options.port), dispatcher, options)
    except OSError as error:
        log.error("Cannot listen on port %d: %s", options.port, error)
        return 1
    server.upkeep = upkeep

    def request_stop(signum: int, frame: Any) -> None:
        log.info("Stopping on %s", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    def request_reload(signum: int, frame: Any) -> None:
        threading.Thread(target=reload_filter, args=(dispatcher, options),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)

    upkeep.start()
    host, port = server.server_address[:2]
    log.info(
        "Listening on %s:%d, namespace %r, Docker at %s",
        host or "*", port, options.namespace, docker.describe(),
    )
    server.serve_forever()

    # Stop taking connections, let requests in flight finish, then stop.
    server.close_idle_connections()
    dispatcher.stopping = True
    dispatcher.notify_job_changed()
    server.wait_for_requests(STOP_GRACE)
    upkeep.stop()
    server.server_close()
    if isinstance(dispatcher.job_filter, FilterWorkers):
        dispatcher.job_filter.close()
    log.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
