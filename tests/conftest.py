"""Shared fixtures. Cluster tests start real node processes on 127.0.0.1 (free ports) and always
stop them by PID, whatever the test did."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cluster.local import LocalCluster

os.environ.setdefault("HYPOTHESIS_PROFILE", "default")

# No per-example deadline anywhere: it is a timing assertion, and these 2-core machines run
# several suites at once (a 200 ms deadline failed a token test that took 2 s under load).
from hypothesis import settings  # noqa: E402

settings.register_profile("suite", deadline=None)
settings.load_profile("suite")


@pytest.fixture
def make_cluster(tmp_path) -> Iterator:
    started: list[LocalCluster] = []

    def make(nodes: int = 3, *, env: dict[str, str] | None = None, extra_args: list[str] | None = None,
             subdir: str = "cluster", up: bool = True) -> LocalCluster:
        cluster = LocalCluster(str(tmp_path / subdir), env=env, extra_args=extra_args)
        started.append(cluster)
        if up:
            cluster.up(nodes, wait_leader_s=30)
        else:
            cluster.init(nodes)
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            cluster.down()


@pytest.fixture
def cluster3(make_cluster) -> LocalCluster:
    return make_cluster(3)


@pytest.fixture
def executors(cluster3):
    """Executor agent processes on cluster3, stopped by PID whatever the test did."""
    from tests.executor_pool import Executors

    pool = Executors(cluster3)
    try:
        yield pool
    finally:
        pool.stop_all()
