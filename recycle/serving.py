"""An HTTP endpoint on Ray Serve (batch prediction over a cluster: :mod:`recycle.batch`).

Serving (:func:`serve`, ``recycle serve NAME [NAME ...]``) is one Ray Serve deployment
(``--replicas`` copies, CPUs/GPUs per replica) holding a Predictor per composition, with a
JSON API:

- ``POST /v1/score`` ``{"composition", "prompt", "choices": [...], "task"?, "explain"?}`` →
  ``{"answer", "scores": {choice: score}, ...}`` (``experts`` with ``explain``);
- ``POST /v1/generate`` ``{"composition", "prompt", "max_new_tokens"? (1-256)}`` → ``{"text"}``;
- ``GET /healthz`` and ``GET /v1/compositions``.

Requests for one composition that arrive together are collected into one batch
(``serve.batch``; ``--max-batch-size``, ``--batch-wait-ms``; ``--no-batching`` turns it
off) and scored in forward passes of up to ``--forward-batch-size`` requests of similar
length. A request is
checked before it is queued: bad JSON or fields are HTTP 400, an unknown composition or
path 404, a wrong method 405, each with a one-line JSON ``{"error": ...}``. Every size a
request controls is bounded, each with a 400 that names the limit, the cheap bounds before
anything is tokenised: the body (8 bytes per character allowed, read no further than that),
its JSON nesting (:data:`MAX_JSON_DEPTH`), the number of choices (64) and the same choice
twice, 16 characters per ``--max-length`` token; then the prompt plus every choice at most
``--max-length`` tokens (default 512), never cut silently. A score that is not a finite
number is a 500, never an answer.
"""

from __future__ import annotations

import json
import math
import time

from recycle.console import Reporter
from recycle.errors import RecycleError

MAX_NEW_TOKENS = 256
DRAIN_S = 30.0  # after Ctrl-C, how long a replica waits for the requests it is answering


class Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(str(message).split())


MAX_JSON_DEPTH = 8  # a request nests two levels (the object, its choices)


def body_limit(max_length: int) -> int:
    """The largest body taken, in bytes: room for the characters a request may have
    (:func:`request_chars`), each escaped as JSON at worst."""
    return max(1 << 16, 8 * request_chars(max_length))


def request_chars(max_length: int) -> int:
    from recycle.predict import CHARS_PER_TOKEN, MAX_CHARS

    return min(MAX_CHARS, CHARS_PER_TOKEN * max_length)


