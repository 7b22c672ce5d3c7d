"""The simulated marketplace that drives traffic through the loop. Nothing in the loop imports it."""
