"""Synapse events: what Helox tells the platform (training progress, models ready, promoted,
rolled back), through a durable local outbox and, when configured, Redis Streams.

A low layer: it imports only the config base, the errors and the standard library (and the
redis package, when a Redis is configured); training and the registry import it.
docs/events.md is the reference of every event and field.
"""

from helox.events.config import EventsConfig
from helox.events.outbox import StoredEvent
from helox.events.publisher import (DrainResult, OutboxStatus, Publisher, drain, open_publisher,
                                    outbox_status)
from helox.events.schema import MODEL_EVENTS, TRAINING_EVENTS, model_event
from helox.events.training import TrainingEvents, open_training_events

__all__ = ["EventsConfig", "StoredEvent", "DrainResult", "OutboxStatus",
           "Publisher", "drain", "open_publisher", "outbox_status", "MODEL_EVENTS",
           "TRAINING_EVENTS", "model_event", "TrainingEvents", "open_training_events"]
