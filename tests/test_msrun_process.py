"""msrun ends with run_t2v.sh / run_ti2v.sh (stepvideo_ms/deploy/msrun_process.py), shown on a stand-in
for msrun that behaves as MindSpore's does where it matters: a start-up phase with the signal
dispositions it inherited, then workers started as session leaders (setsid), then a SIGINT handler that
kills them. The launcher runs in a child process, as a shell's background command would (SIGINT ignored).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO

FAKE_MSRUN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    folder, mode = sys.argv[1], sys.argv[2]
    open(os.path.join(folder, "msrun.pid"), "w").write(str(os.getpid()))
    print("msrun starting", flush=True)
    if mode == "leaves_a_helper":  # msrun's `tail -f` of a worker log: in msrun's group, outliving it
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.path.join(folder, "worker.pid"), "w").write(str(helper.pid))
        sys.exit(0)
    time.sleep(3)  # msrun imports MindSpore: the inherited SIGINT disposition applies
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    if mode == "deaf":  # an msrun that never stops its workers
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        def stop(*_):
            os.killpg(worker.pid, signal.SIGKILL)
            sys.exit(0)
        signal.signal(signal.SIGINT, stop)
    open(os.path.join(folder, "worker.pid"), "w").write(str(worker.pid))
    worker.wait()
""")

LAUNCHER = textwrap.dedent("""
    import os, signal, subprocess, sys
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as bash starts a background command
    from stepvideo_ms.deploy import msrun_process
    folder, mode, fake = sys.argv[1], sys.argv[2], sys.argv[3]
    msrun_process.STOP_WAIT_S = 5.0
    if mode == "signal_while_starting":
        real_popen = subprocess.Popen
        def popen(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives between the fork and the stop path
            return real_popen(*args, **kwargs)
        msrun_process.subprocess.Popen = popen
    with msrun_process.MsrunProcess([sys.executable, fake, folder, mode], dict(os.environ)) as job:
        rc = job.run(lambda data: None)
    print("rc", rc, flush=True)
""")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) or not open(path).read():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return int(open(path).read())


@pytest.fixture(autouse=True)
def no_stray_worker(tmp_path):
    yield
    for name in ("worker.pid", "msrun.pid"):  # a failing test must not leave its stand-ins running
        path = tmp_path / name
        if path.exists() and path.read_text() and pid_alive(int(path.read_text())):
            os.kill(int(path.read_text()), signal.SIGKILL)


def start_launcher(tmp_path, mode):
    fake = tmp_path / "fake_msrun.py"
    fake.write_text(FAKE_MSRUN)
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), mode, str(fake)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(launcher, tmp_path, within_s):
    started = time.monotonic()
    out, _ = launcher.communicate(timeout=60)
    took = time.monotonic() - started
    if (tmp_path / "msrun.pid").exists():
        assert not pid_alive(int((tmp_path / "msrun.pid").read_text())), out
    if (tmp_path / "worker.pid").exists():
        worker = int((tmp_path / "worker.pid").read_text())
        deadline = time.monotonic() + 2
        while pid_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(worker), "a worker outlived the launcher"
    assert took < within_s, f"the stop took {took:.1f} s\n{out}"
    return out


@pytest.mark.timeout(90)
def test_sigterm_during_msrun_start_up_stops_it_although_the_launcher_ignores_sigint(tmp_path):
    launcher = start_launcher(tmp_path, "obedient")
    wait_for(tmp_path / "msrun.pid")  # msrun is in its start-up phase, with the dispositions it inherited
    launcher.send_signal(signal.SIGTERM)
    out = finish(launcher, tmp_path, within_s=2.5)  # not after its 3 s start-up, nor after the 5 s stop wait
    assert "rc 130" in out
    assert not (tmp_path / "worker.pid").exists()  # stopped before it started a worker


@pytest.mark.timeout(90)
def test_an_msrun_that_ignores_the_stop_is_killed_with_its_setsid_workers(tmp_path):
    launcher = start_launcher(tmp_path, "deaf")
    worker = wait_for(tmp_path / "worker.pid")
    assert pid_alive(worker)
    launcher.send_signal(signal.SIGTERM)
    out = finish(launcher, tmp_path, within_s=15)
    assert "rc 130" in out


@pytest.mark.timeout(90)
def test_what_msrun_leaves_in_its_group_ends_with_it(tmp_path):
    launcher = start_launcher(tmp_path, "leaves_a_helper")
    out = finish(launcher, tmp_path, within_s=15)  # finish: the helper (worker.pid) must be gone
    assert "rc 0" in out


@pytest.mark.timeout(90)
def test_a_signal_that_arrives_while_msrun_is_being_started_is_not_lost(tmp_path):
    launcher = start_launcher(tmp_path, "signal_while_starting")
    out = finish(launcher, tmp_path, within_s=15)
    assert "rc 130" in out
    assert not (tmp_path / "worker.pid").exists()


@pytest.mark.timeout(120)
def test_a_real_msrun_job_ended_for_time_leaves_no_worker(tmp_path):
    from service_support import processes_mentioning
    from stepvideo_ms.parallel.msrun import run_msrun

    sleeper = tmp_path / "sleeper.py"  # scheduler and workers alike: hang, as in a stuck collective
    sleeper.write_text("import time\ntime.sleep(600)\n")
    result = run_msrun(str(sleeper), [], workers=2, log_dir=str(tmp_path / "logs"), timeout=8)
    assert result.returncode is None and "[ended after 8 s]" in result.output
    left = processes_mentioning(str(sleeper))
    for pid, _ in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert left == []


FAILING_JOB = textwrap.dedent("""
    import os, sys, time
    from mindspore.communication import get_rank, init
    init()  # the scheduler process serves the cluster here; the workers join it
    if get_rank() == 0:
        sys.exit(1)  # a worker fails: msrun kills the other one, whose node the scheduler then waits for
    time.sleep(600)
""")


@pytest.mark.timeout(180)
def test_a_failed_job_ends_without_waiting_for_the_scheduler_s_timeout(tmp_path):
    from service_support import processes_mentioning
    from stepvideo_ms.deploy import msrun_process
    from stepvideo_ms.parallel.msrun import free_port

    script = tmp_path / "failing_job.py"
    script.write_text(FAILING_JOB)
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
           f"--log_dir={tmp_path / 'logs'}", "--join=True", str(script)]
    env = dict(os.environ, GLOG_v="3", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    started = time.monotonic()
    with msrun_process.MsrunProcess(cmd, env) as job:
        rc = job.run(lambda data: None)
    ended = time.monotonic()
    left = processes_mentioning(str(script))
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert rc == 1 and job.cut_short, b"".join(job.stderr_lines).decode(errors="replace")[-3000:]
    assert left == []
    after_failure = ended - job._failed_at  # msrun's own wait for its scheduler is about 30 s
    assert after_failure < 15, f"{after_failure:.0f} s from the failure to the end (the whole job {ended - started:.0f} s)"
