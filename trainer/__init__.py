"""Training: pretraining of the base model and attribute classifier, incremental personalization updates."""
