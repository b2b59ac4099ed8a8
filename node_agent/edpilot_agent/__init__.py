"""edpilot's node agent: measures GPUs and work on one node, applies the operator's power limits."""

from edpilot import __version__

AGENT_VERSION = __version__
