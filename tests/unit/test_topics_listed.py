"""ensure_topics waits until every broker that answers lists the topics (Apache Kafka: a broker
whose metadata lags says "unknown topic" for a while after another one listed it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from spendgate.adapters.kafka import KafkaUnavailable, _wait_until_every_broker_lists


@dataclass
class Broker:
    nodeId: int


class Answer:
    def __init__(self, topics: list[str]) -> None:
        self.topics = topics

    def to_object(self) -> dict[str, Any]:
        partitions = [{"leader": 1, "partition": 0}]
        return {"topics": [{"topic": t, "error_code": 0, "partitions": partitions} for t in self.topics]}


class Cluster:
    def brokers(self) -> list[Broker]:
        return [Broker(1), Broker(2), Broker(3)]


class Client:
    """Broker 2 lists the topic only from its third answer on; broker 3 is down."""

    cluster = Cluster()

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def send(self, node: int, request: Any) -> Answer:
        self.asked.append(node)
        if node == 3:
            raise KafkaConnectionError("down")
        if node == 2 and self.asked.count(2) < 3:
            return Answer([])
        return Answer(["spend.usage"])


class Admin:
    def __init__(self) -> None:
        self._client = Client()


async def test_waits_for_a_lagging_broker_and_leaves_out_one_that_is_down() -> None:
    admin = Admin()
    await _wait_until_every_broker_lists(admin, ["spend.usage"], time.monotonic() + 10)  # type: ignore[arg-type]
    assert admin._client.asked.count(2) == 3


async def test_gives_up_at_the_deadline_naming_the_broker_and_topic() -> None:
    admin = Admin()
    with pytest.raises(KafkaUnavailable, match=r"brokers \[1, 2\] do not list topics .*spend.other"):
        await _wait_until_every_broker_lists(admin, ["spend.other"], time.monotonic() + 0.3)  # type: ignore[arg-type]


async def test_gives_up_when_no_broker_answers() -> None:
    admin = Admin()

    async def down(node: int, request: Any) -> Answer:
        raise KafkaConnectionError("down")

    admin._client.send = down  # type: ignore[method-assign]
    with pytest.raises(KafkaUnavailable, match="no broker answered"):
        await _wait_until_every_broker_lists(admin, ["spend.usage"], time.monotonic() + 0.3)  # type: ignore[arg-type]
