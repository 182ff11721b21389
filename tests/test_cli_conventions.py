"""The CLI as this field's users expect it (issue 13): honest help, standard conventions, checks up
front, a selection remembered once its arguments are valid, tables that fit 80 columns."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from rsretrieve.datasets import sample_root
from test_cli import MODEL, RSRETRIEVE, assert_clean_error, indexed_workspace, run

COMMANDS = ["encode", "index", "query", "eval", "info", "models", "verify", "convert", "export"]


def run80(args, workspace, check=True, **env):
    """A command on an 80-column terminal."""
    environment = {**os.environ, "RSRETRIEVE_WORKSPACE": str(workspace), "COLUMNS": "80", "PYTHONWARNINGS": "ignore", **env}
    proc = subprocess.run([*RSRETRIEVE, *map(str, args)], capture_output=True, text=True, env=environment, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def flat(text: str) -> str:
    """Help text with the panel borders and line breaks taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


# -- 1. help shows every default and the environment variable ---------------------------------------
def test_help_shows_defaults_and_the_environment_variable(tmp_path):
    main = flat(run80(["--help"], tmp_path).stdout)
    assert "RSRETRIEVE_WORKSPACE" in main and "./rsretrieve-workspace" in main
    encode = flat(run80(["encode", "--help"], tmp_path).stdout)
    for shown in ("the current one, else csmoe-p16", "the current one, else sample", "32 on a CPU, 512 on a GPU",
                  "one per dataset, subset and model in the workspace", "a local cluster", "majortom"):
        shown = f"default: ({shown})"  # Typer puts a default given as text in parentheses
        assert shown in encode, shown
    assert "Patches per model batch" in encode
    assert "default: (the set's own: 10 for BENv2, 3 for sample)" in flat(run80(["eval", "--help"], tmp_path).stdout)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_fits_80_columns(tmp_path, command):
    out = run80([command, "--help"] if command else ["--help"], tmp_path).stdout
    assert max(len(line) for line in out.splitlines()) <= 80


# -- 2. an interrupted first run: the short command resumes it; Ctrl-C exits 130 --------------------
# The CLI's own main, with one pause: when the first chunk's embeddings reach the driver, it
# touches a file and waits there (never ending by itself), so that Ctrl-C comes mid-run at a moment
# the test knows, neither during start-up nor after a run that ended first.
PAUSED_CLI = """
import faulthandler, pathlib, signal, sys, time
faulthandler.register(signal.SIGUSR1)  # the test asks for every thread's stack if the run does not end
# Ctrl-C as a terminal delivers it: a process started by one that ignores SIGINT (a Dask nanny run
# earlier in the same pytest process) inherits the ignoring, and Python then keeps it
signal.signal(signal.SIGINT, signal.default_int_handler)
from rsretrieve.store.writer import ShardWriter
paused = pathlib.Path(sys.argv[1])
def add_after_ctrl_c(self, *args, **kwargs):
    paused.touch()
    while True:
        time.sleep(0.05)
ShardWriter.add = add_after_ctrl_c
sys.argv = ["rsretrieve", *sys.argv[2:]]
from rsretrieve.cli import main
main()
"""


def test_an_interrupted_run_is_resumed_by_the_short_command(tmp_path):
    root = tmp_path / "benv2"
    root.symlink_to(sample_root(), target_is_directory=True)
    ws, paused = tmp_path / "ws", tmp_path / "paused"
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(ws), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    args = ["encode", "--dataset", "benv2", "--data-root", str(root), "--modality", "s1", "--model", MODEL]
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, str(paused), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert paused.exists(), f"the run did not reach its first chunk in 300 s (exit code {proc.poll()})"
        assert _current_is(ws, "benv2")  # the selection is remembered once the run started
        proc.send_signal(signal.SIGINT)  # Ctrl-C mid-run
        try:
            _, errors = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # where it hangs, for the failure message
            time.sleep(2)
            proc.kill()
            pytest.fail("the run did not end within 300 s of Ctrl-C; its stacks:\n" + proc.communicate()[1][-6000:])
    finally:
        proc.kill()  # a no-op once it has exited
    assert proc.returncode == 130, errors
    assert "Traceback" not in errors and "interrupted" in errors
    resumed = run(["encode", "--modality", "s1"], ws)
    assert "dataset benv2" in resumed.stdout and "benv2--csmoe-tiny.zarr" in resumed.stdout


def _current_is(ws: Path, dataset: str) -> bool:
    try:
        return json.loads((ws / "config.json").read_text())["current"]["dataset"] == dataset
    except (OSError, ValueError, KeyError):
        return False


