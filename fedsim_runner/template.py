"""`python -m fedsim_runner init --workflow NAME`: a commented project file that validates as printed.

Every section and option is shown with what it does; the alternatives (featurecloud.ai, vagrant and ssh sites, other
datasets and splits) are there as comments. The mean template points at FedSim's own example files by absolute path so
that it validates wherever it is saved.
"""

from __future__ import annotations

import json

from fedsim_runner.config import RESOURCES
from fedsim_runner.errors import ConfigError
from fedsim_runner.workflows import WORKFLOWS

_HEAD = """\
# FedSim project file ({workflow}). Check it with `python -m fedsim_runner validate FILE`, run it with
# `python -m fedsim_runner {workflow} --config FILE`. Relative paths are relative to this file.
# Credentials are NOT written here: see project.credentials.

[project]
name = "my-{workflow}-study"       # letters, digits, '.', '_', '-'; names the FeatureCloud project
workflow = "{workflow}"                # the analysis: {workflows}
platform = "local"                # "local": localfc, FedSim's offline FeatureCloud on this machine;
                                  # "featurecloud": the real featurecloud.ai (accounts must exist there)
# base_url = "https://featurecloud.ai"  # the FeatureCloud website; default: the local hub, or featurecloud.ai
# project_id = 1234               # reuse this existing FeatureCloud project instead of creating one
timing = "fast"                   # "fast": short engine waits (seconds per run); "realistic": the engine's own waits
seed = 42                         # data splits and synthetic data are deterministic for a seed
outdir = "runs"                   # run directories go to <outdir>/<UTC timestamp>-<workflow>/
timeout = 600                     # seconds a run may take before FedSim stops the project and fails the run
# credentials = "secrets.env"     # the operator's dotenv file, one line <fc_user>=<password> per site (mode 0600,
                                  # never committed; see resources/env.example). Default: resources/.env of FedSim.
                                  # With platform = "local" a missing file is created with random passwords.

[provider]                        # where the sites run
kind = "local"                    # sites on this machine
isolation = "auto"                # "namespace" (root: own network, mounts, hostname, sshd and unix user per site),
                                  # "process" (no root: own processes, folders, environment and ports), "auto" picks
# subnet = "10.213.0.0/16"        # namespace sites take a /30 each from this private range
#
# Vagrant VMs (sites need `address` below; give `inventory --vagrant-ssh-config` the saved `vagrant ssh-config`):
# kind = "vagrant"
# box = "debian/bookworm64"
# vm_provider = "libvirt"         # or "virtualbox"
# memory = 2048                   # MiB per VM
# cpus = 2
#
# Existing machines over SSH (sites need host and user below):
# kind = "ssh"
# copy_key = "~/.ssh/id_ed25519.pub"  # install this public key for each site's user first (optional)
"""

_DATA = {
    "svd": """
[data]                            # what the sites analyse
source = "sklearn:digits"         # "sklearn:<digits|breast_cancer|wine|iris|diabetes>", "synthetic", or a CSV/TSV
                                  # file (header row, samples × features) that FedSim splits across the sites
split = "iid"                     # "iid", "label-skew" (alpha), "size-skew" (sizes), or "files" (sites.data)
# alpha = 0.5                     # label-skew: Dirichlet concentration, smaller = more skewed
# sizes = [1, 2, 7]               # size-skew: relative site sizes, one per site (default: largest = 10 × smallest)
# label_column = "label"          # CSV: the column holding the label (label-skew needs labels)
# samples = 300                   # synthetic: samples, features and rank of the low-rank signal
# features = 20
# rank = 5

[workflow]                        # parameters of the federated SVD (app federated-svd)
k = 5                             # number of singular vectors
center = true                     # subtract each feature's mean
variance = false                  # scale each feature to unit variance
# log_transform = false           # log2(x + 1) before scaling
# tolerance = 1e-6                # passes when every component's angle to the centralized one is below this (rad)
# reference_run = false           # also run the app with one site holding all the data
""",
    "mean": """
[data]                            # what the sites analyse
split = "files"                   # every site brings its own file (sites.data): one line of comma-separated numbers
# source = "sklearn:iris"         # or: a dataset FedSim splits across the sites ("sklearn:<name>", "synthetic", or a
# split = "iid"                   # CSV/TSV file), with split "iid", "label-skew" or "size-skew"

[workflow]                        # parameters of the mean (app mean-app)
tolerance = 1e-9                  # passes when every site reports the mean of the local means within this
# column = 0                      # for a split dataset: which feature to average (index or name; default the first)
""",
}

_SITES_HEAD = """
# One [[sites]] table per participant; exactly one site has coordinator = true.
# name: {name_rule} (it names the site's host, unix user and Dask worker).
# fc_user: the site's FeatureCloud account (e-mail), also its key in the credentials file.
"""

_SITE_VARIANTS = """\
# ssh provider, per site:     host = "10.0.0.11"  user = "debian"  port = 22  ssh_key = "~/.ssh/id_ed25519"
#                             address = "10.0.0.11"   # the address the other machines use (default: host)
# vagrant provider, per site: address = "192.168.56.11"  # the VM's private-network address
# split = "files", per site:  data = ["site1.csv"]      # the site's own files (relative to this file)

"""


def _site(i: int, workflow: str) -> str:
    lines = ["[[sites]]", f'name = "site{i}"']
    if i == 1:
        lines.append("coordinator = true                # this site creates the project and invites the others")
    lines.append(f'fc_user = "site{i}@fedsim.local"')
    if workflow == "mean":
        example = json.dumps(str(RESOURCES / "data" / "mean" / f"site{i}.csv"))  # a valid TOML basic string
        lines.append(f"data = [{example}]  # this site's own files (FedSim's example)")
    return "\n".join(lines) + "\n"


def render_template(workflow: str) -> str:
    if workflow not in WORKFLOWS:
        raise ConfigError(f"init --workflow {workflow}: unknown workflow; use one of: {', '.join(sorted(WORKFLOWS))}")
    name_rule = "1-15 lowercase letters, digits and '-', starting with a letter"
    return (
        _HEAD.format(workflow=workflow, workflows=", ".join(sorted(WORKFLOWS)))
        + _DATA[workflow]
        + _SITES_HEAD.format(name_rule=name_rule)
        + _SITE_VARIANTS
        + "\n".join(_site(i, workflow) for i in (1, 2, 3))
    )
