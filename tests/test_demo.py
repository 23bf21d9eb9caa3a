"""The README's main job: `torchtrt-ext demo` compiles a model, checks it against eager, reports OK.
The command runs in this process (its entry point is main(argv))."""

from torchtrt_ext.cli import main


def test_demo_runs_and_reports_ok(capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("result: OK (every element within rtol=0.0001, atol=0.0001 of eager)")
    assert any(line.startswith("torch.compile(backend='torchtrt_ext')") for line in lines)
    assert any(line.startswith("torchtrt_ext.compile(model)") for line in lines)


def test_options_command_lists_options(capsys):
    assert main(["options"]) == 0
    assert capsys.readouterr().out.startswith("engine ('auto'|'builtin'|'tensorrt', default 'auto')")
