"""The project file (TOML) and the credentials files (dotenv), as validated pydantic models.

Every error a user can make here becomes a ConfigError with ONE line that names the file, the field (and the TOML line
where it can be found) and the fix. The CLI turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import difflib
import io
import ipaddress
import os
import re
import secrets
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv.parser import parse_stream
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

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

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL; use e.g. https://featurecloud.ai")
        return value


class LocalProvider(_Strict):
    kind: Literal["local"] = "local"
    isolation: Literal["auto", "namespace", "process"] = "auto"
    subnet: str = "10.213.0.0/16"  # namespace sites take /30s from this range; the host routes it as unreachable

    @field_validator("subnet")
    @classmethod
    def _network(cls, value: str) -> str:
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as e:
            raise ValueError(f"{e}; use a network address such as 10.213.0.0/16") from None
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
_PROVIDER_TAGS = {"local", "vagrant", "ssh"}


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

    @field_validator("fc_user")
    @classmethod
    def _dotenv_key(cls, value: str) -> str:
        # the user name is a key in the credentials file: it must survive dotenv parsing unchanged
        if not re.match(r"^[^\s=#'\"]+$", value):
            raise ValueError(f"{value!r} cannot be a credentials-file key; use the account's e-mail without spaces")
        return value

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address; use the VM's private-network IP, e.g. 192.168.56.11") from None
        return value


class Config(_Strict):
    project: Project
    provider: Provider = Field(default_factory=LocalProvider)
    data: Data = Field(default_factory=Data)
    workflow: dict[str, Any] = {}  # parameters of the workflow / app (e.g. svd: k, center, variance)
    sites: list[Site] = Field(min_length=1)

    # where the file was read from; relative paths in it are relative to its folder
    path: Path | None = Field(default=None, exclude=True)
    _text: str = PrivateAttr(default="")  # the TOML source, to point later checks at a line

    @model_validator(mode="before")
    @classmethod
    def _provider_kind_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("provider"), dict) and "kind" not in data["provider"]:
            data = {**data, "provider": {"kind": "local", **data["provider"]}}
        return data

    @model_validator(mode="after")
    def _sites_consistent(self) -> Config:
        # messages start with "<field>: " so that parse_config can point at the line
        seen: set[str] = set()
        for s in self.sites:
            if s.name in seen:
                raise ValueError(f"sites.{s.name}.name: duplicate site name {s.name!r}; give every [[sites]] entry its own name")
            seen.add(s.name)
        users: set[str] = set()
        for s in self.sites:
            if s.fc_user in users:
                raise ValueError(
                    f"sites.{s.name}.fc_user: FeatureCloud user {s.fc_user!r} is used twice; every site needs its own account"
                )
            users.add(s.fc_user)
        coordinators = [s.name for s in self.sites if s.coordinator]
        if not coordinators:
            raise ValueError("sites: no site has coordinator = true; set it on exactly one [[sites]] entry")
        if len(coordinators) > 1:
            raise ValueError(
                f"sites.{coordinators[1]}.coordinator: {len(coordinators)} coordinators ({', '.join(coordinators)}); "
                "set coordinator = true on exactly one site"
            )
        kind = self.provider.kind
        for s in self.sites:
            if kind == "ssh" and not (s.host and s.user):
                missing = "host" if not s.host else "user"
                raise ValueError(f"sites.{s.name}.{missing}: the ssh provider needs host and user for every site; add it")
            if kind == "vagrant" and not s.address:
                raise ValueError(
                    f"sites.{s.name}.address: the vagrant provider needs each site's private-network address; add it"
                )
        if self.data.split == "files":
            for s in self.sites:
                if not s.data:
                    raise ValueError(f'sites.{s.name}.data: split = "files" needs data files for every site; add data = ["…"]')
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
    def outdir(self) -> Path:
        """Parent folder of the run directories (project.outdir, relative to this file)."""
        return self.resolve(self.project.outdir)

    @property
    def base_url(self) -> str | None:
        if self.project.base_url:
            return self.project.base_url.rstrip("/")
        return "https://featurecloud.ai" if self.project.platform == "featurecloud" else None

    def where(self, field: str) -> str:
        """`<file>:<line>: <field>` for messages about a value of this file (the line when it can be found)."""
        return _where(self.path, self._text, _field_loc(field, self.sites), field)


# --- locating a field in the TOML text -------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\s\"']+?)\s*\]\]?\s*(#.*)?$")


def _toml_line(text: str, loc: tuple) -> int | None:
    """The 1-based line of a pydantic location in the TOML text: the key's line, else its table's header."""
    lines = text.splitlines()
    parts = [p for i, p in enumerate(loc) if not (i == 1 and loc[0] == "provider" and p in _PROVIDER_TAGS)]
    if not parts or not isinstance(parts[0], str):
        return None
    headers = []
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            headers.append((i, m.group(2).replace(" ", ""), m.group(1) == "[["))
    table, rest = parts[0], parts[1:]
    matching = [h for h in headers if h[1] == table]
    if rest and isinstance(rest[0], int):
        matching = [h for h in matching if h[2]]
        matching = matching[rest[0] : rest[0] + 1]
        rest = rest[1:]
    key = next((p for p in rest if isinstance(p, str)), None)
    if not matching:  # a top-level key, or a table written inline / with dotted keys
        for i, line in enumerate(lines):
            if re.match(rf"^\s*{re.escape(table)}\s*[=.]", line):
                return i + 1
        return None
    start = matching[0][0]
    end = next((h[0] for h in headers if h[0] > start), len(lines))
    if key is not None:
        for i in range(start + 1, end):
            if re.match(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", lines[i]):
                return i + 1
    return start + 1


def _field_loc(field: str, sites: list) -> tuple:
    """"sites.site2.host" → ("sites", 1, "host"): the location of a field named by site name."""
    parts: list[Any] = field.split(".")
    if parts[0] == "sites" and len(parts) > 1:
        names = [s["name"] if isinstance(s, dict) else getattr(s, "name", None) for s in sites]
        if parts[1] in names:  # the last one: for a duplicate name that is the offending entry
            parts[1] = len(names) - 1 - names[::-1].index(parts[1])
    return tuple(parts)


def _where(path: Path | None, text: str, loc: tuple, field: str) -> str:
    line = _toml_line(text, loc) if text else None
    return f"{path}:{line}: {field}" if line else f"{path}: {field}"


def _format_loc(loc: tuple, data: dict) -> str:
    """A pydantic location as the user wrote it: sites by name, provider tags dropped."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 1 and loc[0] == "provider" and item in _PROVIDER_TAGS:
            continue
        if isinstance(item, int) and i > 0 and loc[i - 1] == "sites":
            try:
                name = data["sites"][item]["name"]
            except (KeyError, IndexError, TypeError):
                name = None
            if isinstance(name, str) and name:
                parts.append(name)
            else:
                parts[-1] = f"{parts[-1]}[{item}]"
            continue
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
            continue
        parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _allowed_keys(loc: tuple, data: dict) -> list[str]:
    """The keys the table holding `loc` accepts (for a did-you-mean on unknown keys)."""
    models: dict[str, type[BaseModel]] = {"project": Project, "data": Data, "sites": Site}
    if len(loc) == 1:
        return list(Config.model_fields)
    if loc[0] == "provider":
        kind = loc[1] if loc[1] in _PROVIDER_TAGS else "local"
        return list({"local": LocalProvider, "vagrant": VagrantProvider, "ssh": SshProvider}[kind].model_fields)
    model = models.get(loc[0])
    return list(model.model_fields) if model else []


