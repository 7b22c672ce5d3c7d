"""The closed-loop evaluation: every arm drives the real loop against the same simulated marketplace.

One arm, one round: the arm's serving version generates K candidates for each planned showing (the viewer's
features read from the arm's Feast online store, as the service does); the marketplace decides, from the pixels,
what the viewer does; the live showings' events go to Kafka; the arm's own stream worker (``perfusion worker``
with the arm's topic prefix and Feast store) turns them into features and group samples; the arm's trainer
(``trainer.loop.Trainer``) consumes the samples, updates, gates and publishes; the next round generates from what
was published. Round ``r`` measures the version after ``r`` updates; round 0 is the base model for every arm.

Every arm sees the same plan: the same users, prompts, seeds, event times and marketplace random numbers (one
``numpy`` stream per showing), so differences between arms come from their images alone. Besides the live
showings (training users on training prompts), each round measures held-out prompts (never sent to Kafka, never
trained on) and held-out cold-start users (a profile in Feast, no behaviour).

Metrics per arm, round and slice, as ratios of sums over users: CTR = clicks / candidates shown, conversion =
orders / clicks, return rate = returns / orders, mean true utility of the shown candidates. 95% intervals come
from a paired bootstrap over users (one resampling of users shared by all arms, so lifts against the base arm are
paired too). The reward models are compared offline: PerFusionRM and the same towers without plug-ins, trained
on the same live groups and scored by GAUC and MAP on the held-out groups.
"""

from perfusion.errors import InfrastructureError


class EvaluationError(InfrastructureError):
    """The evaluation could not run a step of the loop (worker, Feast, Kafka)."""
