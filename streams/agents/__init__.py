"""The stream agents, one per module. Each module exposes ``register(context: streams.app.AgentContext)``.

``perfusion.events`` is read by one agent, :mod:`streams.agents.events`, which runs the event stages (preference
features, group builder, demand routing; each in its module, exposing ``stage(context)``) over every micro-batch.
The demand counter and the training trigger read the topics those stages write.

To add an agent: write ``streams/agents/<name>.py`` with ``register`` and add its module path to
:data:`AGENT_MODULES`. To add a computation over inbound events, add a stage module to
:data:`streams.agents.events.EVENT_STAGE_MODULES` instead of a second reader of the topic.
"""

AGENT_MODULES: tuple[str, ...] = (
    "streams.agents.events",
    "streams.agents.demand",
    "streams.agents.training",
)
