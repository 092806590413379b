"""The rendering, refinement and offline benchmarks run end to end on tiny settings, and their reports
hold what their tables print: checked numbers, not a timing target."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script, *args, tmp_path):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_render(tmp_path):
    report, stdout = _run("bench_render.py", "--batches", "1", "3", "--no-model", tmp_path=tmp_path)
    assert [(r["size"], r["batch"]) for r in report["rows"]] == [([384, 288], 1), ([384, 288], 3),
                                                                  ([256, 192], 1), ([256, 192], 3)]
    for row in report["rows"]:
        assert row["stem_max_abs_diff"] < 1e-4  # the fused stem against render-then-convolve
        assert row["speedup_reused"] == pytest.approx(row["port_ms"] / row["reused_ms"], rel=1e-9)
        assert row["speedup_reused"] > 0
    assert "384x288" in stdout


def test_bench_refine(tmp_path):
    report, _ = _run("bench_refine.py", "--backbones", "resnet18", "--sizes", "64x64", "--batches", "3",
                     "--variants", "fp32", "rendered", "--repeat", "1", tmp_path=tmp_path)
    rows = report["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "rendered"] and not any("failed" in r for r in rows)
    for r in rows:
        assert r["serial_per_s"] > 0 and r["piped_per_s"] > 0 and r["floor_per_s"] > 0
        assert 0 < r["render_ms"] < r["model_ms"]  # rendering is timed alone and is a part of the model's time
        assert abs(r["serial_per_s"] - 3 / sum(r[f"{k}_ms"] * 3e-3 for k in ("decode", "crop", "model", "back"))) \
            < 1e-6 * r["serial_per_s"]
    assert rows[0]["gmac_per_person"] == rows[1]["gmac_per_person"] > 0


def test_bench_synth_cli(tmp_path):
    report, stdout = _run("bench_synth.py", "--no-kernels", "--cli-persons", "300", "--crowd", "40",
                          "--crowd-persons", "80", "--baseline-tree", str(BENCHMARKS.parent),
                          "--dataset-sizes", "300x3", "150x2", tmp_path=tmp_path)
    rows = report["cli"]
    assert [r["tree"] for r in rows] == ["baseline", "this tree"] * 2 and all(r["ok"] for r in rows)
    assert rows[0]["persons"] >= 300 and rows[2]["persons"] == 80 and rows[2]["images"] == 2
    for r in rows:
        assert r["persons_per_s"] == pytest.approx(r["persons"] / r["seconds"]) and r["peak_rss_mb"] > 10
    assert "crowd: 40 persons/image x 2" in stdout
    sets = report["datasets"]
    assert [(r["tree"], r["variants"], r["ok"]) for r in sets] == [
        ("baseline", 3, True), ("this", 3, True), ("baseline", 2, True), ("this", 2, True)]
    assert sets[0]["persons"] >= 300 and sets[0]["person_variants"] == sets[1]["person_variants"]
    for r in sets:
        assert r["person_variants"] == r["persons"] * r["variants"] and r["peak_rss_mb"] > 10
        assert r["person_variants_per_s"] == pytest.approx(r["person_variants"] / r["seconds"])


def test_bench_offline(tmp_path):
    report, _ = _run("bench_offline.py", "--instances", "300", "--backbone", "resnet18", "--input-size", "64",
                     "64", "--batch-size", "16", "--seconds", "0", tmp_path=tmp_path)
    run = report["refine"]
    assert report["generation"]["instances"] == run["persons"] == run["persons_refined"] == 300  # --seconds 0: all
    assert run["complete"] and not report["wall"]["projected"]
    assert report["wall"]["coco_val_projected"]  # 300 persons scaled to a COCO val pass
    assert run["batches"][-1][1] == 300  # persons done after the last model call


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'posefix[ray]')")
def test_bench_offline_ray(tmp_path):
    report, stdout = _run("bench_offline.py", "--ray", "--instances", "60", "--backbone", "resnet18", "--input-size",
                          "64", "64", "--batch-size", "16", tmp_path=tmp_path)
    rows = report["rows"]
    assert [r["run"] for r in rows] == ["in process (posefix refine)", "Ray Data, 1 actor", "Ray Data, 2 actors"]
    assert all(r["persons"] == 60 for r in rows)  # every person, each run
    for r in rows:
        assert r["ratio_to_in_process"] == pytest.approx(
            r["persons_per_s_after_first"] / rows[0]["persons_per_s_after_first"], rel=1e-9)
        assert r["persons_per_s"] == pytest.approx(60 / r["refine_s"], rel=1e-9)
    assert "Ray Data, 2 actors" in stdout


@pytest.mark.slow
def test_bench_backends(tmp_path):
    pytest.importorskip("onnxruntime")
    report, stdout = _run("bench_backends.py", "--models", "r18-64x64", "--batches", "2", "--backends", "torch-cl",
                          "ort-fp32", "ort-int8", "--refine-persons", "8", "--repeat", "1", tmp_path=tmp_path)
    rows = report["rows"]
    assert ([r["backend"] for r in rows] == ["torch-cl", "ort-fp32", "ort-int8"]
            and not any("unavailable" in r for r in rows))
    for r in rows:
        assert r["b2_per_s"] > 0 and r["refine_per_s"] > 0
        assert r["x_torch_last_batch"] == pytest.approx(r["b2_per_s"] / rows[0]["b2_per_s"], rel=1e-9)
    assert "ort-int8" in stdout and "CPUExecutionProvider" in report["machine"]["onnxruntime_providers"]


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py's every step on the CPU at tiny sizes: it runs, and its one results file holds
    each step's figures (the CUDA tests skipped here, not failed)."""
    report, stdout = _run("gpu_check.py", "--dry-run", tmp_path=tmp_path)
    assert report["dry_run"] is True and set(report["steps"]) == {"cuda_tests", "throughput", "onnxruntime",
                                                                  "refine", "training"}
    steps = report["steps"]
    assert all(s["status"] == "ok" for s in steps.values()), {k: s.get("error") for k, s in steps.items()}
    assert steps["cuda_tests"]["ok"] and steps["cuda_tests"].get("failed", 0) == 0
    assert [r["batch"] for r in steps["throughput"]["rows"]] == [2, 4]
    assert all(r["persons_per_s"] > 0 for r in steps["throughput"]["rows"])
    assert all(r["persons_per_s"] > 0 for r in steps["onnxruntime"]["rows"])
    assert [(r["row"], r["written"]) for r in steps["refine"]["rows"]] == [("torch", 8), ("onnxruntime", 8)]
    assert steps["training"]["rows"][0]["samples_per_s"] > 0 and steps["training"]["rows"][0]["steps"] == 3
    assert "results written to" in stdout


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--json", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode == 0:
        pytest.skip("a CUDA device is present")
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_bench_realtime(tmp_path):
    """The real-time table end to end on a tiny model: every backend's row, each ratio its two times' quotient,
    posefix refine's rows, the int8 and decoding rows, and BlazePose reported unmeasured without its interpreter."""
    report, stdout = _run("bench_realtime.py", "--models", "mobilenet_v3_small@64x64", "--rounds", "1",
                          "--refine-persons", "8", "--refine-models", "mobilenet_v3_small@64x64", "--repeat", "1",
                          "--calibration-persons", "8", "--blazepose-python", str(tmp_path / "none"),
                          tmp_path=tmp_path)
    rows = report["rounds"][0]
    assert [r["backend"] for r in rows] == ["torch", "torch-cl", "ort-fp32", "ort-int8"]
    for row in rows:
        yard = row["yardstick_ort_fp32_ms" if row["backend"].startswith("ort") else "yardstick_torch_ms"]
        assert row["x_yardstick"] == pytest.approx(row["latency_ms"] / yard, rel=1e-9)
        assert row["b8_per_s"] > 0 and row["b32_per_s"] > 0
    assert [(r["backend"], r["persons"]) for r in report["refine"]] == [("ort-fp32", 8), ("ort-int8", 8)]
    int8 = report["int8"][0]
    assert int8["ort-int8_x_torch"] == pytest.approx(int8["ort-int8_per_s"] / max(int8["torch_per_s"],
                                                                                 int8["torch-cl_per_s"]), rel=1e-9)
    assert [r["decoder"] for r in report["decoding"]] == ["torchvision full", "posefix full", "posefix 1/2",
                                                          "posefix 1/4"]
    assert "unmeasured" in report["blazepose"][0] and "BlazePose full: unmeasured" in stdout


