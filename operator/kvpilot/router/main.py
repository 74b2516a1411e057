"""``kvpilot router`` (``python -m kvpilot.router``): one OpenAI endpoint for the fleet.

In a pod it reads the EndpointSlices with its service account; out of cluster with a
kubeconfig (``--kubeconfig``, else ``$KUBECONFIG`` or ``~/.kube/config``). With
``--upstream MODEL=URL[,URL...]`` it routes to fixed replicas and needs no cluster
(benchmarks, trying it out).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from kvpilot.router.scoring import MODES, Policy

log = logging.getLogger("kvpilot.router")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _upstream(text: str) -> tuple[str, list[str]]:
    model, sep, urls = text.partition("=")
    if not sep or not model or not urls:
        raise argparse.ArgumentTypeError(f"expected MODEL=URL[,URL...], got {text!r}")
    return model, [u for u in urls.split(",") if u]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service "
                   "account, else $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--namespace", action="append", default=[], metavar="NS",
                   help="route to the Models of this namespace (repeatable; default: all "
                        "namespaces)")
    p.add_argument("--upstream", action="append", default=[], type=_upstream,
                   metavar="MODEL=URL[,URL...]",
                   help="fixed replicas of a Model instead of the cluster's (repeatable)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--policy", choices=MODES, default="prefix",
                   help="prefix: prefix affinity with bounded load and KV pressure "
                        "(default); round-robin; least-load")
    p.add_argument("--load-factor", type=float, default=Policy.load_factor,
                   help="bounded load: no replica above this x the mean load (default "
                        f"{Policy.load_factor})")
    p.add_argument("--slack", type=int, default=Policy.slack,
                   help="requests a replica may take beyond that bound (default "
                        f"{Policy.slack})")
    p.add_argument("--kv-high", type=float, default=Policy.kv_high,
                   help="KV-cache usage at which a replica takes new requests only when all "
                        f"do (default {Policy.kv_high})")
    p.add_argument("--scrape-interval", type=_positive, default=0.25, metavar="SECONDS",
                   help="seconds between two reads of every replica's /metrics (default 0.25)")
    p.add_argument("--upstream-timeout", type=_positive, default=120, metavar="SECONDS",
                   help="longest wait for a replica's response head; a non-streamed "
                        "completion's whole answer (default 120)")
    p.add_argument("--idle-timeout", type=_positive, default=120, metavar="SECONDS",
                   help="longest silence of a replica mid-response (default 120)")
    p.add_argument("--attempts", type=int, default=3,
                   help="replicas tried per request (default 3)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                   help="largest request body (default 8 MiB)")
    p.add_argument("--api-keys-file", metavar="PATH",
                   help="require Authorization: Bearer KEY, KEY one of this file's lines")
    p.add_argument("--shutdown-seconds", type=_positive, default=25,
                   help="on SIGTERM, how long open responses may take to finish (default 25)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def settings_from(args: argparse.Namespace):
    from kvpilot.router.app import RouterSettings

    policy = Policy(mode=args.policy, load_factor=args.load_factor, slack=args.slack,
                    kv_high=args.kv_high)
    return RouterSettings(policy=policy, upstream_timeout=args.upstream_timeout,
                          idle_timeout=args.idle_timeout, attempts=args.attempts,
                          max_body_bytes=args.max_body_bytes)


async def run(args: argparse.Namespace) -> int:
    import httpx
    import uvicorn

    from kvpilot.router.app import RouteTable, Router, upstream_client
    from kvpilot.router.auth import ApiKeys
    from kvpilot.router.endpoints import static_routes
    from kvpilot.router.loads import LoadBoard, scrape_forever
    from kvpilot.router.server import ServerBounds, uvicorn_config

    settings = settings_from(args)
    table = RouteTable()
    board = LoadBoard(stale_after=max(2.0, 8 * args.scrape_interval))
    keys = ApiKeys(args.api_keys_file) if args.api_keys_file else None
    tasks: list[asyncio.Task] = []
    if args.upstream:
        table.publish(static_routes(dict(args.upstream)))
        ready = lambda: True  # noqa: E731
    else:
        from kvpilot.operator.kube import load_credentials
        from kvpilot.router.discovery import SliceWatch

        watch = SliceWatch(load_credentials(args.kubeconfig), args.namespace, table.publish)
        ready = lambda: watch.synced  # noqa: E731
        tasks.append(asyncio.create_task(watch.run()))
    client = upstream_client(settings)
    scraper = httpx.AsyncClient(limits=httpx.Limits(max_connections=32), trust_env=False)

    def targets() -> dict[str, tuple[str, str]]:
        return {e.name: (e.url, model) for model, route in table.routes.models.items()
                for e in route.endpoints}

    tasks.append(asyncio.create_task(scrape_forever(
        scraper, board, targets, args.scrape_interval, timeout=max(0.5, 4 * args.scrape_interval))))
    if keys is not None:
        async def reload_keys() -> None:
            while True:
                await asyncio.sleep(10)
                keys.reload()

        tasks.append(asyncio.create_task(reload_keys()))
    router = Router(settings, table, board, client, keys=keys, ready=ready)
    config = uvicorn_config(router, host=args.host, port=args.port, bounds=ServerBounds(),
                            log_level="debug" if args.verbose else "warning")
    config.timeout_graceful_shutdown = int(args.shutdown_seconds)
    server = uvicorn.Server(config)

    def stop(*_) -> None:
        # uvicorn takes SIGINT and SIGTERM while it serves, then raises them again with
        # the handlers it found: these, so that the process cleans up and exits 0.
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    log.info("routing on %s:%d, policy %s, %s", args.host, args.port, settings.policy.mode,
             "fixed upstreams" if args.upstream else
             f"EndpointSlices in {', '.join(args.namespace) or 'every namespace'}")
    try:
        await server.serve()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await scraper.aclose()
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0
    except ValueError as err:  # bad settings or keys file: one line, no traceback
        log.error("%s", err)
        return 2


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvpilot router", description=__doc__.split("\n")[0])
    add_arguments(p)
    return main(p.parse_args(argv))
