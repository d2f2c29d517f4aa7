// relayd web console (docs/console.md). Plain JavaScript, no dependency, no
// build step. Every value from the API reaches the page as a text node or
// an attribute value (textContent, setAttribute, dataset), never as HTML:
// names, labels and reasons come from agents, devices and users. The
// Content-Security-Policy requires Trusted Types, so an innerHTML here
// would throw instead of parsing.
"use strict";

(function () {
  const API = "/api/v1/admin";
  const POLL_MS = 3000;
  const CSRF_KEY = "relayd-console-csrf";
  const PAGES = { "": "overview", agents: "agents", endpoints: "endpoints", hybrid: "hybrid", users: "users" };
  const page = PAGES[location.pathname.replace(/^\/console\/?/, "")] || "overview";

  let csrf = sessionStorage.getItem(CSRF_KEY);
  let timer = null;
  let armed = null; // {key, until}: a destructive button waiting for its confirmation click

  class SignedOut extends Error {}
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // -- DOM --------------------------------------------------------------------------------------

  function h(tag, props, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "data") Object.entries(v).forEach(([dk, dv]) => { el.dataset[dk] = String(dv); });
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === undefined || kid === null || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  const $ = (id) => document.getElementById(id);

  function table(cols, rows, empty, rowProps) {
    if (!rows.length) return h("p", { class: "empty" }, empty);
    return h("table", {},
      h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, c[0])))),
      h("tbody", {}, rows.map((r) => h("tr", rowProps ? rowProps(r) : {},
        cols.map((c) => { const v = c[1](r); return v instanceof Node && v.tagName === "TD" ? v : h("td", {}, v); })))));
  }
  const num = (v) => h("td", { class: "num" }, v === null || v === undefined ? "–" : String(v));
  const wrap = (...kids) => h("td", { class: "wrap" }, ...kids);

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function when(t) {
    if (!t) return "–";
    const d = new Date(t);
    const s = Math.round((Date.now() - d.getTime()) / 1000);
    const abs = Math.abs(s);
    const rel = abs < 60 ? abs + " s" : abs < 3600 ? Math.round(abs / 60) + " min" : abs < 172800
      ? Math.round(abs / 3600) + " h" : Math.round(abs / 86400) + " d";
    return h("span", { title: d.toISOString() }, s >= 0 ? rel + " ago" : "in " + rel);
  }
  const badge = (s) => h("span", { class: "badge " + String(s).replace(/[^a-z]/g, "") }, s);
  const chips = (list) => (list && list.length ? list.map((x) => h("span", { class: "chip" }, x)) : "–");

  // -- the API ----------------------------------------------------------------------------------

  async function api(method, path, body) {
    const opts = { method, credentials: "same-origin", cache: "no-store", headers: { "X-Relayd-CSRF": csrf || "" } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(API + path, opts);
    } catch (e) {
      throw new ApiError(0, "the relay did not answer");
    }
    if (r.status === 401 || r.status === 403 && !csrf) {
      signedOut("Your session has ended: sign in again.");
      throw new SignedOut();
    }
    const data = r.status === 204 ? null : await r.json().catch(() => null);
    if (r.status === 403 && data && data.error === "csrf") {
      // The browser holds one console cookie: a sign-in in another tab replaced this tab's.
      signedOut("This tab's session was replaced by a sign-in in another tab: sign in again.");
      throw new SignedOut();
    }
    if (!r.ok) throw new ApiError(r.status, (data && data.message) || r.statusText);
    return data;
  }

  // -- signing in and out -----------------------------------------------------------------------

  function signedOut(message) {
    stop();
    csrf = null;
    sessionStorage.removeItem(CSRF_KEY);
    $("main").replaceChildren();
    $("nav").hidden = $("live").hidden = $("signout").hidden = true;
    $("signin").hidden = false;
    $("signin-message").textContent = message || "";
    $("key").focus();
  }

  async function signIn(ev) {
    ev.preventDefault();
    const input = $("key");
    const key = input.value.trim();
    input.value = "";
    if (!key) return;
    $("signin-button").disabled = true;
    $("signin-message").textContent = "";
    try {
      const r = await fetch(API + "/console/session", {
        method: "POST", credentials: "same-origin", cache: "no-store", headers: { Authorization: "Bearer " + key },
      });
      const data = await r.json().catch(() => null);
      if (r.status === 201 && data && data.csrf) {
        csrf = data.csrf;
        sessionStorage.setItem(CSRF_KEY, csrf);
        $("signin").hidden = true;
        start();
      } else if (r.status === 401) {
        $("signin-message").textContent = "Wrong admin key: the relay refused it.";
      } else if (r.status === 429) {
        $("signin-message").textContent = "Too many failed sign-ins from here: wait a minute and try again.";
      } else {
        $("signin-message").textContent = (data && data.message) || "The relay refused the sign-in (" + r.status + ").";
      }
    } catch (e) {
      $("signin-message").textContent = "The relay did not answer.";
    } finally {
      $("signin-button").disabled = false;
    }
  }

  async function signOut() {
    try { await api("DELETE", "/console/session"); } catch (e) { /* ended anyway */ }
    signedOut("Signed out.");
  }

  // -- secrets: shown once ----------------------------------------------------------------------

  function showSecret(title, note, fields) {
    const body = $("secret-body");
    body.replaceChildren(...fields.map(([label, value]) => [
      h("div", { class: "sub" }, label), h("code", { class: "secret", data: { secret: label } }, value),
    ]).flat());
    $("secret-title").textContent = title;
    $("secret-note").textContent = note;
    const dlg = $("secret");
    if (!dlg.open) dlg.showModal();
  }
  function closeSecret() {
    const dlg = $("secret");
    $("secret-body").replaceChildren(); // the secret leaves the page
    if (dlg.open) dlg.close();
  }

  // Two clicks for anything that cannot be undone: the first arms the button for 5 s.
  function confirmButton(key, label, action, props) {
    const isArmed = armed && armed.key === key && armed.until > Date.now();
    return h("button", {
      type: "button", class: "small danger" + (isArmed ? " armed" : ""), ...(props || {}),
      onclick: async (ev) => {
        if (!(armed && armed.key === key && armed.until > Date.now())) {
          armed = { key, until: Date.now() + 5000 };
          ev.target.classList.add("armed");
          ev.target.textContent = "Confirm " + label.toLowerCase();
          return;
        }
        armed = null;
        ev.target.disabled = true;
        try { await action(); } catch (e) { if (!(e instanceof SignedOut)) flash(e.message); }
        refresh();
      },
    }, isArmed ? "Confirm " + label.toLowerCase() : label);
  }

  // A refusal of an action, shown above the page for a while (the poll redraws the page).
  let flashed = { text: "", until: 0 };
  function flash(text) {
    flashed = { text, until: Date.now() + 10000 };
    const el = $("flash");
    if (el) el.textContent = text;
  }

  // -- pages ------------------------------------------------------------------------------------

  const views = {};

  views.overview = async function () {
    const s = await api("GET", "/status");
    const card = (n, l, id) => h("div", { class: "card", id }, h("div", { class: "n" }, String(n)), h("div", { class: "l" }, l));
    return [
      h("h1", {}, "Overview"),
      h("div", { class: "cards" },
        card(s.agents.online, "agents online", "agents-online"), card(s.agents.total, "agents enrolled"),
        card(s.agents.revoked, "agents revoked"), card(s.endpoints, "endpoints"),
        card(s.hybrid_connections, "hybrid connections"), card(s.hybrid_listeners, "hybrid listeners"),
        card(s.join_tokens_pending, "join tokens pending")),
      h("div", { class: "panel" }, h("dl", { class: "facts" },
        h("dt", {}, "relayd"), h("dd", {}, s.version),
        h("dt", {}, "node"), h("dd", {}, s.node || "–"),
        h("dt", {}, "started"), h("dd", {}, when(s.started_at)),
        h("dt", {}, "host name"), h("dd", {}, s.hostname || "–"),
        h("dt", {}, "agents dial"), h("dd", { class: "mono" }, s.agents_address),
        h("dt", {}, "HTTPS"), h("dd", { class: "mono" }, s.https_address || "–"),
        h("dt", {}, "CA pin"), h("dd", { class: "mono" }, s.ca_pin))),
    ];
  };

  let tokenForm = null;
  function joinTokenForm() {
    if (tokenForm) return tokenForm;
    const endpoints = h("input", { id: "jt-endpoints", placeholder: "any", size: 24, spellcheck: "false" });
    const ttl = h("select", { id: "jt-ttl" }, ["15m", "1h", "24h", "7d"].map((v) => h("option", { value: v }, v)));
    const transport = h("select", { id: "jt-transport" }, h("option", { value: "tls" }, "TLS (agents port)"),
      h("option", { value: "wss" }, "WebSocket (HTTPS port)"));
    tokenForm = h("form", {
      class: "inline panel", id: "join-token-form",
      onsubmit: async (ev) => {
        ev.preventDefault();
        const body = { ttl: ttl.value, transport: transport.value };
        const eps = endpoints.value.split(/[\s,]+/).filter(Boolean);
        if (eps.length) body.endpoints = eps;
        try {
          const t = await api("POST", "/join-tokens", body);
          showSecret("New join token", "Shown this once: give it to `relayd agent --join`. It enrolls one agent " +
            "before " + new Date(t.expires_at).toISOString() + ".",
          [["token", t.token], ["command", "relayd agent --data DIR --join '" + t.token + "' --endpoint NAME=HOST:PORT"]]);
          refresh();
        } catch (e) { if (!(e instanceof SignedOut)) flash(e.message); }
      },
    }, h("label", {}, "Endpoints (comma separated)", endpoints), h("label", {}, "Valid for", ttl),
    h("label", {}, "Transport", transport), h("button", { type: "submit", id: "new-join-token" }, "New join token"));
    return tokenForm;
  }

  views.agents = async function () {
    const [agents, tokens] = await Promise.all([api("GET", "/agents"), api("GET", "/join-tokens")]);
    const device = (a) => (a.device ? [h("div", { class: "device-name" }, a.device.name),
      Object.entries(a.device.labels || {}).map(([k, v]) => h("span", { class: "chip" }, k + "=" + v)),
      a.device.claimed ? h("div", { class: "sub" }, "claimed") : null] : "–");
    return [
      h("h1", {}, "Agents & devices"),
      joinTokenForm(),
      h("h2", {}, "Agents"),
      table([
        ["Agent", (a) => h("td", { class: "mono" }, a.id)],
        ["Status", (a) => badge(a.status)],
        ["Device", (a) => wrap(device(a))],
        ["Endpoints", (a) => wrap(chips(a.serving || a.offered || a.endpoints))],
        ["Address", (a) => h("td", { class: "mono" }, a.address || "–")],
        ["Connected", (a) => (a.status === "online" ? when(a.connected_since) : "–")],
        ["Last seen", (a) => when(a.last_seen)],
        ["Streams", (a) => num(a.streams)],
        ["In", (a) => num(bytes(a.bytes_in))],
        ["Out", (a) => num(bytes(a.bytes_out))],
        ["", (a) => (a.status === "revoked" ? "" : confirmButton("agent:" + a.id, "Revoke",
          () => api("POST", "/agents/" + encodeURIComponent(a.id) + "/revoke"), { data: { action: "revoke" } }))],
      ], agents.items, "No agent has enrolled yet: make a join token above.", (a) => ({ data: { agent: a.id, status: a.status } })),
      h("h2", {}, "Join tokens"),
      table([
        ["Token", (t) => h("td", { class: "mono" }, t.id)],
        ["State", (t) => badge(t.state)],
        ["Endpoints", (t) => wrap(chips(t.endpoints))],
        ["Made", (t) => when(t.created_at)],
        ["Expires", (t) => when(t.expires_at)],
        ["Agent", (t) => h("td", { class: "mono" }, t.agent_id || "–")],
        ["", (t) => (t.state === "pending" ? confirmButton("token:" + t.id, "Revoke",
          () => api("DELETE", "/join-tokens/" + encodeURIComponent(t.id)), { data: { action: "revoke-token" } }) : "")],
      ], tokens.items, "No join token in the last 7 days.", (t) => ({ data: { token: t.id } })),
    ];
  };

  views.endpoints = async function () {
    const eps = await api("GET", "/endpoints");
    return [
      h("h1", {}, "Endpoints"),
      table([
        ["Endpoint", (e) => h("td", { class: "mono" }, e.name)],
        ["Kind", (e) => e.kind],
        ["Where", (e) => h("td", { class: "mono" }, e.listen || e.route || "–")],
        ["Agents", (e) => wrap(e.agents && e.agents.length ? chips(e.agents) : h("span", { class: "badge revoked" }, "none"))],
        ["Connections", (e) => num(e.connections)],
        ["Held", (e) => num(e.held)],
        ["Streams now", (e) => num(e.streams_active)],
        ["Opened", (e) => num(e.streams_opened)],
        ["Failed", (e) => num(e.streams_failed)],
        ["To agents", (e) => num(bytes(e.bytes_in))],
        ["From agents", (e) => num(bytes(e.bytes_out))],
      ], eps.items, "No endpoint: they come from the relay's configuration (--tcp, --http).", (e) => ({ data: { endpoint: e.name } })),
    ];
  };

  function ruleRows(rules, base, scope) {
    return table([
      ["Rule", (r) => h("td", { class: "mono" }, r.name)],
      ["Rights", (r) => chips(r.rights)],
      ["Source", (r) => r.source],
      ["", (r) => (r.source === "config" ? h("span", { class: "sub" }, "in the config file")
        : h("button", {
          type: "button", class: "small secondary", data: { action: "rotate", rule: r.name, scope },
          onclick: async () => {
            try {
              const k = await api("POST", base + "/" + encodeURIComponent(r.name) + "/rotate");
              showSecret("New primary key of " + r.name, "Shown this once. The previous primary key stays good as " +
                "the secondary until the next rotation.", [["primary key", k.primary_key]].concat(
                k.primary_connection_string ? [["connection string", k.primary_connection_string]] : []));
            } catch (e) { if (!(e instanceof SignedOut)) flash(e.message); }
          },
        }, "Rotate key"))],
    ], rules, "No rule.");
  }

  views.hybrid = async function () {
    const [hcs, nodeRules] = await Promise.all([api("GET", "/hybrid-connections"), api("GET", "/hybrid-rules")]);
    const out = [h("h1", {}, "Hybrid connections")];
    if (!hcs.items.length) out.push(h("p", { class: "empty" }, "No hybrid connection: `relayd admin hc create PATH`."));
    for (const hc of hcs.items) {
      const opts = [hc.websocket !== false ? "WebSocket" : null, hc.http ? "HTTP" : null,
        hc.requires_client_auth === false ? "anonymous senders" : "senders need a token"].filter(Boolean);
      out.push(h("section", { class: "panel", data: { hc: hc.path } },
        h("h2", { class: "mono" }, hc.path, " ", h("span", { class: "sub" }, hc.source + " · " + opts.join(" · "))),
        h("div", { class: "sub" }, "sender connections now: ", String(hc.active_connections ?? "–"),
          " · to listeners ", bytes(hc.bytes_to_listener), " · to senders ", bytes(hc.bytes_to_sender)),
        h("h2", {}, "Listeners (" + hc.listeners.length + ")"),
        table([["Listener", (l) => h("td", { class: "mono" }, l.id)], ["Address", (l) => h("td", { class: "mono" }, l.address)],
          ["Since", (l) => when(l.since)]], hc.listeners, "No listener connected.", (l) => ({ data: { listener: l.id } })),
        h("h2", {}, "Rules"),
        ruleRows(hc.rules, "/hybrid-connections/" + encodeURIComponent(hc.id) + "/rules", hc.path)));
    }
    out.push(h("h2", {}, "The node's rules (every hybrid connection)"), ruleRows(nodeRules.items, "/hybrid-rules", ""));
    return out;
  };

  views.users = async function () {
    const [users, sessions, devices] = await Promise.all([api("GET", "/users"), api("GET", "/sessions"), api("GET", "/devices")]);
    const live = new Set(sessions.items.map((s) => s.provider + "/" + s.username));
    // A kill is a revocation (POST /revocations): the session's tokens stop working and its
    // live flows are cut at once on this relay, at the next refresh of the revocation view elsewhere.
    const kill = (selector) => api("POST", "/revocations", { op: "kill", selector, reason: "killed from the web console" });
    return [
      h("h1", {}, "Users & sessions"),
      h("h2", {}, "Users"),
      table([
        ["Provider", (u) => u.provider],
        ["User", (u) => wrap(u.username)],
        ["Email", (u) => wrap(u.email || "–")],
        ["Groups", (u) => wrap(chips(u.groups))],
        ["Authenticator", (u) => (u.totp ? "TOTP" : "–")],
        ["State", (u) => h("span", { class: "badge " + (u.disabled ? "revoked" : "online") }, u.disabled ? "disabled" : "enabled")],
        ["Added", (u) => when(u.created_at)],
        ["", (u) => (live.has(u.provider + "/" + u.username) ? confirmButton("user:" + u.provider + "/" + u.username,
          "Sign out everywhere", () => kill({ user: [u.provider, u.username] }), { data: { action: "kill-user" } }) : "")],
      ], users.items, "No user yet: `relayd admin user add`.", (u) => ({ data: { user: u.provider + "/" + u.username } })),
      h("h2", {}, "Live sessions"),
      table([
        ["Session", (s) => h("td", { class: "mono" }, s.sid.slice(0, 12) + "…")],
        ["User", (s) => wrap(s.provider + "/" + s.username)],
        ["Device", (s) => h("td", { class: "mono" }, s.device_id)],
        ["Signed in", (s) => when(s.created_at)],
        ["Expires", (s) => when(s.expires_at)],
        ["Methods", (s) => chips(s.methods)],
        ["From", (s) => h("td", { class: "mono" }, s.login_ip || "–")],
        ["", (s) => confirmButton("session:" + s.sid, "Kill", () => kill({ sid: s.sid }), { data: { action: "kill" } })],
      ], sessions.items, "No live zero-trust session.", (s) => ({ data: { sid: s.sid } })),
      h("h2", {}, "Users' devices"),
      table([
        ["Device", (d) => h("td", { class: "mono" }, d.device_id)],
        ["User", (d) => wrap(d.provider + "/" + d.username)],
        ["Host name", (d) => wrap(d.hostname || "–")],
        ["First seen", (d) => when(d.first_seen)],
        ["Last seen", (d) => when(d.last_seen)],
      ], devices.items, "No registered device."),
    ];
  };

  // -- the loop ---------------------------------------------------------------------------------

  async function refresh() {
    clearTimeout(timer);
    timer = null;
    if (!csrf) return;
    try {
      const parts = await views[page]();
      const main = $("main");
      main.replaceChildren(h("p", { id: "flash", class: "error-line", role: "status" },
        flashed.until > Date.now() ? flashed.text : ""), ...parts);
      $("live").classList.remove("stale");
      $("updated").textContent = "live · " + new Date().toLocaleTimeString();
    } catch (e) {
      if (e instanceof SignedOut) return;
      $("live").classList.add("stale");
      $("updated").textContent = "not updated: " + e.message;
    }
    if (csrf && !document.hidden) timer = setTimeout(refresh, POLL_MS);
  }
  function stop() { clearTimeout(timer); timer = null; }

  function start() {
    $("signin").hidden = true;
    $("nav").hidden = $("live").hidden = $("signout").hidden = false;
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("here", a.dataset.page === page);
    document.title = "relayd · " + page;
    refresh();
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden && csrf && !timer) refresh(); });
  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", signIn);
    $("signout").addEventListener("click", signOut);
    $("secret-close").addEventListener("click", closeSecret);
    $("secret").addEventListener("close", () => $("secret-body").replaceChildren());
    if (!csrf) { signedOut(""); return; }
    // A tab that signed in before: is its session still good?
    api("GET", "/console/session").then(start, (e) => { if (!(e instanceof SignedOut)) signedOut(e.message); });
  });
})();
