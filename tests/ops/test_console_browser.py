"""The web console in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium), against a real `relayd serve`
process and real agents on loopback (docs/console.md).

One walk through the console as an operator would take it: a wrong key is
refused with a message; the right one signs in; the console's "New join
token" makes the token a real `relayd agent --join` process enrolls with,
and the agent appears on the page by itself (polling); a device enrolled
over EST with an OTP whose name and label are HTML
(``<img src=x onerror=alert(1)>``) shows them as text, with no element made
and no script run; the agent is revoked from the console, leaves the page
as revoked and its tunnel is cut under a live TCP connection; a hybrid
connection's key is rotated from the console (the key shown once is the
relay's new primary, the old one its secondary) while a real listener
(`relayd hc forward -R`) is shown; of two sign-ins of a user (`relayd
login`), one session is killed from the console and then the user is
signed out everywhere (both revocations recorded as the console's); every
page is visited and shot.

Chromium trusts the relay's CA through an NSS database of its own (a HOME
made for the test: Chromium on Linux reads ``~/.pki/nssdb``), so TLS is
verified as a browser verifies any site; it runs with ``--no-sandbox``
because tests run as root. Screenshots: the test's tmp dir, copied to
``$RELAYD_CONSOLE_SCREENSHOTS`` or else ``bench/results/console/``
(git-ignored)."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from tests.adversarial.stack import EchoHandler, _Server
from tests.tunnel.processes import RELAYD, Proc, free_port, wait_port
from tests.waiting import until_sync

pytestmark = [pytest.mark.once,
              pytest.mark.skipif(not all(shutil.which(t) for t in ("chromium", "chromedriver", "certutil")),
                                 reason="chromium, chromium-driver and libnss3-tools are not installed "
                                        "(scripts/test.sh installs them)")]

XSS = "<img src=x onerror=alert(1)>"
PASSWORD = "correct horse battery"
XSS_LABEL = "<script>alert(2)</script>"
ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = ["overview", "agents", "endpoints", "hybrid", "users"]


class Relay:
    """`relayd serve` with its HTTPS port and a TCP endpoint, its key, and
    the API with the key (what the operator does outside the console)."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.ports = {k: free_port() for k in ("agents", "https", "echo")}
        self.data = tmp / "relay"
        self.echo = _Server(("127.0.0.1", 0), EchoHandler)
        threading.Thread(target=self.echo.serve_forever, daemon=True).start()
        self.procs: list[Proc] = []
        self.relay = Proc(["serve", "--data", str(self.data), "--agents", f"127.0.0.1:{self.ports['agents']}",
                           "--https", f"127.0.0.1:{self.ports['https']}", "--tcp",
                           f"echo=127.0.0.1:{self.ports['echo']}"])
        wait_port(self.ports["https"])
        self.key = (self.data / "admin-api.key").read_text().strip()
        self.ca = str(self.data / "ca" / "ca.crt")
        self.base = f"https://127.0.0.1:{self.ports['https']}"

    def api(self, method: str, path: str, doc=None, want: int = 200):
        c = http.client.HTTPSConnection("127.0.0.1", self.ports["https"],
                                        context=ssl.create_default_context(cafile=self.ca), timeout=15)
        try:
            body = json.dumps(doc).encode() if doc is not None else None
            c.request(method, "/api/v1/admin" + path, body, {"Authorization": f"Bearer {self.key}",
                                                             **({"Content-Type": "application/json"} if body else {})})
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        assert r.status == want, (method, path, r.status, data[:300])
        return json.loads(data) if data else None

    def start(self, args: list[str], env: dict | None = None) -> Proc:
        p = Proc(args, env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def stop(self) -> str:
        out = ""
        for p in self.procs + [self.relay]:
            out += p.stop()[1]
        self.echo.shutdown()
        self.echo.server_close()
        return out


def browser(tmp: pathlib.Path, ca: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    home = tmp / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True, capture_output=True)
    subprocess.run(["certutil", "-A", "-d", f"sql:{nssdb}", "-n", "relayd-test-ca", "-t", "C,,", "-i", ca],
                   check=True, capture_output=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", f"--user-data-dir={tmp / 'profile'}", "--window-size=1366,900",
              "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-extensions", "--password-store=basic", "--lang=en-US"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(shutil.which("chromedriver"), env={**os.environ, "HOME": str(home)})
    return webdriver.Chrome(options=opts, service=service)


@pytest.fixture
def shots(tmp_path):
    out = tmp_path / "screenshots"
    out.mkdir()
    yield out
    dest = pathlib.Path(os.environ.get("RELAYD_CONSOLE_SCREENSHOTS") or ROOT / "bench" / "results" / "console")
    dest.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.png"):
        shutil.copy(f, dest / f.name)


def test_the_console_in_chromium(tmp_path, shots):
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.monotonic()
    relay = Relay(tmp_path)
    driver = None
    secrets = {relay.key, PASSWORD}
    try:
        # What the operator set up elsewhere: a hybrid connection with a listener, a user, a device's OTP.
        relay.api("POST", "/hybrid-connections", {"path": "orders"}, 201)
        rule = relay.api("POST", "/hybrid-connections/orders/rules", {"name": "orders-listen",
                                                                     "rights": ["listen"]}, 201)
        secrets.add(rule["primary_key"])
        relay.start(["hc", "forward", "-R", f"127.0.0.1:{relay.echo.server_address[1]}", "--ca", relay.ca],
                    {"RELAYD_HC_CONNECTION": rule["primary_connection_string"]})
        relay.api("POST", "/users", {"username": "alice", "password": PASSWORD, "groups": ["ops"],
                                     "email": "alice@example.com"}, 201)
        otp = relay.api("POST", "/otps", {"device_name": XSS, "labels": {"note": XSS_LABEL}}, 201)
        secrets.add(otp["otp"])
        relay.start(["agent", "--data", str(tmp_path / "device"), "--otp", otp["otp"], "--est", relay.base,
                     "--pin", otp["ca_sha256"], "--endpoint", "web=127.0.0.1:9"])

        driver = browser(tmp_path, relay.ca)
        wait = WebDriverWait(driver, 20, 0.1, ignored_exceptions=(StaleElementReferenceException,))
        shot = lambda name: driver.save_screenshot(str(shots / f"{name}.png"))  # noqa: E731

        def text(css: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, css).text

        # -- sign in: a wrong key is refused with a message, then the right one
        driver.get(relay.base + "/console/")
        wait.until(lambda d: d.find_element(By.ID, "signin").is_displayed())
        driver.find_element(By.ID, "key").send_keys("rak_" + "x" * 43)
        driver.find_element(By.ID, "signin-button").click()
        wait.until(lambda d: "Wrong admin key" in text("#signin-message"))
        assert not driver.find_element(By.ID, "nav").is_displayed()
        assert driver.find_element(By.ID, "key").get_attribute("value") == ""  # the page does not keep it
        shot("signin")
        driver.find_element(By.ID, "key").send_keys(relay.key)
        driver.find_element(By.ID, "signin-button").click()
        wait.until(lambda d: text("#agents-online .n") != "")
        cookies = driver.get_cookies()
        assert [c["name"] for c in cookies] == []  # the session cookie is not for the console's pages
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly, and scoped to the API
        assert driver.execute_script("return JSON.stringify(sessionStorage)").count(relay.key) == 0
        shot("overview")

        # -- a join token from the console, and a real agent enrolling with it
        driver.get(relay.base + "/console/agents")
        wait.until(lambda d: d.find_element(By.ID, "jt-endpoints"))
        driver.find_element(By.ID, "jt-endpoints").send_keys("echo")
        driver.find_element(By.ID, "new-join-token").click()
        wait.until(lambda d: d.find_element(By.ID, "secret").is_displayed())
        token = driver.find_element(By.CSS_SELECTOR, "#secret code[data-secret=token]").text
        assert token.startswith("relayd1.")
        secrets.add(token)
        shot("agents-join-token")
        driver.find_element(By.ID, "secret-close").click()
        assert driver.find_elements(By.CSS_SELECTOR, "#secret code") == []  # the secret left the page
        relay.start(["agent", "--data", str(tmp_path / "agent"), "--join", token, "--endpoint",
                     f"echo=127.0.0.1:{relay.echo.server_address[1]}"])
        # (the one its token enrolled: the device is an agent too)
        agent_id = until_sync(lambda: next((t["agent_id"] for t in relay.api("GET", "/join-tokens")["items"]
                                            if t["state"] == "used"), None), 30, "the agent did not enroll",
                              interval=0.2)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-agent='{agent_id}'][data-status=online]"))

        # -- the device named with HTML: shown as text, nothing made of it, nothing run
        name = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".device-name"))
        assert name.text == XSS
        chips = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "td .chip")]
        assert f"note={XSS_LABEL}" in chips
        assert driver.execute_script("return document.querySelectorAll('main img, main script').length") == 0
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018
        shot("agents")

        # -- revoke the agent from the console: its row goes revoked, its tunnel is cut
        held = socket.create_connection(("127.0.0.1", relay.ports["echo"]), 5)
        try:
            until_sync(lambda: held.sendall(b"x") or held.recv(1) == b"x", 10, "no stream through the agent",
                       ignore=(OSError,))
            sel = f"tr[data-agent='{agent_id}'] button[data-action=revoke]"
            driver.find_element(By.CSS_SELECTOR, sel).click()
            wait.until(lambda d: "Confirm" in d.find_element(By.CSS_SELECTOR, sel).text)
            driver.find_element(By.CSS_SELECTOR, sel).click()
            t_revoke = time.monotonic()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-agent='{agent_id}'][data-status=revoked]"))
            held.settimeout(5)
            try:
                while held.recv(100):
                    pass
            except (ConnectionResetError, ConnectionAbortedError):
                pass
            assert time.monotonic() - t_revoke < 5
        finally:
            held.close()
        assert relay.api("GET", f"/agents/{agent_id}")["status"] == "revoked"
        shot("agents-revoked")

        # -- endpoints with their traffic
        driver.get(relay.base + "/console/endpoints")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-endpoint=echo]"))
        assert "B" in text("tr[data-endpoint=echo]")  # bytes carried, as counted
        shot("endpoints")

        # -- the hybrid connection and its listener; rotate its key
        driver.get(relay.base + "/console/hybrid")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "section[data-hc=orders] tr[data-listener]"))
        driver.find_element(By.CSS_SELECTOR, "button[data-action=rotate][data-rule=orders-listen]").click()
        wait.until(lambda d: d.find_element(By.ID, "secret").is_displayed())
        new_key = driver.find_element(By.CSS_SELECTOR, "#secret code[data-secret='primary key']").text
        secrets.add(new_key)
        keys = relay.api("POST", "/hybrid-connections/orders/rules/orders-listen/list-keys")
        assert keys["primary_key"] == new_key and keys["secondary_key"] == rule["primary_key"]
        shot("hybrid-rotated")
        driver.find_element(By.ID, "secret-close").click()
        shot("hybrid")

        # -- users and sessions: alice signs in twice (`relayd login`); one
        # session is killed from the console, then "sign out everywhere" the other
        for n in (1, 2):
            login = subprocess.run(RELAYD + ["login", relay.base, "--user", "alice", "--password-stdin", "--ca",
                                             relay.ca, "--data", str(tmp_path / f"alice{n}")],
                                   input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
            assert login.returncode == 0, login.stderr
        sids = [x["sid"] for x in relay.api("GET", "/sessions")["items"]]
        assert len(sids) == 2
        driver.get(relay.base + "/console/users")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-sid]")) == 2)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-user='local/alice'] [data-action=kill-user]"))
        shot("users")

        def confirm(css: str) -> None:  # two clicks: the first arms the button
            driver.find_element(By.CSS_SELECTOR, css).click()
            wait.until(lambda d: "Confirm" in d.find_element(By.CSS_SELECTOR, css).text)
            driver.find_element(By.CSS_SELECTOR, css).click()

        confirm(f"tr[data-sid='{sids[0]}'] button[data-action=kill]")
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f"tr[data-sid='{sids[0]}']"))
        assert [x["sid"] for x in relay.api("GET", "/sessions")["items"]] == [sids[1]]
        confirm("tr[data-user='local/alice'] button[data-action=kill-user]")
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "tr[data-sid]"))
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-action=kill-user]"))
        assert relay.api("GET", "/sessions")["items"] == []
        kills = [(e["op"], e["selector"], e["reason"]) for e in relay.api("GET", "/revocations")["items"]]
        assert kills == [("kill", {"sid": sids[0]}, "killed from the web console"),
                         ("kill", {"user": ["local", "alice"]}, "killed from the web console")], kills
        shot("users-killed")

        # -- every page came up without an error in the console, then sign out
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                  and "console/session - Failed to load resource: the server responded with a status of 401"
                  not in e["message"]]
        assert not errors, errors
        driver.find_element(By.ID, "signout").click()
        wait.until(lambda d: d.find_element(By.ID, "signin").is_displayed())
        assert "Signed out" in text("#signin-message")
        assert sorted(p.stem for p in shots.glob("*.png")) == sorted(
            ["signin", "overview", "agents-join-token", "agents", "agents-revoked", "endpoints", "hybrid-rotated",
             "hybrid", "users", "users-killed"])
        assert set(PAGES) <= {p.stem.split("-")[0] for p in shots.glob("*.png")} | {"overview"}
    finally:
        if driver is not None:
            driver.quit()
        err = relay.stop()
    assert "Traceback" not in err, err[-3000:]
    for s in secrets:
        assert s not in err, "a secret reached a log"
    print(f"console walk-through: {time.monotonic() - t0:.1f} s")
