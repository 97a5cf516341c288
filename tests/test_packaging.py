"""The package is importable only as installed (src/ layout), whatever the working directory."""

import subprocess
import sys


def test_a_clone_named_certnet_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    clone = tmp_path / "certnet"  # e.g. `git clone ... certnet`, then python run beside it
    (clone / "src" / "certnet").mkdir(parents=True)
    (clone / "README.md").write_text("a clone")
    out = subprocess.run([sys.executable, "-c", "from certnet import __version__, load; "
                          "import certnet; print(certnet.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(clone) not in out.stdout
