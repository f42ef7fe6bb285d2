"""MetaSchedule tuning: the tuned .so stays bit-exact, the database is reused by later builds, and a
corrupt or foreign-target database never breaks a build."""

import shutil
import warnings

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import intforge
from conftest import quantize_module
from intforge import reference
from intforge.compiler import build
from intforge.compiler.build import _legalize_passes
from intforge.compiler.tuning import _tuning_target, apply_database_pass, database_dir, open_database, tune
from intforge.relay_passes import emit_program


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A small conv + linear program tuned with a handful of trials into a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("INTFORGE_CACHE", str(cache))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    program = quantize_module(model, (1, 3, 8, 8))
    db_dir = tune(program, "x86", trials=4, progress=False)
    yield program, db_dir
    mp.undo()


def test_tuning_writes_a_database_for_the_target(tuned):
    _, db_dir = tuned
    assert db_dir == database_dir("x86")
    assert (db_dir / "database_tuning_record.json").read_text().strip()


def test_build_reuses_the_database_and_stays_bit_exact(tuned, tmp_path):
    program, _ = tuned
    # The database has schedules for this program's kernels, keyed as the build sees them.
    tgt = _tuning_target(intforge.compiler.resolve_target("x86"))
    with tgt:
        fused = tvm.transform.Sequential(_legalize_passes(intforge.compiler.resolve_target("x86")))(
            emit_program(program))
    db = open_database("x86")
    with tgt:
        applied = apply_database_pass(db, tgt)(fused)
    scheduled = [gv.name_hint for gv, f in applied.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tir.is_scheduled", False)]
    assert scheduled, "no kernel of the program was found in the tuning database"
    art = build(program, tmp_path / "t")
    assert art.manifest["schedule"].startswith("tuned")
    lib = intforge.load(art.library)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32) * 3
    np.testing.assert_array_equal(lib(x), reference.run_float(program, x)[0])
    untuned = build(program, tmp_path / "u", tuned=False)
    assert untuned.manifest["schedule"] == "default"


def test_foreign_target_records_are_ignored(tuned, tmp_path):
    program, db_dir = tuned
    foreign = database_dir("x86-generic")
    shutil.copytree(db_dir, foreign)  # records tuned for znver4 sitting in the x86-64-v2 database
    art = build(program, tmp_path, target="x86-generic")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(intforge.load(art.library)(x), reference.run_float(program, x)[0])


def test_corrupt_database_is_set_aside_with_a_warning(tuned, tmp_path):
    program, db_dir = tuned
    backup = tmp_path / "backup"
    shutil.copytree(db_dir, backup)
    (db_dir / "database_tuning_record.json").write_text('{"this is": not json\n')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            art = build(program, tmp_path / "c")
        assert any("could not be read" in str(w.message) for w in caught)
        assert art.manifest["schedule"] == "default"  # the manifest does not claim the set-aside database
        assert not db_dir.exists()
        x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
        np.testing.assert_array_equal(intforge.load(art.library)(x), reference.run_float(program, x)[0])
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)
        shutil.copytree(backup, db_dir)
