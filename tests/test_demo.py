"""The README's main job: `torchtrt-ext demo` compiles a model, checks it against eager, reports OK."""

import subprocess
import sys


def test_demo_runs_and_reports_ok():
    result = subprocess.run(
        [sys.executable, "-m", "torchtrt_ext.cli", "demo", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("result: OK (every element within rtol=0.0001, atol=0.0001 of eager)")
    assert any(line.startswith("torch.compile(backend='torchtrt_ext')") for line in lines)
    assert any(line.startswith("torchtrt_ext.compile(model)") for line in lines)


def test_options_command_lists_options():
    result = subprocess.run([sys.executable, "-m", "torchtrt_ext.cli", "options"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("engine ('auto'|'builtin'|'tensorrt', default 'auto')")
