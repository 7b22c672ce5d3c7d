"""The one way to run the loop: the launchers of the local Kafka broker and Redis (:mod:`harness.infra`), the
supervisor of the loop's processes (:mod:`harness.processes`) and the loop harness itself (:mod:`harness.loop`).

The demo, the evaluation, the benchmarks and the integration tests all start the loop through here. It starts the
worker, the trainer and the service as ``perfusion`` subprocesses, so it imports none of their code.
"""
