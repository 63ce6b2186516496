"""The installed distribution: import names, the console script, and the `kernels` name clash."""

import subprocess
import sys
from pathlib import Path

import transformers.utils


def test_transformers_does_not_mistake_our_kernels_package_for_hugging_face_kernels():
    # Our top-level package is named `kernels`, like Hugging Face's hub-kernels package that
    # transformers probes; if the probe said yes, transformers would try to use it.
    assert transformers.utils.is_kernels_available() is False


def test_kernels_resolves_to_obliviate():
    import kernels

    assert hasattr(kernels, "generic_labels")


def test_console_script_is_installed_and_answers_help():
    exe = Path(sys.executable).parent / "obliviate"
    assert exe.is_file(), "no `obliviate` console script beside this Python: install the project (make install)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "run", "reinforce", "labels", "unlearn", "eval", "anchors", "bench-train", "profile-kernel", "plan", "submit", "status", "logs"):
        assert command in out.stdout
