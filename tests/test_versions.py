"""The MindSpore versions we support (2.7.0 to 2.10.0) and what each can do, asked in one place.

- versions.py: the range, parsing, the CANN pairing; scripts/setup.sh refuses a version outside the range
  before it creates or downloads anything;
- capabilities: what the installed MindSpore has (probed, not read off the version number), the fallbacks
  computing what the fast paths compute (the sized split by slices), the simulation adding no API the
  version lacks (Tensor.pin_memory on 2.7.0);
- `python -m stepvideo_ms doctor` on CPU and under ascend-sim, its exit code, the CANN and driver files.
This suite runs on the default MindSpore and, in CI, again on the oldest supported one.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, mint

from conftest import REPO
from stepvideo_ms import capabilities, ops, versions
from stepvideo_ms.tools import doctor


def test_the_supported_range_and_its_parsing():
    assert versions.supported("2.7.0") and versions.supported("2.7.1.post1") and versions.supported("2.10.0")
    assert not versions.supported("2.6.0") and not versions.supported("2.11.0") and not versions.supported("3.0")
    assert versions.parse("2.8.0rc1") == (2, 8, 0) and versions.parse("2.10") == (2, 10, 0)
    with pytest.raises(ValueError, match="not a MindSpore version"):
        versions.parse("latest")
    assert versions.cann_for("2.7.1.post1") == "8.3.RC1" and versions.cann_for("2.9.0") is None
    assert versions.OLDEST in versions.TESTED and versions.NEWEST in versions.TESTED
    with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as fh:
        pinned = [line.split("==")[1].strip() for line in fh if line.startswith("mindspore==")]
    assert pinned == [versions.NEWEST]  # the default install is the newest supported
    assert versions.supported(ms.__version__), f"the suite runs on MindSpore {ms.__version__}, outside the range"


@pytest.mark.parametrize("asked,says", [("2.6.0", "is not supported: stepvideo_ms supports MindSpore 2.7.0 to 2.10.0"),
                                        ("banana", "'banana' is not a MindSpore version")])
def test_setup_refuses_a_version_outside_the_range_before_creating_anything(tmp_path, asked, says):
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup.sh")], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=60, env={**os.environ, "STEPVIDEO_MINDSPORE": asked,
                                                      "STEPVIDEO_VENV": str(venv)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "STEPVIDEO_MINDSPORE" in done.stderr, done.stderr
    assert not venv.exists()


def test_an_environment_keeps_the_mindspore_it_was_made_with(tmp_path):
    """Unset STEPVIDEO_MINDSPORE (test.sh's call) means the environment's own choice, never the pin over it;
    a remembered choice is checked like an asked one (here one outside the range: refused, nothing installed)."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".stepvideo_mindspore").write_text("2.6.0\n")
    env = {k: v for k, v in os.environ.items() if k != "STEPVIDEO_MINDSPORE"}
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup.sh")], capture_output=True, text=True,
                          timeout=60, env={**env, "STEPVIDEO_VENV": str(venv)})
    assert "MindSpore: 2.6.0, the one venv was made with (STEPVIDEO_MINDSPORE=pinned" in done.stdout, done.stdout
    assert done.returncode == 2 and "is not supported" in done.stderr, done.stderr
    assert not (venv / "bin").exists()


def test_setup_system_needs_an_interpreter_with_mindspore(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "STEPVIDEO_MINDSPORE": "system", "PYTHON": str(bare / "bin" / "python"),
                               "STEPVIDEO_VENV": str(tmp_path / "venv")})
    assert done.returncode == 2 and "cannot import mindspore" in done.stderr, done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_setup_system_uses_the_installed_mindspore_and_never_replaces_it(tmp_path):
    """This suite's interpreter stands for a machine's system Python with MindSpore installed for its CANN."""
    venv = tmp_path / "venv"
    env = {**os.environ, "STEPVIDEO_MINDSPORE": "system", "PYTHON": sys.executable, "STEPVIDEO_VENV": str(venv)}
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup.sh")], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    site = os.path.dirname(os.path.dirname(ms.__file__))
    assert f"beside the system's MindSpore {ms.__version__} ({site})" in done.stdout
    assert f"ready: mindspore {ms.__version__}" in done.stdout
    probe = subprocess.run([str(venv / "bin" / "python"), "-P", "-c", "import mindspore, stepvideo_ms; print(mindspore.__file__)"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "GLOG_v": "3"})
    assert probe.stdout.strip() == ms.__file__, probe.stdout + probe.stderr
    assert not list((venv / "lib").glob("python*/site-packages/mindspore"))  # nothing installed over it
    unset = {k: v for k, v in env.items() if k != "STEPVIDEO_MINDSPORE"}  # as test.sh runs it later
    again = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup.sh")], capture_output=True, text=True,
                           timeout=300, env=unset)
    assert again.returncode == 0 and "installing" not in again.stdout, again.stdout  # the second run only checks
    assert "MindSpore: system, the one venv was made with" in again.stdout


def test_capabilities_are_read_from_the_installed_mindspore():
    caps = capabilities.capabilities()
    assert caps.mindspore == ms.__version__ and caps.supported
    assert caps.pinned_host_memory == hasattr(Tensor, "pin_memory")
    assert caps.streams and caps.int8_matmul and caps.fused_attention and caps.device_properties  # every version has them
    record = capabilities.in_use("CPU")
    assert record["offload_copies"].startswith("synchronous (CPU backend")
    assert record["sized_split"] == ("mint.split" if capabilities.cpu_sized_split() else
                                     "slices (no sized-split kernel on this backend)")
    assert capabilities.in_use("Ascend")["sized_split"] == "mint.split"  # the NPU has the kernel on every version


