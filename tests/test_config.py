"""The project file and the credentials file: every user error is ONE line (file, field, line, fix) and exit code 2.

The error cases run the real CLI in a subprocess, as a user would.
"""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from fedsim_runner.config import (
    DEFAULT_CONFIGS,
    RESOURCES,
    ensure_local_credentials,
    load_config,
    load_credentials,
    parse_config,
    read_credentials_file,
)
from fedsim_runner.errors import ConfigError
from fedsim_runner.template import render_template
from tests.conftest import REPO

PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable

GOOD = """\
[project]
name = "t"
workflow = "svd"
credentials = "creds.env"

[provider]
kind = "local"
isolation = "process"

[data]
source = "sklearn:iris"

[workflow]
k = 2

[[sites]]
name = "site1"
coordinator = true
fc_user = "site1@fedsim.local"

[[sites]]
name = "site2"
fc_user = "site2@fedsim.local"

[[sites]]
name = "site3"
fc_user = "site3@fedsim.local"
"""
CREDS = "site1@fedsim.local=pw-one-11\nsite2@fedsim.local=pw-two-22\nsite3@fedsim.local=pw-three-33\n"


@pytest.fixture
def project(tmp_path):
    """A valid project file with its credentials file; returns a writer for variants of it."""
    (tmp_path / "creds.env").write_text(CREDS)

    def write(text: str = GOOD):
        path = tmp_path / "project.toml"
        path.write_text(text)
        return path

    return write


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "fedsim_runner", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=120)


def test_valid_project_validates(project):
    r = run_cli("validate", str(project()))
    assert r.returncode == 0, r.stderr
    assert "3 sites" in r.stderr and "coordinator site1" in r.stderr


# (name, edit of GOOD, expected substrings of the one error line, line number or None)
CASES = [
    ("toml syntax", lambda t: t.replace("k = 2", "k = 2 2"), ["TOML syntax error"], 14),
    ("missing coordinator", lambda t: t.replace("coordinator = true\n", ""), ["sites", "coordinator = true"], 16),
    ("two coordinators", lambda t: t.replace('name = "site3"\n', 'name = "site3"\ncoordinator = true\n'),
     ["sites.site3.coordinator", "exactly one"], 27),
    ("unknown workflow", lambda t: t.replace('workflow = "svd"', 'workflow = "pca"'),
     ["project.workflow", "unknown workflow 'pca'", "mean, svd"], 3),
    ("missing data file", lambda t: t.replace('source = "sklearn:iris"', 'source = "no/such.csv"'),
     ["data.source", "no/such.csv does not exist", "fix the path"], 11),
    ("missing site data file", lambda t: t.replace('fc_user = "site2@fedsim.local"',
                                                   'fc_user = "site2@fedsim.local"\ndata = ["gone.csv"]'),
     ["sites.site2.data", "gone.csv does not exist"], 24),
    ("unknown key", lambda t: t.replace('fc_user = "site2@fedsim.local"',
                                        'fc_user = "site2@fedsim.local"\ncoordinater = true'),
     ["sites.site2.coordinater", "unknown key", "did you mean 'coordinator'"], 24),
    ("bad site name", lambda t: t.replace('name = "site2"', 'name = "Site_2"'),
     ["sites.Site_2.name", "'Site_2' is not a valid name", "lowercase"], 22),
    ("unknown provider", lambda t: t.replace('kind = "local"', 'kind = "docker"'),
     ["provider", "'docker'", "vagrant"], 7),
    ("wrong type", lambda t: t.replace('name = "t"', "name = 5"), ["project.name", "string"], 2),
    ("duplicate site", lambda t: t.replace('name = "site3"', 'name = "site2"'),
     ["sites.site2.name", "duplicate site name"], 26),
    ("unknown sklearn dataset", lambda t: t.replace("sklearn:iris", "sklearn:mnist"),
     ["data.source", "sklearn:digits"], 11),
    ("vagrant without address", lambda t: t.replace('kind = "local"\nisolation = "process"', 'kind = "vagrant"'),
     ["sites.site1.address", "private-network address"], 15),
    ("no sites", lambda t: t.split("[[sites]]")[0], ["sites", "add at least one [[sites]]"], None),
    ("unknown workflow parameter", lambda t: t.replace("k = 2", "kk = 2"), ["workflow.kk", "unknown parameter"], None),
]


