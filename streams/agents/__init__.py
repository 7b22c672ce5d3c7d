"""The stream agents, one per module. Each module exposes ``register(context: streams.app.AgentContext)``.

To add an agent: write ``streams/agents/<name>.py`` with ``register`` and add its module path to
:data:`AGENT_MODULES`. Exactly one agent (``preferences``) dead-letters invalid events of ``perfusion.events``;
others that read that topic use ``EventGate(sink=None)``, which skips and counts them.
"""

AGENT_MODULES: tuple[str, ...] = (
    "streams.agents.preferences",
    "streams.agents.groups",
    "streams.agents.demand",
    "streams.agents.training",
)
