"""Zero-trust policy: sites, conditions, entitlements and policies; how
conditions are judged and how entitlements become a session's firewall
rules (``../shared/specs/zero-trust.md`` sections 5 and 6).

Theory of operation
-------------------
The model is data, never code: conditions are a closed set of typed
predicates under ``all``/``any``/``not``, with no network calls, so every
evaluation terminates and can run at every flow open. ``check(kind, doc)``
validates one object (from TOML, the admin API or the CLI) and returns its
normal form, the form stored in the database and copied verbatim into
entitlement tokens; ``Policy`` is the whole set at one version ``pv``.

Two places evaluate:

* the controller, at sign-in and renewal: ``Policy.select(user)`` runs the
  policies over ``user.*`` claims only (trusted, slow-changing) and picks
  the entitlements a user gets (and whether a Stop policy refuses them);
* the gateway, at hello, at every update of the session and at deadlines:
  ``judge`` gives each entitlement its state (active, pending with the
  remedies that would fix it, inactive) from the claims, the device's
  report, the gateway's own system claims, the step-ups in the claims
  token, the reasons given and the clock; ``compile_rules`` expands the
  actions into flow-filter rules.

Three-valued logic: a claim that is missing or of another type than the
value it is compared with makes its criterion UNKNOWN; ``all``/``any``/
``not`` are Kleene's; UNKNOWN at the top is false. A string never equals a
boolean (``"true"`` is not ``true``), and Python's ``True == 1`` is not let
through.
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import math
import re
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from relayd.config import parse_duration
from relayd.core import flowfilter as ff
from relayd.errors import ConfigError

__all__ = ["Policy", "PolicyError", "Conflict", "check", "judge", "compile_rules", "Judgement"]

KINDS = ("sites", "conditions", "entitlements", "policies")
_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]\Z")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NAMESPACES = ("user", "device", "system")
_OPS = {"eq", "ne", "in", "not_in", "contains", "has_any", "has_all", "exists", "cidr", "not_cidr", "lt", "le", "gt",
        "ge", "version_ge", "version_lt", "glob"}
_REMEDIES = {"otp", "password", "reason", "message"}
_PROTOS = {"tcp": ff.TCP, "udp": ff.UDP, "icmp": ff.ICMP, "icmpv6": ff.ICMPV6}
_ACTIONS = {"allow", "block", "alert"}
#: Limits, so that one entitlement token stays far below its 256 KiB cap.
MAX_CRITERIA = 32
MAX_ACTIONS = 64
MAX_HOSTS = 256
MAX_PORTS = 64
MAX_REASON = 512
#: How deep criteria nest (groups, ``not``); evaluation goes no deeper.
MAX_DEPTH = 8
#: The longest duration (max_age, recheck), and the largest number a value
#: may hold: what every JSON reader takes exactly (the objects travel in
#: entitlement tokens).
MAX_DURATION = 10 * 366 * 86400
MAX_NUMBER = 2 ** 53

UNKNOWN = None


class PolicyError(ConfigError):
    """A policy object that does not validate; the message names the key."""


class Conflict(PolicyError):
    """The object exists already, or something still refers to it."""


# -- validation ----------------------------------------------------------------


def _need(doc: dict, key: str, where: str, types, default=...):
    if key not in doc:
        if default is ...:
            raise PolicyError(f"{where}: '{key}' is required")
        return default
    v = doc[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        raise PolicyError(f"{where}: '{key}' has the wrong type")
    return v


def _only(doc, allowed: set, where: str) -> dict:
    if not isinstance(doc, dict):
        raise PolicyError(f"{where}: expected a table")
    extra = set(doc) - allowed
    if extra:
        raise PolicyError(f"{where}: unknown key {sorted(extra)[0]!r}")
    return doc


def _ident(v, where: str) -> str:
    if not isinstance(v, str) or not _ID.match(v):
        raise PolicyError(f"{where}: an id is 1-64 of a-z 0-9 . _ - (starting with a letter or digit)")
    return v


def _ids(v, where: str) -> list:
    if not isinstance(v, list) or len(v) > 256:
        raise PolicyError(f"{where}: expected a list of ids")
    return [_ident(x, where) for x in v]


def _strings(v, where: str, limit: int = 256) -> list:
    if not isinstance(v, list) or len(v) > limit or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in v):
        raise PolicyError(f"{where}: expected a list of strings")
    return list(v)


def _network(text: str, where: str):
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise PolicyError(f"{where}: {text!r} is not an IP address or CIDR") from None


def _duration(v, where: str) -> int:
    try:
        seconds = int(parse_duration(v, where))
    except ConfigError as exc:
        raise PolicyError(str(exc)) from None
    if seconds > MAX_DURATION:
        raise PolicyError(f"{where}: a duration is at most 10 years")
    return seconds


_VALUE = (str, int, float, bool, list)


def _criterion(c, where: str, depth: int) -> dict:
    if not isinstance(c, dict):
        raise PolicyError(f"{where}: expected a table")
    if depth > MAX_DEPTH:
        raise PolicyError(f"{where}: criteria nest at most {MAX_DEPTH} deep")
    if "logic" in c:  # a nested group
        _only(c, {"logic", "criteria"}, where)
        return _group(c, where, depth + 1)
    if "not" in c:
        _only(c, {"not"}, where)
        return {"not": _criterion(c["not"], where + ".not", depth + 1)}
    if "stepup" in c:
        _only(c, {"stepup", "suffix", "provider", "max_age"}, where)
        if c["stepup"] not in ("otp", "password"):
            raise PolicyError(f"{where}: stepup is otp or password")
        out = {"stepup": c["stepup"], "suffix": _suffix(c.get("suffix"), where),
               "max_age": _duration(_need(c, "max_age", where, (str, int)), where + ".max_age")}
        if "provider" in c:
            out["provider"] = _ident(c["provider"], where + ".provider")
        return out
    if "reason" in c:
        _only(c, {"reason", "suffix", "max_age", "min_len"}, where)
        if c["reason"] is not True:
            raise PolicyError(f"{where}: write reason = true")
        return {"reason": True, "suffix": _suffix(c.get("suffix"), where),
                "max_age": _duration(_need(c, "max_age", where, (str, int)), where + ".max_age"),
                "min_len": _min_len(_need(c, "min_len", where, int, 1), where)}
    if "time_window" in c:
        _only(c, {"time_window"}, where)
        tw = _only(c["time_window"], {"days", "from", "to", "tz"}, where + ".time_window")
        days = _strings(tw.get("days", list(_DAYS)), where + ".days", 7)
        if not set(days) <= set(_DAYS):
            raise PolicyError(f"{where}: days are mon..sun")
        for k in ("from", "to"):
            if not isinstance(tw.get(k), str) or not _HHMM.match(tw[k]):
                raise PolicyError(f"{where}.time_window: '{k}' is HH:MM")
        tz = tw.get("tz", "UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise PolicyError(f"{where}.time_window: unknown time zone {tz!r}") from None
        return {"time_window": {"days": days, "from": tw["from"], "to": tw["to"], "tz": tz}}
    _only(c, {"claim", "op", "value"}, where)
    claim = _need(c, "claim", where, str)
    parts = claim.split(".")
    if parts[0] not in _NAMESPACES or len(parts) < 2 or not all(re.match(r"[A-Za-z0-9_-]{1,64}\Z", p) for p in parts):
        raise PolicyError(f"{where}: claim is user.*, device.* or system.* (dotted names)")
    op = _need(c, "op", where, str)
    if op not in _OPS:
        raise PolicyError(f"{where}: unknown op {op!r}")
    out = {"claim": claim, "op": op}
    if op != "exists":
        value = _need(c, "value", where, _VALUE)
        if not all(isinstance(x, str) or isinstance(x, (int, float)) and math.isfinite(x) and abs(x) <= MAX_NUMBER
                   for x in (value if isinstance(value, list) else [value])) \
                or isinstance(value, list) and len(value) > 256:
            raise PolicyError(f"{where}: a value is a string, a number (finite, at most 2^53) or a boolean, "
                              "or a list of them")
        if op in ("cidr", "not_cidr"):
            for n in (value if isinstance(value, list) else [value]):
                _network(n if isinstance(n, str) else "", where)
        out["value"] = value
    return out


def _min_len(n: int, where: str) -> int:
    if not 0 <= n <= MAX_REASON:
        raise PolicyError(f"{where}: min_len is 0 to {MAX_REASON} (a reason's most)")
    return n


def _suffix(v, where: str) -> str:
    if not isinstance(v, str) or not _SUFFIX.match(v):
        raise PolicyError(f"{where}: suffix is 1-64 of A-Z a-z 0-9 . _ -")
    return v


def _group(doc: dict, where: str, depth: int = 0) -> dict:
    logic = doc.get("logic", "all")
    if logic not in ("all", "any"):
        raise PolicyError(f"{where}: logic is all or any")
    crit = doc.get("criteria", [])
    if not isinstance(crit, list) or len(crit) > MAX_CRITERIA:
        raise PolicyError(f"{where}: criteria is a list of at most {MAX_CRITERIA}")
    return {"logic": logic, "criteria": [_criterion(c, f"{where}.criteria[{i}]", depth) for i, c in enumerate(crit)]}


def _tested(criteria: list, kind: str, suffix: str) -> bool:
    for c in criteria:
        if "criteria" in c and _tested(c["criteria"], kind, suffix):
            return True
        if "not" in c and _tested([c["not"]], kind, suffix):
            return True
        if kind == "reason" and c.get("reason") and c["suffix"] == suffix:
            return True
        if c.get("stepup") == kind and c["suffix"] == suffix:
            return True
    return False


def _range(text, where: str, top: int) -> tuple[int, int]:
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    m = re.match(r"(\d{1,5})(?:-(\d{1,5}))?\Z", text) if isinstance(text, str) else None
    if not m:
        raise PolicyError(f"{where}: {text!r} is not N or N-M")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if not 0 <= lo <= hi <= top:
        raise PolicyError(f"{where}: range {text!r} outside 0-{top}")
    return lo, hi


def _action(a, where: str) -> dict:
    _only(a, {"action", "proto", "hosts", "ports", "types", "n"}, where)
    action = _need(a, "action", where, str)
    if action not in _ACTIONS:
        raise PolicyError(f"{where}: action is allow, block or alert")
    proto = _need(a, "proto", where, str)
    if proto not in _PROTOS:
        raise PolicyError(f"{where}: proto is tcp, udp, icmp or icmpv6")
    hosts = _strings(_need(a, "hosts", where, list), where + ".hosts", MAX_HOSTS)
    if not hosts:
        raise PolicyError(f"{where}: hosts is empty")
    for h in hosts:
        if not (_is_ip(h) or _is_name(h)):
            raise PolicyError(f"{where}: {h!r} is neither an address, a CIDR nor a host name")
    out = {"action": action, "proto": proto, "hosts": hosts}
    if proto in ("tcp", "udp"):
        if "types" in a:
            raise PolicyError(f"{where}: types are for icmp")
        ports = [str(p) for p in _need(a, "ports", where, list)]
        if not ports or len(ports) > MAX_PORTS:
            raise PolicyError(f"{where}: ports is a list of 1 to {MAX_PORTS}")
        for p in ports:
            _range(p, where + ".ports", 65535)
        out["ports"] = ports
    else:
        if "ports" in a:
            raise PolicyError(f"{where}: ports are for tcp and udp")
        types = [str(t) for t in _need(a, "types", where, list, ["0-255"])]
        for t in types:
            _range(t, where + ".types", 255)
        out["types"] = types
    return out


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_network(h, strict=False)
        return True
    except ValueError:
        return False


def _is_name(h: str) -> bool:
    return bool(re.match(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z",
                         h.lower()))


def check(kind: str, doc) -> dict:
    """The normal form of one policy object of ``kind`` (sites, conditions,
    entitlements, policies); PolicyError naming the first bad key."""
    where = kind + "." + str(doc.get("id", "?") if isinstance(doc, dict) else "?")
    if kind == "sites":
        _only(doc, {"id", "name", "networks", "gateways"}, where)
        out = {"id": _ident(doc.get("id"), where), "name": _need(doc, "name", where, str, doc.get("id"))}
        out["gateways"] = _strings(_need(doc, "gateways", where, list, []), where + ".gateways", 16)
        out["networks"] = [str(_network(n, where + ".networks")) for n in
                           _strings(_need(doc, "networks", where, list, []), where + ".networks")]
        return out
    if kind == "conditions":
        _only(doc, {"id", "logic", "criteria", "recheck", "remedy_logic", "remedies"}, where)
        out = {"id": _ident(doc.get("id"), where), **_group(doc, where)}
        recheck = _strings(doc.get("recheck", []), where + ".recheck", 8)
        for r in recheck:
            if not _HHMM.match(r):
                _duration(r, where + ".recheck")
        out["recheck"] = recheck
        out["remedy_logic"] = doc.get("remedy_logic", "any")
        if out["remedy_logic"] not in ("all", "any"):
            raise PolicyError(f"{where}: remedy_logic is all or any")
        remedies = []
        for i, r in enumerate(_need(doc, "remedies", where, list, [])):
            w = f"{where}.remedies[{i}]"
            _only(r, {"type", "provider", "suffix", "message", "kind"}, w)
            t = _need(r, "type", w, str)
            if t not in _REMEDIES:
                raise PolicyError(f"{w}: type is otp, password, reason or message")
            rem = {"type": t, "message": _need(r, "message", w, str, "")[:1024]}
            if t == "message":
                rem["kind"] = _need(r, "kind", w, str, "info")
                if rem["kind"] not in ("info", "fix"):
                    raise PolicyError(f"{w}: kind is info or fix")
            else:
                rem["suffix"] = _suffix(r.get("suffix"), w)
                if t != "reason":
                    rem["provider"] = _ident(_need(r, "provider", w, str, "totp" if t == "otp" else "local"), w)
                if not _tested(out["criteria"], t if t != "reason" else "reason", rem["suffix"]):
                    # The prompt would come back forever (Appgate's warning).
                    raise PolicyError(f"{w}: no criterion of this condition tests the {t} suffix "
                                      f"{rem['suffix']!r}; the user would be asked again and again")
            remedies.append(rem)
        out["remedies"] = remedies
        return out
    if kind == "entitlements":
        # rev is the store's count of an entitlement's versions: read back
        # from an export, never taken from the document.
        _only(doc, {"id", "site", "condition_logic", "conditions", "tags", "actions", "disabled", "rev"}, where)
        out = {"id": _ident(doc.get("id"), where), "site": _ident(doc.get("site"), where + ".site"),
               "condition_logic": doc.get("condition_logic", "all"),
               "conditions": _ids(doc.get("conditions", []), where + ".conditions"),
               "tags": _ids(doc.get("tags", []), where + ".tags"),
               "disabled": _need(doc, "disabled", where, bool, False)}
        if out["condition_logic"] not in ("all", "any"):
            raise PolicyError(f"{where}: condition_logic is all or any")
        actions = _need(doc, "actions", where, list)
        if not actions or len(actions) > MAX_ACTIONS:
            raise PolicyError(f"{where}: actions is a list of 1 to {MAX_ACTIONS}")
        out["actions"] = [dict(_action(a, f"{where}.actions[{i}]"), n=i) for i, a in enumerate(actions)]
        return out
    if kind == "policies":
        _only(doc, {"id", "match", "entitlements", "entitlement_tags", "stop"}, where)
        match = _only(_need(doc, "match", where, dict, {"logic": "all", "criteria": []}), {"logic", "criteria"},
                      where + ".match")
        out = {"id": _ident(doc.get("id"), where), "match": _group(match, where + ".match"),
               "entitlements": _ids(doc.get("entitlements", []), where + ".entitlements"),
               "entitlement_tags": _ids(doc.get("entitlement_tags", []), where + ".entitlement_tags"),
               "stop": _need(doc, "stop", where, bool, False)}
        if _uses(out["match"]["criteria"], lambda c: not c.get("claim", "user.").startswith("user.")
                 or "stepup" in c or "reason" in c or "time_window" in c):
            raise PolicyError(f"{where}.match: policies test user.* claims only (device claims only narrow, "
                              "in conditions)")
        return out
    raise PolicyError(f"unknown policy kind {kind!r}")


def _uses(criteria: list, pred) -> bool:
    for c in criteria:
        if "criteria" in c:
            if _uses(c["criteria"], pred):
                return True
        elif "not" in c:
            if _uses([c["not"]], pred):
                return True
        elif pred(c):
            return True
    return False


@dataclass
class Policy:
    """The whole policy at version ``pv``: kind -> id -> normal form."""

    pv: int = 0
    sites: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)
    entitlements: dict = field(default_factory=dict)
    policies: dict = field(default_factory=dict)

    def table(self, kind: str) -> dict:
        if kind not in KINDS:
            raise PolicyError(f"unknown policy kind {kind!r}")
        return getattr(self, kind)

    def references(self) -> list[str]:
        """What refers to something missing (empty when consistent)."""
        bad = []
        for e in self.entitlements.values():
            if e["site"] not in self.sites:
                bad.append(f"entitlement {e['id']}: unknown site {e['site']}")
            bad += [f"entitlement {e['id']}: unknown condition {c}" for c in e["conditions"]
                    if c not in self.conditions]
        for p in self.policies.values():
            bad += [f"policy {p['id']}: unknown entitlement {x}" for x in p["entitlements"]
                    if x not in self.entitlements]
        return bad

    @classmethod
    def from_doc(cls, doc: dict, pv: int = 0) -> "Policy":
        """From the TOML/JSON form: ``[[sites]] [[conditions]] [[entitlements]] [[policies]]``."""
        _only(doc, set(KINDS), "policy")
        p = cls(pv)
        for kind in KINDS:
            items = doc.get(kind, [])
            if not isinstance(items, list):
                raise PolicyError(f"policy: {kind} is an array of tables")
            for item in items:
                obj = check(kind, item)
                if obj["id"] in p.table(kind):
                    raise PolicyError(f"{kind}.{obj['id']}: defined twice")
                p.table(kind)[obj["id"]] = obj
        bad = p.references()
        if bad:
            raise PolicyError(bad[0])
        return p

    def to_doc(self) -> dict:
        return {k: [self.table(k)[i] for i in sorted(self.table(k))] for k in KINDS}

    def select(self, user: dict) -> tuple[list[str], str | None]:
        """The entitlement ids ``user`` (the ``user.*`` claims) gets, sorted,
        and the id of a Stop policy that refuses them (or None)."""
        ctx = {"user": user}
        chosen: set = set()
        for p in sorted(self.policies.values(), key=lambda p: p["id"]):
            if _group_value(p["match"], ctx, 0) is not True:
                continue
            if p["stop"]:
                return [], p["id"]
            chosen.update(p["entitlements"])
            tags = set(p["entitlement_tags"])
            if tags:
                chosen.update(e["id"] for e in self.entitlements.values() if tags & set(e["tags"]))
        return sorted(e for e in chosen if e in self.entitlements and not self.entitlements[e]["disabled"]), None

    def remedies_for(self, entitlement_ids) -> list[dict]:
        """Every remedy of the conditions of these entitlements."""
        out = []
        for eid in entitlement_ids:
            for cid in self.entitlements.get(eid, {}).get("conditions", []):
                out += self.conditions.get(cid, {}).get("remedies", [])
        return out


def to_toml(doc: dict) -> str:
    """The TOML form of ``Policy.to_doc()`` (arrays of tables, inline
    values): what `relayd admin policy export` prints."""
    lines = []
    for kind in KINDS:
        for item in doc.get(kind, []):
            lines.append(f"[[{kind}]]")
            for k, v in item.items():
                if kind == "entitlements" and k == "actions":
                    v = [{kk: vv for kk, vv in a.items() if kk != "n"} for a in v]
                lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def _toml_key(k: str) -> str:
    return k if re.match(r"[A-Za-z0-9_-]+\Z", k) else _toml_str(k)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    """A TOML basic string: the quote, the backslash and the control
    characters TOML does not take raw are escaped, the rest written as it
    is (JSON's escapes are not TOML's: a character beyond U+FFFF would be
    a surrogate pair, which TOML refuses)."""
    return '"' + "".join(_TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ch == "\x7f" else ch)
                         for ch in s) + '"'


# -- evaluation --------------------------------------------------------------------


def _lookup(ctx: dict, claim: str):
    parts = claim.split(".")
    v = ctx.get(parts[0])
    for p in parts[1:]:
        if not isinstance(v, dict) or p not in v:
            return ...
        v = v[p]
    return v


def _kind(v):
    if isinstance(v, bool):
        return bool
    if isinstance(v, (int, float)):
        return float
    return type(v)


def _same(a, b) -> bool:
    return _kind(a) is _kind(b) and a == b


def _version(v) -> tuple | None:
    if not isinstance(v, str) or not re.match(r"\d+(\.\d+){0,5}\Z", v):
        return None
    return tuple(int(x) for x in v.split("."))


def _cmp_version(a, b) -> int | None:
    va, vb = _version(a), _version(b)
    if va is None or vb is None:
        return None
    n = max(len(va), len(vb))
    va, vb = va + (0,) * (n - len(va)), vb + (0,) * (n - len(vb))
    return (va > vb) - (va < vb)


def _ip(v):
    if not isinstance(v, str):
        return None
    try:
        a = ipaddress.ip_address(v)
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a


def _claim_value(c: dict, ctx: dict):
    op, v = c["op"], _lookup(ctx, c["claim"])
    want = c.get("value")
    if op == "exists":
        return v is not ...
    if v is ... or v is None:
        return UNKNOWN
    if op in ("eq", "ne"):
        if _kind(v) is not _kind(want):
            return UNKNOWN
        return (v == want) == (op == "eq")
    if op in ("in", "not_in"):
        if not isinstance(want, list):
            return UNKNOWN
        hit = any(_same(v, w) for w in want)
        return hit == (op == "in")
    if op == "contains":
        if not isinstance(v, list):
            return UNKNOWN
        return any(_same(x, want) for x in v)
    if op in ("has_any", "has_all"):
        if not isinstance(v, list) or not isinstance(want, list):
            return UNKNOWN
        hits = [any(_same(x, w) for x in v) for w in want]
        return any(hits) if op == "has_any" else all(hits)
    if op in ("cidr", "not_cidr"):
        a = _ip(v)
        if a is None:
            return UNKNOWN
        nets = [ipaddress.ip_network(n, strict=False) for n in (want if isinstance(want, list) else [want])]
        hit = any(a.version == n.version and a in n for n in nets)
        return hit == (op == "cidr")
    if op in ("lt", "le", "gt", "ge"):
        if _kind(v) is not float or _kind(want) is not float:
            return UNKNOWN
        return {"lt": v < want, "le": v <= want, "gt": v > want, "ge": v >= want}[op]
    if op in ("version_ge", "version_lt"):
        r = _cmp_version(v, want)
        if r is None:
            return UNKNOWN
        return r >= 0 if op == "version_ge" else r < 0
    if op == "glob":
        if not isinstance(v, str) or not isinstance(want, str):
            return UNKNOWN
        return fnmatch.fnmatchcase(v.casefold(), want.casefold())
    return UNKNOWN


def _in_window(tw: dict, now: float) -> bool:
    t = datetime.datetime.fromtimestamp(now, ZoneInfo(tw["tz"]))
    day = _DAYS[t.weekday()]
    hm = t.strftime("%H:%M")
    f, to = tw["from"], tw["to"]
    if f <= to:
        return day in tw["days"] and f <= hm < to
    # Over midnight: the part after midnight belongs to the day before.
    if hm >= f:
        return day in tw["days"]
    prev = _DAYS[(t.weekday() - 1) % 7]
    return hm < to and prev in tw["days"]


def _value(c: dict, ctx: dict, depth: int):
    if depth > MAX_DEPTH:
        return UNKNOWN
    if "criteria" in c:
        return _group_value(c, ctx, depth + 1)
    if "not" in c:
        v = _value(c["not"], ctx, depth + 1)
        return UNKNOWN if v is UNKNOWN else not v
    now = ctx.get("now", 0)
    if "stepup" in c:
        done = (ctx.get("stepup") or {}).get(f"{c['stepup']}:{c['suffix']}")
        if not isinstance(done, dict) or not isinstance(done.get("at"), int):
            return False
        if "provider" in c and done.get("p") != c["provider"]:
            return False
        return now - done["at"] < c["max_age"]
    if "reason" in c:
        given = (ctx.get("reasons") or {}).get(c["suffix"])
        if not given:
            return False
        at, text = given
        return now - at < c["max_age"] and len(text.strip()) >= c["min_len"]
    if "time_window" in c:
        return _in_window(c["time_window"], now)
    return _claim_value(c, ctx)


def _group_value(g: dict, ctx: dict, depth: int):
    vals = [_value(c, ctx, depth) for c in g["criteria"]]
    if g["logic"] == "all":
        if any(v is False for v in vals):
            return False
        return UNKNOWN if any(v is UNKNOWN for v in vals) else True
    if any(v is True for v in vals):
        return True
    return UNKNOWN if any(v is UNKNOWN for v in vals) else False


def condition_passes(cond: dict, ctx: dict) -> bool:
    """A condition at the top: UNKNOWN is false."""
    return _group_value(cond, ctx, 0) is True


@dataclass
class Judgement:
    """An entitlement's state for a session: ``active``, ``pending`` (with
    the remedies offered) or ``inactive``; the conditions that fail."""

    state: str
    failing: list = field(default_factory=list)
    remedies: list = field(default_factory=list)
    remedy_logic: str = "any"


def judge(ent: dict, conditions: dict, ctx: dict) -> Judgement:
    if not ent["conditions"]:
        return Judgement("active")
    results = {cid: cid in conditions and condition_passes(conditions[cid], ctx) for cid in ent["conditions"]}
    ok = all(results.values()) if ent["condition_logic"] == "all" else any(results.values())
    if ok:
        return Judgement("active")
    failing = [cid for cid, r in results.items() if not r]
    remedies, logic = [], "any"
    for cid in failing:
        cond = conditions.get(cid, {})
        for r in cond.get("remedies", []):
            if r not in remedies:
                remedies.append(r)
        if ent["condition_logic"] == "all" and cond.get("remedy_logic") == "all":
            logic = "all"
    return Judgement("pending" if remedies else "inactive", failing, remedies, logic)


def next_deadline(conditions: dict, ctx: dict) -> float | None:
    """The next instant a condition can change its answer by the clock
    alone: a step-up or reason reaching its age, a time window's edge
    (the next minute), a recheck schedule."""
    now = ctx.get("now", 0)
    out = math.inf

    def walk(criteria):
        nonlocal out
        for c in criteria:
            if "criteria" in c:
                walk(c["criteria"])
            elif "not" in c:
                walk([c["not"]])
            elif "stepup" in c:
                done = (ctx.get("stepup") or {}).get(f"{c['stepup']}:{c['suffix']}")
                if isinstance(done, dict) and isinstance(done.get("at"), int) and done["at"] + c["max_age"] > now:
                    out = min(out, done["at"] + c["max_age"])
            elif "reason" in c:
                given = (ctx.get("reasons") or {}).get(c["suffix"])
                if given and given[0] + c["max_age"] > now:
                    out = min(out, given[0] + c["max_age"])
            elif "time_window" in c:
                out = min(out, (now // 60 + 1) * 60)

    for cond in conditions.values():
        walk(cond["criteria"])
        for r in cond.get("recheck", []):
            if _HHMM.match(r):
                t = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                h, m = map(int, r.split(":"))
                at = t.replace(hour=h, minute=m, second=0, microsecond=0)
                if at.timestamp() <= now:
                    at += datetime.timedelta(days=1)
                out = min(out, at.timestamp())
            else:
                step = max(60, int(parse_duration(r)))
                out = min(out, (now // step + 1) * step)
    return None if out == math.inf else out


# -- compilation ---------------------------------------------------------------------


def _prefix(net) -> tuple[int, int, int]:
    return (32 if net.version == 4 else 128), int(net.network_address), net.prefixlen


def compile_rules(entitlements: list, states: dict, resolve=None) -> list:
    """The flow-filter rules of a session: each action of each entitlement,
    one rule per (host x range). Active: the action's own verdict (alert =
    allow); pending: its allows become PENDING; inactive: its allows
    vanish; blocks always stay. Host names go through ``resolve(name)``
    (addresses, or [] when unknown); the refs are ``entitlement#n``."""
    rules = []
    for ent in entitlements:
        st = states.get(ent["id"])
        state = st.state if st is not None else "inactive"
        for a in ent["actions"]:
            verdict = ff.BLOCK if a["action"] == "block" else {
                "active": ff.ALLOW, "pending": ff.PENDING}.get(state)
            if verdict is None:
                continue
            proto = _PROTOS[a["proto"]]
            ranges = [_range(p, "", 65535) for p in a.get("ports", a.get("types", []))]
            nets = []
            for h in a["hosts"]:
                if _is_ip(h):
                    nets.append(ipaddress.ip_network(h, strict=False))
                elif resolve is not None:
                    nets += [ipaddress.ip_network(x) for x in resolve(h)]
            ref = f"{ent['id']}#{a['n']}"
            for net in nets:
                if proto == ff.ICMP and net.version != 4 or proto == ff.ICMPV6 and net.version != 6:
                    continue
                bits, addr, plen = _prefix(net)
                for lo, hi in ranges:
                    rules.append(ff.Rule(proto, bits, addr, plen, lo, hi, verdict, ref))
    return rules


def names_of(entitlements: list) -> set:
    """The host names the actions of these entitlements mention."""
    return {h.lower() for e in entitlements for a in e["actions"] for h in a["hosts"] if not _is_ip(h)}
