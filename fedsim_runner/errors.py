"""The two kinds of failure a user sees, mapped to exit codes by the CLI."""


class ConfigError(Exception):
    """A user error in a project, credentials or data file (exit 2): one line naming the file, the field and the fix."""


class RunFailed(Exception):
    """The run started but did not succeed (exit 1): the message names the site and the phase."""
