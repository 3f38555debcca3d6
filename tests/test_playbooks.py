"""distribute.yml over real SSH into namespace sites (root): each site gets only its own credentials (0600, owned by
its user), a second run changes nothing, and a site missing from the operator's credentials stops the playbook before
anything is written, naming the site. Range 10.224.0.0/17 (other suites use 10.221–10.223)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fedsim_runner.ansible import run_playbook
from fedsim_runner.config import load_config
from fedsim_runner.errors import RunFailed
from fedsim_runner.sites import get_provider
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.e2e, pytest.mark.root]
SITES = ("alpha", "beta", "gamma")
PASSWORDS = {f"{s}@example.org": f"pw-{s}-'$\\x{i}" for i, s in enumerate(SITES)}  # quotes, $ and \ survive


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pb")
    data = tmp / "shared.csv"
    data.write_text("1,2,3\n")
    entries = "".join(
        f'[[sites]]\nname = "{s}"\nfc_user = "{s}@example.org"\ncoordinator = {"true" if i == 0 else "false"}\n'
        f'data = ["shared.csv"]\n'
        for i, s in enumerate(SITES)
    )
    (tmp / "p.toml").write_text(textwrap.dedent("""\
        [project]
        name = "fstest-pb"
        workflow = "mean"
        [data]
        split = "files"
        [provider]
        isolation = "namespace"
        subnet = "10.224.0.0/17"
        """) + entries)
    cfg = load_config(tmp / "p.toml")
    provider = get_provider(cfg)
    handles = {h.name: h for h in provider.up()}
    inventory = provider.inventory(output=tmp / "inventory.yml")
    yield provider, handles, inventory
    provider.down()


def _dotfile(handle) -> Path:
    return Path(handle.home) / ".fedsim" / "site.env"


def test_missing_site_credentials_stop_before_anything_is_written(sites):
    provider, handles, inventory = sites
    for h in handles.values():
        assert not _dotfile(h).exists()
    partial = {k: v for k, v in PASSWORDS.items() if not k.startswith("beta")}
    with pytest.raises(RunFailed, match=r"site beta: no password for FeatureCloud user beta@example\.org") as err:
        run_playbook("distribute.yml", inventory, secrets={"fedsim_credentials": partial})
    assert not any(p in str(err.value) for p in PASSWORDS.values())
    for h in handles.values():  # not even the sites that had credentials got anything
        assert not _dotfile(h).exists()
        assert not (Path(h.home) / "input").exists()


def test_distribute_gives_each_site_only_its_own_credentials_and_is_idempotent(sites):
    provider, handles, inventory = sites
    first = run_playbook("distribute.yml", inventory, secrets={"fedsim_credentials": PASSWORDS})
    assert all(first["changed"].get(s, 0) > 0 for s in SITES)
    for name, h in handles.items():
        dotfile = _dotfile(h)
        st = dotfile.stat()
        assert st.st_mode & 0o777 == 0o600
        uid = int(provider.popen(name, ["id", "-u"], env={}, stdout=-1).communicate()[0])
        assert st.st_uid == uid
        text = dotfile.read_text()
        assert f"FEDSIM_SITE='{name}'" in text and f"FC_USERNAME='{name}@example.org'" in text
        others = [p for user, p in PASSWORDS.items() if not user.startswith(name)]
        assert not any(p.replace("'", "\\'").replace("\\x", "\\\\x") in text or p in text for p in others)
        # the site's own programs read it back exactly (python-dotenv, as site_env does)
        proc = provider.popen(name, ["/usr/bin/python3", "-c",
                                     "import sys; sys.path[:0] = sys.argv[1:]; from dotenv import dotenv_values;"
                                     "print(dotenv_values(__import__('os').path.expanduser('~/.fedsim/site.env'))"
                                     "['FC_PASSWORD'])", *_dotenv_path()], env={}, stdout=-1)
        assert proc.communicate()[0].decode().strip() == PASSWORDS[f"{name}@example.org"]
        assert (Path(h.home) / "input" / "shared.csv").read_text() == "1,2,3\n"
    second = run_playbook("distribute.yml", inventory, secrets={"fedsim_credentials": PASSWORDS})
    assert sum(second["changed"].values()) == 0, second["changed"]


def _dotenv_path() -> list[str]:
    import dotenv

    return [str(Path(dotenv.__file__).parent.parent)]


def test_no_secret_left_in_the_temp_dir_or_the_inventory(sites, tmp_path):
    provider, handles, inventory = sites
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("fedsim-ansible-*"))
    run_playbook("distribute.yml", inventory, secrets={"fedsim_credentials": PASSWORDS})
    assert set(Path(tempfile.gettempdir()).glob("fedsim-ansible-*")) == before
    assert not any(p in Path(inventory).read_text() for p in PASSWORDS.values())
