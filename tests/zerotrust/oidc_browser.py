"""A person at a browser, for the OpenID Connect tests: opens the
authorization URL, fills in the provider's own login form (and allows
the client on its consent form), follows the redirects with the provider's
cookies and lands on the client's loopback listener, as a browser does;
nothing of the provider or of relayd is stood in for.

As a program it is the ``BROWSER`` that `relayd login` opens (webbrowser
runs it with the URL): the account comes from RELAYD_TEST_OIDC_USER and
RELAYD_TEST_OIDC_PASSWORD, the cookie jar from RELAYD_TEST_OIDC_JAR (a file,
so that a later sign-in in the test sees the provider's session, as the same
browser would), and each page it was shown is appended to
RELAYD_TEST_OIDC_LOG.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

TIMEOUT = 10.0


class _Stop(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # every redirect is looked at, then followed by hand


@dataclass
class Visit:
    """What the browser went through: the pages (method, URL, status), how
    many times the provider asked for the password, and where it sent the
    browser back to."""

    pages: list = field(default_factory=list)
    logins: int = 0
    redirect: str | None = None


def sign_in(url: str, username: str, password: str, *, jar: http.cookiejar.CookieJar | None = None,
            follow: bool = True, tamper=None, visit: Visit | None = None) -> Visit:
    """Drive the provider from ``url`` until it redirects to the client's
    ``redirect_uri``; then fetch that (``follow``) or stop. ``tamper(url)``
    may rewrite the final redirect (an attacker's page doing the fetch).
    The pages are recorded in ``visit`` as they go."""
    redirect_uri = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["redirect_uri"][0]
    jar = http.cookiejar.CookieJar() if jar is None else jar  # (an empty jar is false)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _Stop)
    visit = Visit() if visit is None else visit
    method, data = "GET", None
    for _ in range(12):
        if url.startswith(redirect_uri):
            visit.redirect = tamper(url) if tamper else url
            if follow:
                _open(opener, visit.redirect, None, visit)
            return visit
        status, headers, body = _open(opener, url, data, visit, method)
        if status in (301, 302, 303, 307):
            url, method, data = urllib.parse.urljoin(url, headers["Location"]), "GET", None
            continue
        m = re.search(rb'<form method="post" action="([^"]+)"', body)
        if status == 200 and m:
            url, method, data = urllib.parse.urljoin(url, m.group(1).decode()), "POST", b""
            if b'name="password"' in body:
                visit.logins += 1
                data = urllib.parse.urlencode({"username": username, "password": password}).encode()
            continue
        raise RuntimeError(f"the provider answered {status} at {url}: {body[:300]!r}")
    raise RuntimeError("too many redirects")


def _open(opener, url, data, visit: Visit, method: str = "GET"):
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with opener.open(req, timeout=TIMEOUT) as r:
            out = r.status, r.headers, r.read(1 << 20)
    except urllib.error.HTTPError as exc:
        out = exc.code, exc.headers, exc.read(1 << 20)
    visit.pages.append((method, url.split("?")[0], out[0]))
    return out


def main() -> int:
    path = os.environ.get("RELAYD_TEST_OIDC_JAR")
    jar = http.cookiejar.LWPCookieJar(path) if path else http.cookiejar.CookieJar()
    if path and os.path.exists(path):
        jar.load(ignore_discard=True)
    visit = Visit()
    try:
        sign_in(sys.argv[1], os.environ["RELAYD_TEST_OIDC_USER"], os.environ["RELAYD_TEST_OIDC_PASSWORD"], jar=jar,
                visit=visit)
    except Exception as exc:  # the page that failed, for the test to show
        visit.pages.append(("ERROR", repr(exc)[:300], 0))
        raise
    finally:
        if path:
            jar.save(ignore_discard=True)
        if os.environ.get("RELAYD_TEST_OIDC_LOG"):
            with open(os.environ["RELAYD_TEST_OIDC_LOG"], "a") as f:
                for m, u, status in visit.pages:
                    f.write(f"{m} {u} {status}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
