"""The bus boundary: publish messages, consume them per service, dead-letter what cannot be handled.

Two implementations obey the same rules (one contract suite runs against both):
`shared.bus.rabbit.RabbitBus` (RabbitMQ through aio-pika) and `shared.bus.memory.MemoryBus`.
Rules: a message reaches every consumer bound to its name; a body that does not validate is
dead-lettered at once with the reason; a handler that raises is retried until the delivery limit,
then dead-lettered with the error; `stop()` stops taking messages and waits for in-flight handlers.
Delivery is at least once: handlers deduplicate through the inbox (`shared.outbox`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from shared.events import InvalidMessage, Message, decode, encode

log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Envelope:
    """A message as it travels: routing key, serialized body and the ids used for tracing."""

    name: str
    body: bytes
    message_id: str
    correlation_id: str

    @classmethod
    def of(cls, message: Message) -> Envelope:
        return cls(
            name=message.name(),
            body=encode(message),
            message_id=str(message.message_id),
            correlation_id=str(message.correlation_id),
        )


@dataclass(frozen=True)
class DeadLetter:
    consumer: str
    envelope: Envelope
    reason: str


class Bus(Protocol):
    async def start(self) -> None:
        """Connect (and declare the exchange)."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """Returns once the broker has confirmed the message."""
        ...

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """Publish in order and return once the broker has confirmed them all (an outbox batch:
        the confirms are awaited together, not one round trip each)."""
        ...

    async def subscribe(self, consumer: str, handlers: Mapping[str, Handler]) -> None:
        """Declare the consumer's queue, bind it to the handlers' message names, start consuming."""
        ...

    async def stop(self) -> None:
        """Stop consuming, wait for in-flight handlers, close."""
        ...

    async def ping(self) -> None:
        """Raise if the bus is not usable (for readiness checks)."""
        ...

    async def take_dead_letters(self, consumer: str, limit: int = 100) -> list[DeadLetter]:
        """Remove and return up to `limit` dead letters of a consumer, oldest first."""
        ...


class Outcome(Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


async def dispatch(
    handlers: Mapping[str, Handler], envelope: Envelope, attempt: int, limit: int
) -> tuple[Outcome, str]:
    """The consuming rule both buses share: decode, handle, and say what to do with the delivery.

    `attempt` counts deliveries of this message, starting at 1.
    """
    handler = handlers.get(envelope.name)
    if handler is None:
        return Outcome.DEAD, f"no handler for {envelope.name!r}"
    try:
        message = decode(envelope.name, envelope.body)
    except InvalidMessage as exc:
        return Outcome.DEAD, str(exc)
    try:
        await handler(message)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        if attempt >= limit:
            log.error(
                "dead-lettering %s %s after %d attempts: %s",
                envelope.name,
                envelope.message_id,
                attempt,
                reason,
            )
            return Outcome.DEAD, f"failed {attempt} times, last: {reason}"
        log.warning(
            "handler for %s %s failed (attempt %d of %d): %s",
            envelope.name,
            envelope.message_id,
            attempt,
            limit,
            reason,
        )
        return Outcome.RETRY, reason
    return Outcome.ACK, ""


def create_bus(url: str, *, exchange: str, prefetch: int, delivery_limit: int) -> Bus:
    """The composition roots' one way to build a bus from settings."""
    if url.startswith("memory://"):
        from shared.bus.memory import MemoryBus

        return MemoryBus(prefetch=prefetch, delivery_limit=delivery_limit)
    from shared.bus.rabbit import RabbitBus

    return RabbitBus(url, exchange=exchange, prefetch=prefetch, delivery_limit=delivery_limit)


__all__ = [
    "Bus",
    "DeadLetter",
    "Envelope",
    "Handler",
    "Outcome",
    "create_bus",
    "dispatch",
]
