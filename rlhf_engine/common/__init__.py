"""Helpers every layer may use and that import nothing else of ours: dtypes by name, dataclass configs from
YAML (`config_io`), checkpoint folders written atomically (`checkpoint`), child processes (`procs`)."""
