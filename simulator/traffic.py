"""A seeded marketplace that produces realistic event streams for a handful of users.

Merchants post designs; the generator shows shoppers groups of K catalog-like candidates; shoppers click with a
position bias and in proportion to their hidden taste, order some of what they clicked and return some of what
they ordered (more often when it suited them less); merchants select candidates of their own designs. The hidden
tastes live only here: the loop must learn them from behaviour.

Use :meth:`TrafficSimulator.events` as a library, :func:`produce_events` to send them to Kafka (kafka-python),
or ``perfusion simulate``.

The same simulator also drives the closed-loop evaluation with *generated* images: the generator draws the
candidates, :class:`simulator.marketplace.Marketplace` decides what a viewer does with them from the pixels (via a
pluggable preference panel), and :meth:`TrafficSimulator.design_event`, :meth:`TrafficSimulator.impression_event`
and :meth:`TrafficSimulator.response_events` turn that into the same timed, keyed events.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import Field

from perfusion.attributes import ATTRIBUTE_KINDS, Attributes, descriptor_blocks, one_hot_descriptor
from perfusion.contracts.records import AnyEvent, Candidate, Click, DesignCreated, Impression, Order, Return, Select
from perfusion.errors import ConfigError
from perfusion.settings import KafkaSecuritySettings, Settings
from simulator.marketplace import GroupResponse

log = logging.getLogger(__name__)


class TrafficConfig(Settings):
    """Shape of the simulated marketplace."""

    seed: int = Field(default=0, description="same seed, same events")
    shoppers: int = Field(default=5, ge=1, description="number of shoppers")
    merchants: int = Field(default=2, ge=1, description="number of merchants posting designs")
    designs: int = Field(default=6, ge=1, description="number of designs posted before the first impression")
    candidates_per_impression: int = Field(default=4, ge=1, le=16, description="K, images shown per impression")
    start_ts: float = Field(default=0.0, description="event time of the first event; 0 = one hour ago")
    mean_gap_s: float = Field(default=2.0, gt=0, description="mean event-time gap between impressions (seconds)")
    taste_sharpness: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="0 = indifferent shoppers, 1 = each wants exactly one value of each kind",
    )
    merchant_view_rate: float = Field(
        default=0.1, description="share of impressions shown to the design's merchant, who selects candidates"
    )
    model_version: str = Field(default="catalog", description="model_version stamped on impressions")
    max_follow_up_s: float = Field(
        default=240.0, description="latest a click, order or return comes after its impression (seconds)"
    )


@dataclass(frozen=True)
class SimulatedUser:
    user_id: str
    taste: list[float]  # a descriptor: per attribute kind, how much this user likes each value

    def affinity(self, descriptor: list[float]) -> float:
        """How well an image suits this user, 0..1: the mean over attribute kinds of taste . image."""
        taste_blocks, image_blocks = descriptor_blocks(self.taste), descriptor_blocks(descriptor)
        per_kind = [sum(t * i for t, i in zip(taste_blocks[k], image_blocks[k], strict=True)) for k in taste_blocks]
        return sum(per_kind) / len(per_kind)


@dataclass(frozen=True)
class Design:
    design_id: str
    merchant: SimulatedUser
    garment: str
    prompt: str


class TrafficSimulator:
    """Generates one seeded stream of events; successive calls to :meth:`events` continue the same stream."""

    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._clock = config.start_ts or time.time() - 3600.0
        self._serial = 0
        self.shoppers = [self._user(f"shopper-{index}") for index in range(config.shoppers)]
        self.merchants = [self._user(f"merchant-{index}") for index in range(config.merchants)]
        self._designs: list[Design] = []
        self._pending: list[AnyEvent] = []

    def events(self, count: int) -> list[AnyEvent]:
        """The next ``count`` events: designs first, then impressions with what followed each."""
        out: list[AnyEvent] = []
        while len(out) < count:
            if not self._pending:
                self._pending.extend(self._next_episode())
            out.append(self._pending.pop(0))
        return out

    def _user(self, user_id: str) -> SimulatedUser:
        liked = {kind: self._rng.choice(values) for kind, values in ATTRIBUTE_KINDS.items()}
        sharp, uniform = one_hot_descriptor(liked), one_hot_descriptor({})
        mix = self.config.taste_sharpness
        return SimulatedUser(user_id, [mix * s + (1.0 - mix) * u for s, u in zip(sharp, uniform, strict=True)])

    def _event_id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-{self.config.seed}-{self._serial:07d}"

    def _next_episode(self) -> list[AnyEvent]:
        if len(self._designs) < self.config.designs:
            return [self._post_design()]
        self._clock += self._rng.expovariate(1.0 / self.config.mean_gap_s)
        design = self._rng.choice(self._designs)
        if self._rng.random() < self.config.merchant_view_rate:
            return self._merchant_view(design)
        return self._shopper_view(design, self._rng.choice(self.shoppers))

    def _post_design(self) -> DesignCreated:
        merchant = self._rng.choice(self.merchants)
        garment = self._rng.choice(ATTRIBUTE_KINDS["garment"])
        design = Design(self._event_id("design"), merchant, garment, f"a {garment} for the season")
        self._designs.append(design)
        return DesignCreated(
            event_id=design.design_id,
            ts=self._clock,
            user_id=merchant.user_id,
            design_id=design.design_id,
            prompt=design.prompt,
            order_threshold=self._rng.randint(3, 8),
        )

    def _impression(self, design: Design, viewer: SimulatedUser) -> Impression:
        candidates = []
        for position in range(self.config.candidates_per_impression):
            labels = {kind: self._rng.choice(values) for kind, values in ATTRIBUTE_KINDS.items()}
            attributes = Attributes(**{**labels, "garment": design.garment})
            image_id = f"catalog-{'-'.join(getattr(attributes, kind) for kind in ATTRIBUTE_KINDS)}-{position}"
            candidates.append(Candidate(image_id=image_id, position=position, descriptor=attributes.descriptor()))
        return Impression(
            event_id=self._event_id("imp"),
            ts=self._clock,
            user_id=viewer.user_id,
            design_id=design.design_id,
            prompt=design.prompt,
            model_version=self.config.model_version,
            candidates=candidates,
        )

    def _shopper_view(self, design: Design, shopper: SimulatedUser) -> list[AnyEvent]:
        impression = self._impression(design, shopper)
        episode: list[AnyEvent] = [impression]
        ts = impression.ts
        user_id, impression_id, design_id = shopper.user_id, impression.event_id, design.design_id
        for candidate in impression.candidates:
            affinity = shopper.affinity(candidate.descriptor)
            position_bias = 1.0 / math.sqrt(1.0 + candidate.position)
            if self._rng.random() >= 0.9 * position_bias * affinity**2:
                continue
            ts = min(ts + self._rng.uniform(1.0, 20.0), impression.ts + self.config.max_follow_up_s)
            click = Click(
                event_id=self._event_id("click"),
                ts=ts,
                user_id=user_id,
                impression_id=impression_id,
                design_id=design_id,
                image_id=candidate.image_id,
            )
            episode.append(click)
            if self._rng.random() >= 0.6 * affinity:
                continue
            ts = min(ts + self._rng.uniform(5.0, 60.0), impression.ts + self.config.max_follow_up_s)
            order = Order(
                event_id=self._event_id("order"),
                ts=ts,
                image_id=candidate.image_id,
                quantity=self._rng.choice((1, 1, 1, 2)),
                user_id=user_id,
                impression_id=impression_id,
                design_id=design_id,
            )
            episode.append(order)
            if self._rng.random() < 0.4 * (1.0 - affinity):
                ts = min(ts + self._rng.uniform(30.0, 120.0), impression.ts + self.config.max_follow_up_s)
                episode.append(Return.of_order(order, self._event_id("return"), ts))
        return episode

    def _merchant_view(self, design: Design) -> list[AnyEvent]:
        impression = self._impression(design, design.merchant)
        ranked = sorted(impression.candidates, key=lambda c: design.merchant.affinity(c.descriptor), reverse=True)
        chosen = ranked[: self._rng.randint(1, min(2, len(ranked)))]
        select = Select(
            event_id=self._event_id("select"),
            ts=impression.ts + self._rng.uniform(5.0, 30.0),
            user_id=design.merchant.user_id,
            impression_id=impression.event_id,
            design_id=design.design_id,
            image_ids=[c.image_id for c in chosen],
        )
        return [impression, select]

    # ------------------------------------------------------------------ generated groups (closed-loop evaluation)

    def design_event(
        self, design_id: str, merchant_id: str, prompt: str, ts: float, order_threshold: int = 5
    ) -> DesignCreated:
        """A merchant posting a text design at event time ``ts``."""
        return DesignCreated(
            event_id=self._event_id("design"),
            ts=ts,
            user_id=merchant_id,
            design_id=design_id,
            prompt=prompt,
            order_threshold=order_threshold,
        )

    def impression_event(
        self,
        viewer_id: str,
        design_id: str,
        prompt: str,
        model_version: str,
        image_ids: list[str],
        descriptors: list[list[float]],
        ts: float,
    ) -> Impression:
        """An impression of generated candidates, shown in slots 0..K-1 in the order given."""
        if len(image_ids) != len(descriptors):
            raise ConfigError(f"need one descriptor per image: {len(image_ids)} images, {len(descriptors)} descriptors")
        return Impression(
            event_id=self._event_id("imp"),
            ts=ts,
            user_id=viewer_id,
            design_id=design_id,
            prompt=prompt,
            model_version=model_version,
            candidates=[
                Candidate(image_id=image_id, position=position, descriptor=descriptor)
                for position, (image_id, descriptor) in enumerate(zip(image_ids, descriptors, strict=True))
            ],
        )

    def response_events(self, impression: Impression, response: GroupResponse) -> list[AnyEvent]:
        """The clicks, orders, returns and selection that ``response`` holds for ``impression``, timed after it."""
        if response.k != len(impression.candidates):
            raise ConfigError(
                f"response covers {response.k} candidates, impression {impression.event_id} shows "
                f"{len(impression.candidates)}"
            )
        limit = impression.ts + self.config.max_follow_up_s
        user_id, impression_id, design_id = impression.user_id, impression.event_id, impression.design_id
        events: list[AnyEvent] = []
        ts = impression.ts
        for candidate in sorted(impression.candidates, key=lambda c: c.position):
            slot = candidate.position
            if not response.clicked[slot]:
                continue
            ts = min(ts + self._rng.uniform(1.0, 20.0), limit)
            events.append(
                Click(
                    event_id=self._event_id("click"),
                    ts=ts,
                    user_id=user_id,
                    impression_id=impression_id,
                    design_id=design_id,
                    image_id=candidate.image_id,
                )
            )
            if not response.ordered[slot]:
                continue
            ts = min(ts + self._rng.uniform(5.0, 60.0), limit)
            order = Order(
                event_id=self._event_id("order"),
                ts=ts,
                image_id=candidate.image_id,
                quantity=1,
                user_id=user_id,
                impression_id=impression_id,
                design_id=design_id,
            )
            events.append(order)
            if response.returned[slot]:
                ts = min(ts + self._rng.uniform(30.0, 120.0), limit)
                events.append(Return.of_order(order, self._event_id("return"), ts))
        chosen = [c.image_id for c in impression.candidates if response.selected[c.position]]
        if chosen:
            events.append(
                Select(
                    event_id=self._event_id("select"),
                    ts=min(impression.ts + self._rng.uniform(5.0, 30.0), limit),
                    user_id=user_id,
                    impression_id=impression_id,
                    design_id=design_id,
                    image_ids=chosen,
                )
            )
        return events


def encode(event: AnyEvent) -> tuple[bytes, bytes]:
    """(key, value) of an event on ``perfusion.events``: keyed by user id."""
    return event.user_id.encode(), event.to_bytes()


def produce_events(
    messages: Iterable[tuple[bytes, bytes]],
    bootstrap_servers: str,
    topic: str,
    rate: float | None = None,
    security: KafkaSecuritySettings | None = None,
) -> int:
    """Send (key, value) pairs with kafka-python at about ``rate`` messages/s (None = as fast as possible), connecting
    with ``security`` (None: PLAINTEXT); returns how many were sent, all acknowledged by the broker."""
    from kafka import KafkaProducer

    from perfusion.kafka_security import kafka_python_kwargs

    if rate is not None and rate <= 0:
        raise ConfigError(f"rate must be positive (messages per second), got {rate}")
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5, **kafka_python_kwargs(security)
    )
    sent = 0
    started = time.monotonic()
    try:
        futures = []
        for key, value in messages:
            futures.append(producer.send(topic, key=key, value=value))
            sent += 1
            if rate is not None:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()
    log.info("sent %d messages to %s in %.1f s", sent, topic, time.monotonic() - started)
    return sent
