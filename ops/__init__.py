"""The operator's floor: the ``perfusion`` CLI, the one loop harness, the launchers of the local Kafka broker and
Redis, the demo and the benchmarks. It may import every floor below it; nothing imports it."""
