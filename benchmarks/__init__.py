"""Checkpoint benchmarks: datarax_ckpt against raw Orbax, PyTorch DCP and physical floors."""

from benchmarks.config import BenchConfig as BenchConfig
from benchmarks.config import CaseConfig as CaseConfig
from benchmarks.config import ConfigError as ConfigError
from benchmarks.config import load_config as load_config
from benchmarks.measure import METRICS as METRICS
from benchmarks.runner import run as run

__all__ = ["METRICS", "BenchConfig", "CaseConfig", "ConfigError", "load_config", "run"]
