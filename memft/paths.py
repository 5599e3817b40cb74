"""Where the project's own files live (memft is installed editable from its repository)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = PROJECT_ROOT / "recipes"
CONFIGS_DIR = PROJECT_ROOT / "configs"
