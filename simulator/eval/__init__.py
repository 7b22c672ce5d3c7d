"""The closed-loop evaluation: every arm of the trainer driven through the live loop against simulated shoppers."""