@pytest.mark.parametrize("name,edit,expected,line", CASES, ids=[c[0] for c in CASES])
def test_user_errors_are_one_line_exit_2(project, name, edit, expected, line):
    path = project(edit(GOOD))
    r = run_cli("validate", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    err = lines[0]
    assert err.startswith("error: ") and str(path) in err
    for part in expected:
        assert part in err, err
    if line is not None:
        assert f"{path}:{line}:" in err, err


def test_site_without_credentials_names_site_and_fix(project, tmp_path):
    (tmp_path / "creds.env").write_text("site1@fedsim.local=pw-one-11\nsite2@fedsim.local=pw-two-22\n")
    r = run_cli("validate", str(project()))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (err,) = r.stderr.strip().splitlines()
    assert str(tmp_path / "creds.env") in err and "site3" in err and "add the line site3@fedsim.local=<password>" in err
    assert "pw-one-11" not in err and "pw-two-22" not in err


def test_missing_project_file_and_folder(tmp_path):
    for target, words in [(tmp_path / "nope.toml", "no such project file"), (tmp_path, "is a folder")]:
        r = run_cli("validate", str(target))
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_dotenv_reads_email_keys_quotes_and_dollars(tmp_path):
    f = tmp_path / "c.env"
    f.write_text(
        "# operator credentials\n"
        "site1@fedsim.local=plain\n"
        'site2@fedsim.local = "with space #and hash"\n'
        "export site3+tag@example.org='p$HOME${USER}x'\n"
        "site4@x.org=a=b\n"
    )
    assert read_credentials_file(f) == {
        "site1@fedsim.local": "plain",
        "site2@fedsim.local": "with space #and hash",
        "site3+tag@example.org": "p$HOME${USER}x",  # never interpolated
        "site4@x.org": "a=b",
    }
    unquoted = tmp_path / "u.env"
    unquoted.write_text("site1@fedsim.local=p${HOME}q\n")
    assert read_credentials_file(unquoted) == {"site1@fedsim.local": "p${HOME}q"}


def test_unparsable_credentials_line_names_line_not_content(tmp_path):
    f = tmp_path / "c.env"
    f.write_text("site1@fedsim.local=ok\n\nsite2@fedsim.local hunter2-secret\n")
    with pytest.raises(ConfigError) as e:
        read_credentials_file(f)
    assert f"{f}:3:" in str(e.value) and "hunter2" not in str(e.value)


def test_empty_password_is_an_error(project, tmp_path):
    (tmp_path / "creds.env").write_text(CREDS.replace("pw-two-22", ""))
    cfg = load_config(project())
    with pytest.raises(ConfigError, match="empty password for site site2"):
        load_credentials(cfg)


def test_ensure_local_credentials_creates_0600_file_once(project, tmp_path):
    (tmp_path / "creds.env").unlink()
    cfg = load_config(project())
    path = ensure_local_credentials(cfg)
    assert path == tmp_path / "creds.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = load_credentials(cfg)
    assert set(creds) == {"site1@fedsim.local", "site2@fedsim.local", "site3@fedsim.local"}
    assert len(set(creds.values())) == 3 and all(len(p) >= 32 for p in creds.values())
    before = path.read_text()
    assert ensure_local_credentials(cfg) == path and path.read_text() == before  # never rewritten


def test_ensure_local_credentials_never_touches_an_existing_file(project, tmp_path):
    (tmp_path / "creds.env").write_text("site1@fedsim.local=mine\n")
    cfg = load_config(project())
    ensure_local_credentials(cfg)
    assert (tmp_path / "creds.env").read_text() == "site1@fedsim.local=mine\n"
    with pytest.raises(ConfigError, match="no password for site site2"):
        load_credentials(cfg)


def test_ensure_local_credentials_only_for_localfc(project, tmp_path):
    (tmp_path / "creds.env").unlink()
    cfg = load_config(project(GOOD.replace('workflow = "svd"', 'workflow = "svd"\nplatform = "featurecloud"')))
    ensure_local_credentials(cfg)
    assert not (tmp_path / "creds.env").exists()
    with pytest.raises(ConfigError, match="credentials file missing"):
        load_credentials(cfg)


def test_embedded_defaults():
    svd = load_config(DEFAULT_CONFIGS["svd"])
    assert [s.name for s in svd.sites] == ["site1", "site2", "site3"] and svd.coordinator.name == "site1"
    assert [s.fc_user for s in svd.sites] == [f"site{i}@fedsim.local" for i in (1, 2, 3)]
    assert svd.project.platform == "local" and svd.provider.kind == "local" and svd.provider.isolation == "auto"
    assert svd.project.timing == "fast" and svd.data.split == "iid" and svd.data.source.startswith("sklearn:")
    assert svd.workflow == {"k": 5, "center": True, "variance": False}
    assert svd.outdir == (RESOURCES.parent / "runs").resolve()
    assert svd.resolve(svd.project.credentials) == RESOURCES / ".env"

    mean = load_config(DEFAULT_CONFIGS["mean"])
    assert mean.data.split == "files"
    contents = [mean.resolve(s.data[0]).read_text().strip() for s in mean.sites]
    assert contents == ["1,2,3,4,5", "7,9,11", "2,2,2,4,6,6,6"]


def test_env_example_covers_the_embedded_sites():
    example = read_credentials_file(RESOURCES / "env.example")
    for cfg in (load_config(DEFAULT_CONFIGS["svd"]), load_config(DEFAULT_CONFIGS["mean"])):
        assert load_credentials(cfg, RESOURCES / "env.example") == {s.fc_user: example[s.fc_user] for s in cfg.sites}


@pytest.mark.parametrize("workflow", ["svd", "mean"])
def test_template_validates_and_documents_every_section(tmp_path, workflow):
    text = render_template(workflow)
    path = tmp_path / "t.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.project.workflow == workflow and len(cfg.sites) == 3
    for section in ("[project]", "[provider]", "[data]", "[workflow]", "[[sites]]"):
        assert section in text
    for variant in ('kind = "vagrant"', 'kind = "ssh"', "address =", "ssh_key =", 'platform = "local"',
                    "featurecloud", "credentials"):
        assert variant in text, variant
    # every option of the models appears, set or commented
    from fedsim_runner.config import Data, LocalProvider, Project, Site, SshProvider, VagrantProvider

    for model in (Project, LocalProvider, VagrantProvider, SshProvider, Site):
        for field in model.model_fields:
            assert f"{field} =" in text or f"{field} = " in text, (model.__name__, field)
    if workflow == "svd":
        for field in Data.model_fields:
            assert f"{field} =" in text, field


def test_ssh_provider_needs_host_and_user(tmp_path):
    text = GOOD.replace('kind = "local"\nisolation = "process"', 'kind = "ssh"')
    with pytest.raises(ConfigError, match=r"project.toml:15: sites.site1.host: the ssh provider needs host"):
        parse_config(text, tmp_path / "project.toml")


def test_provider_kind_defaults_to_local(tmp_path):
    cfg = parse_config(GOOD.replace('kind = "local"\n', ""), tmp_path / "p.toml")
    assert cfg.provider.kind == "local" and cfg.provider.isolation == "process"
