"""The tests' warm start (tests/cli_zygote.py) gives what a cold ``python -m`` gives: the same argv,
working directory, import path, environment, ``__name__``, stdout, stderr, atexit output and exit
status, for a module of the test's own and for the real CLI; a hung command times out as
subprocess.run's does."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from conftest import _cli_env, _warm_start, run_cli, run_script

PROBE = textwrap.dedent(
    """
    import atexit, json, os, sys
    atexit.register(lambda: print("atexit ran", flush=True))
    print(json.dumps({
        "argv": sys.argv[1:], "argv0": os.path.basename(sys.argv[0]), "cwd": os.getcwd(),
        "path0": sys.path[0], "name": __name__, "spec": __spec__ and __spec__.name,
        "main": sys.modules["__main__"].__file__ == __file__,
        "env": os.environ.get("PROBE_VALUE"), "stdin": sys.stdin.read(),
        "project_imported": any(m.startswith("recompute_lab") for m in sys.modules),
    }))
    print("to stderr", file=sys.stderr)
    if "--fail" in sys.argv:
        raise ValueError("as asked")
    sys.exit(int(sys.argv[1]))
    """
)


@pytest.fixture
def probe_module(tmp_path):
    (tmp_path / "zygote_probe.py").write_text(PROBE)
    return tmp_path


def test_warm_and_cold_runs_of_a_module_agree(probe_module):
    env = {"PROBE_VALUE": "x y"}
    warm = run_cli(["3", "a b"], cwd=probe_module, module="zygote_probe", env=env)
    cold = run_cli(["3", "a b"], cwd=probe_module, module="zygote_probe", env=env, cold=True)
    assert _warm_start(_cli_env(env)) is not None  # the first really was forked
    assert (warm.returncode, warm.stdout, warm.stderr) == (
        cold.returncode,
        cold.stdout,
        cold.stderr,
    )
    assert warm.returncode == 3 and warm.stdout.endswith("atexit ran\n")
    assert '"argv": ["3", "a b"], "argv0": "zygote_probe.py"' in warm.stdout
    assert f'"path0": "{probe_module}"' in warm.stdout and '"name": "__main__"' in warm.stdout
    assert '"env": "x y", "stdin": "", "project_imported": false' in warm.stdout


def test_warm_and_cold_runs_of_a_script_agree(probe_module, tmp_path_factory):
    """``python path/script.py``: argv[0] the path as given, the script's folder (not the working
    directory) first on the import path, no __spec__."""
    elsewhere = tmp_path_factory.mktemp("cwd")
    script = probe_module / "zygote_probe.py"
    warm = run_script(script, ["4", "a b"], cwd=elsewhere, env={"PROBE_VALUE": "s"})
    cold = run_script(script, ["4", "a b"], cwd=elsewhere, env={"PROBE_VALUE": "s"}, cold=True)
    assert (warm.returncode, warm.stdout, warm.stderr) == (
        cold.returncode,
        cold.stdout,
        cold.stderr,
    )
    assert warm.returncode == 4 and warm.stdout.endswith("atexit ran\n")
    assert f'"cwd": "{elsewhere}", "path0": "{probe_module}"' in warm.stdout
    assert '"spec": null, "main": true, "env": "s"' in warm.stdout


def test_an_uncaught_exception_exits_1_with_its_traceback_as_cold(probe_module):
    warm = run_cli(["0", "--fail"], cwd=probe_module, module="zygote_probe")
    cold = run_cli(["0", "--fail"], cwd=probe_module, module="zygote_probe", cold=True)
    assert warm.returncode == cold.returncode == 1
    assert warm.stderr.splitlines()[-1] == cold.stderr.splitlines()[-1] == "ValueError: as asked"
    assert warm.stdout == cold.stdout


def test_the_real_cli_answers_alike_warm_and_cold(tmp_path):
    for args in (["--help", "+strategy=layers"], ["+strategy=nope"]):
        warm = run_cli(args, cwd=tmp_path)
        cold = run_cli(args, cwd=tmp_path, cold=True)
        assert (warm.returncode, warm.stdout, warm.stderr) == (
            cold.returncode,
            cold.stdout,
            cold.stderr,
        )
    assert warm.returncode != 0 and "nope" in warm.stderr


def test_a_start_up_variable_runs_cold_and_a_hung_command_times_out(probe_module):
    assert _warm_start(_cli_env({"OMP_NUM_THREADS": "7"})) is None
    assert _warm_start(_cli_env({"WANDB_API_KEY": ""})) is not None
    (probe_module / "zygote_sleep.py").write_text(
        "import time\nprint('up', flush=True)\ntime.sleep(60)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_cli([], cwd=probe_module, module="zygote_sleep", timeout=5)
    assert info.value.output == "up\n"
    after = run_cli(["0"], cwd=probe_module, module="zygote_probe")  # the warm start goes on
    assert after.returncode == 0, after.stderr


def test_a_childs_exit_leaves_the_zygotes_temporary_folders(tmp_path):
    """W&B makes a media folder on import and removes it at exit: were it imported in the zygote,
    each child's exit would remove the folder the next child uses (seen in a full run: "W&B
    summary failed (FileNotFoundError ... wandb-media/...html)")."""
    (tmp_path / "zygote_media.py").write_text(
        "import os\nfrom wandb.sdk.data_types._private import MEDIA_TMP\n"
        "print(os.path.isdir(MEDIA_TMP.name))\n"
    )
    runs = [run_cli([], cwd=tmp_path, module="zygote_media") for _ in range(2)]
    assert [r.stdout for r in runs] == ["True\n", "True\n"], [r.stderr for r in runs]