def test_bench_decoding(tmp_path):
    """Reduced decoding's benchmark end to end on enlarged photos: both decodings timed in turn, the ratio their
    medians' quotient, and every photo given the reduction the refiner's rule chooses."""
    report, stdout = _run("bench_decoding.py", "--scale", "2", "--copies", "1", "--rounds", "1", "--backend", "torch",
                          tmp_path=tmp_path)
    assert [row["decoding"] for row in report["speed"]] == ["reduced", "full size"]
    assert report["reduced_x_full"] == pytest.approx(report["median_reduced_per_s"] / report["median_full_size_per_s"])
    assert sum(report["reductions"].values()) == sum(report["reductions_x1"].values()) == 21  # the sample's photos
    assert report["reductions"] != report["reductions_x1"]  # enlarged photos: coarser decoding allowed
    assert report["quality"] == [] and "median: reduced" in stdout


def test_bench_hostile(tmp_path):
    report, stdout = _run("bench_hostile.py", "--trials", "2", "--mib", "1", "--quiet-s", "0.1", tmp_path=tmp_path)
    assert [t["code"] for t in report["trials"]] == ["INVALID_ARGUMENT"] * 2  # a 0xFF "JPEG" is refused
    worst = [t["health_worst_ms"] for t in report["trials"]]
    assert report["health_worst_ms"]["max"] == pytest.approx(max(worst)) and min(worst) > 0
    assert "longest health check" in stdout