def parse_body(raw: bytes):
    """A request body as JSON, refused (400) when it is not JSON or nests deeper than
    :data:`MAX_JSON_DEPTH` (never a RecursionError and a 500)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise Rejected(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Rejected(400, f"the body is not JSON ({e})") from None
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise Rejected(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))
    return body


def check_request(body, served: dict, kind: str, tokenizer_of, max_length: int) -> dict:
    """A request's fields, checked; raises :class:`Rejected` (400/404) with one line. Its
    size is bounded before anything is tokenised: at most 64 choices, each different, and
    16 characters per ``--max-length`` token; then prompt plus choices at most
    ``max_length`` tokens."""
    from recycle.predict import check_item, check_tokens

    if not isinstance(body, dict):
        raise Rejected(400, "the body must be a JSON object")
    name = body.get("composition")
    if not isinstance(name, str) or not name:
        raise Rejected(400, "needs a \"composition\" (one of: " + ", ".join(served) + ")")
    if name not in served:
        raise Rejected(404, f"no composition {name[:100]!r} is served here (served: {', '.join(served)})")
    item = {k: body[k] for k in ("prompt", "choices", "task", "text") if k in body}
    if kind == "score" and not body.get("choices"):
        raise Rejected(400, "needs \"choices\": a list of at least two answer strings")
    try:
        check_item(item, max_chars=request_chars(max_length),
                   chars_why=f" (--max-length {max_length} tokens; 16 characters per token at most)")
    except RecycleError as e:
        raise Rejected(400, str(e).removeprefix("request: ")) from None
    unknown = sorted(set(body) - {"composition", "prompt", "choices", "task", "text", "explain", "max_new_tokens"})
    if unknown:
        raise Rejected(400, f"unknown field {unknown[0][:100]!r}")
    if "explain" in body and not isinstance(body["explain"], bool):
        raise Rejected(400, "\"explain\" must be true or false")
    if kind == "generate":
        n = body.get("max_new_tokens", 32)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
            raise Rejected(400, f"\"max_new_tokens\" must be an integer from 1 to {MAX_NEW_TOKENS}")
    try:
        check_tokens(item, tokenizer_of(name), max_length)
    except RecycleError as e:
        raise Rejected(400, str(e).removeprefix("request: ").replace("are taken", "are taken by this server")) from None
    return {"name": name, "item": item, "explain": bool(body.get("explain")), "max_new_tokens": body.get("max_new_tokens", 32)}


def make_app(plans: dict[str, dict], *, replicas: int = 1, cpus: float = 1.0, gpus: float = 0.0,
             dtype: str = "float32", max_batch_size: int = 16, batch_wait_ms: float = 10.0, batching: bool = True, max_length: int = 512,
             forward_batch_size: int = 8):
    """The Ray Serve application serving ``plans`` (name -> Plan as a dict). A batch of
    requests is scored in forward passes of at most ``forward_batch_size`` requests of
    similar length (the Predictor sorts them): on CPU one padded pass over 32 requests of
    mixed lengths is slower than scoring them one by one, passes of 4-16 are 1.6-2x faster
    (benchmarks/serving.py)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    threads = max(1, math.ceil(cpus))

    @serve.deployment(name="recycle", num_replicas=replicas,
                      ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                      graceful_shutdown_timeout_s=DRAIN_S, graceful_shutdown_wait_loop_s=0.2,
                      max_ongoing_requests=max(64, 4 * max_batch_size))
    class RecycleServer:
        def __init__(self):
            import torch

            from recycle import cluster
            from recycle.methods import Plan
            from recycle.predict import Predictor

            torch.set_num_threads(threads)
            device = cluster.device("cuda" if gpus > 0 else "cpu")
            self.predictors = {n: Predictor(Plan.from_dict(p), device=device, dtype=dtype) for n, p in plans.items()}
            self.info = [{"name": n, "method": p["method"], "members": [m["name"] for m in p["members"]],
                          "settings": p["settings"]} for n, p in plans.items()]
            self.score_batch.set_max_batch_size(max_batch_size)
            self.score_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)
            self.generate_batch.set_max_batch_size(max_batch_size)
            self.generate_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

        def _score(self, reqs: list[dict]) -> list:
            out = [None] * len(reqs)
            by_name: dict[str, list[int]] = {}
            for i, r in enumerate(reqs):
                by_name.setdefault(r["name"], []).append(i)
            for name, idx in by_name.items():
                p = self.predictors[name]
                plain = [i for i in idx if not reqs[i]["explain"]]
                try:
                    if plain:
                        items = [reqs[i]["item"] for i in plain]
                        for i, res in zip(plain, p.score(items, batch_size=min(len(plain), forward_batch_size),
                                                         max_length=max_length, fitted=True)):
                            out[i] = res
                    for i in idx:
                        if reqs[i]["explain"]:
                            out[i] = p.score([reqs[i]["item"]], explain=True, max_length=max_length, fitted=True)[0]
                except RecycleError as e:  # bad input 400; no answer to give (non-finite scores) 500
                    for i in idx:
                        out[i] = Rejected(400 if e.exit_code == 2 else 500, str(e))
            return out

        def _generate(self, reqs: list[dict]) -> list:
            out = [None] * len(reqs)
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(reqs):
                groups.setdefault((r["name"], r["max_new_tokens"]), []).append(i)
            for (name, n), idx in groups.items():
                try:
                    res = self.predictors[name].generate([reqs[i]["item"] for i in idx], max_new_tokens=n,
                                                         batch_size=min(len(idx), forward_batch_size))
                    for i, r in zip(idx, res):
                        out[i] = {"text": r["answer"]}
                except RecycleError as e:
                    for i in idx:
                        out[i] = Rejected(400, str(e))
            return out

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def score_batch(self, reqs: list[dict]) -> list:
            return self._score(reqs)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def generate_batch(self, reqs: list[dict]) -> list:
            return self._generate(reqs)

        def _tokenizer(self, name):
            return self.predictors[name].tokenizer

        async def __call__(self, request: Request):
            try:
                path, method = request.url.path.rstrip("/") or "/", request.method
                if path in ("/healthz", "/v1/compositions"):
                    if method != "GET":
                        raise Rejected(405, f"{path} takes GET")
                    if path == "/healthz":
                        return JSONResponse({"status": "ok", "compositions": list(self.predictors)})
                    return JSONResponse({"compositions": self.info})
                if path not in ("/v1/score", "/v1/generate"):
                    raise Rejected(404, f"no endpoint {path} (endpoints: /v1/score, /v1/generate, /v1/compositions, "
                                        "/healthz)")
                if method != "POST":
                    raise Rejected(405, f"{path} takes POST with a JSON body")
                body = parse_body(await read_body(request, body_limit(max_length)))
                kind = "score" if path == "/v1/score" else "generate"
                req = check_request(body, self.predictors, kind, self._tokenizer, max_length)
                if kind == "score":
                    res = await self.score_batch(req) if batching else self._score([req])[0]
                else:
                    res = await self.generate_batch(req) if batching else self._generate([req])[0]
                if isinstance(res, Rejected):
                    raise res
                return JSONResponse(res)
            except Rejected as e:
                return JSONResponse({"error": e.message}, status_code=e.status)
            except Exception as e:  # noqa: BLE001 - a bug: still one line, never a traceback
                return JSONResponse({"error": f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"},
                                    status_code=500)

    return RecycleServer.bind()


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (400) as soon as it passes ``limit`` bytes: never read whole first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(400, f"the body is {int(declared)} bytes; this server takes at most {limit} (from --max-length)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(400, f"the body is over {limit} bytes; this server takes at most {limit} (from --max-length)")
        chunks.append(chunk)
    return b"".join(chunks)


def check_listen(host: str, port: int) -> None:
    """Refuse, before Ray starts, an address this machine cannot listen on: a port in use,
    a host that is not one of its addresses (or no address at all). The same options as
    Serve's server (``SO_REUSEADDR``), so a port it could take is not refused. On a remote
    cluster (``--address``) the proxy listens on the head node, so this checks this machine
    only where that is the one that serves."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise RecycleError(f"--host {host!r} is not an address or host name this machine knows ({e})") from None
    family, kind, proto, _, sockaddr = infos[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(sockaddr)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise RecycleError(f"port {port} on {host} is in use (another server?): give another --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise RecycleError(f"--host {host} is not an address of this machine") from None
        if e.errno == errno.EACCES:
            raise RecycleError(f"no permission to listen on port {port} (ports below 1024 need privileges)") from None
        raise RecycleError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        s.close()


def serve(plans: dict, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          report: Reporter | None = None, block: bool = True, **app_options) -> None:
    """Run the endpoint (see the module docstring) until interrupted (``block``), then
    shut Serve down; on a local Ray, Ray too."""
    from ray import serve as rserve

    from recycle import cluster

    report = report or Reporter()
    with cluster.connect(address) as where:
        try:
            rserve.start(http_options={"host": host, "port": port})
        except Exception as e:  # noqa: BLE001 - Ray's error is a page long: one line
            if type(e).__module__.startswith("ray"):
                raise RecycleError(f"cannot start serving on {host}:{port}: {cluster.describe_error(e)[:200]}") from None
            raise
        try:
            rserve.run(make_app(plans, **app_options), name="recycle", route_prefix="/")
            report.say(f"serving {', '.join(plans)} on http://{host}:{port} (Ray: {where}); Ctrl-C stops")
            while block:
                time.sleep(3600)
        except KeyboardInterrupt:
            drain(report)
            raise
        finally:
            rserve.shutdown()


def drain(report: Reporter) -> None:
    """After Ctrl-C: take no new requests, answer those in flight (each replica waits up to
    :data:`DRAIN_S` for them), then return. Deleting the application does both: the HTTP
    proxy stops routing to it at once, and Serve shuts each replica down gracefully, after
    its ongoing requests. A second Ctrl-C stops waiting."""
    from ray import serve as rserve

    report.say(f"stopping: no new requests; answering those in flight (at most {DRAIN_S:g} s; Ctrl-C again: now)")
    try:
        rserve.delete("recycle", _blocking=True)
    except KeyboardInterrupt:
        report.say("stopped without waiting")
