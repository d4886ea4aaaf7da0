"""The integration-test broker comes from AMQP_URL, else from testcontainers
when a Docker engine answers, else the session fails with a clear message.
Each branch is exercised here without Docker, with stand-ins for the engine
probe, the container and the connection check."""

from __future__ import annotations

import pytest

from tests.support.broker import (
    NO_BROKER_MESSAGE,
    TESTCONTAINERS_IMAGE,
    BrokerUnreachable,
    provide_broker,
)


class FakeContainer:
    """Quacks like testcontainers' RabbitMqContainer."""

    instances: list[FakeContainer] = []

    def __init__(self, image: str) -> None:
        self.image = image
        self.port = 5672
        self.username = self.password = "guest"
        self.running = False
        FakeContainer.instances.append(self)

    def __enter__(self) -> FakeContainer:
        self.running = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False

    def get_container_host_ip(self) -> str:
        return "10.1.2.3"

    def get_exposed_port(self, port: int) -> int:
        return 49153


def no_docker() -> bool:
    raise AssertionError("Docker must not be probed when AMQP_URL is set")


def test_amqp_url_wins_and_is_checked():
    checked = []
    with provide_broker(
        {"AMQP_URL": "amqp://u:p@broker:5672/"},
        docker_available=no_docker,
        check=lambda url, **_: checked.append(url),
    ) as url:
        assert url == "amqp://u:p@broker:5672/"
    assert checked == [url]


def test_an_unreachable_amqp_url_is_an_error_not_a_fallback():
    def refuse(url: str, **_: object) -> None:
        raise BrokerUnreachable(f"RabbitMQ at {url} did not accept a connection")

    with pytest.raises(BrokerUnreachable, match="broker:5672"):
        with provide_broker(
            {"AMQP_URL": "amqp://u:p@broker:5672/"}, docker_available=no_docker, check=refuse
        ):
            pass


def test_without_amqp_url_a_docker_engine_gives_a_testcontainers_broker():
    FakeContainer.instances.clear()
    checked = []
    with provide_broker(
        {},
        docker_available=lambda: True,
        container_factory=FakeContainer,
        check=lambda url, **kw: checked.append((url, kw)),
    ) as url:
        (container,) = FakeContainer.instances
        assert container.running and container.image == TESTCONTAINERS_IMAGE
        assert url == "amqp://guest:guest@10.1.2.3:49153/"
    assert not container.running  # stopped after the session
    assert checked == [(url, {"timeout": 60})]


def test_without_amqp_url_or_docker_the_message_says_how_to_get_a_broker():
    with pytest.raises(BrokerUnreachable) as info:
        with provide_broker({}, docker_available=lambda: False):
            pass
    assert str(info.value) == NO_BROKER_MESSAGE
    for advice in ("AMQP_URL", "scripts/setup.sh", "Docker"):
        assert advice in NO_BROKER_MESSAGE


def test_the_real_testcontainers_class_is_importable():
    from testcontainers.rabbitmq import RabbitMqContainer

    assert callable(RabbitMqContainer)
