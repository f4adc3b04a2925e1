"""The bus on RabbitMQ (aio-pika): one durable topic exchange, one quorum queue per consumer.

Queues are named `<exchange>.<consumer>` (and `<exchange>.<consumer>.dead`), so one exchange name
namespaces a whole installation on a shared broker. Publishing waits for the broker's confirm.
Commands are published mandatory: a command no queue is bound to raises `Unroutable` (its owner has
not declared its queue yet; the outbox keeps it and retries) instead of vanishing. An event with no
consumer is simply dropped, as events have zero or more consumers. While the connection is down,
publish retries (up to `publish_timeout`); a lost confirm can mean a duplicate, which consumers
dedupe anyway.

Each consumer's queue is a durable quorum queue bound to the names it handles. Quorum queues count
deliveries (`x-delivery-count`), which gives `dispatch` its attempt number. A message
that `dispatch` gives up on is published (confirmed) to `<exchange>.dead`, routed to
`<exchange>.<consumer>.dead` with the reason in a header, and only then acked. The queue's own
`x-delivery-limit` sends a message there too, without a reason, if its deliveries are never
settled (a consumer that keeps crashing).

Connections are robust: aio-pika reconnects and restores exchanges, queues, bindings, qos and
consumers (tests/bus/test_rabbit_faults.py checks that it does). Each consumer has a connection of
its own, apart from the publisher's, so flow control on publishers never stalls consumers; each is
named `hpcfleet:<consumer or publisher>:<pid>` so an operator, or a test, can find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
    ConsumerTag,
)
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    PublishError,
)
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)
from yarl import URL

from shared.bus import DeadLetter, Envelope, Handler, Outcome, dispatch
from shared.events import CATALOGUE

log = logging.getLogger(__name__)

RECONNECT_INTERVAL = 1.0  # seconds; `?reconnect_interval=` in the URL overrides it
CANCEL_TIMEOUT = 5.0  # seconds stop() waits for the broker to confirm a consumer's cancel
SETTLE_TIMEOUT = 5.0  # seconds an ack or nack may take to reach the socket
PUBLISH_BATCH_TIMEOUT = 10.0  # seconds a batch may take to be written and confirmed
REASON_HEADER = "x-hpcfleet-reason"
CONSUMER_HEADER = "x-hpcfleet-consumer"

# Errors that mean "the connection or channel went away": worth retrying once it is back.
# A nack or a return (DeliveryError, PublishError) is the broker's answer and is not retried.
_TRANSIENT = (AMQPConnectionError, ChannelInvalidStateError, ConnectionError, TimeoutError)


class PublishRejected(Exception):
    """The broker did not take the message: it nacked it, or returned it (see `Unroutable`)."""


class Unroutable(PublishRejected):
    """No queue is bound to the command's name, so nobody would get it."""


@dataclass
class _Consumer:
    name: str
    connection: AbstractRobustConnection
    channel: AbstractRobustChannel
    queue: AbstractRobustQueue
    dead_exchange: AbstractExchange
    handlers: dict[str, Handler]
    tag: ConsumerTag = ""
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)
    acks: _Acks = field(default_factory=lambda: _Acks())


