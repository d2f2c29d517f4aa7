"""The route table's own guarantees, in-process: what the schemathesis run
(test_schemathesis.py) found, each kept as a regression assertion."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate as validate_openapi

from relayd.control.api import Api, Op


def _op(**kw) -> Op:
    return Op("GET", "/x", lambda req: None, "x", "x", "t", **kw)


def test_every_error_status_a_route_gives_is_documented():
    # A route with 412 (claim a device that is offline) once made
    # GET /openapi.json answer 500: the generator had no text for 412.
    api = Api(lambda k: False, "t")
    api.add([_op(errors=(409, 412, 429))])
    doc = api.openapi()
    validate_openapi(doc)
    assert {"409", "412", "429"} <= set(doc["paths"]["/api/v1/x"]["get"]["responses"])
    # A status without a description is refused when the route is added, at start.
    with pytest.raises(ValueError, match="418"):
        Api(lambda k: False, "t").add([_op(errors=(418,))])


def test_a_schema_name_means_one_schema():
    # The user API's "User" and "Device" (a profile, an edge device) once
    # replaced the admin API's (a directory user, a user's device): GET
    # /admin/users answered items the document said were profiles.
    api = Api(lambda k: False, "t")
    api.add([], {"User": {"type": "object"}})
    api.add([], {"User": {"type": "object"}})  # the same schema again: fine
    with pytest.raises(ValueError, match="'User' given twice"):
        api.add([], {"User": {"type": "object", "required": ["id"]}})


def test_the_relays_modules_name_their_schemas_apart():
    from relayd.control import admin, deviceproxy, devicegw, devices, provisioning, webhooks, ztapi

    api = Api(lambda k: False, "t")
    for module in (ztapi, devices, devicegw, webhooks, provisioning, deviceproxy, admin):
        api.add([], module.SCHEMAS)
    assert api.schemas["User"] is ztapi.SCHEMAS["User"] and api.schemas["Device"] is ztapi.SCHEMAS["Device"]


def test_the_front_doors_refusal_is_documented():
    # GET /api/v1/devices/a%2Fb is refused by the HTTPS front door before
    # the API (an encoded slash): 400 as text/plain, which the document
    # once did not allow (schemathesis: undocumented Content-Type).
    api = Api(lambda k: False, "t")
    api.add([_op()])
    content = api.openapi()["paths"]["/api/v1/x"]["get"]["responses"]["400"]["content"]
    assert set(content) == {"application/json", "text/plain"}