def _fix(err: dict, loc: tuple, data: dict) -> str:
    kind, last = err["type"], next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind == "missing":
        if loc == ("sites",):
            return "add at least one [[sites]] table with name and fc_user"
        if len(loc) == 1:
            return f"add a [{last}] table"
        return f"add {last} = …"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(last, _allowed_keys(loc, data), n=1)
        if close:
            return f"did you mean {close[0]!r}?"
        if loc[0] == "provider" and len(loc) > 1 and loc[1] in _PROVIDER_TAGS:
            owners = [k for k, m in (("local", LocalProvider), ("vagrant", VagrantProvider), ("ssh", SshProvider))
                      if last in m.model_fields]
            if owners:
                return f'it belongs to kind = "{owners[0]}", not "{loc[1]}"; remove it'
        return "remove it or check its spelling"
    if kind == "string_pattern_mismatch":
        if "sites" in loc:
            return "use 1-15 lowercase letters, digits and '-', starting with a letter (e.g. site1)"
        return "use letters, digits, '.', '_' and '-' (e.g. my-study)"
    if kind in ("literal_error", "union_tag_invalid"):
        return "use one of the allowed values"
    if kind == "list_type" and loc == ("sites",):
        return "write each site as a [[sites]] table (double brackets)"
    if kind == "too_short" and loc == ("sites",):
        return "add at least one [[sites]] table with name and fc_user"
    return "fix the value"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_config(text: str, path: Path) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise ConfigError(f"{where}: TOML syntax error: {_one_line(e)}; fix the syntax there") from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        msg = _one_line(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if not loc and re.match(r"^[a-z_]+(\.[A-Za-z0-9_\-]+)*: ", msg):  # model-level messages carry their own field
            field, msg = msg.split(": ", 1)
            loc = _field_loc(field, data.get("sites") if isinstance(data.get("sites"), list) else [])
            raise ConfigError(f"{_where(path, text, loc, field)}: {msg}") from None
        field = _format_loc(loc, data)
        if err["type"] == "union_tag_invalid":  # point at the `kind = …` line
            loc = (*loc, "kind")
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "string_pattern_mismatch":
            msg = f"{err['input']!r} is not a valid name"
        fix = _fix(err, loc, data)
        tail = "" if "; " in msg else f"; {fix}"
        raise ConfigError(f"{_where(path, text, loc, field)}: {msg}{tail}") from None
    cfg.path = path.resolve()
    cfg._text = text
    return cfg


def load_config(path: Path | str, check_files: bool = True) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such project file; create one with `python -m fedsim_runner init`") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a project file; pass the .toml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; pass a TOML project file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the project file ({e.strerror})") from None
    cfg = parse_config(text, path)
    if check_files:
        check_data_files(cfg)
    return cfg


