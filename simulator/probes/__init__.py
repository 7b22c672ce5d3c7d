"""Offline probes: one generator update, or one reward model, trained on logged base-model groups and scored."""
