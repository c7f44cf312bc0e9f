# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""pytest setup for the transformers conformance (peer) tests in this directory.

Two situations:
- In the repository (`python -m pytest` from the repo root): transformers' test modules are not here (they are
  never committed), so nothing in this directory is collected and this file changes nothing else.
- In the tree laid out by `run_peer_tests.py` (`<tmp>/tests/{test_modeling_common.py, ..., peer/}`): collect the
  peer module, register the markers transformers' tests use, and, for the session only, add hf_weaknat's classes
  to transformers' static Auto name tables, which the common tests consult by class *name* to tell a base model
  (no loss, no training test) from an LM head.

The guard is the presence of `test_modeling_common.py` next to this directory's parent package: robust to the
rootdir, the cwd and how pytest was invoked, and it needs no file outside tests/peer/.
"""

import json
import os
from pathlib import Path

LAID_OUT = (Path(__file__).resolve().parent.parent / "test_modeling_common.py").is_file()

# In the repository, ignore every file here (the peer module would fail to import; the runner is not a test).
collect_ignore_glob = [] if LAID_OUT else ["*"]

MARKERS = (
    "slow: slow tests (run with RUN_SLOW=1)",
    "generate: tests that use the GenerationTesterMixin",
    "accelerate_tests: tests that need accelerate",
    "torch_compile_test: tests that torch.compile a model",
    "torch_export_test: tests that torch.export a model",
    "flash_attn_test: flash-attention tests",
    "flash_attn_3_test: flash-attention 3 tests",
    "flash_attn_4_test: flash-attention 4 tests",
    "all_flash_attn_test: tests of all flash-attention versions",
    "is_training_test: tests of the TrainingTesterMixin",
    "is_tensor_parallel_test: tensor-parallel tests",
    "is_expert_parallel_test: expert-parallel tests",
    "is_fsdp_test: FSDP tests",
    "bitsandbytes: bitsandbytes integration tests",
    "not_device_test: tests that do not need an accelerator",
)

# (name table in transformers.models.auto.modeling_auto, class name) added for model_type "weaknat".
NAME_TABLE_ADDITIONS = (
    ("MODEL_MAPPING_NAMES", "WeakNATModel"),  # base model
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "WeakNATForConditionalGeneration"),  # seq2seq LM head
)
_added = []


def pytest_configure(config):
    if not LAID_OUT:
        return
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    import transformers.models.auto.modeling_auto as modeling_auto

    import hf_weaknat  # noqa: F401  (registers the config and models with the public Auto classes)

    for table_name, class_name in NAME_TABLE_ADDITIONS:
        table = getattr(modeling_auto, table_name)
        if "weaknat" not in table:
            table["weaknat"] = class_name
            _added.append(table)


def pytest_unconfigure(config):
    while _added:
        _added.pop().pop("weaknat", None)


def pytest_terminal_summary(terminalreporter):
    """For run_peer_tests.py: pytest's own outcome counts (as on its summary line) and every skip with its reason."""
    path = os.environ.get("HF_WEAKNAT_PEER_REPORT")
    if not (LAID_OUT and path):
        return
    stats = terminalreporter.stats
    counts = {key: sum(1 for r in reports if getattr(r, "count_towards_summary", True))
              for key, reports in stats.items() if key and key != "warnings"}
    skipped = []
    for key, reports in stats.items():
        for report in reports:
            if getattr(report, "skipped", False) and isinstance(getattr(report, "longrepr", None), tuple):
                where, line, reason = report.longrepr
                skipped.append({"test": report.nodeid.rsplit("::", 1)[-1], "where": f"{Path(where).name}:{line}",
                                "reason": reason.removeprefix("Skipped: "),
                                "subtest": hasattr(report, "context")})  # pytest's SubtestReport
    failed = [r.nodeid for key in ("failed", "error") for r in stats.get(key, [])]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"counts": counts, "skipped": skipped, "failed": failed}, handle, indent=1)