def test_the_sized_split_fallback_gives_the_kernel_s_parts(monkeypatch):
    x = Tensor(np.arange(2 * 3 * 10, dtype=np.float32).reshape(2, 3, 10))
    want = np.split(x.asnumpy(), [4, 7], axis=-1)
    got = [p.asnumpy() for p in ops.split(x, [4, 3, 3], dim=-1)]
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    monkeypatch.setattr(capabilities, "cpu_sized_split", lambda: False)  # the 2.7.0 path, on any version
    sliced = ops.split(x, [1, 2], dim=1)
    assert [tuple(p.shape) for p in sliced] == [(2, 1, 10), (2, 2, 10)]
    assert np.array_equal(sliced[1].asnumpy(), x.asnumpy()[:, 1:])
    assert all(np.array_equal(a.asnumpy(), b) for a, b in zip(ops.split(x, [4, 3, 3]), want))
    with pytest.raises(ValueError, match=r"add up to 9, the axis -1 has 10"):
        ops.split(x, [4, 5])


def test_the_probe_agrees_with_the_kernel():
    x = Tensor(np.ones((1, 6), np.float32))
    try:
        mint.split(x, [2, 4], dim=-1)[1].asnumpy()
        has_kernel = True
    except RuntimeError:
        has_kernel = False
    assert capabilities.cpu_sized_split() == has_kernel


SIM_SCRIPT = r"""
import json
from mindspore import Tensor
had = hasattr(Tensor, "pin_memory")
from stepvideo_ms import runtime
runtime.init("ascend-sim")
from stepvideo_ms.capabilities import capabilities, cpu_bf16_elementwise, in_use
import numpy as np, mindspore as ms
x = Tensor(np.array([1.5, -2.25, 3.0], np.float32)).astype(ms.bfloat16)
y = (x * x - x / 2 + (-x)).astype(ms.float32).asnumpy().tolist()  # elementwise bf16 on every version
print(json.dumps({"had": had, "has": hasattr(Tensor, "pin_memory"), "caps": capabilities().pinned_host_memory,
                  "bf16_kernels": cpu_bf16_elementwise(), "y": y, "offload": in_use("ascend-sim")["offload_copies"]}))
"""


def test_the_simulation_adds_no_api_the_version_lacks():
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", SIM_SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    import json

    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["has"] == got["had"] == got["caps"], got  # pin_memory emulated only where MindSpore has it
    assert got["offload"].startswith("asynchronous" if got["had"] else "synchronous (MindSpore"), got
    assert got["y"] == [1.5 * 1.5 - 0.75 - 1.5, 2.25 * 2.25 + 1.125 + 2.25, 9.0 - 1.5 - 3.0], got


def test_doctor_on_cpu_reports_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "stepvideo_ms", "doctor", "--device", "CPU"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"ok  MindSpore          {ms.__version__} (supported: 2.7.0 to 2.10.0" in out, out
    assert "ok  device             CPU (compute dtype Float32)" in out and "BAD" not in out
    assert "offload" in out and "sized split" in out and "everything a run needs is there" in out
    assert "[WARNING]" not in done.stdout + done.stderr


def test_doctor_under_the_simulation_reports_the_simulated_card():
    env = {**os.environ, "PYTHONPATH": REPO, "STEPVIDEO_SIM_CARD_GB": "32"}
    done = subprocess.run([sys.executable, "-m", "stepvideo_ms", "doctor", "--device", "ascend-sim"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok  card               device 0: 32 GiB" in done.stdout, done.stdout
    assert "CANN               not read (simulation" in done.stdout


def test_doctor_exits_1_when_something_is_missing(monkeypatch):
    monkeypatch.setattr(versions, "supported", lambda v: False)
    lines, ok = doctor.report("CPU")
    assert not ok and lines[0].startswith("BAD MindSpore") and "NOT supported" in lines[0]


def test_cann_and_driver_versions_are_read_from_the_install_info(tmp_path):
    import platform

    toolkit = tmp_path / "ascend-toolkit" / "latest" / f"{platform.machine()}-linux"
    toolkit.mkdir(parents=True)
    (toolkit / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=8.3.RC1\ninnerversion=V100R001C23\narch=x\n")
    (tmp_path / "driver").mkdir()
    (tmp_path / "driver" / "version.info").write_text("Version=25.2.0\nascendhal_version=7.35.23\n")
    assert doctor.cann_version(env={}, root=str(tmp_path))[0] == "8.3.RC1"
    assert doctor.driver_version(root=str(tmp_path)) == ("25.2.0", str(tmp_path / "driver" / "version.info"))
    home = tmp_path / "cann-8.5.0" / "aarch64-linux"  # a set_env.sh home wins over the default folders
    home.mkdir(parents=True)
    (home / "ascend_toolkit_install.info").write_text("version=8.5.0\n")
    assert doctor.cann_version(env={"ASCEND_HOME_PATH": str(tmp_path / "cann-8.5.0")}, root=str(tmp_path))[0] == "8.5.0"
    assert doctor.cann_version(env={}, root=str(tmp_path / "none")) == (None, "")


def test_an_interrupted_environment_is_made_again(tmp_path):
    """A venv whose creation was killed before pip came (python present, no pip) is made again, not used as it is
    (pip failed on it before); the installation after that is kept offline here, and fails fast."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "STEPVIDEO_MINDSPORE"}
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup.sh")], capture_output=True, text=True,
                          timeout=300, env={**env, "STEPVIDEO_VENV": str(venv), "PIP_INDEX_URL": "http://127.0.0.1:9/",
                                            "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)})
    assert "has no pip (its creation was interrupted): making it again" in done.stdout, done.stdout + done.stderr
    probe = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr  # pip is back
