"""The container image's health check: ``python -m relayd.healthcheck [URL]``.

Asks a running relay whether it serves: ``GET /healthz`` on its metrics
listener (``relayd serve --metrics``), by default
``http://127.0.0.1:9100/healthz`` or ``$RELAYD_HEALTH_URL``. Exits 0 on 200
and 1 on anything else (503 while stopping or not accepting, no answer,
timeout), printing the relay's answer or the failure for ``docker inspect``.
Standard library only, so that it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9100/healthz"
TIMEOUT = 5.0


def check(url: str, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """(healthy, what the relay said or why there was no answer)."""
    # No proxy: an HTTP_PROXY meant for the agent's way out must not carry a local probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status == 200, resp.read(4096).decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return False, f"{exc.code}: {exc.read(4096).decode(errors='replace').strip()}"
    except (OSError, ValueError) as exc:
        return False, f"no answer from {url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    url = argv[0] if argv else os.environ.get("RELAYD_HEALTH_URL") or DEFAULT_URL
    ok, said = check(url)
    print(said)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
