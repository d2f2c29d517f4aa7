"""The zero-trust admin resources of the REST API (relayd.control.api):
users, groups, the policy objects and the whole policy document,
revocations, registered devices and sessions, under ``/api/v1/admin``.

Every handler calls the same Controller and ZtStore functions as `relayd
admin user|group|entitlement|policy|revoke|device|sessions`
(relayd.cli_zerotrust), so the command line and the API cannot differ in
what they allow or what a change does: policy objects are validated by
relayd.control.policy.check, every policy write bumps the version ``pv``,
a password or authenticator change kills the sessions it backed, a kill
reaches the live flows of this relay at once.
"""

from __future__ import annotations

from relayd.config import parse_duration
from relayd.control import policy as pol
from relayd.control import totp
from relayd.control.api import JSON, Op, Request, listing, no_content, not_found, ok, parse_rfc3339, rfc3339
from relayd.control.zerotrust import TYPES, Controller
from relayd.control.ztstore import LOCAL
from relayd.core import http1
from relayd.errors import ConfigError

TOML = "application/toml"
A = "/admin"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _list(item: dict, n: int = 256) -> dict:
    return {"type": "array", "items": item, "maxItems": n}


_ID = {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]{0,63}$",
       "description": "1-64 of a-z 0-9 . _ - (starting with a letter or digit)"}
_PROVIDER = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
             "description": "local (relayd's own directory) or an OpenID Connect provider's name"}
_LOCAL_NAME = {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._@-]{0,63}$",
               "description": "1-64 of a-z 0-9 . _ @ - (lowercase), starting with a letter or digit"}
_TEXT = r"^[^\x00-\x1f\x7f-\x9f]+$"
_USERNAME = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": _TEXT,
             "description": "the user's name at its provider (1-128 characters, no control characters)"}
_GROUP = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": _TEXT,
          "description": "a group name (1-128 characters, no control characters)"}
_DEVICE = {"type": "string", "pattern": r"^[0-9a-f]{32}$", "description": "32 lowercase hex digits"}
_TIME = {"type": "string", "format": "date-time"}
_PASSWORD = {"type": "string", "minLength": 8, "maxLength": 1024}
_STRINGS = _list({"type": "string", "minLength": 1, "maxLength": 256})
_LOGIC = {"type": "string", "enum": ["all", "any"]}
_RANGES = _list({"type": ["string", "integer"]}, 64)

_CRITERIA = [
    {"title": "claim", "type": "object", "required": ["claim", "op"], "additionalProperties": False,
     "properties": {"claim": {"type": "string", "description": "user.*, device.* or system.* (dotted)"},
                    "op": {"type": "string", "enum": sorted(pol._OPS)},
                    "value": {"type": ["string", "number", "boolean", "array"]}}},
    {"title": "step-up", "type": "object", "required": ["stepup", "suffix", "max_age"], "additionalProperties": False,
     "properties": {"stepup": {"type": "string", "enum": ["otp", "password"]}, "suffix": {"type": "string"},
                    "provider": {"type": "string"}, "max_age": {"type": ["string", "integer"]}}},
    {"title": "reason", "type": "object", "required": ["reason", "suffix", "max_age"], "additionalProperties": False,
     "properties": {"reason": {"const": True}, "suffix": {"type": "string"}, "max_age": {"type": ["string", "integer"]},
                    "min_len": {"type": "integer"}}},
    {"title": "time window", "type": "object", "required": ["time_window"], "additionalProperties": False,
     "properties": {"time_window": {"type": "object", "additionalProperties": False, "required": ["from", "to"],
                                    "properties": {"days": _list({"type": "string"}, 7), "from": {"type": "string"},
                                                   "to": {"type": "string"}, "tz": {"type": "string"}}}}},
    {"title": "group", "type": "object", "required": ["logic"], "additionalProperties": False,
     "properties": {"logic": _LOGIC, "criteria": _list(_ref("Criterion"), 32)}},
    {"title": "not", "type": "object", "required": ["not"], "additionalProperties": False,
     "properties": {"not": _ref("Criterion")}},
]

