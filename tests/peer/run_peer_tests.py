#!/usr/bin/env python
# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""Run transformers' own common model tests against hf_weaknat (conformance).

    python tests/peer/run_peer_tests.py [--keep] [-- <extra pytest args, e.g. -k attention -x>]

What it does:
1. Reads the installed transformers version. The common test files import private internals, so they must come
   from exactly that version: the PyPI sdist ships them (the wheel does not).
2. Gets `transformers-<version>.tar.gz` from the cache (`$HF_WEAKNAT_PEER_CACHE`, default
   `~/.cache/hf_weaknat/peer/<version>/`), or downloads it with
   `pip download transformers==<version> --no-deps --no-binary :all:` into that cache. Offline works once cached.
3. Lays out a temporary tree: `tests/test_modeling_common.py` and `tests/test_configuration_common.py` from the
   sdist (plus any sdist module they import relatively), three stand-ins for modules the sdist lacks, `__init__.py`
   files, a `pytest.ini`, and this directory copied to `tests/peer/`.
4. Runs pytest there (hf_weaknat imported from this checkout), prints a passed/skipped/failed summary with the
   skip reasons grouped, and exits with pytest's exit code.

Nothing of transformers' test code is ever written into this repository.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import json
import time
from pathlib import Path

PEER_DIR = Path(__file__).resolve().parent
REPO = PEER_DIR.parents[1]
SDIST_FILES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py")
PEER_FILES = ("conftest.py", "test_peer_weaknat.py")

# Modules the common tests import that the sdist does not ship. Ours win even if a later sdist ships them (a copy of
# the export tester from another version failed against 5.23; the generation suite tests AR decoding).
EXPORT_STAND_IN = '''"""Stand-in written by hf_weaknat's run_peer_tests.py: the sdist lacks tests/exporters/.

transformers' export tests are all @slow and version-sensitive; hf_weaknat tests torch.export itself.
"""


class ExportTesterMixin:
    pass
'''
GENERATION_STAND_IN = '''"""Stand-in written by hf_weaknat's run_peer_tests.py: the sdist lacks tests/generation/.

hf_weaknat has no GenerationMixin (its generate is CTC decoding), so the AR generation suite does not apply.
"""


class GenerationTesterMixin:
    pass
'''


class PeerTestError(RuntimeError):
    pass


def config_common_kwargs_source() -> str:
    """`config_common_kwargs` for ConfigTester: every public attribute of a bare PreTrainedConfig, non-default.

    Derived from the installed transformers so a new common attribute shows up here (and fails loudly if we do not
    know a non-default value for it) instead of silently going untested.
    """
    from transformers.configuration_utils import PreTrainedConfig

    bare = PreTrainedConfig()
    skip = {"transformers_version", "is_encoder_decoder", "name_or_path"}  # set by save/model, not common kwargs
    keys = []
    for key in vars(bare):
        public = key.lstrip("_")
        if key.startswith("_") and not isinstance(getattr(type(bare), public, None), property):
            continue  # private state without a public property
        if public not in skip and public not in keys:
            keys.append(public)
    known = {
        "architectures": ["WeakNATForConditionalGeneration"],
        "id2label": {0: "label"},
        "label2id": {"label": 0},
        "problem_type": "regression",
        "dtype": "float16",  # ConfigTester compares config.dtype with torch.float16
    }
    kwargs = {}
    for key in keys:
        default = getattr(bare, key)
        if key in known:
            kwargs[key] = known[key]
        elif isinstance(default, bool):
            kwargs[key] = not default
        elif isinstance(default, int):
            kwargs[key] = default + 5
        else:
            raise PeerTestError(f"PreTrainedConfig has a new public attribute {key!r} (default {default!r}); "
                                "add a non-default value for it in run_peer_tests.config_common_kwargs_source")
        if kwargs[key] == default:
            raise PeerTestError(f"config_common_kwargs[{key!r}] equals the default {default!r}")
    return ('"""Stand-in written by hf_weaknat\'s run_peer_tests.py: the upstream file needs Hub-staging helpers.\n\n'
            'Every public attribute of a bare PreTrainedConfig, mapped to a non-default value."""\n\n'
            f"config_common_kwargs = {kwargs!r}\n")


def cache_dir(version: str) -> Path:
    root = os.environ.get("HF_WEAKNAT_PEER_CACHE") or Path.home() / ".cache" / "hf_weaknat" / "peer"
    return Path(root) / version


def is_valid_sdist(path: Path) -> bool:
    try:
        with tarfile.open(path) as tar:
            names = set(tar.getnames())
    except (tarfile.TarError, OSError, EOFError):
        return False
    top = path.name[: -len(".tar.gz")]
    return all(f"{top}/{name}" in names for name in SDIST_FILES)


