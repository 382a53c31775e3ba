"""The step cache in one process (diffusion/step_cache.py, parallel/step_plan.py) on the tiny DiT.

- threshold 0 gives today's latents exactly (T2V and TI2V), and the record counts every block run;
- the decision rule: warmup, threshold, at most max_skip cached steps in a row, the reference probe
  kept from the last computed step;
- a cached run skips the middle blocks of its cached steps: with --offload only the blocks that run are
  copied in (counted; the gathers of --shard_weights are counted under msrun), with the cached
  latents of the plain one-rank run;
- a cached step adds the middle span's residual of the last computed step (checked against the blocks
  run by hand);
- the settings' checks name the flag (values, and against the model's blocks and stages).
"""
import os

import numpy as np
import pytest
from mindspore import Tensor

from parallel_cases import GUIDANCE, TIME_SHIFT, Case, case_inputs, conditioning, write_model
from stepvideo_ms.diffusion.sampling import denoise
from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
from stepvideo_ms.diffusion.settings import GenerationSettings, SettingError
from stepvideo_ms.diffusion.step_cache import CACHE_DEFAULTS, CacheSettings, StepCache
from stepvideo_ms.parallel import Mesh, ParallelDiT, load_stage, make_communicator, parallel_denoise

STEPS = 6
GRID = (3, 3, 3)
# probe = block 0, last = block 3, middle = blocks 1-2 of the tiny model's 4; one step of warmup
CACHED = dict(warmup=1, first=1, last=1, max_skip=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_models")
    return {kind: write_model(str(root / kind), kind, seed=3) for kind in ("t2v", "ti2v")}


def run(model_dir, kind, cache=None, steps=STEPS, **layout):
    """(latents, the ParallelDiT's block source) of a one-rank loop."""
    mesh = Mesh.create(1, 0, **layout)
    model, shards = load_stage(model_dir, mesh, progress=False)
    inputs = case_inputs(Case(kind, GRID, 1, 1))
    dit = ParallelDiT(mesh, make_communicator(mesh), model, shards)
    if cache is not None:
        cache.settings.check_model(model.num_layers, dit.partition)
        cache.num_layers = model.num_layers
    out = denoise(dit.predictor(conditioning(inputs, kind), cache), Tensor(inputs["latents"]), FlowMatchScheduler(),
                  steps, TIME_SHIFT, GUIDANCE, progress=False)
    return out.asnumpy(), dit.blocks


@pytest.mark.parametrize("kind", ["t2v", "ti2v"])
def test_threshold_zero_is_the_uncached_run_exactly(models, kind):
    plain, _ = run(models[kind], kind)
    cache = StepCache(CacheSettings(threshold=0.0, **CACHED))
    got, _ = run(models[kind], kind, cache)
    assert np.array_equal(got, plain)
    record = cache.record()
    assert record["cached_steps"] == [] and record["blocks_skipped"] == 0
    assert record["steps"] == STEPS and record["blocks_run"] == STEPS * 4


def test_decision_rule_warmup_threshold_max_skip():
    cache = StepCache(CacheSettings(threshold=0.5, warmup=2, first=1, last=0, max_skip=2), num_layers=4)
    # step 0 has no reference; step 1 is warmup; 2, 3 cached; 4 forced (max_skip); 5 cached; 6 over threshold
    verdicts = [cache.decide(d, 10.0) for d in (0.0, 1.0, 1.0, 2.0, 1.0, 4.0, 6.0)]
    assert verdicts == [False, False, True, True, False, True, False]
    record = cache.record()
    assert record["cached_steps"] == [2, 3, 5]
    assert record["blocks_skipped"] == 3 * 3 and record["blocks_run"] == 7 * 4 - 9
    assert record["relative_l1"][0] is None and record["relative_l1"][6] == 0.6


def test_cached_run_records_its_steps_and_differs_only_where_cached(models):
    plain, _ = run(models["t2v"], "t2v")
    cache = StepCache(CacheSettings(threshold=0.3, **CACHED))
    got, _ = run(models["t2v"], "t2v", cache)
    record = cache.record()
    assert record["cached_steps"], f"nothing cached at 0.3: {record['relative_l1']}"
    assert 0 not in record["cached_steps"]
    assert record["blocks_skipped"] == 2 * len(record["cached_steps"])
    assert np.isfinite(got).all() and not np.array_equal(got, plain)
    # the same loop stopped before the first cached step equals the uncached loop's first steps
    first = record["cached_steps"][0]
    short, _ = run(models["t2v"], "t2v", StepCache(CacheSettings(threshold=0.3, **CACHED)), steps=first)
    assert np.array_equal(short, run(models["t2v"], "t2v", steps=first)[0])


def test_a_cached_step_adds_the_residual_of_the_last_computed_step(models):
    """By hand on the plain model: step 0 computed (keeps blocks 1-2's residual), step 1 cached."""
    import mindspore as ms
    from stepvideo_ms.models.dit import StepVideoModel

    model = StepVideoModel.from_pretrained(models["t2v"], dtype=ms.float32, progress=False)
    inputs = case_inputs(Case("t2v", GRID, 1, 1))
    c = conditioning(inputs, "t2v")
    text = model.embed_text(c.encoder_hidden_states, c.encoder_attention_mask, c.encoder_hidden_states_2)
    residual = {}

    def predict(latents, timestep):
        x_in = model.embed(latents, timestep, None, None, None, None, None, text=text)
        rope = model.rope_for(x_in.grid)
        x = model.run_blocks(x_in.tokens, x_in, rope, range(0, 1))
        if "r" not in residual:
            y = model.run_blocks(x, x_in, rope, range(1, 3))
            residual["r"] = y - x
        else:
            y = x + residual["r"]
        return model.finish(model.run_blocks(y, x_in, rope, range(3, 4)), x_in)

    want = denoise(predict, Tensor(inputs["latents"]), FlowMatchScheduler(), 2, TIME_SHIFT, GUIDANCE,
                   progress=False).asnumpy()
    cache = StepCache(CacheSettings(threshold=10.0, **CACHED))
    got, _ = run(models["t2v"], "t2v", cache, steps=2)
    assert cache.record()["cached_steps"] == [1]
    assert float(np.abs(got - want).max()) <= 1e-5 * (1 + float(np.abs(want).max()))


def test_offload_copies_only_the_blocks_that_run(models):
    """(Sharded weights need two ranks: their gathers are counted under msrun, test_parallel_msrun.py.)"""
    want, _ = run(models["t2v"], "t2v", StepCache(CacheSettings(threshold=0.3, **CACHED)))
    _, source = run(models["t2v"], "t2v", StepCache(CacheSettings(threshold=0.0, **CACHED)), offload=True)
    assert source.copies == STEPS * 4
    cache = StepCache(CacheSettings(threshold=0.3, **CACHED))
    got, source = run(models["t2v"], "t2v", cache, offload=True)
    record = cache.record()
    assert record["blocks_skipped"] > 0
    assert source.copies == record["blocks_run"] == STEPS * 4 - record["blocks_skipped"]
    assert np.array_equal(got, want)


def test_settings_resolve_to_the_defaults_and_name_the_flag():
    s = GenerationSettings(prompt="a cat").resolved()
    assert {k: getattr(s, k) for k in CACHE_DEFAULTS} == CACHE_DEFAULTS
    assert not CacheSettings.of(s).enabled
    s = GenerationSettings(prompt="a cat", cache_threshold=0.1, cache_first=2).resolved()
    assert CacheSettings.of(s) == CacheSettings(threshold=0.1, warmup=8, first=2, last=0, max_skip=2)
    for name, bad in (("cache_threshold", -0.1), ("cache_first", 0), ("cache_max_skip", 0), ("cache_warmup", 1.5)):
        with pytest.raises(SettingError) as exc:
            GenerationSettings(prompt="a cat", **{name: bad}).resolved()
        assert exc.value.field == name and name in str(exc.value)


def test_settings_against_the_model_and_the_stages():
    with pytest.raises(ValueError, match="--cache_first 3 \\+ --cache_last 1 leave no middle block"):
        CacheSettings(threshold=0.1, first=3, last=1).check_model(4)
    with pytest.raises(ValueError, match="--cache_first 3: the first pipeline stage holds 2 blocks"):
        CacheSettings(threshold=0.1, first=3, last=0).check_model(4, (range(0, 2), range(2, 4)))
    CacheSettings(threshold=0.0, first=8, last=8).check_model(4)  # off: nothing to check
    CacheSettings(threshold=0.1, first=2, last=1).check_model(4, (range(0, 2), range(2, 4)))


def test_parallel_denoise_refuses_a_probe_longer_than_the_first_stage(models):
    mesh = Mesh.create(1, 0)
    model, _ = load_stage(models["t2v"], mesh, progress=False)
    inputs = case_inputs(Case("t2v", GRID, 1, 1))
    with pytest.raises(ValueError, match="--cache_first 4 \\+ --cache_last 0 leave no middle block"):
        parallel_denoise(mesh, make_communicator(mesh), model, Tensor(inputs["latents"]), conditioning(inputs, "t2v"),
                         FlowMatchScheduler(), 2, TIME_SHIFT, GUIDANCE, progress=False,
                         cache=StepCache(CacheSettings(threshold=0.1, first=4, last=0)))