class _Acks:
    """A consumer's acks, coalesced. Handlers that finish in the same turn of the event loop (a
    group commit releases them together) are acked by one `multiple` ack up to the highest tag
    below which every delivery on the channel is among them, the rest one by one: a frame and a
    broker-side settle per message cost both ends more than the handler's own work. One task
    sends them, so its frames never overtake each other; a delivery that is not settled (in a
    handler, being nacked, left for redelivery at stop) is never covered.
    """

    def __init__(self) -> None:
        self.unsettled: dict[object, set[int]] = {}  # per aiormq channel: tags not yet settled
        self.ready: list[tuple[AbstractIncomingMessage, asyncio.Future[None]]] = []
        self.sender: asyncio.Task[None] | None = None

    def delivered(self, message: AbstractIncomingMessage) -> None:
        channel = _channel_of(message)
        if channel is not None and message.delivery_tag is not None:
            self.unsettled.setdefault(channel, set()).add(message.delivery_tag)
        for gone in [c for c in self.unsettled if getattr(c, "is_closed", False)]:
            del self.unsettled[gone]  # a reconnection's old channel: its tags are void

    def forget(self, message: AbstractIncomingMessage) -> None:
        """The delivery was settled otherwise (its nack has been written)."""
        tags = self.unsettled.get(_channel_of(message), set())
        tags.discard(message.delivery_tag or 0)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        future = asyncio.get_running_loop().create_future()
        self.ready.append((message, future))
        if self.sender is None or self.sender.done():
            # Its first step runs after the handlers already woken in this turn have acked.
            self.sender = asyncio.create_task(self._send())
        await future

    async def _send(self) -> None:
        while self.ready:
            batch, self.ready = self.ready, []
            await self._flush(batch)

    async def _flush(
        self, batch: list[tuple[AbstractIncomingMessage, asyncio.Future[None]]]
    ) -> None:
        by_channel: dict[object, dict[int, tuple[AbstractIncomingMessage, asyncio.Future[None]]]]
        by_channel = {}
        for message, future in batch:
            by_channel.setdefault(_channel_of(message), {})[message.delivery_tag or 0] = (
                message,
                future,
            )
        for channel, ready in by_channel.items():
            unsettled = self.unsettled.get(channel, set())
            cut = 0
            for tag in sorted(unsettled):
                if tag not in ready:
                    break
                cut = tag
            covered = sorted(tag for tag in ready if tag <= cut)
            try:
                if len(covered) > 1:
                    await ready[cut][0].ack(multiple=True)
                    _resolve(ready[tag][1] for tag in covered)
                    covered = []
                for tag in [*covered, *sorted(tag for tag in ready if tag > cut)]:
                    await ready[tag][0].ack()
                    _resolve([ready[tag][1]])
            except Exception as exc:
                for _, future in ready.values():
                    if not future.done():
                        future.set_exception(exc)
            finally:
                unsettled.difference_update(ready)
                if not unsettled:
                    self.unsettled.pop(channel, None)


