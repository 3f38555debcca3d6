"""The project file (TOML) and the credentials files (dotenv), as validated pydantic models.

Every error a user can make here becomes a ConfigError with ONE line that names the file, the field (and the TOML line
where the parser gives it) and the fix. The CLI turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedsim_runner.errors import ConfigError
from fedsim_runner.workflows import WORKFLOWS

REPO_ROOT = Path(__file__).resolve().parent.parent
RESOURCES = REPO_ROOT / "resources"
DEFAULT_CONFIGS = {name: RESOURCES / f"config_{name}.toml" for name in WORKFLOWS}
DEFAULT_CREDENTIALS = RESOURCES / ".env"
SITE_NAME_RE = r"^[a-z][a-z0-9-]{0,14}$"  # usable as hostname, unix user, netns and Dask worker name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Project(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    workflow: str
    platform: Literal["local", "featurecloud"] = "local"
    project_id: int | None = None  # reuse an existing FeatureCloud project instead of creating one
    outdir: Path = Path("runs")
    seed: int = 42
    timing: Literal["fast", "realistic"] = "fast"
    credentials: Path = DEFAULT_CREDENTIALS  # the operator's dotenv file: <fc_username>=<password> per line
    base_url: str | None = None  # FeatureCloud website; default: the local hub, or https://featurecloud.ai
    timeout: float = Field(default=600.0, gt=0)  # seconds a run may take before FedSim shuts the project down

    @field_validator("workflow")
    @classmethod
    def _known_workflow(cls, value: str) -> str:
        if value not in WORKFLOWS:
            raise ValueError(f"unknown workflow {value!r}; use one of: {', '.join(sorted(WORKFLOWS))}")
        return value


class LocalProvider(_Strict):
    kind: Literal["local"] = "local"
    isolation: Literal["auto", "namespace", "process"] = "auto"
    subnet: str = "10.213.0.0/16"  # namespace sites take /30s from this range; the host routes it as unreachable

    @field_validator("subnet")
    @classmethod
    def _network(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if not net.is_private or net.version != 4 or net.prefixlen > 24:
            raise ValueError("must be a private IPv4 range of /24 or larger, e.g. 10.213.0.0/16")
        return value


class VagrantProvider(_Strict):
    kind: Literal["vagrant"]
    box: str = "debian/bookworm64"
    vm_provider: Literal["libvirt", "virtualbox"] = "libvirt"
    memory: int = Field(default=2048, ge=512)
    cpus: int = Field(default=2, ge=1)


class SshProvider(_Strict):
    kind: Literal["ssh"]
    copy_key: Path | None = None  # install this public key for each site's user (ssh-copy-id style) when set


Provider = Annotated[LocalProvider | VagrantProvider | SshProvider, Field(discriminator="kind")]


class Data(_Strict):
    # "sklearn:<name>" (digits, breast_cancer, wine, iris, diabetes), "synthetic", or a CSV/TSV file (samples × features)
    source: str = "sklearn:digits"
    split: Literal["iid", "label-skew", "size-skew", "files"] = "iid"
    alpha: float = Field(default=0.5, gt=0)  # Dirichlet concentration for label-skew
    sizes: list[float] | None = None  # relative site sizes for size-skew
    samples: int = Field(default=300, ge=2)  # synthetic
    features: int = Field(default=20, ge=1)  # synthetic
    rank: int = Field(default=5, ge=1)  # synthetic: rank of the signal
    label_column: str | None = None  # CSV: column holding the label (needed for label-skew)


class Site(_Strict):
    name: str = Field(pattern=SITE_NAME_RE)
    coordinator: bool = False
    fc_user: str = Field(min_length=1)  # the FeatureCloud account (e-mail) of this site
    data: list[Path] = []  # explicit input files (split = "files")
    # ssh provider: how Ansible reaches the host
    host: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    user: str | None = None
    ssh_key: Path | None = None
    # vagrant provider: the private-network address other machines use
    address: str | None = None


class Config(_Strict):
    project: Project
    provider: Provider = Field(default_factory=LocalProvider)
    data: Data = Field(default_factory=Data)
    workflow: dict[str, Any] = {}  # parameters of the workflow / app (e.g. svd: k, center, variance)
    sites: list[Site] = Field(min_length=1)

    # where the file was read from; relative paths in it are relative to its folder
    path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _sites_consistent(self) -> Config:
        names = [s.name for s in self.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sites: duplicate site name {dupes[0]!r}; give every [[sites]] entry its own name")
        users = [s.fc_user for s in self.sites]
        dup_users = sorted({u for u in users if users.count(u) > 1})
        if dup_users:
            raise ValueError(f"sites: FeatureCloud user {dup_users[0]!r} is used twice; every site needs its own account")
        coordinators = [s.name for s in self.sites if s.coordinator]
        if len(coordinators) != 1:
            found = ", ".join(coordinators) if coordinators else "none"
            raise ValueError(
                f"sites: exactly one site must have coordinator = true (found {found}); set it on one site only"
            )
        kind = self.provider.kind
        for s in self.sites:
            if kind == "ssh" and not s.host:
                raise ValueError(f"sites.{s.name}.host: the ssh provider needs host (and user) for every site")
            if kind == "vagrant" and not s.address:
                raise ValueError(f"sites.{s.name}.address: the vagrant provider needs the private-network address")
            if s.address:
                ipaddress.ip_address(s.address)
        if self.data.split == "files":
            for s in self.sites:
                if not s.data:
                    raise ValueError(f"sites.{s.name}.data: split = \"files\" needs data files for every site")
        return self

    @property
    def coordinator(self) -> Site:
        return next(s for s in self.sites if s.coordinator)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def resolve(self, p: Path) -> Path:
        """A path from the file, made absolute relative to the file's folder."""
        p = Path(p).expanduser()
        if p.is_absolute() or self.path is None:
            return p
        return (self.path.parent / p).resolve()

    @property
    def base_url(self) -> str | None:
        if self.project.base_url:
            return self.project.base_url.rstrip("/")
        return "https://featurecloud.ai" if self.project.platform == "featurecloud" else None


