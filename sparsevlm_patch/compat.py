"""Which upstream versions the hooks are written against, checked before patching."""
from __future__ import annotations

import inspect
from importlib import metadata

SUPPORTED = {
    "transformers": ("4.36.2", "4.37.2"),
    "llava-torch": ("1.2.2.post1",),
}

# Distribution names of upstream LLaVA: PyPI's, and a source checkout of the LLaVA repository
# (`pip install -e .` there installs it as "llava").
LLAVA_DISTRIBUTIONS = ("llava-torch", "llava")


class UnsupportedVersionError(ValueError):
    """An upstream the hooks were not written for (a configuration error, like a bad flag)."""


def check_versions() -> None:
    """Fail, naming installed and supported versions, on an upstream we don't know."""
    for package, supported in SUPPORTED.items():
        names = LLAVA_DISTRIBUTIONS if package == "llava-torch" else (package,)
        found, installed = _installed_version(names)
        if installed is None:
            if package == "transformers":
                raise UnsupportedVersionError(
                    f"sparsevlm_patch needs transformers {' or '.join(supported)}; it is not installed")
            continue  # llava not installed yet: its hook waits for the import
        if installed not in supported:
            raise UnsupportedVersionError(
                f"sparsevlm_patch supports {package} {' or '.join(supported)}, but {found} {installed} is "
                f"installed: install a supported version (see README, 'Supported versions'), "
                f"or run without the plugin (SPARSEVLM=0)")


def _installed_version(names):
    """(distribution name, version) of the first of `names` installed, else (None, None)."""
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None, None


# Expected parameters of each patched symbol, by its path ("LlamaModel.forward"); filled from
# the patch table (hooks.PATCHES).
EXPECTED = {}


def check_signature(name: str, target, expected=None, fields: bool = False) -> None:
    """`target`'s parameters must be exactly `expected` (default: the patch table's row `name`),
    since a wrapper binds them by name; for a class that the plugin replaces (`fields`), its
    constructor must have every name in `expected`."""
    expected = EXPECTED[name] if expected is None else expected
    params = list(inspect.signature(target).parameters)
    ok = set(expected) <= set(params) if fields else params == list(expected)
    if not ok:
        raise UnsupportedVersionError(
            f"{name} has parameters {params}, expected {list(expected)}: this upstream version is "
            f"not supported by sparsevlm_patch (supported: transformers "
            f"{' or '.join(SUPPORTED['transformers'])}, llava-torch {SUPPORTED['llava-torch'][0]})")