def _resolve(futures: Iterable[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # its waiter may have timed out
            future.set_result(None)


def _channel_of(message: AbstractIncomingMessage) -> object:
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


class RabbitBus:
    """`Bus` over RabbitMQ; see the module docstring and `shared.bus` for the rules."""

    def __init__(
        self,
        url: str,
        *,
        exchange: str,
        prefetch: int,
        delivery_limit: int,
        publish_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.exchange = exchange
        self.dead_exchange = f"{exchange}.dead"
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self.publish_timeout = publish_timeout
        self._publisher: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._consumers: dict[str, _Consumer] = {}
        self._stopping = False

    def queue_name(self, consumer: str) -> str:
        return f"{self.exchange}.{consumer}"

    def connection_name(self, role: str) -> str:
        """The `connection_name` client property of the connection for a consumer or `publisher`."""
        return f"hpcfleet:{role}:{os.getpid()}"

    async def _connect(self, role: str) -> AbstractRobustConnection:
        url = URL(self.url)
        if "reconnect_interval" not in url.query:
            # aio-pika waits this long after a lost connection too, not only between failed
            # attempts; its default of 5 s leaves consumers idle for 5 s after every blip.
            url = url.update_query(reconnect_interval=RECONNECT_INTERVAL)
        return await aio_pika.connect_robust(
            url, client_properties={"connection_name": self.connection_name(role)}
        )

    async def start(self) -> None:
        self._stopping = False
        self._publisher = await self._connect("publisher")
        channel = await self._publisher.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        self._exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def ping(self) -> None:
        connections = [self._publisher, *(c.connection for c in self._consumers.values())]
        for connection in connections:
            if connection is None or connection.is_closed or not connection.connected.is_set():
                raise ConnectionError(f"RabbitMQ connection to {self.exchange!r} is not open")

    async def publish(self, envelope: Envelope) -> None:
        """Publish and wait for the confirm; while the connection is down, retry until
        `publish_timeout`, then raise ConnectionError (a lost confirm means the message may arrive
        twice: consumers dedupe). Raise PublishRejected on a nack or a return."""
        if self._exchange is None:
            raise ConnectionError("RabbitBus is not started")
        message = aio_pika.Message(
            envelope.body,
            message_id=envelope.message_id,
            correlation_id=envelope.correlation_id,
            type=envelope.name,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        retrying = AsyncRetrying(
            stop=stop_after_delay(self.publish_timeout),
            wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1),
            retry=retry_if_exception_type(_TRANSIENT),
            before_sleep=lambda state: log.warning(
                "publish of %s %s failed (%r); retrying",
                envelope.name,
                envelope.message_id,
                state.outcome.exception() if state.outcome else None,
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await _publish_confirmed(
                        self._exchange, message, envelope.name, mandatory=_is_command(envelope.name)
                    )
        except _TRANSIENT as exc:
            raise ConnectionError(
                f"could not publish {envelope.name} {envelope.message_id} "
                f"within {self.publish_timeout:g} s: {exc!r}"
            ) from exc

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """`publish` for a batch: the messages' frames go to the socket in one write and their
        confirms are awaited together (see `_send_batch`). After a transient failure the
        messages not yet confirmed are published again, until `publish_timeout`; a nack or a
        return raises."""
        if self._channel is None:
            raise ConnectionError("RabbitBus is not started")
        pending = list(envelopes)
        retrying = AsyncRetrying(
            stop=stop_after_delay(self.publish_timeout),
            wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1),
            retry=retry_if_exception_type(_TRANSIENT),
            before_sleep=lambda state: log.warning(
                "publish of %d messages failed (%r); retrying",
                len(pending),
                state.outcome.exception() if state.outcome else None,
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    channel = await self._channel.get_underlay_channel()
                    results = await self._send_batch(channel, pending)
                    errors = [r for r in results if isinstance(r, BaseException)]
                    for error in errors:
                        if not isinstance(error, _TRANSIENT):
                            raise error
                    if errors:
                        pending = [
                            e for e, r in zip(pending, results, strict=True) if r is not None
                        ]
                        raise errors[0]
        except _TRANSIENT as exc:
            raise ConnectionError(
                f"could not publish {len(pending)} of {len(envelopes)} messages"
                f" within {self.publish_timeout:g} s: {exc!r}"
            ) from exc

    async def _send_batch(
        self, channel: Any, envelopes: Sequence[Envelope]
    ) -> list[BaseException | None]:
        """Publish `envelopes` on the publisher's (aiormq) channel with `publish`'s properties, as
        aiormq's `basic_publish` does each one, but with their frames in one write to the socket:
        a relay batch then costs one write, not a write, a task, a lock turn, a timeout and two
        futures a message (which cost the relay more CPU than the broker spent on the batch).
        Returns each message's outcome: None once confirmed, else the error."""
        confirmations: list[asyncio.Future[Any]] = []
        tags: list[tuple[str, int]] = []
        frames: list[Any] = []
        try:
            async with (
                asyncio.timeout(PUBLISH_BATCH_TIMEOUT),
                channel.lock,
            ):  # as basic_publish: delivery tags are taken in order
                first = channel.delivery_tag
                sent = False
                try:
                    for envelope in envelopes:
                        channel.delivery_tag += 1
                        tag = channel.delivery_tag
                        properties = Basic.Properties(
                            content_type="application/json",
                            delivery_mode=2,  # persistent
                            message_id=envelope.message_id,
                            correlation_id=envelope.correlation_id,
                            message_type=envelope.name,
                        )
                        frames.append(
                            Basic.Publish(
                                exchange=self.exchange,
                                routing_key=envelope.name,
                                mandatory=_is_command(envelope.name),
                            )
                        )
                        frames.append(
                            ContentHeader(body_size=len(envelope.body), properties=properties)
                        )
                        size = channel.max_content_size
                        frames.extend(
                            ContentBody(envelope.body[at : at + size])
                            for at in range(0, len(envelope.body), size)
                        )
                        confirmation = channel.create_future()
                        channel.confirmations[tag] = confirmation
                        # a return names the message by id: aiormq finds its tag here
                        channel.message_id_delivery_tag[envelope.message_id] = tag
                        confirmations.append(confirmation)
                        tags.append((envelope.message_id, tag))
                    written = channel.create_future()
                    await channel.write_queue.put(
                        ChannelFrame.marshall(
                            channel_number=channel.number, frames=frames, drain_future=written
                        )
                    )
                    sent = True
                    await written
                except BaseException:
                    if not sent:  # the broker has seen none of them: give the tags back
                        channel.delivery_tag = first
                        for message_id, tag in tags:
                            channel.confirmations.pop(tag, None)
                            if channel.message_id_delivery_tag.get(message_id) == tag:
                                channel.message_id_delivery_tag.pop(message_id)
                        for confirmation in confirmations:
                            confirmation.cancel()
                    raise
            async with asyncio.timeout(PUBLISH_BATCH_TIMEOUT):
                results = await asyncio.gather(*confirmations, return_exceptions=True)
        finally:
            for message_id, tag in tags:
                if channel.message_id_delivery_tag.get(message_id) == tag:
                    channel.message_id_delivery_tag.pop(message_id)
        outcomes: list[BaseException | None] = []
        for envelope, result in zip(envelopes, results, strict=True):
            if isinstance(result, PublishError):
                outcomes.append(
                    Unroutable(
                        f"no queue is bound to {envelope.name!r} on {self.exchange!r}: "
                        f"{envelope.name} {envelope.message_id} was returned"
                    )
                )
            elif isinstance(result, DeliveryError):
                outcomes.append(
                    PublishRejected(f"broker nacked {envelope.name} {envelope.message_id}")
                )
            elif isinstance(result, BaseException):
                outcomes.append(result)
            else:
                outcomes.append(None)
        return outcomes

    async def subscribe(self, consumer: str, handlers: Mapping[str, Handler]) -> None:
        existing = self._consumers.get(consumer)
        if existing is not None:
            existing.handlers.update(handlers)
            await self._bind(existing.channel, existing.queue, handlers)
            return
        connection = await self._connect(consumer)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.prefetch)
        dead_exchange = await channel.declare_exchange(
            self.dead_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dead_queue = await channel.declare_queue(
            f"{self.queue_name(consumer)}.dead", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead_exchange, routing_key=consumer)
        queue = await channel.declare_queue(
            self.queue_name(consumer),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # Our own rule dead-letters at `delivery_limit` with the reason; the broker's limit
                # is the backstop for deliveries we never settle (a consumer that keeps crashing).
                "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": self.dead_exchange,
                "x-dead-letter-routing-key": consumer,
            },
        )
        await self._bind(channel, queue, handlers)
        state = _Consumer(consumer, connection, channel, queue, dead_exchange, dict(handlers))
        self._consumers[consumer] = state
        state.tag = await queue.consume(functools.partial(self._on_delivery, state))

    async def _bind(
        self, channel: AbstractRobustChannel, queue: AbstractRobustQueue, names: Mapping[str, Any]
    ) -> None:
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for name in names:
            await queue.bind(exchange, routing_key=name)

    async def _on_delivery(self, consumer: _Consumer, message: AbstractIncomingMessage) -> None:
        """Run the handler in a task of our own: aio-pika cancels its delivery tasks when the
        channel drops, and a handler should finish (its redelivery is deduplicated) rather than
        stop halfway."""
        consumer.acks.delivered(message)  # first: a `multiple` ack must never cover it
        if self._stopping:
            return  # left unacknowledged: the broker hands it out again after we close
        task = asyncio.create_task(self._handle(consumer, message))
        consumer.in_flight.add(task)
        task.add_done_callback(consumer.in_flight.discard)

    async def _handle(self, consumer: _Consumer, message: AbstractIncomingMessage) -> None:
        envelope = Envelope(
            name=message.routing_key or "",
            body=message.body,
            message_id=message.message_id or "",
            correlation_id=message.correlation_id or "",
        )
        # Quorum queues count earlier deliveries of this message in x-delivery-count.
        delivered_before = message.headers.get("x-delivery-count", 0)
        attempt = (delivered_before if isinstance(delivered_before, int) else 0) + 1
        outcome, reason = await dispatch(consumer.handlers, envelope, attempt, self.delivery_limit)
        try:
            if outcome is Outcome.DEAD:
                try:
                    await self._dead_letter(consumer, message, reason)
                except (PublishRejected, *_TRANSIENT):
                    log.exception("could not dead-letter %s %s", envelope.name, envelope.message_id)
                    outcome = Outcome.RETRY  # the queue's own delivery limit catches it later
            # Bounded: an ack sent just as the connection drops can wait forever for a socket that
            # is gone (seen with aiormq 7.2.4), and would hold up stop(); the broker redelivers.
            async with asyncio.timeout(SETTLE_TIMEOUT):
                if outcome is Outcome.RETRY:
                    try:
                        await message.nack(requeue=True)
                    finally:
                        consumer.acks.forget(message)
                else:
                    await consumer.acks.ack(message)
        except _TRANSIENT as exc:
            log.warning(
                "could not settle %s %s (%r); the broker will deliver it again",
                envelope.name,
                envelope.message_id,
                exc,
            )

    async def _dead_letter(
        self, consumer: _Consumer, message: AbstractIncomingMessage, reason: str
    ) -> None:
        """Publish the original body to `<consumer>.dead` with the reason in a header, confirmed,
        before the delivery is acked, so a dead letter is never lost and always says why."""
        headers = {
            key: value for key, value in message.headers.items() if key != "x-delivery-count"
        }
        headers[REASON_HEADER] = reason
        headers[CONSUMER_HEADER] = consumer.name
        dead = aio_pika.Message(
            message.body,
            headers=headers,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            type=message.type or message.routing_key,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await _publish_confirmed(consumer.dead_exchange, dead, consumer.name)

    async def take_dead_letters(self, consumer: str, limit: int = 100) -> list[DeadLetter]:
        if self._publisher is None:
            raise ConnectionError("RabbitBus is not started")
        taken: list[DeadLetter] = []
        channel = await self._publisher.channel(publisher_confirms=False)
        try:
            try:
                queue = await channel.declare_queue(
                    f"{self.queue_name(consumer)}.dead", passive=True, robust=False
                )
            except ChannelNotFoundEntity:
                return []  # the consumer never subscribed on this broker
            while len(taken) < limit:
                message = await queue.get(fail=False)
                if message is None:
                    break
                taken.append(_dead_letter_of(consumer, message))
                await message.ack()
        finally:
            with contextlib.suppress(*_TRANSIENT):
                await channel.close()
        return taken

    async def stop(self) -> None:
        self._stopping = True
        for consumer in self._consumers.values():
            # With the broker down, cancel would wait for a reconnection: skip it (closing the
            # connection below ends the consumer anyway), and bound it in case the link drops now.
            if not consumer.connection.connected.is_set():
                continue
            with contextlib.suppress(*_TRANSIENT):
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    await consumer.queue.cancel(consumer.tag)
        for consumer in self._consumers.values():
            while consumer.in_flight:
                await asyncio.gather(*consumer.in_flight, return_exceptions=True)
        for consumer in self._consumers.values():
            await consumer.connection.close()
        self._consumers.clear()
        if self._publisher is not None:
            await self._publisher.close()
        self._publisher = self._channel = self._exchange = None


def _is_command(name: str) -> bool:
    """Commands (and names outside the catalogue) must reach a queue; events may reach none."""
    kind = CATALOGUE.get(name)
    return kind is None or kind.kind == "command"


async def _publish_confirmed(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    *,
    mandatory: bool = True,
) -> None:
    try:
        await exchange.publish(message, routing_key=routing_key, mandatory=mandatory, timeout=10)
    except PublishError as exc:
        raise Unroutable(
            f"no queue is bound to {routing_key!r} on {exchange.name!r}: "
            f"{message.type} {message.message_id} was returned"
        ) from exc
    except DeliveryError as exc:
        raise PublishRejected(
            f"broker nacked {message.type} {message.message_id} to {routing_key!r}: {exc}"
        ) from exc


def _dead_letter_of(consumer: str, message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers
    reason = headers.get(REASON_HEADER)
    if not isinstance(reason, str):
        # Dead-lettered by the broker itself (its delivery limit), not by `dispatch`.
        cause = headers.get("x-first-death-reason", b"unknown")
        cause = cause.decode() if isinstance(cause, bytes) else str(cause)
        reason = f"dead-lettered by RabbitMQ: {cause}"
    envelope = Envelope(
        name=message.type or message.routing_key or "",
        body=message.body,
        message_id=message.message_id or "",
        correlation_id=message.correlation_id or "",
    )
    return DeadLetter(consumer, envelope, reason)
