"""benchmarks/gpu_check.py --device cpu: every check of the GPU run, at tiny sizes, passes and lands in the JSON
report with its figures (on a GPU the same command with --device cuda is the one-shot check)."""
import json
import subprocess
import sys

from helpers import REPO, _env


def test_gpu_check_passes_on_cpu(tmp_path):
    out = tmp_path / "gpu_check_cpu.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out",
                             str(out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    failed = [(c["name"], c.get("error")) for c in report["checks"] if not c["passed"]]
    assert result.returncode == 0 and not failed, (failed, result.stdout[-3000:], result.stderr[-3000:])
    names = [c["name"] for c in report["checks"]]
    assert names == ["fused_vs_plain", "device_vs_cpu", "per_image_generators", "sdpa_kernels",
                     "fp16_gradscaler_overflow", "one_rank_ddp", "digits_preset", "training_memory_and_speed",
                     "sampling_speed", "compiled_sampling", "inception_tf32"]
    figures = {c["name"]: c["figures"] for c in report["checks"]}
    assert figures["fp16_gradscaler_overflow"]["scale_after_overflow"] == figures["fp16_gradscaler_overflow"][
        "init_scale"] / 2
    assert figures["training_memory_and_speed"]["worst_relative_error"] < 0.15
    assert figures["compiled_sampling"]["recompiles"] <= 2
