"""The service's web page in headless Chromium (Debian's `chromium`; skipped where absent): the form starts
from the operator's settings (/health's defaults), a preset applies only when picked, a job submitted
through the form runs, its video plays in the page with a download link and its time, and a screenshot
is saved."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cdp import Browser, find_chromium
from conftest import REPO

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


# what the operator chose on the command line: the page must start from it, not from a preset
OPERATOR = ["--infer_steps", "3", "--cfg_scale", "7.5", "--num_frames", "17", "--height", "96", "--width", "160",
            "--seed", "9"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    model = root / "model"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(model), "--task", "t2v"], check=True, cwd=REPO,
                   capture_output=True, env={**os.environ, "GLOG_v": "3"})
    out, err = open(root / "service.out", "w"), open(root / "service.err", "w")
    proc = subprocess.Popen([sys.executable, "run_parallel.py", "--serve", "--port", "0", "--model_dir", str(model),
                             "--caption_url", "local", "--vae_url", "local", "--save_path", str(root / "videos"),
                             "--no_progress", *OPERATOR], cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                            env={**os.environ, "GLOG_v": "3"})
    url = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and url is None:
        match = re.search(r"service ready: (http://\S+/)", (root / "service.out").read_text())
        url = match.group(1) if match else None
        time.sleep(0.3)
    if url is None:
        proc.kill()
        pytest.fail("service did not start:\n" + (root / "service.err").read_text()[-3000:])
    yield url, root
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    out.close()
    err.close()


@pytest.mark.timeout(300)
def test_form_submits_a_job_and_its_video_plays(service, tmp_path):
    url, _ = service
    browser = Browser(CHROMIUM, str(tmp_path / "chromium.log"))
    try:
        browser.open_page()
        browser.navigate(url)
        presets = browser.wait_for("Array.from(document.querySelectorAll('#preset option')).map(o => o.value)",
                                   60, "the presets")
        # a T2V model: the TI2V preset and image field are hidden; the form starts from the server's defaults
        assert presets == ["server defaults", "T2V", "T2V-Turbo"]
        form = "Object.fromEntries(%s.map(id => [id, document.getElementById(id).value]))" % (
            ["preset", "infer_steps", "cfg_scale", "time_shift", "num_frames", "height", "width", "seed"],)
        assert browser.js(form) == {"preset": "server defaults", "infer_steps": "3", "cfg_scale": "7.5",
                                    "time_shift": "13", "num_frames": "17", "height": "96", "width": "160",
                                    "seed": "9"}
        pick = "document.getElementById('preset').value = '%s'; " \
               "document.getElementById('preset').dispatchEvent(new Event('change')); 1"
        browser.js(pick % "T2V-Turbo")  # a preset sets what it names, the rest stays
        assert browser.js(form) == {"preset": "T2V-Turbo", "infer_steps": "15", "cfg_scale": "5", "time_shift": "17",
                                    "num_frames": "17", "height": "96", "width": "160", "seed": "9"}
        browser.js(pick % "server defaults")
        assert browser.js("document.getElementById('infer_steps').value") == "3"
        browser.js("""(() => {
            document.getElementById('prompt').value = 'a lighthouse at dusk';
            document.getElementById('submit').click(); return 1; })()""")
        browser.wait_for("document.getElementById('message').textContent.startsWith('queued as')", 30,
                         "the job to be queued")
        playing = browser.wait_for("""(() => { const v = document.querySelector('video');
            return v && !v.paused && v.currentTime > 0 && !v.error ?
                {t: v.currentTime, w: v.videoWidth, h: v.videoHeight} : null; })()""", 180, "the video to play")
        assert (playing["w"], playing["h"]) == (160, 96)
        assert "done" in browser.js("document.querySelector('#jobs tr td:nth-child(3)').textContent")
        assert browser.js("document.querySelector('#jobs tr td:nth-child(4)').textContent").strip().endswith("3/3")
        assert re.fullmatch(r"\d+ s", browser.js("document.querySelector('#jobs tr td:nth-child(5)').textContent"))
        link = browser.js("(() => { const a = document.querySelector('#jobs a[download]');"
                          " return a && {name: a.download, blob: a.href.startsWith('blob:')}; })()")
        assert link == {"name": "job00001.mp4", "blob": True}
        shot = tmp_path / "page.png"
        browser.screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("STEPVIDEO_PAGE_SCREENSHOT"):  # keep a copy for a person to look at
            import shutil
            shutil.copy(shot, os.environ["STEPVIDEO_PAGE_SCREENSHOT"])
    finally:
        browser.close()
