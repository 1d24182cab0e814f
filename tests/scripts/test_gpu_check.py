"""benchmarks/gpu_check.py: the whole GPU check runs on a tiny model on the CPU (--quick), and what it
must carry to a GPU machine without a package index is what the jneox modules it uses import."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_quick_runs_every_section_and_writes_its_table(tmp_path):
    r = run_script("--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    table = (tmp_path / "gpu_check.md").read_text(encoding="utf-8")
    rows = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))["rows"]
    sections = {row["section"] for row in rows}
    assert sections == {"setup", "correctness", "decode", "server", "train", "compiled"}
    failed = [row for row in rows if row["result"].startswith("failed")]
    assert not failed, failed
    assert table.startswith("GPU check on CPU (--quick)") and table in r.stdout
    # the static step agrees with transformers on the tiny model
    greedy = next(row for row in rows if row["what"].startswith("greedy tokens"))
    assert greedy["result"].startswith("8/8 identical") and "agreement 8/8" in greedy["result"]
    # the CUDA-only rows say why they did not run
    assert all(row["result"].startswith("skipped: needs CUDA") for row in rows
               if row["section"] == "compiled" and "torch.compile" in row["what"])
    served = [row for row in rows if row["section"] == "server"]
    assert len(served) == 3 and all("tok/s aggregate" in row["result"] for row in served)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_measurement_is_a_row_and_the_run_goes_on():
    gpu_check = load_script()
    run = gpu_check.Run(argparse.Namespace(budget=60.0))
    run.shared["device"] = torch.device("cpu")

    def broken(run):
        run.row("s1", "fine", "1 tok/s")
        run.attempt("s1", "broken", lambda: 1 / 0)
        run.row("s1", "after", "2 tok/s")
        raise RuntimeError("the GPU fell off\nsecond line")

    run.section("s1", 10, broken)
    run.section("s2", 10, lambda run: run.row("s2", "next", "3 tok/s"))
    assert [(r["what"], r["result"]) for r in run.rows] == [
        ("fine", "1 tok/s"), ("broken", "failed: ZeroDivisionError: division by zero"), ("after", "2 tok/s"),
        ("(section)", "failed: RuntimeError: the GPU fell off"), ("next", "3 tok/s")]
    run.deadline = 0  # the run's budget spent: later sections are skipped, visibly
    run.section("s3", 10, lambda run: run.row("s3", "never", ""))
    assert run.rows[-1]["result"] == "skipped: the run's time budget is spent"


def test_the_bundle_is_what_the_gpu_image_lacks(tmp_path):
    r = run_script("--list-imports")
    assert r.returncode == 0, r.stderr
    imported = set(json.loads(r.stdout.strip().splitlines()[-1]))
    # the Engine without the HTTP app: no web framework travels
    assert not imported & {"fastapi", "uvicorn", "starlette", "pydantic", "pydantic_core"}, imported
    assert {"llguidance", "prometheus_client"} <= imported
    module = load_script()
    names = module.make_bundle(tmp_path / "bundle")
    assert set(names) == imported - module.IMAGE_HAS
    for name in names:
        assert (tmp_path / "bundle" / name).exists() or list((tmp_path / "bundle").glob(f"{name}.*")), name
    # a fresh interpreter that sees only the image's packages (links to this environment's) and the bundle
    site = Path(torch.__file__).parents[1]
    image = tmp_path / "image"
    image.mkdir()
    for name in module.IMAGE_HAS:
        for path in [site / name, *site.glob(f"{name}.*py"), *site.glob(f"{name}.*.so"), *site.glob(f"{name}-*.dist-info")]:
            if path.exists():
                (image / path.name).symlink_to(path)
    code = ("import sys, runpy; sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2]); "
            "runpy.run_path(sys.argv[3])['import_jneox'](); print(sorted(m for m in sys.modules if '.' not in m))")
    check = subprocess.run([sys.executable, "-S", "-c", code, str(image), str(tmp_path / "bundle"), str(SCRIPT)],
                           capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert check.returncode == 0, check.stderr
    assert "'llguidance'" in check.stdout and "'fastapi'" not in check.stdout


def test_a_run_past_its_budget_still_writes_its_table(tmp_path):
    code = ("import runpy, sys, time; g = runpy.run_path(sys.argv[1], run_name='gpu_check');"
            "main = g['main']; main.__globals__['GRACE_S'] = 0;"
            "main.__globals__['section_setup'] = lambda run: (run.row('setup', 'slow', 'begun'), time.sleep(60));"
            "main(['--quick', '--budget', '10', '--out', sys.argv[2]])")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 50
    rows = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))["rows"]
    assert [row["result"] for row in rows][0] == "begun"
    assert rows[-1]["result"].startswith("stopped: ") and "past the --budget of 10 s" in rows[-1]["result"]
