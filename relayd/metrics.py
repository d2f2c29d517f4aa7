"""Prometheus metrics. Names follow Azure Relay's metrics where one exists
(listener = agent link, sender = public client), plus latency histograms.
Labels are bounded by the relay's config and fixed sets of results and
reasons, never by its population: no label names an agent, a device, a user,
an address, a path a client chose or a token, so a relay with 10,000 devices
has the same series as one with ten (tests/ops/test_cardinality.py). What
each agent did is in its store row (``relayd admin agents``, the admin API)."""

from __future__ import annotations

import asyncio
from typing import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from relayd.core import http1

LISTENER_CONNECTIONS = Counter(
    "relayd_listener_connections_total", "Agent link attempts, by result", ["result"])
ACTIVE_LISTENERS = Gauge("relayd_active_listeners", "Agents connected now")
ENDPOINT_AGENTS = Gauge("relayd_endpoint_agents", "Agents connected now that serve the endpoint (0: nobody "
                        "serves it)", ["endpoint"])
DEVICES_ONLINE = Gauge("relayd_devices_online", "Devices (agents with a device record) connected to this relay now")
SENDER_CONNECTIONS = Counter(
    "relayd_sender_connections_total", "Public connections, by endpoint and result", ["endpoint", "result"])
ACTIVE_CONNECTIONS = Gauge("relayd_active_connections", "Public connections open now", ["endpoint"])
STREAMS_OPENED = Counter("relayd_streams_opened_total", "Streams opened to agents", ["endpoint"])
STREAMS_FAILED = Counter("relayd_streams_failed_total", "Streams that could not be opened", ["endpoint", "reason"])
STREAMS_ACTIVE = Gauge("relayd_streams_active", "Streams open now", ["endpoint"])
BYTES = Counter("relayd_bytes_total", "Bytes carried, counted as they flow", ["endpoint", "direction"])
ENROLLMENTS = Counter("relayd_enrollments_total", "Agent enrollments and renewals, by result", ["kind", "result"])
STREAM_OPEN_SECONDS = Histogram(
    "relayd_stream_open_seconds", "Public accept to agent ACK",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PROTOCOL_ERRORS = Counter("relayd_protocol_errors_total", "Links ended by a peer's protocol error", ["kind"])
AGENT_RECONNECTS = Counter("relayd_agent_reconnects_total", "Agent-side reconnect attempts")
BAD_INPUT = Counter("relayd_bad_input_total",
                    "Connections and requests refused: bad input, failed TLS handshakes, timeouts, caps",
                    ["where", "kind"])
UNAUTHENTICATED = Gauge("relayd_unauthenticated_connections",
                        "Connections on the TLS listeners that have not finished their handshake and first request")
RESOURCE_EXHAUSTED = Counter("relayd_resource_exhausted_total",
                             "Times a listener ran out of a resource (file descriptors) and paused", ["listener", "resource"])
# Certificate expiry (docs/operations.md): the relay's own certificates by role
# (ca, server, user_ca, https with the certificate's name), and the earliest
# expiry among connected agents' current certificates (kind agent or device).
CERT_EXPIRY = Gauge("relayd_certificate_expiry_timestamp_seconds",
                    "When one of the relay's own certificates expires (Unix time)", ["cert", "name"])
AGENT_CERT_EXPIRY = Gauge("relayd_agent_certificate_expiry_earliest_timestamp_seconds",
                          "The earliest expiry (Unix time) among the current certificates of the connected agents "
                          "of this relay's store, renewals included", ["kind"])
INTERNAL_ERRORS = Counter("relayd_internal_errors_total",
                          "Exceptions caught at a boundary that must not raise (a relayd bug; the offending "
                          "stream or connection was closed, the rest went on)", ["where"])
#: Every place relayd.log.caught is called from (tests/ops/test_cardinality.py
#: keeps the list whole): each has its series from the start, at 0, so that an
#: alert on its increase has data before the first bug.
CAUGHT_AT = ("api", "device_proxy", "est", "event_handler", "http_gate", "http_local", "http_request",
             "http_response", "mux_event", "mux_meter", "mux_resume", "mux_sink_reset", "packet_link", "zt_poll")
for _where in CAUGHT_AT:
    INTERNAL_ERRORS.labels(_where)


async def serve_metrics(sock, health: Callable[[], tuple[bool, dict]] | None = None) -> asyncio.AbstractServer:
    """A minimal HTTP/1.1 endpoint for ``GET /metrics`` on a bound socket,
    and ``GET /healthz`` when ``health`` is given: 200 or 503 with its JSON
    (the answer comes from the node's own event loop, so a wedged loop fails
    it too)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), http1.LIMITS.head_timeout)
            try:
                head = http1.parse_request_head(raw)
            except http1.HeadError as exc:
                writer.write(http1.response(exc.status, str(exc).encode() + b"\n"))
            else:
                if head.method == b"GET" and head.path == b"/metrics":
                    writer.write(http1.response(200, generate_latest(), CONTENT_TYPE_LATEST.encode()))
                elif head.method == b"GET" and head.path == b"/healthz" and health is not None:
                    ok, detail = health()
                    writer.write(http1.response(200 if ok else 503, orjson.dumps(detail) + b"\n", b"application/json"))
                else:
                    writer.write(http1.response(404, b"not found\n"))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, sock=sock, limit=http1.LIMITS.max_head)
HTTP_RESPONSES = Counter("relayd_http_error_responses_total", "Error responses the HTTP ingress made itself",
                         ["status"])
HTTP_RETRIES = Counter("relayd_http_retries_total",
                       "Requests sent again on a fresh stream because a kept-alive service connection closed under them")

# Hybrid connections: the names mirror Azure Relay's metrics (docs/hybrid.md);
# labels carry the hybrid connection's path and status codes, never a token,
# an id or payload.
HC_LISTENER_REQUESTS = Counter("relayd_hc_listener_connections_requests_total", "Listen attempts", ["entity"])
HC_LISTENER_SUCCESS = Counter("relayd_hc_listener_connections_success_total", "Listen handshakes accepted",
                              ["entity"])
HC_LISTENER_CLIENT_ERRORS = Counter("relayd_hc_listener_connections_client_error_total",
                                    "Listen attempts refused for the client's fault (4xx)", ["entity", "code"])
HC_LISTENER_SERVER_ERRORS = Counter("relayd_hc_listener_connections_server_error_total",
                                    "Listen attempts failed for the relay's fault (5xx)", ["entity", "code"])
HC_LISTENER_DISCONNECTS = Counter("relayd_hc_listener_disconnects_total", "Control channels ended",
                                  ["entity", "code"])
HC_ACTIVE_LISTENERS = Gauge("relayd_hc_active_listeners", "Open control channels", ["entity"])
HC_SENDER_REQUESTS = Counter("relayd_hc_sender_connections_requests_total", "Sender attempts", ["entity", "mode"])
HC_SENDER_SUCCESS = Counter("relayd_hc_sender_connections_success_total",
                            "Sender connections joined to a listener", ["entity", "mode"])
HC_SENDER_CLIENT_ERRORS = Counter("relayd_hc_sender_connections_client_error_total",
                                  "Sender attempts refused (4xx: the sender's fault, or the listener's refusal)",
                                  ["entity", "mode", "code"])
HC_SENDER_SERVER_ERRORS = Counter("relayd_hc_sender_connections_server_error_total",
                                  "Sender attempts failed (5xx: no listener, timeouts, the relay's fault)",
                                  ["entity", "mode", "code"])
HC_SENDER_DISCONNECTS = Counter("relayd_hc_sender_disconnects_total", "Sender WebSocket connections ended",
                                ["entity", "code"])


def hc_listener_error(entity: str, status: int) -> None:
    (HC_LISTENER_SERVER_ERRORS if status >= 500 else HC_LISTENER_CLIENT_ERRORS).labels(entity, str(status)).inc()


def hc_sender_error(entity: str, mode: str, status: int) -> None:
    (HC_SENDER_SERVER_ERRORS if status >= 500 else HC_SENDER_CLIENT_ERRORS).labels(entity, mode, str(status)).inc()
HC_ACTIVE_CONNECTIONS = Gauge("relayd_hc_active_connections", "Open sender-listener connections", ["entity"])
HC_BYTES = Counter("relayd_hc_bytes_transferred_total", "Payload bytes relayed", ["entity", "direction"])
HC_ACCEPT_SECONDS = Histogram("relayd_hc_accept_seconds", "From a sender's connect to the listener's accept",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
HC_RESPONSE_SECONDS = Histogram("relayd_hc_http_response_seconds",
                                "From an HTTP-mode request's dispatch to its response head",
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
HC_REFUSALS = Counter("relayd_hc_refusals_total", "Hybrid-connection handshakes refused, by kind",
                      ["kind", "code"])

# Zero-trust access (docs/zero-trust.md): labels are reasons, verdicts and
# sites, never a user, a token or an address.
ZT_TOKEN_REJECTIONS = Counter("relayd_token_rejections_total", "Zero-trust tokens or certificates refused",
                              ["reason"])
ZT_LOGINS = Counter("relayd_zt_logins_total", "Sign-ins", ["provider", "result"])
ZT_RENEWALS = Counter("relayd_zt_renewals_total", "Session renewals", ["result"])
ZT_STEPUPS = Counter("relayd_zt_stepups_total", "Step-ups verified by the controller", ["method", "result"])
ZT_DECISIONS = Counter("relayd_zt_flow_decisions_total", "Flow decisions at the gateway", ["site", "verdict"])
ZT_SESSIONS = Gauge("relayd_zt_sessions", "Live user sessions at the gateway", ["site"])
ZT_FLOWS_CUT = Counter("relayd_zt_flows_cut_total", "Live flows cut by a revocation or a re-evaluation",
                       ["site", "why"])
ZT_REVOCATIONS = Counter("relayd_zt_revocations_applied_total", "Revocation entries a gateway applied", ["op"])
ZT_PACKETS = Counter("relayd_zt_packets_total", "TUN-mode packets at the gateway: passed, or dropped and why",
                     ["site", "direction", "result"])
ZT_FLOW_OPEN_SECONDS = Histogram("relayd_zt_flow_open_seconds", "From a flow's request to the agent's dial",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

# The REST API (/api/v1, relayd.control.api): labels are the route's template,
# the method and the status; never an id, a key or a body.
API_REQUESTS = Counter("relayd_api_requests_total", "Requests to the relay's REST API, by route template, method "
                       "and status", ["route", "method", "status"])

# The web console (relayd.control.console): pages by name (a fixed set, "-"
# for any other path), sessions, sign-ins and refusals by result and reason.
CONSOLE_REQUESTS = Counter("relayd_console_requests_total", "Requests for the web console's pages and files, by "
                           "page and status", ["page", "status"])
CONSOLE_SESSIONS = Gauge("relayd_console_sessions", "Web console sessions open now")
CONSOLE_SIGNINS = Counter("relayd_console_signins_total", "Web console sign-ins, by result", ["result"])
CONSOLE_AUTH_REFUSALS = Counter("relayd_console_auth_refusals_total", "Requests with a console session refused, by "
                                "reason", ["reason"])

# The device gateway and notifications (relayd.control.devicegw, relayd.control.webhooks).
DEVICE_TOKENS = Counter("relayd_device_tokens_issued_total", "Device tokens pushed to devices", ["when"])
DEVICE_API_REFUSALS = Counter("relayd_device_api_refusals_total", "Device gateway calls refused, by reason",
                              ["reason"])
DEVICE_PROXY_TOKENS = Counter("relayd_device_proxy_tokens_issued_total",
                              "Proxy tokens issued (POST /api/v1/token), for all of a user's devices or one", ["scope"])
DEVICE_PROXY_REQUESTS = Counter("relayd_device_proxy_requests_total",
                                "Device proxy requests: admitted, or refused and failed by reason", ["result"])
OTPS_ISSUED = Counter("relayd_otps_issued_total", "Provisioning OTPs issued, by way in (api, prov-admin, cli)",
                      ["via"])
EST_REQUESTS = Counter("relayd_est_requests_total", "EST requests answered, by operation and status",
                       ["op", "status"])
DEVICE_NOTIFICATIONS = Counter("relayd_device_notifications_total", "Device notifications accepted, by way in",
                               ["via"])
WEBHOOK_DELIVERIES = Counter("relayd_webhook_deliveries_total", "Webhook delivery attempts, by result", ["result"])
WEBHOOK_PENDING = Gauge("relayd_webhook_pending", "Webhook deliveries waiting or in flight")
# the device registry, users and claim codes (relayd.control.devices)
USER_AUTH_REFUSALS = Counter("relayd_user_auth_refusals_total", "Device API user tokens refused, by reason",
                             ["reason"])
DEVICE_CLAIMS = Counter("relayd_device_claims_total", "Claim attempts, by result", ["result"])
CLAIM_CODES = Counter("relayd_claim_codes_total", "Claim codes pushed to devices and acknowledged", ["event"])
DEVICE_EVENTS = Counter("relayd_device_events_total", "Device events published by this node, by type", ["type"])
EVENT_BUS_ERRORS = Counter("relayd_event_bus_errors_total", "Event bus failures (Redis unreachable...), by operation",
                           ["op"])
ACME_ORDERS = Counter("relayd_acme_orders_total", "ACME certificate orders, by result: valid, refused (the CA's "
                      "problem document) or error (unreachable, timeout, unreadable answer)", ["result"])
ACME_ERRORS = Counter("relayd_acme_errors_total", "Failed ACME orders by kind: the problem type's short name "
                      "(rateLimited, unauthorized, connection ...) or network, timeout, bad_response", ["kind"])
ACME_CHALLENGES = Counter("relayd_acme_challenge_requests_total", "ACME validation requests the relay answered "
                          "(served) or had no challenge for (unknown)", ["challenge", "result"])

# Series of closed label sets exist from the start, at 0, so that rates and
# the alert rules' ratios (configs/prometheus) read 0 rather than nothing
# before the first event (Prometheus' advice: avoid missing metrics).
for _result in ("success", "refused", "error"):
    LISTENER_CONNECTIONS.labels(_result)
for _result in ("delivered", "failed", "gave_up", "dropped", "not_visible"):
    WEBHOOK_DELIVERIES.labels(_result)
