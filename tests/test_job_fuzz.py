"""Property-based fuzzing of the job parser (hypothesis, fixed examples, derandomized: the same cases on
every run). Any JSON value for any key, sent to POST /jobs as a JSON body or as the multipart 'job'
field, or given to job_from_dict as a prompts-file line is, gives either a 4xx naming the field or a
job whose settings are all of their type, finite and in range, and that the journal and the ranks'
broadcast can carry; never an exception, never a 5xx."""
import json
import math
import warnings

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stepvideo_ms.diffusion.settings import PER_VIDEO_SETTINGS, SETTING_RANGES, check_setting
from stepvideo_ms.generation.jobs import JOB_KEYS, job_from_dict
from stepvideo_ms.generation.service.app import API_KEYS, ServiceState, create_app
from stepvideo_ms.generation.service.board import JobBoard
from stepvideo_ms.generation.service.journal import Journal
from stepvideo_ms.serving.limits import Limits

EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# every character, lone surrogates included (Python's json reads "\ud800" into a str that UTF-8 cannot encode)
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=6)
# values near every edge of every range, so that accepted jobs are common too
EDGES = st.one_of(*[st.sampled_from([low, high, low - 1, high + 1, (low + high) / 2, float(high) + 1e-9, -0.0, 2 ** 63])
                    for low, high in SETTING_RANGES.values()])
KEYS = st.sampled_from(list(JOB_KEYS) + ["first_image", "steps", "", "Seed"]) | TEXT
VALUES = JSON | EDGES


def near_range(name):
    """Mostly in range, sometimes just outside it, sometimes any JSON value."""
    kind = PER_VIDEO_SETTINGS[name]
    if kind is str:
        return TEXT | JSON
    low, high = SETTING_RANGES[name]
    inside = (st.integers(int(low) - 2, int(high) + 2) if kind is int else
              st.floats(low - 1, high + 1) | st.integers(int(low) - 1, int(high) + 1))
    return inside | inside | EDGES | JSON


PLAUSIBLE = st.fixed_dictionaries(
    {"prompt": st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20) | TEXT},
    optional={name: near_range(name) for name in PER_VIDEO_SETTINGS if name != "motion_score"})
JOBS = st.one_of(
    JSON,  # anything at all, mostly not an object
    st.dictionaries(KEYS, VALUES, max_size=5),
    PLAUSIBLE, PLAUSIBLE,
    st.builds(lambda extra, prompt: dict(extra, prompt=prompt),
              st.dictionaries(st.sampled_from(list(PER_VIDEO_SETTINGS)), VALUES, max_size=4), TEXT | JSON))


def has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    return False


def assert_sound(job):
    """Every setting of an accepted job: its type (an int is not a bool), finite, in range, and the job
    travels (JSON without NaN, UTF-8) as the journal and broadcast_json carry it."""
    s = job.settings
    for name, kind in PER_VIDEO_SETTINGS.items():
        value = getattr(s, name)
        if value is None and name == "motion_score" and s.task == "t2v":
            continue
        assert type(value) is kind, (name, value)
        assert check_setting(name, value) == value, (name, value)
    assert s.num_frames % 17 == 0 and s.height % 16 == 0 and s.width % 16 == 0
    json.dumps(job.to_dict(), allow_nan=False, ensure_ascii=False).encode("utf-8")


def app_client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    board = JobBoard(10 ** 9, keep_finished=10, journal=Journal(str(folder / "videos")))
    board.restore("t2v")
    state = ServiceState(board, "t2v", Limits(max_body_bytes=1 << 20), None, str(folder / "uploads"), {},
                         {"num_frames": 17, "height": 48, "width": 80})
    return create_app(state).test_client(), board


def check_response(r, data, board, form: bool):
    assert r.status_code < 500, r.get_data(as_text=True)
    body = r.get_json()
    if has_non_finite(data):  # NaN / Infinity literals are not JSON
        assert r.status_code == 400 and body["field"] == ("job" if form else "body"), body
        return "not JSON"
    if r.status_code == 201:
        assert_sound(board.record(body["id"]).job)
        return "accepted"
    assert 400 <= r.status_code < 500 and isinstance(body["field"], str), body  # the key may be ""
    if isinstance(data, dict) and r.status_code == 422:
        assert body["field"] in data or body["field"] in ("prompt", "first_image"), body
        if body["field"] in API_KEYS:
            assert body["field"] in body["error"], body
    return f"{r.status_code} {body['field'] if body['field'] in API_KEYS else '(other key)'}"


def test_fuzz_http_json_body(tmp_path_factory):
    c, board = app_client(tmp_path_factory)
    seen = {}

    @FUZZ
    @given(JOBS)
    @example({"prompt": "a", "cfg_scale": float("nan")})  # both sides are reached whatever the draw
    @example({"prompt": "a cat", "seed": 7})
    def case(data):
        text = json.dumps(data, allow_nan=True)
        r = c.post("/jobs", data=text.encode("utf-8"), headers={"Content-Type": "application/json"})
        outcome = check_response(r, data, board, form=False)
        seen[outcome] = seen.get(outcome, 0) + 1

    case()
    print("POST /jobs JSON outcomes:", dict(sorted(seen.items())))
    assert seen.get("accepted") and seen.get("not JSON") and sum(seen.values()) >= EXAMPLES  # both sides reached


def test_fuzz_http_form_field(tmp_path_factory):
    c, board = app_client(tmp_path_factory)
    seen = {}

    @settings(FUZZ, max_examples=EXAMPLES // 3)
    @given(JOBS)
    def case(data):
        r = c.post("/jobs", data={"job": json.dumps(data, allow_nan=True)}, content_type="multipart/form-data")
        outcome = check_response(r, data, board, form=True)
        seen[outcome] = seen.get(outcome, 0) + 1

    case()
    print("POST /jobs form outcomes:", dict(sorted(seen.items())))
    assert seen.get("accepted")


@FUZZ
@given(JOBS)
def test_fuzz_prompts_file_line(data):
    """What a prompts-file line parses to (first_image_path and output_file_name are allowed there)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rounding notes
            job = job_from_dict(data, "t2v", {"num_frames": 17})
    except ValueError as exc:
        assert isinstance(getattr(exc, "field", None), str), repr(exc)
        return
    assert_sound(job)
