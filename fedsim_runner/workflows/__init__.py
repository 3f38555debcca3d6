"""The workflow registry: one module per analysis tool, imported on demand (keeps `--help` and validation fast)."""

import importlib

# workflow name -> module implementing it (see fedsim_runner/workflows/base.py for the interface)
WORKFLOWS = {
    "svd": "fedsim_runner.workflows.svd",
    "mean": "fedsim_runner.workflows.mean",
}


def load(name: str):
    return importlib.import_module(WORKFLOWS[name])
