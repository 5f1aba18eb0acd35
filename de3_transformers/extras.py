"""Optional dependencies: imported where they are used, never by `import de3_transformers`, and when one is missing
the error names the extra that installs it.

Written here rather than reusing `transformers.utils.import_utils.requires_backends`: that one knows only
transformers' own backends and points at their install pages, not at this package's extras.
"""

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Imports and returns `module`, which `feature` needs.

    Raises:
        ImportError: when `module` cannot be imported, naming the command that installs it,
            `pip install "de3-transformers[<extra>]"`.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{feature} needs {module.split('.')[0]}, which is not installed: "
                          f"pip install \"de3-transformers[{extra}]\"") from error


__all__ = ["require"]
