"""The preregistered science evaluation (``perfusion eval science``): one update of every arm on the same logged
round, in process, with the loop's own code (the worker's pure stages, the trainer's update, the service's
generator), scored by the simulator's shoppers against the base model. See docs/science-protocol.md."""
