"""The code location `platform_assets`: its one Definitions, for the environment that
PLATFORM_ENV names (local | pg | prod). The parts are assembled in assembly.py."""

from .assembly import build_platform
from .settings import load_settings

platform = build_platform(load_settings())
defs = platform.defs
