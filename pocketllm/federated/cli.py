"""`pocketllm federate simulate|serve|join`: the actions, by name."""

from __future__ import annotations

from ..methods import settings_for


def _simulate(args, settings) -> int:
    from .simulate import simulate
    simulate(args, settings)
    return 0


def _serve(args, settings) -> int:
    from .deploy import serve
    return serve(args, settings)


def _join(args, settings) -> int:
    from .deploy import join
    return join(args, settings)


ACTIONS = {"simulate": _simulate, "serve": _serve, "join": _join}


def run(action: str, args, given: dict) -> int:
    from .partition import parse
    try:
        parse(args.partition)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return ACTIONS[action](args, settings_for(args.method, given))
