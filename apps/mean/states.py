"""The mean of the clients' local means, as the store's mean app computes it (FEATURECLOUD.md §5).

config.yml: `fc_mean: {input_name: data.csv, output_name: output.csv}`; the input is comma-separated numbers. Only each
client's local mean leaves the site. Folders: /mnt/input and /mnt/output, or FEDSIM_INPUT_DIR / FEDSIM_OUTPUT_DIR.
"""

import os
import shutil

import yaml
from FeatureCloud.app.engine.app import AppState, Role, app_state

INPUT_DIR = os.getenv("FEDSIM_INPUT_DIR", "/mnt/input")
OUTPUT_DIR = os.getenv("FEDSIM_OUTPUT_DIR", "/mnt/output")


@app_state("initial")
class LocalMean(AppState):
    def register(self):
        self.register_transition("aggregate", Role.COORDINATOR)
        self.register_transition("write", Role.PARTICIPANT)

    def run(self):
        with open(os.path.join(INPUT_DIR, "config.yml")) as f:
            config = yaml.safe_load(f)["fc_mean"]
        shutil.copy(os.path.join(INPUT_DIR, "config.yml"), os.path.join(OUTPUT_DIR, "config.yml"))
        with open(os.path.join(INPUT_DIR, config.get("input_name", "data.csv"))) as f:
            values = [float(v) for v in f.read().replace("\n", ",").split(",") if v.strip()]
        self.store("output_name", config.get("output_name", "output.csv"))
        self.log(f"{len(values)} local values")
        self.send_data_to_coordinator(sum(values) / len(values))
        return "aggregate" if self.is_coordinator else "write"


@app_state("aggregate")
class Aggregate(AppState):
    def register(self):
        self.register_transition("write", Role.COORDINATOR)

    def run(self):
        means = self.gather_data()
        # an explicit memo: without one, the engine's await_data() on a coordinator that is the only client takes the
        # wait for a gather round and never sees the broadcast (featurecloud 0.1.0)
        self.broadcast_data(sum(means) / len(means), memo="mean")
        return "write"


@app_state("write")
class Write(AppState):
    def register(self):
        self.register_transition("terminal")

    def run(self):
        mean = self.await_data(memo="mean")
        with open(os.path.join(OUTPUT_DIR, self.load("output_name")), "w") as f:
            f.write(f"{mean}\n")
        self.log(f"mean of the local means: {mean}")
        return "terminal"
