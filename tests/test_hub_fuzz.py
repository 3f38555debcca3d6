"""Schema-driven fuzzing of the real hub process: schemathesis draws valid and invalid requests for every operation
of the hub's OpenAPI (with and without a login, with random and with real project/run ids); none may answer 500."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.test_hub_api import HubProcess, project_with_members, start_run

pytestmark = pytest.mark.e2e

EXAMPLES = 300  # bounded: the whole test stays well under a minute
MAX_WAIT = 0.2  # s; long polls are capped so that fuzzing does not sit in them


def test_no_request_makes_the_hub_fail(tmp_path):
    hub = HubProcess(tmp_path / "hub.sqlite3").start()
    try:
        pid, clients = project_with_members(hub, names=("coord", "member"))
        run = start_run(pid, clients)
        auth = {"Authorization": f"Bearer {clients[0]._access}"}
        schema = schemathesis.openapi.from_url(hub.url + "/openapi.json")
        cases = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                          schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
        failures: list[str] = []
        statuses: list[int] = []

        @given(case=cases, logged_in=st.booleans(), real_ids=st.booleans())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def call(case, logged_in, real_ids):
            if real_ids and isinstance(case.path_parameters, dict):
                case.path_parameters.update({k: v for k, v in (("pid", pid), ("run_nr", run))
                                             if k in case.path_parameters})
            if isinstance(case.query, dict) and isinstance(case.query.get("wait"), int | float):
                case.query["wait"] = min(max(case.query["wait"], 0), MAX_WAIT)
            response = case.call(base_url=hub.url, headers=auth if logged_in else None, timeout=30)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} query={case.query} body={case.body!r}: "
                                f"{response.status_code}")

        call()
        assert not failures, "\n".join(failures[:20])
        # the fuzzing reached the handlers: some calls were accepted, some refused by the rules, some by validation
        assert {200, 401, 404, 422} <= set(statuses), sorted(set(statuses))
        print(f"{len(statuses)} calls, statuses {sorted(set(statuses))}")
        assert hub.process.poll() is None
        log = hub.log.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        hub.stop()
