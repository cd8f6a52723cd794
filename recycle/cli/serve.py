"""``serve``: compositions over HTTP on Ray Serve."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from recycle.cli.common import AddressOption, DbOption, open_registry
from recycle.cli.root import app
from recycle.settings import Precision, Resources, bounded, options


@app.command("serve")
@options("resources", Resources, names={"cpus": "cpus_per_replica", "gpus": "gpus_per_replica"})
@options("precision", Precision)
def serve_cmd(
    names: Annotated[list[str], typer.Argument(help="Stored compositions (or methods over every expert) to serve.",
                                               show_default=False)],
    port: Annotated[int, typer.Option(help="HTTP port.", callback=bounded(minimum=1, maximum=65535))] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    replicas: Annotated[int, typer.Option(help="Copies of the deployment (each holds every composition).",
                                          callback=bounded(minimum=1))] = 1,
    resources: Resources = None,
    precision: Precision = None,
    max_batch_size: Annotated[int, typer.Option(help="Requests scored together at most.",
                                                callback=bounded(minimum=1))] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.",
                                                 callback=bounded(minimum=0))] = 10.0,
    forward_batch_size: Annotated[int, typer.Option(
        help="Requests per forward pass within a batch (sorted by length first, so each pass pads little).",
        callback=bounded(minimum=1))] = 8,
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help="Dynamic request batching.")] = True,
    max_length: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens (longer: HTTP 400).",
                                            callback=bounded(minimum=1))] = 512,
    address: AddressOption = None,
    db: DbOption = None,
):
    """Serve compositions over HTTP on Ray Serve until Ctrl-C.

    POST /v1/score {"composition", "prompt", "choices", "explain"?} and POST /v1/generate
    {"composition", "prompt", "max_new_tokens"?}; GET /healthz and GET /v1/compositions.
    Bad requests get 400/404 with a one-line JSON error.

    Examples:

      recycle serve pg --port 8000

      curl -s localhost:8000/v1/score -d '{"composition": "pg", "prompt": "Review: great!\\nSentiment:", "choices": [" positive", " negative"]}'

      recycle serve pg moe --address auto --replicas 4 --gpus-per-replica 0.5 --host 0.0.0.0
    """
    from recycle import cluster
    from recycle.predict import resolve
    from recycle.serving import check_listen, serve

    registry = open_registry(db, create=False)
    plans = {n: resolve(registry, n).to_dict() for n in dict.fromkeys(names)}
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local":  # this machine serves: check before Ray
        check_listen(host, port)
    with cluster.connect(address):
        gpus = cluster.default_gpus(resources.gpus)
        cluster.check_fits(resources.cpus, gpus)
        serve(plans, host=host, port=port, address=address, replicas=replicas, cpus=resources.cpus, gpus=gpus,
              dtype=cluster.resolve_dtype(precision.dtype, gpus),
              max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, batching=batching, max_length=max_length,
              forward_batch_size=forward_batch_size)
