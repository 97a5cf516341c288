"""Opt-in mutation testing of the soundness-critical modules with mutmut (docs/testing.md).

Run through ``scripts/mutation.sh`` (which installs the pinned mutmut into .venv). Each module
runs in its own scratch copy of the project, ``.mutation/<module>/`` (git-ignored): ``src/``
(the working tree, or ``git HEAD`` with ``--head``), ``tests/``, ``pyproject.toml`` and a
generated ``setup.cfg`` whose [mutmut] section mutates that one module and selects the test
files of :data:`TARGETS`. mutmut then runs, per mutant, only those of the selected tests that
call the mutated function. Results are merged into ``tests/mutation/results.json`` (one entry
per module) and printed as a table; the surviving mutants' diffs go to
``.mutation/<module>/survivors.diff``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
RESULTS = ROOT / "tests" / "mutation" / "results.json"
#: each module's recorded verdicts (mutmut's meta files), so a later run in a new checkout
#: carries over what an earlier one found (:func:`seed_verdicts`)
VERDICTS = ROOT / "tests" / "mutation" / "verdicts"
#: the tests written against survivors (tests/mutation/survivors.md)
SURVIVOR_TESTS = "tests/test_mutation_survivors*.py"

#: module name -> (source files to mutate, fast test files run against its mutants). The one
#: place that maps code to tests; keep each list to files that pass quickly (no `slow` tests:
#: pyproject's addopts deselects them anyway).
TARGETS: dict[str, tuple[list[str], list[str]]] = {
    # the rounding rules of the layers are registered beside them (nn/lipschitz.py)
    "rounding": (["src/certnet/nn/rounding.py", "src/certnet/nn/layer_types.py"],
                 ["tests/test_rounding.py", "tests/test_rule_rounding.py",
                  "tests/test_exact_rounding.py", "tests/test_mutants.py",
                  "tests/test_lipschitz.py", "tests/test_mutation_survivors.py"]),
    "spectral": (["src/certnet/nn/spectral.py"],
                 ["tests/test_lipschitz.py", "tests/test_rounding.py", "tests/test_mutants.py",
                  "tests/test_mutation_survivors.py"]),
    "masked_spectral": (["src/certnet/nn/masked_spectral.py"],
                        ["tests/test_local_lipschitz.py", "tests/test_mutants.py",
                         "tests/test_mutation_survivors.py",
                         "tests/test_mutation_survivors_masked.py"]),
    "checkpoint": (["src/certnet/checkpoint.py", "src/certnet/files.py"],
                   ["tests/test_train_checkpoint.py", "tests/test_bad_inputs.py",
                    # test_faults.py trains for minutes: only its checkpoint-write test
                    "tests/test_faults.py::test_failing_checkpoint_write_keeps_the_previous_one",
                    "tests/test_mutation_survivors.py"]),
    "attacks": (["src/certnet/attacks.py"],
                ["tests/test_attacks.py", "tests/test_mutants.py",
                 "tests/test_mutation_survivors.py",
                 "tests/test_mutation_survivors_attacks.py"]),
    "bounds": (["src/certnet/bounds/*.py", "src/certnet/bounds/rules/*.py"],
               ["tests/test_bounds.py", "tests/test_rule_rounding.py", "tests/test_mutants.py",
                "tests/test_certifiers_soundness.py", "tests/test_refusals.py",
                "tests/test_mutation_survivors.py", "tests/test_mutation_survivors_bounds.py",
                "tests/test_smooth_activations.py",
                "tests/test_maxpool.py", "tests/test_leaky_relu.py", "tests/test_scale_ops.py",
                "tests/test_pad.py", "tests/test_graph_bounds.py",
                "tests/test_mutation_survivors_scale_pad.py",
                "tests/test_mutation_survivors_piecewise.py",
                "tests/test_mutation_survivors_graph.py",
                "tests/test_mutation_survivors_patches.py"]),
    # the smooth activations' rules alone (a slice of "bounds" that finishes in minutes)
    "smooth": (["src/certnet/bounds/rules/smooth.py"],
               ["tests/test_smooth_activations.py", "tests/test_mutation_survivors.py"]),
    # constant arithmetic and padding (layers and rules): another slice of "bounds"
    "scale_pad": (["src/certnet/bounds/rules/scale.py", "src/certnet/bounds/rules/pad.py",
                   "src/certnet/nn/scale.py", "src/certnet/nn/pad.py"],
                  ["tests/test_scale_ops.py", "tests/test_pad.py",
                   "tests/test_mutation_survivors.py",
                   "tests/test_mutation_survivors_scale_pad.py"]),
    # LeakyReLU and MaxPool2d: another slice of "bounds"
    "piecewise": (["src/certnet/bounds/rules/piecewise.py"],
                  ["tests/test_leaky_relu.py", "tests/test_maxpool.py",
                   "tests/test_mutation_survivors.py",
                   "tests/test_mutation_survivors_piecewise.py"]),
    # the rest of "bounds" in slices that finish in an hour or less each
    "crown": (["src/certnet/bounds/crown.py", "src/certnet/bounds/backward_rounding.py",
               "src/certnet/bounds/alpha_crown.py"],
              ["tests/test_bounds.py", "tests/test_rule_rounding.py",
               "tests/test_exact_rounding.py", "tests/test_mutants.py",
               "tests/test_loss_fusion.py", "tests/test_crown_shortcuts.py",
               "tests/test_mutation_survivors.py", "tests/test_mutation_survivors_bounds.py"]),
    # test_loss_fusion: fused_training_loss; test_decide: spec_bounds (no other file calls them)
    "ibp": (["src/certnet/bounds/ibp.py", "src/certnet/bounds/margins.py"],
            ["tests/test_bounds.py", "tests/test_rule_rounding.py",
             "tests/test_exact_rounding.py", "tests/test_mutants.py", "tests/test_refusals.py",
             "tests/test_loss_fusion.py", "tests/test_decide.py", "tests/test_crown_shortcuts.py",
             "tests/test_mutation_survivors.py", "tests/test_mutation_survivors_bounds.py"]),
    "relu_affine": (["src/certnet/bounds/rules/base.py", "src/certnet/bounds/rules/affine.py",
                     "src/certnet/bounds/rules/activations.py",
                     "src/certnet/bounds/rules/relaxation.py"],
                    ["tests/test_bounds.py", "tests/test_rule_rounding.py",
                     "tests/test_exact_rounding.py", "tests/test_activations.py",
                     "tests/test_crown_shortcuts.py", "tests/test_graph_bounds.py",
                     "tests/test_mutants.py", "tests/test_mutation_survivors.py",
                     "tests/test_mutation_survivors_bounds.py"]),
    "graph_step": (["src/certnet/bounds/rules/graph_step.py"],
                   ["tests/test_graph_bounds.py", "tests/test_graph_oracle.py",
                    "tests/test_graph_random.py", "tests/test_crown_shortcuts.py",
                    "tests/test_mutation_survivors.py",
                    "tests/test_mutation_survivors_graph.py"]),
    "patches": (["src/certnet/bounds/crown_patches.py"],
                ["tests/test_bounds.py", "tests/test_rule_rounding.py",
                 "tests/test_mutation_survivors.py", "tests/test_mutation_survivors_bounds.py",
                 "tests/test_mutation_survivors_patches.py"]),
    # pairwise.py's constants are read by the lipschitz certifiers and GloRo: their tests too
    "lipschitz_bounds": (["src/certnet/bounds/local.py", "src/certnet/bounds/linf_lipschitz.py",
                          "src/certnet/bounds/pairwise.py",
                          "src/certnet/bounds/rules/linf_dist.py"],
                         ["tests/test_local_lipschitz.py", "tests/test_linf_dist.py",
                          "tests/test_lipschitz.py", "tests/test_gloro.py",
                          "tests/test_exact_rounding.py", "tests/test_mutation_survivors.py",
                          "tests/test_mutation_survivors_lipschitz.py"]),
    "certifiers": (["src/certnet/certifiers/*.py"],
                   ["tests/test_certifiers_soundness.py", "tests/test_refusals.py",
                    "tests/test_linf_dist.py", "tests/test_exact_rounding.py",
                    "tests/test_lipschitz.py", "tests/test_local_lipschitz.py",
                    "tests/test_mutants.py", "tests/test_gloro.py",
                    "tests/test_mutation_survivors.py",
                    "tests/test_mutation_survivors_bounds.py"]),
}

#: mutmut's per-mutant exit codes -> our three counts (anything else is reported as "other")
KILLED = {"killed", "caught by type check"}
TIMEOUT = {"timeout"}
SURVIVED = {"survived"}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def undecorate(code: str) -> str:
    """``@d1 @d2 def f`` -> ``def f`` then ``f = d1(d2(f))``: the same module, but mutmut (which
    skips decorated functions) mutates f. Left alone: a lone @staticmethod / @classmethod
    (mutmut handles those), decorators on the function's own name (``@f.setter``) and jit
    compilers (a trampoline cannot be compiled)."""
    import libcst as cst

    class Undecorate(cst.CSTTransformer):
        def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef
                              ) -> cst.FunctionDef | cst.FlattenSentinel:
            decorators = [cst.Module([]).code_for_node(d.decorator) for d in updated.decorators]
            name = updated.name.value
            if not decorators or decorators in (["staticmethod"], ["classmethod"]) or any(
                    d.startswith(name + ".") or "jit" in d for d in decorators):
                return updated
            value = name
            for d in reversed(decorators):
                value = f"({d})({value})"
            assign = cst.parse_statement(f"{name} = {value}\n")
            return cst.FlattenSentinel([updated.with_changes(decorators=[]), assign])

    return cst.parse_module(code).visit(Undecorate()).code


def prepare(name: str, head: bool) -> Path:
    """A fresh scratch project for ``name`` with its generated mutmut config."""
    sources, tests = TARGETS[name]
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if head:  # committed src/ and tests/, plus the working tree's survivor tests
        blob = subprocess.run(["git", "archive", "HEAD", "src", "tests"], cwd=ROOT,
                              check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(blob)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                tar.extractall(work, filter="data")
            else:  # our own git archive: plain files under src/ and tests/
                tar.extractall(work)
        for path in ROOT.glob(SURVIVOR_TESTS):
            shutil.copy(path, work / path.relative_to(ROOT))
    else:
        shutil.copytree(ROOT / "src", work / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        shutil.copytree(ROOT / "tests", work / "tests",
                        ignore=shutil.ignore_patterns("__pycache__", "mutation"))
    for source in sources:
        for path in work.glob(source):
            path.write_text(undecorate(path.read_text()))
    pyproject = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in pyproject:
        sys.exit("pyproject.toml has a [tool.mutmut] section, which would override the "
                 "generated setup.cfg: keep the config in scripts/mutation.py")
    (work / "pyproject.toml").write_text(pyproject)
    tests = [t for t in tests if (work / t.split("::")[0]).exists()]
    lines = ["[mutmut]", "source_paths = src", "only_mutate ="]
    lines += [f"    {s}" for s in sources]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in tests]
    # a mutant's CPU limit is 2 * multiplier * (its tests' time + 1 s): mutmut's 15 lets one
    # mutant that loops hold a core for most of an hour on the slow bounds tests. Workers
    # fork from a server that never ran the suite: forked from the process that did (mutmut's
    # default), the bounds and certifier workers hung on a lock at their first test
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider",
              "use_git_change_detection = false", "timeout_multiplier = 3",
              "process_isolation = forkserver", ""]
    (work / "setup.cfg").write_text("\n".join(lines))
    (work / "commit.txt").write_text(git("rev-parse", "HEAD") + ("" if head else " +changes"))
    return work


def seed_verdicts(name: str, work: Path) -> int:
    """Start ``work`` from the verdicts recorded in ``tests/mutation/verdicts/<name>.json``.

    Only kills (and timeouts) are carried over, and only while the slice's test list still
    holds every file it had then: survivors always run again against today's tests. mutmut
    itself drops the verdicts of every function whose code changed since (it keeps a hash per
    function in the meta file and resets the mutants of a function whose hash differs)."""
    from mutmut.stats import status_by_exit_code

    path = VERDICTS / f"{name}.json"
    if not path.exists():
        return 0
    saved = json.loads(path.read_text())
    if not set(saved["tests"]) <= set(TARGETS[name][1]):
        print(f"{name}: the slice's tests changed since {path.name}; not carried over")
        return 0
    kept = 0
    for relative, meta in saved["meta"].items():
        codes = {key: code if code is not None and status_by_exit_code[code] in KILLED | TIMEOUT
                 else None for key, code in meta["exit_code_by_key"].items()}
        kept += sum(code is not None for code in codes.values())
        target = work / "mutants" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({
            "exit_code_by_key": codes, "hash_by_function_name": meta["hash_by_function_name"],
            "type_check_error_by_key": {}, "durations_by_key": {},
            "estimated_durations_by_key": {}}))
    print(f"{name}: {kept} verdicts carried over from {path.relative_to(ROOT)} "
          f"(commit {saved['commit'][:10]})")
    return kept


def save_verdicts(name: str, work: Path, commit: str) -> None:
    """Record the verdicts of ``work`` for :func:`seed_verdicts`."""
    meta = {}
    for path in sorted((work / "mutants" / "src").rglob("*.py.meta")):
        data = json.loads(path.read_text())
        meta[str(path.relative_to(work / "mutants"))] = {
            key: data[key] for key in ("exit_code_by_key", "hash_by_function_name")}
    if meta:
        VERDICTS.mkdir(parents=True, exist_ok=True)
        (VERDICTS / f"{name}.json").write_text(json.dumps(
            {"commit": commit, "tests": TARGETS[name][1], "meta": meta}, indent=1) + "\n")


def run_module(name: str, head: bool, resume: bool = False) -> dict:
    """Run mutmut on a fresh scratch copy, or (``resume``) on the one a stopped run left:
    mutmut keeps the verdicts it recorded and checks the rest."""
    work = WORK / name
    carried = 0
    if not (resume and (work / "mutants").is_dir()):
        work = prepare(name, head)
        carried = seed_verdicts(name, work)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    mutmut = str(Path(sys.executable).parent / "mutmut")
    start = time.monotonic()
    with open(work / "mutmut.log", "a" if resume else "w") as log:
        rc = subprocess.run([mutmut, "run", "--max-children", "1"], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    return {**collect(name), "mutmut_exit_code": rc, "carried_over": carried,
            "seconds": round(time.monotonic() - start)}


def collect(name: str) -> dict:
    """The verdicts mutmut has recorded so far in ``.mutation/<name>/`` (a finished run, or
    one stopped for time: its unchecked mutants are counted as such), and the survivors'
    diffs into ``survivors.diff``."""
    from mutmut.stats import status_by_exit_code

    work = WORK / name
    counts = {"killed": 0, "survived": 0, "timeout": 0, "other": 0, "not_checked": 0}
    survivors, others = [], []
    for meta in sorted((work / "mutants" / "src").rglob("*.py.meta")):
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = "not checked" if code is None else status_by_exit_code[code]
            if status in KILLED:
                counts["killed"] += 1
            elif status in SURVIVED:
                counts["survived"] += 1
                survivors.append(key)
            elif status in TIMEOUT:
                counts["timeout"] += 1
            elif status == "not checked":
                counts["not_checked"] += 1
            else:
                counts["other"] += 1
                others.append(f"{key}: {status}")
    checked = counts["killed"] + counts["survived"] + counts["timeout"] + counts["other"]
    if not checked:
        print(f"{name}: no verdicts in {work}; see {work / 'mutmut.log'}", file=sys.stderr)
    mutmut = str(Path(sys.executable).parent / "mutmut")
    with open(work / "survivors.diff", "w") as out:
        for key in sorted(survivors):
            out.write(subprocess.run([mutmut, "show", key], cwd=work, capture_output=True,
                                     text=True).stdout + "\n")
    return {
        "sources": TARGETS[name][0], "tests": TARGETS[name][1], **counts,
        "total": checked + counts["not_checked"],
        "score": round((counts["killed"] + counts["timeout"]) / checked, 4) if checked
        else None,
        "survivors": sorted(survivors), "other_statuses": sorted(others),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="module",
                        help=f"any of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--head", action="store_true",
                        help="use the committed src/ and tests/ (git HEAD), not the working tree "
                        f"(the working tree's {SURVIVOR_TESTS} is still used)")
    parser.add_argument("--collect", action="store_true",
                        help="record what an earlier (or stopped) run of each module found, "
                        "without running mutmut: unchecked mutants counted as such")
    parser.add_argument("--resume", action="store_true",
                        help="go on with a stopped run's scratch copy (its code and tests) "
                        "where there is one, keeping its verdicts")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {list(TARGETS)}")
    dirty = git("status", "--porcelain", "--", "src", "tests").splitlines()
    if args.resume:
        code = "a stopped run's scratch copy, resumed (its commit below)"
    elif args.head:
        code = f"HEAD src/ and tests/, with the working tree's {SURVIVOR_TESTS}"
    elif dirty:
        # porcelain lines are "XY path"; git() strips the first line's leading blank
        code = "working tree, dirty: " + ", ".join(line.split(maxsplit=1)[1] for line in dirty)
    else:
        code = "working tree (clean)"
    common = {
        "commit": git("rev-parse", "HEAD"),
        "code": code,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": f"mutmut {version('mutmut')}",
        "command": "scripts/mutation.sh " + " ".join(sys.argv[1:]),
    }
    for name in args.modules or list(TARGETS):
        print(f"mutating {name} ...", flush=True)
        entry = {**common, **(collect(name) if args.collect
                              else run_module(name, args.head, args.resume))}
        stamp = WORK / name / "commit.txt"  # the commit the scratch copy was made from
        if stamp.exists():
            entry["commit"] = stamp.read_text().split()[0]
        save_verdicts(name, WORK / name, entry["commit"])
        # re-read just before writing: only this module's entry changes
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"modules": {}}
        results["modules"][name] = entry
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'module':<16}{'killed':>8}{'survived':>10}{'timeout':>9}{'other':>7}"
          f"{'score':>8}  commit")
    for name, r in results["modules"].items():
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f}%"
        print(f"{name:<16}{r['killed']:>8}{r['survived']:>10}{r['timeout']:>9}{r['other']:>7}"
              f"{score:>8}  {r['commit'][:10]}")
    print(f"\nresults: {RESULTS.relative_to(ROOT)}; survivor diffs: .mutation/<module>/"
          "survivors.diff")


if __name__ == "__main__":
    main()
