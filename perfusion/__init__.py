"""PerFusion: personalized group-level preference alignment for a "sell it before you make it" loop."""

__version__ = "0.1.0"
