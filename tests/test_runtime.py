"""The app runtime with real engine processes, driven by the app protocol over the in-process relay (no hub).

Covers: the mean app across 3 instances, a failing app (error detected, traceback in the instance log, instances
stopped), and a third-party-style app that hard-codes /mnt/input and /mnt/output (root: private mount namespace).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fedsim_runner.errors import ConfigError
from fedsim_runner.localfc.project_runner import AppFailed, drive
from fedsim_runner.localfc.runtime import start_instance
from fedsim_runner.localfc.testbed import LocalRelay
from fedsim_runner.localfc.timing import Timing
from tests.conftest import REPO, needs_root

pytestmark = pytest.mark.e2e
FAST = Timing.named("fast")
MEAN_DATA = ["1,2,3,4,5", "7,9,11", "2,2,2,4,6,6,6"]

# An app as a third party writes it: fixed /mnt paths, no FedSim environment variables.
THIRD_PARTY_STATES = '''
from FeatureCloud.app.engine.app import AppState, app_state


@app_state("initial")
class Only(AppState):
    def register(self):
        self.register_transition("terminal")

    def run(self):
        with open("/mnt/input/numbers.txt") as f:
            total = sum(int(v) for v in f.read().split())
        self.send_data_to_coordinator(total)
        if self.is_coordinator:
            self.broadcast_data(sum(self.gather_data()))
        with open("/mnt/output/total.txt", "w") as f:
            f.write(str(self.await_data()))
        return "terminal"
'''


def run_instances(app_dir: Path, inputs: list[Path], root: Path) -> tuple[list, list, list[Path]]:
    """Start one instance per input folder, drive all to their end; (outputs, per-client outcome, log files)."""
    clients = [str(i + 1) for i in range(len(inputs))]
    relay = LocalRelay(clients, clients[0])
    outputs = [root / f"out{c}" for c in clients]
    logs = [root / f"app{c}.log" for c in clients]
    instances = []
    try:
        for input_dir, output_dir, log in zip(inputs, outputs, logs, strict=True):
            output_dir.mkdir(parents=True)
            instances.append(start_instance(app_dir, input_dir, output_dir, log, FAST.engine_waits))
        outcome: list = [None] * len(clients)
        failed = threading.Event()

        def client(i: int) -> None:
            try:
                drive(instances[i], client_id=clients[i], coordinator_id=clients[0], clients=clients,
                      relay=relay.endpoint(clients[i]), query_interval=FAST.query_interval,
                      first_poll=FAST.first_poll, cancelled=lambda: "another client failed" if failed.is_set() else None)
                outcome[i] = "finished"
            except AppFailed as e:
                outcome[i] = f"error: {e}"
                failed.set()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a client did not end within 60 s"
    finally:
        for instance in instances:
            instance.stop()
    assert all(not instance.alive() for instance in instances)
    return outputs, outcome, logs


def inputs_for(root: Path, files: list[dict[str, str]]) -> list[Path]:
    folders = []
    for i, content in enumerate(files):
        folder = root / f"in{i + 1}"
        folder.mkdir(parents=True)
        for name, text in content.items():
            (folder / name).write_text(text)
        folders.append(folder)
    return folders


def test_mean_app_gives_the_mean_of_local_means_at_every_site(tmp_path):
    config = "fc_mean:\n  input_name: data.csv\n  output_name: result.txt\n"
    inputs = inputs_for(tmp_path, [{"config.yml": config, "data.csv": d} for d in MEAN_DATA])
    outputs, outcome, _ = run_instances(REPO / "apps" / "mean", inputs, tmp_path)
    assert outcome == ["finished"] * 3
    for out in outputs:
        assert round(float((out / "result.txt").read_text()), 4) == 5.3333


def test_mean_app_with_a_single_client_finishes(tmp_path):
    """One site alone (a reference run): the coordinator must receive its own broadcast (explicit memo, see the app)."""
    config = "fc_mean:\n  input_name: data.csv\n  output_name: result.txt\n"
    inputs = inputs_for(tmp_path, [{"config.yml": config, "data.csv": "1,2,3,6\n"}])
    outputs, outcome, _ = run_instances(REPO / "apps" / "mean", inputs, tmp_path)
    assert outcome == ["finished"] and float((outputs[0] / "result.txt").read_text()) == 3.0


def test_failing_app_is_detected_with_its_traceback_in_the_instance_log(tmp_path):
    inputs = inputs_for(tmp_path, [{}, {}, {}])
    _, outcome, logs = run_instances(REPO / "tests" / "apps" / "failing_app", inputs, tmp_path)
    assert any(o and o.startswith("error: the app failed") for o in outcome[1:]), outcome
    participant_log = logs[1].read_text(errors="replace")
    assert "Traceback" in participant_log and "DeliberateFailure" in participant_log


@needs_root
def test_third_party_app_reads_mnt_input_in_its_own_mount_namespace(tmp_path):
    app = tmp_path / "third_party_app"
    app.mkdir()
    (app / "states.py").write_text(THIRD_PARTY_STATES)
    (app / "main.py").write_text("")
    (app / "requirements.txt").write_text("")
    inputs = inputs_for(tmp_path, [{"numbers.txt": "1 2"}, {"numbers.txt": "10"}, {"numbers.txt": "100 200"}])
    outputs, outcome, _ = run_instances(app, inputs, tmp_path)
    assert outcome == ["finished"] * 3
    assert [(out / "total.txt").read_text() for out in outputs] == ["313"] * 3
    assert not Path("/mnt/output/total.txt").exists(), "the app wrote into the host's /mnt/output"


def test_app_needing_a_package_the_apps_python_lacks_is_a_clear_config_error(tmp_path):
    app = tmp_path / "needy_app"
    app.mkdir()
    (app / "states.py").write_text("")
    (app / "requirements.txt").write_text("pyyaml\nno-such-package-fedsim>=1.0  # not installed\n")
    with pytest.raises(ConfigError, match="needs no-such-package-fedsim, missing from the apps' Python"):
        start_instance(app, tmp_path, tmp_path, tmp_path / "app.log", FAST.engine_waits)
    assert not (tmp_path / "app.log").exists()  # refused before any process started
