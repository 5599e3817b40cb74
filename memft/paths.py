"""Where memft's own files live: the built-in models (`configs/`) and recipes (`recipes/`).

In a checkout they sit beside the package (an editable install reads them there); a wheel carries them inside it,
as `memft/configs` and `memft/recipes` (pyproject.toml's `package-dir`).
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
"""The checkout (or, for a wheel, site-packages: nothing of memft's is looked up there but the package)."""


def _shipped(name: str) -> Path:
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PROJECT_ROOT / name


RECIPES_DIR = _shipped("recipes")
CONFIGS_DIR = _shipped("configs")
