"""The real-Kafka test cluster's setup: a clear message without Java/Maven, the proven settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from spendgate.adapters import kafka_cluster
from spendgate.adapters.kafka_cluster import KafkaCluster, KafkaClusterError, require_tools


@pytest.mark.parametrize("missing", ["java", "mvn"])
def test_missing_java_or_maven_is_named(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setattr(
        kafka_cluster.shutil, "which", lambda name: None if name == missing else f"/usr/bin/{name}"
    )
    with pytest.raises(KafkaClusterError, match=f"needs {missing}") as info:
        require_tools()
    assert "apt-get install" in str(info.value)


def test_nodes_form_one_quorum_with_rf3_and_min_isr_2(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path)
    props = [cluster._properties(node) for node in cluster.nodes]
    assert len({n.port for n in cluster.nodes} | {n.controller_port for n in cluster.nodes}) == 6
    assert len({p["controller.quorum.voters"] for p in props}) == 1
    assert props[0]["controller.quorum.voters"].count("@127.0.0.1:") == 3
    for p in props:
        assert p["default.replication.factor"] == "3" and p["min.insync.replicas"] == "2"
        assert p["offsets.topic.replication.factor"] == "3"
        assert int(p["group.min.session.timeout.ms"]) <= 2000  # Faust's dev session is 2 s
    assert cluster.bootstrap.count(",") == 2


def test_a_single_node_cluster_lowers_replication_to_fit(tmp_path: Path) -> None:
    [node] = KafkaCluster(tmp_path, size=1).nodes
    props = KafkaCluster(tmp_path, size=1, nodes=[node])._properties(node)
    assert props["default.replication.factor"] == "1" and props["min.insync.replicas"] == "1"