SCHEMAS = {
    "User": {"type": "object", "additionalProperties": False,
             "required": ["provider", "username", "groups", "totp", "disabled", "created_at"],
             "properties": {"provider": {"type": "string"}, "username": {"type": "string"},
                            "email": {"type": ["string", "null"]}, "groups": _list({"type": "string"}, 100000),
                            "provider_groups": _list({"type": "string"}),
                            "totp": {"type": "boolean", "description": "whether sign-in needs a one-time code"},
                            "disabled": {"type": "boolean"}, "created_at": _TIME,
                            "totp_secret": {"type": "string", "description": "only when it was just made: "
                                                                             "shown once"},
                            "totp_uri": {"type": "string", "description": "otpauth:// URI of totp_secret"}}},
    "NewUser": {"type": "object", "additionalProperties": False, "required": ["username", "password"],
                "properties": {"username": _LOCAL_NAME, "password": _PASSWORD, "groups": _list(_GROUP),
                               "email": {"type": "string", "minLength": 3, "maxLength": 254, "pattern": _TEXT},
                               "totp": {"type": "boolean", "description": "require a one-time code at sign-in: "
                                                                         "the answer holds the new secret"}}},
    "UserPatch": {"type": "object", "additionalProperties": False, "minProperties": 1,
                  "properties": {"groups": {**_list(_GROUP), "description": "the user's groups, all of them"},
                                 "disabled": {"type": "boolean", "description": "true: sign-in refused and the "
                                                                               "user's sessions killed"},
                                 "password": {**_PASSWORD, "description": "a new password (relayd's own users); "
                                                                          "kills the user's sessions"},
                                 "totp": {"type": "string", "enum": ["off", "reset"],
                                          "description": "remove the authenticator, or make a new secret; kills "
                                                         "the user's sessions"}}},
    "Group": {"type": "object", "additionalProperties": False, "required": ["name", "members"],
              "properties": {"name": {"type": "string"}, "members": _list({
                  "type": "object", "additionalProperties": False, "required": ["provider", "username"],
                  "properties": {"provider": {"type": "string"}, "username": {"type": "string"}}}, 100000)}},
    "Site": {"type": "object", "additionalProperties": False, "required": ["id"],
             "properties": {"id": _ID, "name": {"type": "string"}, "networks": _STRINGS,
                            "gateways": _list({"type": "string"}, 16)}},
    "Criterion": {"oneOf": _CRITERIA, "description": "a claim test, a step-up, a reason, a time window, a group "
                                                     "of criteria or a negation (docs/zero-trust.md)"},
    "Remedy": {"type": "object", "additionalProperties": False, "required": ["type"],
               "properties": {"type": {"type": "string", "enum": sorted(pol._REMEDIES)},
                              "message": {"type": "string"}, "kind": {"type": "string", "enum": ["info", "fix"]},
                              "suffix": {"type": "string"}, "provider": {"type": "string"}}},
    "Condition": {"type": "object", "additionalProperties": False, "required": ["id"],
                  "properties": {"id": _ID, "logic": _LOGIC, "criteria": _list(_ref("Criterion"), 32),
                                 "recheck": _list({"type": "string"}, 8), "remedy_logic": _LOGIC,
                                 "remedies": _list(_ref("Remedy"))}},
    "Action": {"type": "object", "additionalProperties": False, "required": ["action", "proto", "hosts"],
               "properties": {"action": {"type": "string", "enum": sorted(pol._ACTIONS)},
                              "proto": {"type": "string", "enum": sorted(pol._PROTOS)},
                              "hosts": _list({"type": "string"}, pol.MAX_HOSTS), "ports": _RANGES,
                              "types": _RANGES, "n": {"type": "integer", "readOnly": True}}},
    "Entitlement": {"type": "object", "additionalProperties": False, "required": ["id", "site", "actions"],
                    "properties": {"id": _ID, "site": _ID, "condition_logic": _LOGIC, "conditions": _list(_ID),
                                   "tags": _list(_ID), "disabled": {"type": "boolean"},
                                   "actions": _list(_ref("Action"), pol.MAX_ACTIONS),
                                   "rev": {"type": "integer", "readOnly": True,
                                           "description": "how many times it was written"}}},
    "AccessPolicy": {"type": "object", "additionalProperties": False, "required": ["id"],
                     "properties": {"id": _ID, "match": {"type": "object", "additionalProperties": False,
                                                         "properties": {"logic": _LOGIC,
                                                                        "criteria": _list(_ref("Criterion"), 32)}},
                                    "entitlements": _list(_ID), "entitlement_tags": _list(_ID),
                                    "stop": {"type": "boolean"}}},
    "PolicyDocument": {"type": "object", "additionalProperties": False,
                       "properties": {"sites": _list(_ref("Site"), 100000),
                                      "conditions": _list(_ref("Condition"), 100000),
                                      "entitlements": _list(_ref("Entitlement"), 100000),
                                      "policies": _list(_ref("AccessPolicy"), 100000)}},
    "Version": {"type": "object", "additionalProperties": False, "required": ["pv"],
                "properties": {"pv": {"type": "integer", "description": "the policy's version after the change"}}},
    "Selector": {"type": "object", "additionalProperties": False, "minProperties": 1,
                 "description": "typed, never a DN substring: all, or some of the others (all must match)",
                 "properties": {"all": {"const": True}, "user": {
                     "type": "array", "prefixItems": [_PROVIDER, _USERNAME], "items": False, "minItems": 2,
                     "description": "[provider, username]"},
                     **{k: {"type": "string", "minLength": 1, "maxLength": 128} for k in
                        ("sid", "jti", "device", "provider", "site")}}},
    "RevocationRequest": {
        "type": "object", "additionalProperties": False, "required": ["op", "selector"],
        "properties": {"op": {"type": "string", "enum": ["kill", "lock", "renew", "reevaluate"]},
                       "selector": _ref("Selector"),
                       "types": {"type": "array", "items": {"type": "string", "enum": list(TYPES)}, "minItems": 1,
                                 "maxItems": 2, "description": "token types (kill, lock, renew)"},
                       "delay": {"type": ["string", "integer"], "description": "renew: when the old tokens stop "
                                                                                "working, such as 5m (default)"},
                       "until": {**_TIME, "description": "lock: when it ends (default: never)"},
                       "reason": {"type": "string", "maxLength": 512}}},
    "Revocation": {"type": "object", "additionalProperties": False,
                   "required": ["seq", "op", "selector", "types", "issued_before", "effective_at", "expires_at",
                                "reason", "actor"],
                   "properties": {"seq": {"type": "integer"}, "op": {"type": "string"}, "selector": {"type": "object"},
                                  "types": _list({"type": "string"}, 2), "issued_before": _TIME,
                                  "effective_at": _TIME, "expires_at": _TIME, "reason": {"type": "string"},
                                  "actor": {"type": "string"}}},
    "Device": {"type": "object", "additionalProperties": False,
               "required": ["device_id", "provider", "username", "hostname", "first_seen", "last_seen"],
               "properties": {"device_id": {"type": "string"}, "provider": {"type": "string"},
                              "username": {"type": "string"}, "hostname": {"type": ["string", "null"]},
                              "first_seen": _TIME, "last_seen": _TIME}},
    "Session": {"type": "object", "additionalProperties": False,
                "required": ["sid", "provider", "username", "device_id", "created_at", "expires_at", "methods"],
                "properties": {"sid": {"type": "string"}, "provider": {"type": "string"},
                               "username": {"type": "string"}, "device_id": {"type": "string"},
                               "created_at": _TIME, "expires_at": _TIME,
                               "methods": _list({"type": "string"}, 8), "login_ip": {"type": "string"}}},
}