# -- 4. faiss missing: one line with the install command, before any work --------------------------
def test_missing_faiss_is_named_before_any_encoding(tmp_path):
    script = "import sys; sys.modules['faiss'] = None; sys.argv[0] = 'rsretrieve'; from rsretrieve.cli import main; main()"
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(tmp_path), "COLUMNS": "200"}
    for args in (["index", "--model", MODEL], ["eval", "sample", "--model", MODEL]):
        proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
        assert_clean_error(proc, "faiss is not installed", "pip install 'rsretrieve[cpu]'")
    assert not (tmp_path / "stores").exists()


# -- 6. the dashboard only when asked, and then with what it needs --------------------------------
def test_dashboard_without_bokeh_is_one_line(tmp_path):
    pytest.importorskip("distributed")
    try:
        import bokeh  # noqa: F401
        pytest.skip("bokeh is installed here: the dashboard would start")
    except ImportError:
        pass
    assert_clean_error(run(["encode", "--modality", "s1", "--model", MODEL, "--dashboard", "127.0.0.1:0"], tmp_path, check=False),
                       "--dashboard needs bokeh", "pip install")


# -- 8. conventions: --json on stdout, --output to a file, -k/--top-k, -V, -q --------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return indexed_workspace(tmp_path_factory.mktemp("conventions"))


def test_eval_json_goes_to_stdout_and_output_to_a_file(ws, tmp_path):
    printed = json.loads(run(["eval", "sample", "--json", "--top-k", "2"], ws).stdout)
    assert printed["random_init"] is True and printed["protocol"]["k"] == 2
    out = tmp_path / "f1.json"
    shown = run(["eval", "sample", "-k", "2", "-o", out], ws)
    assert "S1S2" in shown.stdout and json.loads(out.read_text())["tasks"].keys() == printed["tasks"].keys()
    assert json.loads(run(["eval", "sample", "-k", "2", "--output", "-"], ws).stdout)["tasks"].keys() == printed["tasks"].keys()


def test_version_short_flag_and_completion(tmp_path):
    assert run(["-V"], tmp_path).stdout.startswith("rsretrieve ")
    assert "--install-completion" in run80(["--help"], tmp_path).stdout


def test_quiet_drops_progress_and_notes_but_keeps_the_warning(tmp_path):
    proc = run(["-q", "encode", "--modality", "s1", "--model", MODEL], tmp_path)
    assert "encoding" not in proc.stderr and "━" not in proc.stderr
    assert "RANDOM WEIGHTS" in proc.stderr


def test_verbose_shows_the_log(tmp_path):
    quiet = run(["info"], tmp_path)
    loud = run(["-vv", "encode", "--modality", "s1", "--model", MODEL], tmp_path)
    assert "DEBUG" not in quiet.stderr
    assert "DEBUG" in loud.stderr or "INFO" in loud.stderr


# -- 5. terminal tables fit 80 columns; info shows store names whole ---------------------------------
def test_output_tables_fit_80_columns_and_info_names_stores_whole(ws):
    for args in (["info"], ["models"], ["eval", "sample"], ["verify"], ["encode"]):
        proc = run80(args, ws)
        out = proc.stdout + proc.stderr
        assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "sample--csmoe-tiny.zarr" in run80(["info"], ws).stdout


# -- 11. models lists every registered config; the notebook command runs with what make installs --
def test_models_lists_the_small_configs(tmp_path):
    names = {row["name"] for row in json.loads(run(["models", "--json"], tmp_path).stdout)}
    table = run80(["models"], tmp_path).stdout
    assert {"csmoe-tiny", "csmae-tiny", "csmoe-p16", "csmae-p15"} <= names
    assert "csmoe-tiny" in table


def test_the_notebook_runner_executes_and_saves_outputs(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import rsretrieve\nprint(rsretrieve.__version__)")])
    source = tmp_path / "nb.ipynb"
    nbformat.write(notebook, source)
    tool = Path(__file__).resolve().parents[1] / "tools" / "run_notebook.py"
    subprocess.run([sys.executable, str(tool), str(source)], check=True, capture_output=True, timeout=300)
    executed = nbformat.read(tmp_path / "nb.executed.ipynb", as_version=4)
    assert executed.cells[0].outputs and executed.cells[0].outputs[0]["text"].strip()


# -- 7. no silent waits --------------------------------------------------------------------------------
def test_an_unreachable_scheduler_is_announced_and_named(tmp_path):
    proc = run(["encode", "--modality", "s1", "--model", MODEL, "--scheduler", "tcp://127.0.0.1:1"], tmp_path, check=False)
    assert "connecting to the Dask scheduler at tcp://127.0.0.1:1" in proc.stderr  # said before the wait
    assert_clean_error(proc, "tcp://127.0.0.1:1", "no scheduler answered within 20 s")
