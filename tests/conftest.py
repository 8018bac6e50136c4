"""Test-wide settings: one intra-op thread (the suite is many small ops, where threads cost more than they give,
and the distributed tests run two processes on CI's two cores).

In CI (the environment variable CI set, as `CI=true bash .ci/run` does) a skip because a test dependency is missing
is a failure: `pytest.importorskip` (in a test, a fixture or at module level) or a skip whose reason says a package
is needed ("needs sentencepiece"). Without sentencepiece, 29 tests (the WanPipeline comparison among them) would
otherwise turn into skips and the suite would stay green. Skips for hardware (CUDA, a GPU) stay skips."""

from __future__ import annotations

import os
import re

import pytest
import torch

torch.set_num_threads(1)

CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

# importorskip says "could not import 'NAME': ..." (pytest 8-9); a hand-written skip names what it needs
MISSING_IMPORT = re.compile(r"could not import|No module named|\bneeds? (the )?(package |module )?"
                            r"(sentencepiece|diffusers|transformers|peft|accelerate|k[-_]?diffusion|torchsde|einops|"
                            r"trampoline|scipy|tensorboard|torchdiffeq|av|sklearn|scikit-learn|chromium|"
                            r"playwright)", re.IGNORECASE)
HARDWARE = re.compile(r"\b(cuda|gpus?|accelerator|nccl)\b", re.IGNORECASE)


def missing_dependency(report) -> str | None:
    """The skip reason if `report` is a skip for a missing import (not an xfail, not a hardware skip)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if MISSING_IMPORT.search(reason) and not HARDWARE.search(reason):
        return reason
    return None


def fail_instead(report) -> None:
    reason = missing_dependency(report)
    if CI and reason is not None:
        report.outcome = "failed"
        report.longrepr = (f"CI is set, so a missing test dependency fails instead of skipping: {reason}\n"
                           f"(install the dev extras: make install, or pip install -e '.[dev]')")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    fail_instead(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level importorskip skips the whole file at collection time."""
    outcome = yield
    fail_instead(outcome.get_result())
