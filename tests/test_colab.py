"""The notebooks' first cell (BOOTSTRAP in .dev/notebooks.py) as Colab runs it, offline.

Colab is simulated: `google.colab` is imported at kernel start (a sitecustomize.py on the kernel's PYTHONPATH, as
Colab's kernel has it loaded), and the stub `drive.mount` links `<mount>/MyDrive` to a temporary "Drive" folder
(or fails, as when the user declines). The clone source is a git repository made from this working tree, with
the notebooks generated from .dev/notebooks.py, so the cell under test is the one being edited. Each notebook
runs in a new kernel from a folder holding only that notebook, as when it is opened from GitHub.
RLHF_COLAB_NO_INSTALL=1 keeps runtime.colab_setup from calling pip; every run asserts that the cell
found nothing to install (in .venv-colab, `make test-colab`, that is Colab's published package set)."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("rlhf_notebooks", ROOT / ".dev" / "notebooks.py")
NB = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(NB)

STUB = {
    # pkgutil-style, so that other `google.*` packages (protobuf, ...) still import
    "google/__init__.py": "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n",
    "google/colab/__init__.py": "",
    "google/colab/drive.py": '''import os


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    """Like Colab's: the user's Drive appears as <mountpoint>/MyDrive; here STUB_DRIVE, a folder."""
    drive = os.environ.get("STUB_DRIVE")
    if not drive:
        raise ValueError("Error: credential propagation was unsuccessful")    # what a declined mount says
    os.makedirs(mountpoint, exist_ok=True)
    if not os.path.exists(os.path.join(mountpoint, "MyDrive")):
        os.symlink(drive, os.path.join(mountpoint, "MyDrive"))
    print("Mounted at", mountpoint)
''',
    "sitecustomize.py": "import google.colab  # loaded at start, as in Colab's kernel\n",
}
PERSIST = "outputs (model/) persist on Google Drive"
# what the first cell prints last in a runtime that has every package we need (Colab's today, and this)
NOTHING = re.compile(r"Colab set-up: nothing to install, Colab has every package at a supported "
                     r"version \(\d+\.\d s\)\n$")
LOST = "not on Google Drive: the next notebook will NOT see model/ (lost when the runtime ends)"


def notebook(name):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.from_dict(json.loads(json.dumps(c))) for c in NB.NOTEBOOKS[name]]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture(scope="session")
def stub(tmp_path_factory):
    d = tmp_path_factory.mktemp("colab-stub")
    for rel, text in STUB.items():
        Path(d, rel).parent.mkdir(parents=True, exist_ok=True)
        Path(d, rel).write_text(text)
    return d


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """A git repository holding this working tree (tracked and new files) with freshly generated notebooks."""
    if not shutil.which("git"):
        pytest.skip("git is needed (the Colab cell clones with it)")
    src = tmp_path_factory.mktemp("github") / "tiny-rlhf"
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    for name in NB.NOTEBOOKS:
        nbformat.write(notebook(name), src / f"{name}.ipynb")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
        subprocess.run(git + cmd, cwd=src, check=True, capture_output=True)
    return src


def kernel_env(stub, tmp, repo, drive=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "STUB_"))}
    env.update(PYTHONPATH=str(stub), RLHF_PRESET="smoke", TQDM_DISABLE="1", RLHF_COLAB_NO_INSTALL="1",
               RLHF_REPO=str(repo), RLHF_COLAB_CONTENT=str(tmp / "content"),
               RLHF_DRIVE_MOUNT=str(tmp / "content" / "drive"), IPYTHONDIR=str(tmp / "ipython"))
    if drive:
        env["STUB_DRIVE"] = str(drive)
    (tmp / "content").mkdir(exist_ok=True)
    return env                                          # RLHF_OUT unset: outputs go to the project's model/


def run_in_colab(name, folder, env, cells=None):
    """Executes notebook `name` (or these `cells` under its name) in a new kernel, cwd = `folder` holding only
    it. Returns the text each cell printed, or raises CellExecutionError."""
    folder.mkdir(parents=True)
    nb = notebook(name)
    if cells is not None:
        nb.cells = [nbformat.from_dict(json.loads(json.dumps(c))) for c in cells]
    nbformat.write(nb, folder / f"{name}.ipynb")
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(folder)}})
    client.execute(env=env)
    assert sorted(os.listdir(folder)) == [f"{name}.ipynb"]
    return ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells]


def first_cell(text):
    """The first cell's output less its last line, which must say that it installed nothing."""
    assert NOTHING.search(text), text
    return NOTHING.sub("", text)


def code_cells(name):
    return [c for c in NB.NOTEBOOKS[name] if c.cell_type == "code"]


def test_every_notebook_starts_with_the_bootstrap_then_the_parameters():
    for name in NB.NOTEBOOKS:
        first, second = code_cells(name)[:2]
        assert first.source == NB.BOOTSTRAP and "tags" not in first.metadata
        assert second.metadata["tags"] == ["parameters"] and second.source == NB.PARAMS.strip()
    lines = NB.BOOTSTRAP.splitlines()
    assert len(lines) <= 32 and max(map(len, lines)) <= 100
    assert NB.BOOTSTRAP.count("https://github.com/") == 1


