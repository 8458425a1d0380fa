"""Upstream versions and signatures the hooks were written for: anything else fails clearly."""
from importlib import metadata

import pytest

from sparsevlm_patch import compat


def test_installed_stack_is_supported():
    compat.check_versions()  # the suite runs on the pinned stack


@pytest.mark.parametrize("package", ["transformers", "llava-torch"])
def test_other_version_names_package_installed_and_supported(monkeypatch, package):
    real = metadata.version
    monkeypatch.setattr(compat.metadata, "version", lambda name: "9.9.9" if name == package else real(name))
    with pytest.raises(ValueError) as excinfo:
        compat.check_versions()
    message = str(excinfo.value)
    assert package in message and "9.9.9" in message
    assert all(v in message for v in compat.SUPPORTED[package])


def test_a_source_install_of_llava_is_checked_too(monkeypatch):
    """A checkout of the LLaVA repository installs as the distribution "llava", not "llava-torch"."""
    real = metadata.version

    def version(name):
        if name == "llava-torch":
            raise metadata.PackageNotFoundError(name)
        return "1.1.3" if name == "llava" else real(name)

    monkeypatch.setattr(compat.metadata, "version", version)
    with pytest.raises(ValueError, match="supports llava-torch 1.2.2.post1, but llava 1.1.3 is installed"):
        compat.check_versions()


def test_changed_upstream_signature_fails_naming_the_function():
    def forward(self, input_ids, attention_mask, cache_position):
        pass

    with pytest.raises(ValueError) as excinfo:
        compat.check_signature("LlamaModel.forward", forward)
    message = str(excinfo.value)
    assert "LlamaModel.forward" in message and "cache_position" in message and "4.37.2" in message