def check_data_files(cfg: Config) -> None:
    """Every file the project file names exists (data, data source, ssh keys) and sklearn datasets are known."""
    for s in cfg.sites:
        for f in s.data:
            if not cfg.resolve(f).is_file():
                raise ConfigError(f"{cfg.where(f'sites.{s.name}.data')}: file {f} does not exist; fix the path")
    src = cfg.data.source
    if cfg.data.split != "files":
        if src.startswith("sklearn:"):
            from fedsim_runner.data import SKLEARN_DATASETS

            if src.removeprefix("sklearn:") not in SKLEARN_DATASETS:
                names = ", ".join(f"sklearn:{n}" for n in SKLEARN_DATASETS)
                raise ConfigError(f"{cfg.where('data.source')}: unknown dataset {src}; use one of {names}")
        elif src != "synthetic" and not cfg.resolve(Path(src)).is_file():
            raise ConfigError(
                f"{cfg.where('data.source')}: file {src} does not exist; fix the path or use sklearn:<name> or synthetic"
            )
    for s in cfg.sites:
        if s.ssh_key and not cfg.resolve(s.ssh_key).is_file():
            raise ConfigError(f"{cfg.where(f'sites.{s.name}.ssh_key')}: file {s.ssh_key} does not exist; fix the path")


# --- credentials ------------------------------------------------------------------------------------------------------


def credentials_path(cfg: Config) -> Path:
    return cfg.resolve(cfg.project.credentials)


def read_credentials_file(path: Path) -> dict[str, str]:
    """`<fc_user>=<password>` lines as python-dotenv reads them, without `${…}` expansion (passwords may hold `$`).

    A line dotenv cannot parse is an error naming its number only: its text may be a password.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: credentials file missing; copy resources/env.example there and add one line "
            "<fc_user>=<password> per site"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not a text file"
        raise ConfigError(f"{path}: cannot read the credentials file ({reason}); fix its permissions or content") from None
    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            line = binding.original.line + len(binding.original.string) - len(binding.original.string.lstrip("\n"))
            raise ConfigError(f"{path}:{line}: cannot parse this line; write it as <fc_user>=<password>")
        if binding.key is not None:
            values[binding.key] = binding.value or ""
    return values


def load_credentials(cfg: Config, path: Path | None = None) -> dict[str, str]:
    """The operator's credentials for the project's sites: {fc_user: password}. Read only to distribute them."""
    path = Path(path) if path else credentials_path(cfg)
    values = read_credentials_file(path)
    for s in cfg.sites:
        if not values.get(s.fc_user):
            state = "an empty password" if s.fc_user in values else "no password"
            raise ConfigError(
                f"{path}: {state} for site {s.name} (FeatureCloud user {s.fc_user}); "
                f"add the line {s.fc_user}=<password>"
            )
    return {s.fc_user: values[s.fc_user] for s in cfg.sites}


_OWN_CREDENTIALS_HEADER = "# created by FedSim for the localfc accounts of the project's sites; <fc_user>=<password> per line\n"


def ensure_local_credentials(cfg: Config) -> Path:
    """The operator credentials file, created with random passwords when the sites' accounts are FedSim's own.

    On platform = "local" the sites sign their localfc accounts up themselves, so a fresh machine needs no hand-made
    file: the file is created (mode 0600) with a strong password per site when it does not exist, and a file FedSim
    created (its first line says so) gets a line for each site it lacks (e.g. after `--sites 8`). A file the operator
    wrote is never touched; a site missing from it stays an error (load_credentials).
    """
    path = credentials_path(cfg)
    if cfg.project.platform != "local":
        return path
    if path.exists():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            return path  # load_credentials says what is wrong with it
        if not text.startswith(_OWN_CREDENTIALS_HEADER):
            return path
        known = read_credentials_file(path)
        missing = "".join(f"{s.fc_user}={secrets.token_urlsafe(24)}\n" for s in cfg.sites if s.fc_user not in known)
        if missing:
            with open(path, "a") as f:
                f.write(("" if text.endswith("\n") else "\n") + missing)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{s.fc_user}={secrets.token_urlsafe(24)}\n" for s in cfg.sites)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created meanwhile by another run: theirs stays
        return path
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the credentials file ({e.strerror}); set project.credentials") from None
    with os.fdopen(fd, "w") as f:
        f.write(_OWN_CREDENTIALS_HEADER + lines)
    return path
