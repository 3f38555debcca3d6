"""The two timings of localfc (DESIGN §5): `realistic` keeps FeatureCloud's waits, `fast` shrinks them."""

from __future__ import annotations

from dataclasses import dataclass

from fedsim_runner.errors import ConfigError


@dataclass(frozen=True)
class Timing:
    name: str
    query_interval: float  # longest pause between GET /status calls to an idle app instance
    first_poll: float  # first pause after activity; pauses grow from it to query_interval
    hub_poll: float  # seconds between the controller's looks at its projects on the hub
    relay_wait: float  # long-poll length of one relay receive
    engine_waits: dict  # FeatureCloud engine module constants to override; empty = the engine's own

    @classmethod
    def named(cls, name: str) -> Timing:
        if name not in TIMINGS:
            raise ConfigError(f"timing {name!r} is unknown; use one of: {', '.join(TIMINGS)}")
        return TIMINGS[name]


TIMINGS = {
    # FeatureCloud's CLI polls an app every 2 s; the engine waits 1 s between states and 10 s + 10 s at the end
    "realistic": Timing("realistic", query_interval=2.0, first_poll=2.0, hub_poll=2.0, relay_wait=10.0, engine_waits={}),
    "fast": Timing("fast", query_interval=0.1, first_poll=0.005, hub_poll=0.5, relay_wait=5.0,
                   engine_waits={"TRANSITION_WAIT": 0.01, "TERMINAL_WAIT": 0.2, "DATA_POLL_INTERVAL": 0.01}),
}
