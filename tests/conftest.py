"""Shared test helpers: reference packages are optional locally, never in CI."""
import importlib
import os

import pytest


def need(module: str):
    """Import a reference package, or skip with the reason (fail instead when CI=true)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a package that breaks while importing
        msg = f"reference package {module!r} unavailable: {type(e).__name__}: {e}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must install requirements-dev.txt)")
        pytest.skip(msg)


def randomise_(m):
    """Make every parameter random, norm weights and biases included, so a dropped or swapped one shows."""
    import torch
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or name == "masked_spec_embed":
                p.normal_(0.0, 0.1)
    return m
