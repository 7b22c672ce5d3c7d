"""What the loop's processes agree on: the records on Kafka (:mod:`perfusion.contracts.records`) and the topic names
(:mod:`perfusion.contracts.topics`). The worker, the trainer and the service all import these, and none another."""
