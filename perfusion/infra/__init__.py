"""Local infrastructure the loop runs on: the Kafka broker (KRaft, one JVM) and the Redis server.

Import the submodules directly (``perfusion.infra.kafka_broker``, ``perfusion.infra.redis_server``); this package
imports nothing heavy so that the CLI stays fast.
"""
