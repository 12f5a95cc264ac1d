"""The Docker image's command lines, built from the settings the service reads.

The Dockerfile runs ``t2i-serve`` (``CMD``) and checks ``t2i-healthcheck`` (``HEALTHCHECK``); both
read :class:`server.settings.Settings` from the same environment, so the health check asks the port
the service listens on. tests/test_docker.py checks the Dockerfile against these.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from server.settings import Settings, SettingsError

SERVE_COMMAND = ("t2i-serve",)
HEALTHCHECK_COMMAND = ("t2i-healthcheck",)
HEALTHCHECK_TIMEOUT_S = 2.0
# /health statuses of a container that is up: LOADING while engines load and warm up (the
# HEALTHCHECK's start period covers it), IDLE when serving with nothing to do, OK while generating.
# ERROR (start-up failed, or Triton gone after serving) and no answer are unhealthy.
HEALTHY = frozenset({"OK", "LOADING", "IDLE"})
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthcheck_url(settings: Settings) -> str:
    """Where the service answers ``/health`` from inside its container."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/health"


def check_health(url: str, timeout_s: float = HEALTHCHECK_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the service at ``url`` is healthy, and what it said."""
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as response:
            status = json.loads(response.read()).get("status", "")
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as e:
        return False, f"no answer from {url}: {e}"
    return status in HEALTHY, f"{url}: {status}"


def healthcheck_main(argv: list[str] | None = None) -> int:
    """``t2i-healthcheck``: exit 0 when the service in this container is up, 1 otherwise."""
    argparse.ArgumentParser(
        prog="t2i-healthcheck",
        description="Exit 0 when the service of this container answers /health and is not ERROR, else 1 "
        "(reads the service's settings from the environment: HOST, PORT).",
    ).parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"t2i-healthcheck: {e}", file=sys.stderr)
        return 1
    healthy, said = check_health(healthcheck_url(settings))
    print(said, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1
