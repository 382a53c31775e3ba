"""Generation settings (defaults, rounding, validation) and the image/video helpers."""
import numpy as np
import pytest

from stepvideo_ms import video as video_io
from stepvideo_ms.diffusion.settings import TASK_DEFAULTS, GenerationSettings


def test_task_defaults_are_upstream_values():
    t2v = GenerationSettings(prompt="a cat").resolved()
    assert (t2v.num_frames, t2v.height, t2v.width, t2v.infer_steps, t2v.cfg_scale, t2v.time_shift) == \
        (204, 544, 992, 50, 9.0, 13.0)
    assert t2v.pos_magic == TASK_DEFAULTS["t2v"]["pos_magic"] and t2v.neg_magic.startswith("画面暗")


def test_ti2v_defaults_and_requirements(tmp_path):
    img = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (40, 30), (10, 20, 30)).save(img)
    s = GenerationSettings(prompt="x", task="ti2v", first_image_path=str(img)).resolved()
    assert s.motion_score == 5.0 and s.num_frames == 102 and s.pos_magic.startswith("画面中的主体")
    with pytest.raises(ValueError, match="first_image_path"):
        GenerationSettings(prompt="x", task="ti2v").resolved()
    with pytest.raises(ValueError, match="no such file"):
        GenerationSettings(prompt="x", task="ti2v", first_image_path=str(tmp_path / "none.png")).resolved()


def test_sizes_are_rounded_with_a_warning_naming_the_value_used():
    with pytest.warns(UserWarning, match="num_frames=40 .* using num_frames=34"):
        s = GenerationSettings(prompt="x", num_frames=40, height=100, width=70).resolved()
    assert (s.num_frames, s.height, s.width) == (34, 96, 64)
    assert any("height=100" in n for n in s.notes)
    assert s.latent_shape(64) == (1, 6, 64, 6, 4)
    with pytest.warns(UserWarning):
        assert GenerationSettings(prompt="x", num_frames=5, height=8, width=8).resolved().num_frames == 17


@pytest.mark.parametrize("field,value,match", [
    ("num_frames", 0, "num_frames"), ("height", -16, "height"), ("infer_steps", 0, "infer_steps"),
    ("cfg_scale", -1.0, "cfg_scale"), ("time_shift", 0.0, "time_shift"), ("task", "i2v", "task"),
    ("prompt", "  ", "prompt"),
])
def test_bad_values_are_named(field, value, match):
    kwargs = {"prompt": "x", field: value}
    with pytest.raises(ValueError, match=match):
        GenerationSettings(**kwargs).resolved()


def test_cover_crop_box_fills_the_target_and_centres():
    (rh, rw), (top, left) = video_io.cover_crop_box((300, 400), (544, 992))
    assert rw == 992 and rh >= 544 and left == 0 and top == (rh - 544) // 2
    (rh, rw), (top, left) = video_io.cover_crop_box((1000, 200), (64, 64))
    assert rw == 64 and rh == 320 and top == 128


def test_image_to_condition_range_shape_and_colour(tmp_path):
    from PIL import Image
    p = tmp_path / "red.jpg"
    Image.new("RGB", (90, 50), (255, 0, 0)).save(p)
    arr = video_io.image_to_condition(video_io.load_image(str(p)), 32, 48)
    assert arr.shape == (1, 1, 3, 32, 48) and arr.dtype == np.float32
    assert arr.min() >= -1.0 and arr.max() <= 1.0
    assert arr[0, 0, 0].mean() > 0.9 and arr[0, 0, 1].mean() < -0.9


def test_unreadable_image_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not a readable image"):
        video_io.load_image(str(p))


def test_frames_to_uint8_clamps_and_maps():
    frames = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], np.float32).reshape(1, 1, 1, 5).repeat(3, axis=1)
    out = video_io.frames_to_uint8(frames)
    assert out.shape == (1, 1, 5, 3)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 127, 255, 255])


def test_540p_crop_only_when_larger():
    big = np.zeros((2, 544, 992, 3), np.uint8)
    assert video_io.crop_to_540p(big).shape == (2, 540, 960, 3)
    tall = np.zeros((1, 992, 544, 3), np.uint8)
    assert video_io.crop_to_540p(tall).shape == (1, 960, 540, 3)
    small = np.zeros((1, 32, 48, 3), np.uint8)
    assert video_io.crop_to_540p(small).shape == small.shape


def test_write_mp4_is_readable_with_the_right_frames(tmp_path):
    import imageio.v3 as iio
    video = np.random.default_rng(0).integers(0, 255, (17, 32, 48, 3), dtype=np.uint8)
    path = video_io.write_mp4(video, str(tmp_path / "out" / "v.mp4"))
    back = np.stack(list(iio.imiter(path)))
    assert back.shape == (17, 32, 48, 3)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v.mp4"]  # no temporary file left


@pytest.mark.parametrize("field,value,match", [
    ("cfg_scale", float("nan"), "cfg_scale=nan is not a finite number"),
    ("cfg_scale", float("inf"), "cfg_scale=inf is not a finite number"),
    ("time_shift", np.float32("nan"), "time_shift=nan is not a finite number"),
    ("motion_score", -float("inf"), "motion_score=-inf"),
    ("cfg_scale", 10 ** 400, "cfg_scale=an integer of 401 digits is too large"),
    ("seed", -1, "seed=-1 is under the allowed range: give an integer from 0 to 9223372036854775807"),
    ("seed", 2 ** 63, "seed=9223372036854775808 is over the limit"),
    ("seed", 10 ** 40, "seed=an integer of 41 digits"),
    ("seed", True, "seed must be an integer, got True"),
    ("num_frames", True, "num_frames must be an integer"),
    ("infer_steps", 2.0, "infer_steps must be an integer, got 2.0"),
    ("cfg_scale", "9", "cfg_scale must be a number"),
    ("pos_magic", "a\x00b", "pos_magic contains a NUL character"),
    ("prompt", "\ud800", "prompt is not valid Unicode text"),
])
def test_every_number_is_finite_in_range_and_of_its_type(field, value, match):
    """The one check behind the command line, prompts files, the HTTP API and the Python API."""
    from stepvideo_ms.diffusion.settings import SettingError
    kwargs = {"prompt": "x", "task": "ti2v" if field == "motion_score" else "t2v", field: value}
    with pytest.raises(SettingError, match=match) as exc:
        GenerationSettings(**kwargs).resolved()
    assert exc.value.field == field


def test_numpy_numbers_are_taken_as_python_numbers():
    s = GenerationSettings(prompt="x", num_frames=np.int64(17), cfg_scale=np.float32(5.0), seed=np.uint64(2 ** 63 - 1),
                           height=48, width=80).resolved()
    assert (type(s.num_frames), type(s.cfg_scale), type(s.seed)) == (int, float, int) and s.seed == 2 ** 63 - 1


def test_frames_with_nan_are_refused_not_cast_to_garbage():
    frames = np.zeros((1, 3, 4, 4), np.float32)
    frames[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="1 non-finite value"):
        video_io.frames_to_uint8(frames)
