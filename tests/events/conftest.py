import pytest

from helox.events import EventsConfig


@pytest.fixture
def events_config(redis_server):
    """The events config of a test on its Redis: an outage is retried within 0.2 s."""
    def make(**fields) -> EventsConfig:
        return EventsConfig(**{"redis_url": redis_server.url, "retry_initial_s": 0.05,
                               "retry_max_s": 0.2, **fields})
    return make
