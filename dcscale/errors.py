"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class DcscaleError(Exception):
    """A problem with the user's input (config, data, arguments), reported without a traceback."""


class ConfigError(DcscaleError):
    """An invalid config file, key or value."""


class DataError(DcscaleError):
    """A missing, corrupt or inconsistent shard set."""
