class ConfigError(ValueError):
    """A config, CLI or layout problem, raised before any process group is created."""
