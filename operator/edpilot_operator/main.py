"""`edpilot operator`: runs kopf with edpilot's handlers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import zlib

import kopf

from edpilot import dra
from edpilot.optimizer import DEFAULT_TUNING

from . import metrics
from .handlers import OperatorConfig, register


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edpilot operator", description="Close the EDP loop for EnergyPolicies.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", action="append", default=[], help="watch only these namespaces (repeatable)"
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch the whole cluster (default)")
    p.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: in-cluster, then ~/.kube"
    )
    p.add_argument(
        "--peering", default=None, help="kopf peering name; several replicas then never act together"
    )
    p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority of this replica (default: derived from --identity, so replicas differ)",
    )
    p.add_argument("--metrics-port", type=int, default=9465, help="serve /metrics here; 0 turns it off")
    p.add_argument(
        "--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument("--reconcile-interval", type=float, default=5.0, help="seconds between policy decisions")
    p.add_argument("--report-interval", type=float, default=5.0, help="seconds between report spec updates")
    p.add_argument("--lease-seconds", type=int, default=60, help="agents restore default limits after this")
    p.add_argument(
        "--lease-name",
        default="edpilot-operator",
        help="the coordination.k8s.io Lease the operator renews and every report spec names",
    )
    p.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE") or "default",
        help="that Lease's namespace (default: $POD_NAMESPACE, else default)",
    )
    p.add_argument(
        "--fast-report-interval", type=int, default=5, help="agent report interval while exploring"
    )
    p.add_argument("--slow-report-interval", type=int, default=60, help="agent report interval otherwise")
    p.add_argument(
        "--report-writes-per-second",
        type=float,
        default=OperatorConfig.report_writes_per_second,
        help="report spec writes a second at most, with bursts of twice that (a restart on a large fleet)",
    )
    p.add_argument(
        "--window-seconds", type=float, default=DEFAULT_TUNING.windowSeconds, help="shortest window"
    )
    p.add_argument("--baseline-windows", type=int, default=DEFAULT_TUNING.baselineWindows)
    p.add_argument("--probe-windows", type=int, default=DEFAULT_TUNING.probeWindows)
    p.add_argument(
        "--apply-timeout",
        type=float,
        default=DEFAULT_TUNING.applyTimeoutSeconds,
        help="seconds a workload has to apply a hint",
    )
    p.add_argument(
        "--rollout-delivery",
        action="store_true",
        help="watch Deployments and StatefulSets and patch their pod templates (delivery Rollout)",
    )
    p.add_argument("--identity", default=os.environ.get("POD_NAME") or os.uname().nodename)
    p.add_argument("-v", "--verbose", action="store_true")
    dra.add_arguments(p)
    args = p.parse_args(argv)
    if not args.report_writes_per_second > 0:  # also NaN
        p.error(f"--report-writes-per-second must be above 0, not {args.report_writes_per_second}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    # kopf pauses every replica whose priority ties with another's, so replicas must differ.
    priority = args.priority if args.priority is not None else zlib.crc32(args.identity.encode()) % 1000
    registry = kopf.OperatorRegistry()
    register(
        registry,
        OperatorConfig(
            kubeconfig=args.kubeconfig,
            identity=args.identity,
            reconcile_interval=args.reconcile_interval,
            report_interval=args.report_interval,
            lease_seconds=args.lease_seconds,
            lease_namespace=args.lease_namespace,
            lease_name=args.lease_name,
            fast_report_interval=args.fast_report_interval,
            slow_report_interval=args.slow_report_interval,
            report_writes_per_second=args.report_writes_per_second,
            tuning=DEFAULT_TUNING.model_copy(
                update={
                    "windowSeconds": args.window_seconds,
                    "baselineWindows": args.baseline_windows,
                    "probeWindows": args.probe_windows,
                    "applyTimeoutSeconds": args.apply_timeout,
                }
            ),
            dra=dra.config_from(args),
            rollouts=args.rollout_delivery,
        ),
    )
    # No stop_flag: kopf waits for a threading.Event in an executor thread that asyncio's shutdown
    # then joins forever, so SIGTERM stopped the operator but never the process.
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        kopf.run(
            registry=registry,
            standalone=args.peering is None,
            peering_name=args.peering,
            priority=priority,
            # kopf would name this replica after its user, and a uid without a passwd entry (the
            # image's numeric USER under containerd, an OpenShift uid) has none: getpwuid fails.
            identity=args.identity,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
        )
    return 0