_FIXES = {
    "missing": "add it",
    "extra_forbidden": "remove it or check its spelling",
    "literal_error": "use one of the allowed values",
    "string_pattern_mismatch": "use lowercase letters, digits and '-', starting with a letter (at most 15 characters)",
}


def _toml_line(text: str, loc: tuple) -> int | None:
    """Best-effort line number for a pydantic location in the TOML text (the key's first appearance)."""
    keys = [k for k in loc if isinstance(k, str)]
    if not keys:
        return None
    key = keys[-1]
    # find the table header for the first key, then the key after it
    lines = text.splitlines()
    start = 0
    if len(keys) > 1:
        for i, line in enumerate(lines):
            if re.match(rf"^\s*\[+\s*{re.escape(keys[0])}\s*\]+", line):
                start = i
                if isinstance(loc[1], int):  # [[sites]] index
                    idx = loc[1]
                    hits = [j for j, ln in enumerate(lines) if re.match(rf"^\s*\[\[\s*{re.escape(keys[0])}\s*\]\]", ln)]
                    if idx < len(hits):
                        start = hits[idx]
                break
    for i in range(start, len(lines)):
        if re.match(rf"^\s*{re.escape(key)}\s*=", lines[i]) or re.match(rf"^\s*\[+\s*{re.escape(key)}\s*\]+", lines[i]):
            return i + 1
    return None


def _format_loc(loc: tuple, data: dict) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int) and i > 0 and loc[i - 1] == "sites":
            try:
                parts.append(str(data["sites"][item]["name"]))
                continue
            except (KeyError, IndexError, TypeError):
                parts[-1] = f"{parts[-1]}[{item}]"
                continue
        if isinstance(item, str) and item in {"LocalProvider", "VagrantProvider", "SshProvider"} or item in {
            "local",
            "vagrant",
            "ssh",
        } and i > 0 and loc[i - 1] == "provider":
            continue
        parts.append(str(item))
    return ".".join(parts) or "(top level)"


def parse_config(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}; fix the syntax at that line") from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        field = _format_loc(loc, data)
        if msg.startswith(("sites", "sites.")) and ":" in msg:  # model-level messages carry their own field
            field, msg = msg.split(": ", 1)
        line = _toml_line(text, loc)
        where = f" (line {line})" if line else ""
        fix = _FIXES.get(err["type"], "")
        if err["type"] == "missing":
            msg = "is required"
        tail = f"; {fix}" if fix and fix not in msg else ""
        raise ConfigError(f"{path}: {field}{where}: {msg}{tail}") from None
    cfg.path = path.resolve()
    return cfg


def load_config(path: Path | str, check_files: bool = True) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such project file; create one with `python -m fedsim_runner init`") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the project file ({e.strerror})") from None
    cfg = parse_config(text, path)
    if check_files:
        check_data_files(cfg)
    return cfg


def check_data_files(cfg: Config) -> None:
    for s in cfg.sites:
        for f in s.data:
            if not cfg.resolve(f).is_file():
                raise ConfigError(f"{cfg.path}: sites.{s.name}.data: file {f} does not exist; fix the path")
    src = cfg.data.source
    if not src.startswith("sklearn:") and src != "synthetic" and cfg.data.split != "files":
        if not cfg.resolve(Path(src)).is_file():
            raise ConfigError(f"{cfg.path}: data.source: file {src} does not exist; fix the path or use sklearn:<name>")
    for s in cfg.sites:
        if s.ssh_key and not cfg.resolve(s.ssh_key).is_file():
            raise ConfigError(f"{cfg.path}: sites.{s.name}.ssh_key: file {s.ssh_key} does not exist; fix the path")


def load_credentials(cfg: Config, path: Path | None = None) -> dict[str, str]:
    """The operator's credentials for the project's sites: {fc_user: password}. Read only to distribute them."""
    path = Path(path) if path else cfg.resolve(cfg.project.credentials)
    if not path.is_file():
        raise ConfigError(
            f"{path}: credentials file missing; copy resources/env.example there and add one line "
            "<fc_user>=<password> per site"
        )
    values = {k: v for k, v in dotenv_values(path).items() if v}
    for s in cfg.sites:
        if s.fc_user not in values:
            raise ConfigError(
                f"{path}: no password for site {s.name} (FeatureCloud user {s.fc_user}); add the line {s.fc_user}=<password>"
            )
    return {s.fc_user: values[s.fc_user] for s in cfg.sites}