def fetch_sdist(version: str) -> Path:
    """The cached sdist of transformers==version, downloading it once with pip."""
    target = cache_dir(version) / f"transformers-{version}.tar.gz"
    if target.is_file():
        if is_valid_sdist(target):
            print(f"[peer] using cached sdist {target}")
            return target
        print(f"[peer] cached {target} is unreadable or lacks the test files; fetching it again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[peer] downloading the transformers=={version} sdist (pip download, ~11 MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-deps",
               "--no-binary", ":all:", "--dest", tmp, "--quiet", "--disable-pip-version-check"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / target.name
        if result.returncode != 0 or not downloaded.is_file():
            raise PeerTestError(
                f"No cached sdist at {target} and `{' '.join(cmd[2:])}` failed (exit {result.returncode}); "
                "the peer tests need PyPI once to fetch transformers' test files, then run offline from the cache.\n"
                f"pip said:\n{(result.stderr or result.stdout).strip()[-2000:]}")
        if not is_valid_sdist(downloaded):
            raise PeerTestError(f"The downloaded {downloaded.name} does not contain {', '.join(SDIST_FILES)}")
        os.replace(downloaded, target)  # atomic: a half-written file is never left in the cache
    return target


RELATIVE_IMPORT = re.compile(r"^\s*from\s+(\.+)([\w.]*)\s+import\s", re.MULTILINE)


def lay_out(sdist: Path, root: Path) -> None:
    """Write the temporary tree `root/tests/...` described in the module docstring."""
    version_dir = sdist.name[: -len(".tar.gz")]
    stand_ins = {
        "tests/exporters/test_export.py": EXPORT_STAND_IN,
        "tests/generation/test_utils.py": GENERATION_STAND_IN,
        "tests/utils/test_configuration_utils.py": config_common_kwargs_source(),
    }
    for rel, text in stand_ins.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    with tarfile.open(sdist) as tar:
        members = {m.name[len(version_dir) + 1:]: m for m in tar.getmembers() if m.name.startswith(version_dir + "/")}
        pending, done = list(SDIST_FILES), set()
        while pending:  # the common files and every relative import they make that the sdist has
            rel = pending.pop()
            if rel in done or rel in stand_ins:
                continue
            done.add(rel)
            if rel not in members:
                raise PeerTestError(f"{rel} is imported by transformers' common tests but neither the sdist nor our "
                                    "stand-ins provide it; add a stand-in in run_peer_tests.py")
            text = tar.extractfile(members[rel]).read().decode("utf-8")
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text, encoding="utf-8")
            for dots, module in RELATIVE_IMPORT.findall(text):
                if not module:  # `from . import name`: not used by these files; a missing name fails at import
                    continue
                base = Path(rel).parent
                for _ in range(len(dots) - 1):
                    base = base.parent
                pending.append((base / module.replace(".", "/")).as_posix() + ".py")
    (root / "tests" / "peer").mkdir()
    for name in PEER_FILES:
        shutil.copy2(PEER_DIR / name, root / "tests" / "peer" / name)
    for directory in [root / "tests", *(p for p in (root / "tests").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (root / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n", encoding="utf-8")


def skip_groups(skipped: list[dict]) -> dict[str, list[str]]:
    """Skip reason (class names generalised so per-class skips group together) -> test names."""
    groups = collections.defaultdict(list)
    for skip in skipped:
        reason = re.sub(r"<class '[\w.]+\.(\w+)'>", r"\1", skip["reason"])
        reason = re.sub(r"\bWeakNAT(Model|ForConditionalGeneration)\b", "<class>", reason)
        groups[reason].append(skip["test"])
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Arguments after `--` go to pytest.")
    parser.add_argument("--keep", action="store_true", help="keep the temporary tree and print its path")
    parser.add_argument("--quiet-skips", action="store_true", help="do not list the skip reasons")
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]

    import transformers

    version = transformers.__version__
    start = time.perf_counter()
    try:
        sdist = fetch_sdist(version)
    except PeerTestError as error:
        print(f"[peer] ERROR: {error}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="hf_weaknat_peer_"))
    try:
        lay_out(sdist, root)
        report = root / "report.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", HF_WEAKNAT_PEER_REPORT=str(report),
                   PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        cmd = [sys.executable, "-m", "pytest", "tests/peer/test_peer_weaknat.py", "-q", "-rfE", *pytest_args]
        print(f"[peer] transformers {version}: running `{' '.join(cmd[2:])}` in {root}", flush=True)
        code = subprocess.run(cmd, cwd=root, env=env).returncode
        elapsed = time.perf_counter() - start
        if report.is_file():
            result = json.loads(report.read_text(encoding="utf-8"))
            counts = collections.Counter(result["counts"])
            extra = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())
                              if k not in ("passed", "skipped", "failed", "error"))
            print(f"\n[peer] transformers {version} common tests on hf_weaknat: {counts['passed']} passed, "
                  f"{counts['skipped']} skipped, {counts['failed']} failed, {counts['error']} errors"
                  f"{' (' + extra + ')' if extra else ''} in {elapsed:.1f} s (pytest exit code {code})")
            whole = [skip for skip in result["skipped"] if not skip["subtest"]]
            inner = [skip for skip in result["skipped"] if skip["subtest"]]
            print(f"[peer] {counts['passed'] + len(whole) + counts['failed']} test cases: {len(whole)} skipped "
                  f"whole; {len(inner)} of the skips are subtests inside {len({s['test'] for s in inner})} test cases "
                  "that pytest also counts as passed")
            for title, skips in (("skipped test cases", whole), ("skipped subtests (of passed test cases)", inner)):
                if skips and not args.quiet_skips:
                    print(f"[peer] {title}, by reason:")
                    groups = skip_groups(skips)
                    for reason, names in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
                        print(f"  {len(names):3d}  {reason}  [{', '.join(sorted(set(names)))}]")
            for name in result["failed"]:
                print(f"[peer] FAILED {name}")
        else:
            print(f"[peer] pytest wrote no report (exit code {code})")
        return code
    except PeerTestError as error:
        print(f"[peer] ERROR: {error}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"[peer] kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
