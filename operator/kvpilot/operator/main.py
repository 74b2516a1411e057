"""``kvpilot operator``: run the operator, out of cluster (kubeconfig) or in a pod.

Start-up order: settings (refused with a clear message when invalid), credentials, the
Lease (a standby replica waits here), then kopf with the handlers of
``kvpilot.operator.handlers``. Losing the Lease stops kopf; the process stands by again
and starts kopf afresh once it holds the Lease again.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from kvpilot.operator.settings import Settings

log = logging.getLogger("kvpilot.operator")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service "
                   "account, else $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--mode", choices=("auto", "dra", "devicePlugin"),
                   help="how replicas get GPUs (env KVPILOT_MODE; default auto)")
    p.add_argument("--namespace", help="namespace of the leader Lease (env KVPILOT_NAMESPACE)")
    p.add_argument("--worker-image", help="default worker image (env KVPILOT_WORKER_IMAGE)")
    p.add_argument("--reconcile-seconds", type=float, help="longest time between fleet passes")
    p.add_argument("--metrics-port", type=int, help="operator /metrics port, 0 for none")
    p.add_argument("--health-port", type=int, help="liveness /healthz port, 0 for none")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        mode=args.mode, namespace=args.namespace, worker_image=args.worker_image,
        reconcile_seconds=args.reconcile_seconds, metrics_port=args.metrics_port,
        health_port=args.health_port)


async def run(settings: Settings, kubeconfig: str | None = None) -> int:
    """Run until stopped (0). Losing the Lease (another replica took it, or the API
    server could not be reached for a lease duration) stops kopf and every loop; the
    process stands by and, once it holds the Lease again, starts them afresh (kopf
    lists everything again), with no exit: an API server restart must not become a
    crash loop."""
    import kopf

    from kvpilot.operator import handlers, metrics  # importing handlers registers them
    from kvpilot.operator.health import Health
    from kvpilot.operator.kube import Kube, load_credentials
    from kvpilot.operator.leader import Lease

    if settings.inference_pool != "false":
        handlers.serve_inference_pools()
    kube = Kube(load_credentials(kubeconfig), settings.write_concurrency)
    lease = Lease(kube, settings.namespace, settings.lease_name, settings.identity,
                  settings.lease_seconds)
    health = Health(stale_after=max(120.0, 4 * settings.reconcile_seconds))
    server = health.serve(settings.health_port)
    metrics_served = False
    try:
        while True:
            await lease.acquire()
            health.leading()
            if not metrics_served:
                metrics.serve(settings.metrics_port)
                metrics_served = True
            lost = asyncio.Event()
            keeper = asyncio.create_task(lease.keep(lost))
            try:
                memo = kopf.Memo(kube=kube, settings=settings, health=health)
                await kopf.operator(clusterwide=True, standalone=True, memo=memo,
                                    stop_flag=lost)
            finally:
                keeper.cancel()
            if not lost.is_set():  # stopped (a signal): hand the Lease on at once
                await lease.release()
                return 0
            health.standing_by()
            log.warning("lost lease %s/%s: stopped acting; standing by to take it again",
                        settings.namespace, settings.lease_name)
    finally:
        if server is not None:
            server.shutdown()
        await kube.close()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    if not args.verbose:  # kopf's line per handler run (every watched event) otherwise
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings = settings_from(args)
    log.info("starting: mode %s, lease %s/%s as %s", settings.mode, settings.namespace,
             settings.lease_name, settings.identity)
    try:
        return asyncio.run(run(settings, args.kubeconfig))
    except KeyboardInterrupt:
        return 0
