"""``kvpilot operator``: run the operator, out of cluster (kubeconfig) or in a pod.

Start-up order: settings (refused with a clear message when invalid), credentials, the
Lease (a standby replica waits here), then kopf with the handlers of
``kvpilot.operator.handlers``. Losing the Lease stops kopf; the process then exits
non-zero, and its restart comes back as a standby.
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
    """Run until stopped (0) or until the Lease is lost (1)."""
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
    lost = asyncio.Event()
    keeper = None
    health = Health(stale_after=max(120.0, 4 * settings.reconcile_seconds))
    server = health.serve(settings.health_port)
    try:
        await lease.acquire()
        health.leading()
        metrics.serve(settings.metrics_port)
        keeper = asyncio.create_task(lease.keep(lost))
        memo = kopf.Memo(kube=kube, settings=settings, health=health)
        await kopf.operator(clusterwide=True, standalone=True, memo=memo, stop_flag=lost)
    finally:
        if server is not None:
            server.shutdown()
        if keeper is not None:
            keeper.cancel()
        if not lost.is_set():
            await lease.release()
        await kube.close()
    return 1 if lost.is_set() else 0


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
