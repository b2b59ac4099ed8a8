"""The `edpilot` command. Each subcommand lives with the component it runs and is imported
only when chosen, so `edpilot simulate` needs neither a cluster client nor NVML."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, one-line help); each module has `main(argv: list[str]) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("edpilot_operator.main", "run the kopf operator that closes the EDP loop"),
    "agent": ("edpilot_agent.main", "run the node agent for one GPU node"),
    "agent-setter": ("edpilot_agent.setter", "the agent's privileged helper: sets GPU power limits"),
    "extender": ("edpilot_operator.extender", "run the kube-scheduler extender HTTP server"),
    "simulate": ("edpilot.simulate", "run the closed loop on a simulated fleet, no cluster"),
    "demo": ("edpilot_operator.demo", "local control plane + KWOK GPU nodes + operator, converging"),
    "report": ("edpilot.report", "tables and plots of policies and workloads"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items())
    return (
        f"usage: edpilot <command> [options]\n\ncommands:\n{rows}\n\n`edpilot <command> --help` for options."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from edpilot import __version__

        print(__version__)
        return 0
    if args[0] not in COMMANDS:
        print(f"edpilot: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    run: Callable[[list[str]], int] = module.main
    return run(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
