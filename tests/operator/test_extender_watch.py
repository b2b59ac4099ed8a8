"""The extender's list+watch against the real API server: what the view sees, and when."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
import pytest
from edpilot_operator.extender_view import BUDGETS, KINDS, ClusterView
from edpilot_operator.extender_watch import Gone, Watcher, load_endpoint

if TYPE_CHECKING:
    from kubetest import Cluster


def budget(name: str, max_watts: float) -> str:
    return json.dumps(
        {
            "apiVersion": "edpilot.io/v1alpha1",
            "kind": "PowerBudget",
            "metadata": {"name": name},
            "spec": {"nodeSelector": {"matchLabels": {"edpilot.io/test": name}}, "maxWatts": max_watts},
        }
    )


async def eventually(what: str, check: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.1)


def test_the_view_follows_list_and_watch(crds_installed: Cluster) -> None:
    cluster = crds_installed
    cluster.kubectl("apply", "-f", "-", input=budget("watch-before", 1000))

    async def run() -> None:
        view = ClusterView()
        endpoint = load_endpoint(str(cluster.kubeconfig))
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(Watcher(kind, endpoint, session, view).run()) for kind in KINDS]
            try:
                await eventually("every kind listed", lambda: view.ready)
                assert view.budget_views["watch-before"].max_watts == 1000
                assert view.counts()["nodes"] >= 1  # the cluster's own KWOK GPU nodes

                cluster.kubectl("apply", "-f", "-", input=budget("watch-after", 2000))
                await eventually("ADDED", lambda: "watch-after" in view.budget_views)
                cluster.kubectl("apply", "-f", "-", input=budget("watch-after", 2500))
                await eventually("MODIFIED", lambda: view.budget_views["watch-after"].max_watts == 2500)
                cluster.kubectl("delete", "powerbudget", "watch-before", "watch-after")
                await eventually(
                    "DELETED", lambda: not {"watch-before", "watch-after"} & set(view.budget_views)
                )
                assert view.events >= 3
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(run())
    finally:
        cluster.kubectl(
            "delete", "powerbudget", "watch-before", "watch-after", "--ignore-not-found", check=False
        )


def test_an_expired_resource_version_means_list_again(crds_installed: Cluster) -> None:
    cluster = crds_installed

    async def run() -> None:
        endpoint = load_endpoint(str(cluster.kubeconfig))
        async with aiohttp.ClientSession() as session:
            watcher = Watcher(BUDGETS, endpoint, session, ClusterView())
            # resourceVersion 1 predates everything this API server keeps history for.
            with pytest.raises(Gone):
                await watcher._watch("1")

    asyncio.run(run())
