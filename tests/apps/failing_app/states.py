"""Participants raise in their first state; the coordinator waits for their data, which never comes.

So the run can only end through the controllers: the failing sites report `error`, the hub marks the project `error`,
and the coordinator's controller must stop its instance.
"""

from FeatureCloud.app.engine.app import AppState, Role, app_state


class DeliberateFailure(RuntimeError):
    pass


@app_state("initial")
class InitialState(AppState):
    def register(self):
        self.register_transition("terminal", Role.BOTH)

    def run(self):
        if not self.is_coordinator:
            raise DeliberateFailure(f"client {self.id} fails on purpose (tests/apps/failing_app)")
        self.gather_data()
        return "terminal"
