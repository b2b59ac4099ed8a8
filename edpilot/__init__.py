"""edpilot: measure and lower the energy GPU workloads spend per unit of work."""

__version__ = "0.1.0"