def test_outside_colab_the_cell_does_nothing():
    script = ("import os, sys\n"
              "cwd, path, mods = os.getcwd(), list(sys.path), set(sys.modules)\n"
              f"exec({NB.BOOTSTRAP!r})\n"
              "assert 'google.colab' not in sys.modules and 'util' not in sys.modules\n"
              "assert os.getcwd() == cwd and sys.path == path, 'cwd or sys.path changed'\n"
              "assert set(sys.modules) - mods <= {'os', 'sys'}, set(sys.modules) - mods\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_a_from_github_without_drive_clones_into_content_and_warns(stub, source, tmp_path):
    env = kernel_env(stub, tmp_path, f"file://{source}")
    out = run_in_colab("0_download", tmp_path / "opened", env)
    project = tmp_path / "content" / "tiny-rlhf"
    assert first_cell(out[1]) == f"Google Drive not mounted: Error: credential propagation was unsuccessful\n" \
                     f"tiny-rlhf: {project}; {LOST}\n"
    assert f"preset: smoke   precision: fp32   outputs: {project}/model" in out[3]
    assert (project / "model" / "base_actor").is_dir() and not (tmp_path / "content" / "drive").exists()
    cloned = json.loads((project / "0_download.ipynb").read_text())["cells"]
    assert "".join(next(c for c in cloned if c["cell_type"] == "code")["source"]) == NB.BOOTSTRAP
    # the warning is true: the next notebook, in a new runtime (a fresh /content), clones again and lacks model/
    fresh = tmp_path / "runtime2"
    fresh.mkdir()
    with pytest.raises(CellExecutionError, match="run 0_download.ipynb first"):
        run_in_colab("1_actor", fresh / "opened", kernel_env(stub, fresh, f"file://{source}"))


def test_c_with_drive_the_clone_goes_to_drive_and_the_next_notebook_finds_model(stub, source, tmp_path):
    drive = tmp_path / "gdrive"
    drive.mkdir()
    project = tmp_path / "content" / "drive" / "MyDrive" / "tiny-rlhf"
    out = run_in_colab("0_download", tmp_path / "nb0", kernel_env(stub, tmp_path, f"file://{source}", drive))
    assert first_cell(out[1]) == f"Mounted at {tmp_path}/content/drive\ntiny-rlhf: {project}; {PERSIST}\n"
    assert (drive / "tiny-rlhf" / "util.py").is_file() and (drive / "tiny-rlhf" / "model" / "base_actor").is_dir()
    assert not (tmp_path / "content" / "tiny-rlhf").exists()
    # 1_actor: a new kernel (runtime) with a fresh /content; Drive still holds the project: found, not cloned
    fresh = tmp_path / "runtime2"
    fresh.mkdir()
    out = run_in_colab("1_actor", fresh / "nb1", kernel_env(stub, fresh, fresh / "no-such-repo", drive))
    project = fresh / "content" / "drive" / "MyDrive" / "tiny-rlhf"
    assert first_cell(out[1]) == f"Mounted at {fresh}/content/drive\ntiny-rlhf: {project}; {PERSIST}\n"
    assert (drive / "tiny-rlhf" / "model" / "actor" / "metrics.json").is_file()


def copy_project(source, dest):
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".git"))


def test_b_a_copy_uploaded_to_drive_is_found_without_cloning(stub, source, tmp_path):
    drive = tmp_path / "gdrive"
    (drive / "notes").mkdir(parents=True)
    (drive / "notes" / "util.py").write_text("raise SystemExit('not the project')\n")   # no notebooks: skipped
    copy_project(source, drive / "Colab Notebooks" / "tiny-rlhf")
    cells = NB.NOTEBOOKS["0_download"]
    cells = [*cells[:2], NB.code(NB.BOOTSTRAP), *cells[2:]]      # the cell run twice: the second finds the cwd
    env = kernel_env(stub, tmp_path, tmp_path / "no-such-repo", drive)
    out = run_in_colab("0_download", tmp_path / "opened", env, cells)
    project = f"{tmp_path}/content/drive/MyDrive/Colab Notebooks/tiny-rlhf"
    assert first_cell(out[1]) == f"Mounted at {tmp_path}/content/drive\ntiny-rlhf: {project}; {PERSIST}\n"
    assert first_cell(out[2]) == f"tiny-rlhf: {drive}/Colab Notebooks/tiny-rlhf; {PERSIST}\n"        # cwd, no mount again
    assert (drive / "Colab Notebooks" / "tiny-rlhf" / "model" / "base_actor").is_dir()
    assert sorted(os.listdir(drive)) == ["Colab Notebooks", "notes"]                   # nothing cloned


@pytest.mark.parametrize("where", ["tiny-rlhf", "tiny-rlhf-main", "Colab Notebooks/tiny-rlhf-main"])
def test_b_where_on_drive_a_copy_is_found(stub, source, tmp_path, where):
    """The search alone, in a plain Python process that has google.colab loaded (no kernel)."""
    drive = tmp_path / "gdrive"
    drive.mkdir()
    copy_project(source, drive / where)
    env = kernel_env(stub, tmp_path, tmp_path / "no-such-repo", drive)
    script = f"exec({NB.BOOTSTRAP!r})\nprint('CWD', os.getcwd(), runtime.ROOT)\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "content", env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"tiny-rlhf: {tmp_path}/content/drive/MyDrive/{where}; {PERSIST}" in proc.stdout
    assert proc.stdout.strip().endswith(f"CWD {drive / where} {drive / where}")
