"""Local infrastructure the loop runs on: the Kafka broker (KRaft, one JVM) and the Redis server.

Import the submodules directly (``harness.infra.kafka_broker``, ``harness.infra.redis_server``); this package
imports nothing heavy so that the CLI stays fast.
"""