#: The policy kinds: their route name, their schema and what one is called.
KINDS = {"sites": ("Site", "site"), "conditions": ("Condition", "condition"),
         "entitlements": ("Entitlement", "entitlement"), "policies": ("AccessPolicy", "policy")}


def _items(schema: dict, pv: bool = False) -> dict:
    return listing(schema, **({"pv": {"type": "integer"}} if pv else {}))


def _written(name: str) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["pv", "item"],
            "properties": {"pv": {"type": "integer"}, "item": _ref(name)}}


def _user(u: dict) -> dict:
    return {"provider": u["provider"], "username": u["username"], "email": u.get("email"), "groups": u["groups"],
            "provider_groups": list((u.get("attrs") or {}).get("groups", [])),
            "totp": bool(u.get("totp", u.get("totp_secret"))), "disabled": u.get("disabled_at") is not None,
            "created_at": rfc3339(u["created_at"])}


def _revocation(e: dict) -> dict:
    return dict(e, issued_before=rfc3339(e["issued_before"]), effective_at=rfc3339(e["effective_at"]),
                expires_at=rfc3339(e["expires_at"]))


class ZtResources:
    """The handlers, over one Controller (the relay's own: a kill it makes
    reaches this relay's sessions at once)."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.zs = ctl.zs

    # -- users -------------------------------------------------------------------------

    def _get_user(self, req: Request) -> dict:
        u = self.zs.get_user(req.params["provider"], req.params["username"])
        if u is None:
            raise not_found("user")
        return u

    def list_users(self, req: Request):
        return ok({"items": [_user(u) for u in self.zs.list_users()]})

    def create_user(self, req: Request):
        b = req.body
        req.target = f"{LOCAL}/{b['username']}"
        secret = self.ctl.add_user(b["username"], b["password"], groups=b.get("groups", []), email=b.get("email"),
                                   with_totp=b.get("totp", False))
        out = _user(self.zs.get_user(LOCAL, b["username"]))
        if secret:
            out.update(totp_secret=secret, totp_uri=totp.provisioning_uri(secret, b["username"]))
        return ok(out, 201, ((b"Location", f"/api/v1/admin/users/{LOCAL}/{b['username']}".encode()),))

    def get_user(self, req: Request):
        return ok(_user(self._get_user(req)))

    def patch_user(self, req: Request):
        u = self._get_user(req)
        b, provider, name = req.body, u["provider"], u["username"]
        if ("password" in b or "totp" in b) and provider != LOCAL:
            raise ConfigError("password and totp are for users of relayd's own directory (provider local)")
        if "groups" in b:
            have, want = set(u["groups"]), set(b["groups"])
            self.zs.set_groups(provider, name, add=sorted(want - have), remove=sorted(have - want))
        secret = None
        if "password" in b:
            self.ctl.reset_user(name, password=b["password"], actor=req.actor)
        if "totp" in b:
            secret = self.ctl.reset_user(name, totp_off=b["totp"] == "off", actor=req.actor)
        if "disabled" in b:
            self.ctl.set_disabled(provider, name, b["disabled"], actor=req.actor)
        out = _user(self.zs.get_user(provider, name) or u)
        if secret:
            out.update(totp_secret=secret, totp_uri=totp.provisioning_uri(secret, name))
        return ok(out)

    def delete_user(self, req: Request):
        if not self.ctl.remove_user(req.params["provider"], req.params["username"], actor=req.actor):
            raise not_found("user")
        return no_content()

    # -- groups ---------------------------------------------------------------------------

    def list_groups(self, req: Request):
        return ok({"items": [self._group(g, m) for g, m in self.zs.list_groups().items()]})

    @staticmethod
    def _group(name: str, members) -> dict:
        return {"name": name, "members": [{"provider": p, "username": u} for p, u in members]}

    def get_group(self, req: Request):
        members = self.zs.list_groups().get(req.params["group"])
        if not members:
            raise not_found("group (a group exists while it has members)")
        return ok(self._group(req.params["group"], members))

    def _membership(self, req: Request, add: bool):
        p = req.params
        if self.zs.get_user(p["provider"], p["username"]) is None:
            raise not_found("user")
        self.zs.set_groups(p["provider"], p["username"], add=[p["group"]] if add else (),
                           remove=() if add else [p["group"]])
        return no_content()

    def add_member(self, req: Request):
        return self._membership(req, True)

    def remove_member(self, req: Request):
        return self._membership(req, False)

    # -- policy objects -----------------------------------------------------------------------

    def _kind_ops(self, kind: str) -> list[Op]:
        schema, one = KINDS[kind]
        ref = _ref(schema)
        tag = "policy"

        def list_(req):
            p = self.zs.policy()
            return ok({"pv": p.pv, "items": [p.table(kind)[i] for i in sorted(p.table(kind))]})

        def get(req):
            obj = self.zs.policy().table(kind).get(req.params["id"])
            if obj is None:
                raise not_found(one)
            return ok(obj)

        def create(req):
            req.target = f"{kind}/{req.body.get('id')}"
            obj, pv = self.zs.put_policy(kind, req.body, create=True)
            return ok({"pv": pv, "item": obj}, 201, ((b"Location", f"/api/v1/admin/{kind}/{obj['id']}".encode()),))

        def put(req):
            doc = dict(req.body)
            if doc.setdefault("id", req.params["id"]) != req.params["id"]:
                raise ConfigError(f"{kind}: the body's id is not the path's")
            obj, pv = self.zs.put_policy(kind, doc)
            return ok({"pv": pv, "item": obj})

        def delete(req):
            pv = self.zs.delete_policy(kind, req.params["id"])
            if pv is None:
                raise not_found(one)
            return ok({"pv": pv})

        path, item = f"{A}/{kind}", f"{A}/{kind}/{{id}}"
        ids = {"id": _ID}
        return [
            Op("GET", path, list_, f"list_{kind}", f"List the {kind}", tag,
               responses={200: (f"The {kind} and the policy's version", _items(ref, True), (JSON,))}),
            Op("POST", path, create, f"create_{one}", f"Add a {one} (409 if its id is taken)", tag, body=ref,
               own_check=True, write=True, errors=(409,),
               responses={201: ("Added: its normal form and the new policy version", _written(schema), (JSON,))}),
            Op("GET", item, get, f"get_{one}", f"A {one} in its normal form", tag, params=ids,
               responses={200: (f"The {one}", ref, (JSON,))}),
            Op("PUT", item, put, f"put_{one}", f"Add or replace a {one}", tag, params=ids, body=ref,
               own_check=True, write=True, errors=(409,),
               responses={200: ("Saved: its normal form and the new policy version", _written(schema), (JSON,))}),
            Op("DELETE", item, delete, f"delete_{one}", f"Remove a {one} (409 while something refers to it)", tag,
               params=ids, write=True, errors=(409,),
               responses={200: ("Removed: the new policy version", _ref("Version"), (JSON,))}),
        ]

    def export_policy(self, req: Request):
        p = self.zs.policy()
        pv = ((b"Relayd-Policy-Version", str(p.pv).encode()),)
        if TOML in req.accept and JSON not in req.accept:
            return http1.Reply(200, pol.to_toml(p.to_doc()).encode(), TOML.encode(), pv)
        return ok(p.to_doc(), headers=pv)

    def import_policy(self, req: Request):
        req.target = "policy"
        return ok({"pv": self.zs.import_policy(pol.Policy.from_doc(req.body))})

    # -- revocations, devices, sessions ----------------------------------------------------------

    def revoke(self, req: Request):
        b = req.body
        op = b["op"]
        if "delay" in b and op != "renew":
            raise ConfigError("delay is for renew")
        if "until" in b and op != "lock":
            raise ConfigError("until is for lock")
        req.target = op
        entries = self.ctl.revoke(op, b["selector"], types=b.get("types", TYPES),
                                  delay=parse_duration(b.get("delay", "5m"), "delay"),
                                  until=parse_rfc3339(b["until"], "until") if "until" in b else None,
                                  reason=b.get("reason", ""), actor=req.actor)
        return ok({"entries": [_revocation(e) for e in entries]}, 201)

    def list_revocations(self, req: Request):
        return ok({"items": [_revocation(e) for e in self.zs.revocations(req.query.get("since", 0))]})

    def list_devices(self, req: Request):
        return ok({"items": [dict(d, first_seen=rfc3339(d["first_seen"]), last_seen=rfc3339(d["last_seen"]))
                             for d in self.zs.list_devices()]})

    def delete_device(self, req: Request):
        if not self.ctl.remove_device(req.params["device_id"], actor=req.actor):
            raise not_found("device")
        return no_content()

    def list_sessions(self, req: Request):
        out = []
        for s in self.zs.list_sessions():
            x = {"sid": s["sid"], "provider": s["provider"], "username": s["username"], "device_id": s["device_id"],
                 "created_at": rfc3339(s["created_at"]), "expires_at": rfc3339(s["expires_at"]),
                 "methods": list(s["auth"].get("methods", []))}
            if isinstance(s["auth"].get("login_ip"), str):
                x["login_ip"] = s["auth"]["login_ip"]
            out.append(x)
        return ok({"items": out})

    # -- the table ---------------------------------------------------------------------------------

    def ops(self) -> list[Op]:
        user = {"provider": _PROVIDER, "username": _USERNAME}
        member = {"group": _GROUP, **user}
        ok_user = {200: ("The user", _ref("User"), (JSON,))}
        out = [
            Op("GET", f"{A}/users", self.list_users, "list_users", "List the users", "users",
               responses={200: ("Users of every provider", _items(_ref("User")), (JSON,))}),
            Op("POST", f"{A}/users", self.create_user, "create_user", "Add a user to relayd's own directory", "users",
               body=_ref("NewUser"), write=True, errors=(409,),
               responses={201: ("Added (with the authenticator secret if asked: shown once)", _ref("User"), (JSON,))}),
            Op("GET", f"{A}/users/{{provider}}/{{username}}", self.get_user, "get_user", "A user", "users",
               params=user, responses=ok_user),
            Op("PATCH", f"{A}/users/{{provider}}/{{username}}", self.patch_user, "patch_user",
               "Change a user's groups, disable or enable them, reset their password or authenticator", "users",
               params=user, body=_ref("UserPatch"), body_types=(JSON, "application/merge-patch+json"), write=True,
               responses={200: ("The user as changed (a new authenticator secret: shown once)", _ref("User"),
                                (JSON,))}),
            Op("DELETE", f"{A}/users/{{provider}}/{{username}}", self.delete_user, "delete_user",
               "Remove a user and kill their sessions", "users", params=user, write=True,
               responses={204: ("Removed", None, ())}),
            Op("GET", f"{A}/groups", self.list_groups, "list_groups", "Groups of relayd's directory and their members",
               "users", responses={200: ("The groups", _items(_ref("Group")), (JSON,))}),
            Op("GET", f"{A}/groups/{{group}}", self.get_group, "get_group", "A group's members", "users",
               params={"group": _GROUP}, responses={200: ("The group", _ref("Group"), (JSON,))}),
            Op("PUT", f"{A}/groups/{{group}}/members/{{provider}}/{{username}}", self.add_member, "add_member",
               "Put a user in a group (effective at their next renewal)", "users", params=member, write=True,
               responses={204: ("The user is a member", None, ())}, errors=(422,),
               description="422: a group name the directory refuses (unprintable characters)."),
            Op("DELETE", f"{A}/groups/{{group}}/members/{{provider}}/{{username}}", self.remove_member,
               "remove_member", "Take a user out of a group (effective at their next renewal)", "users",
               params=member, write=True, responses={204: ("The user is not a member", None, ())}, errors=(422,)),
        ]
        for kind in KINDS:
            out += self._kind_ops(kind)
        out += [
            Op("GET", f"{A}/policy", self.export_policy, "export_policy",
               "The whole policy as one document (JSON, or TOML with Accept: application/toml)", "policy",
               responses={200: ("The document; Relayd-Policy-Version: its version", _ref("PolicyDocument"),
                                (JSON, TOML))}),
            Op("PUT", f"{A}/policy", self.import_policy, "import_policy", "Replace the whole policy (JSON or TOML)",
               "policy", body=_ref("PolicyDocument"), body_types=(JSON, TOML), own_check=True, write=True,
               responses={200: ("Imported: the new policy version", _ref("Version"), (JSON,))}),
            Op("POST", f"{A}/revocations", self.revoke, "revoke",
               "Kill, lock, renew or re-evaluate the sessions and tokens a selector names", "revocations",
               body=_ref("RevocationRequest"), write=True,
               responses={201: ("The entries appended (a kill reaches this relay's live flows at once)", {
                   "type": "object", "additionalProperties": False, "required": ["entries"],
                   "properties": {"entries": _list(_ref("Revocation"), 2)}}, (JSON,))}),
            Op("GET", f"{A}/revocations", self.list_revocations, "list_revocations",
               "Revocation entries still in force", "revocations",
               query={"since": {"type": "integer", "minimum": 0, "maximum": 2 ** 62,
                                "description": "only entries after this seq"}},
               responses={200: ("The entries, in order", _items(_ref("Revocation")), (JSON,))}),
            Op("GET", f"{A}/devices", self.list_devices, "list_devices", "Registered user devices", "devices",
               responses={200: ("The devices", _items(_ref("Device")), (JSON,))}),
            Op("DELETE", f"{A}/devices/{{device_id}}", self.delete_device, "delete_device",
               "Drop a device's registration and kill its tokens", "devices", params={"device_id": _DEVICE},
               write=True, responses={204: ("Removed", None, ())}),
            Op("GET", f"{A}/sessions", self.list_sessions, "list_sessions", "Live zero-trust sessions", "sessions",
               responses={200: ("The sessions", _items(_ref("Session")), (JSON,))}),
        ]
        return out
