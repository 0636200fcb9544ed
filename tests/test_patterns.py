"""Pattern configs: validation errors name the field, value and what is allowed; JSON round trips; defaults load."""

from __future__ import annotations

import json

import pytest

from hf_sparsek import PRESETS, BlockLayout, ModelSparsity, SparsePattern, available_model_types, default_sparsity
from hf_sparsek.patterns import as_model_sparsity

BAD_PATTERNS = [
    ({"block_size": 32}, "block_size"),
    ({"block_size": 100}, "block_size"),
    ({"sink_tokens": -1}, "sink_tokens"),
    ({"sink_tokens": 1.5}, "sink_tokens"),
    ({"window": 0}, "window"),
    ({"window": True}, "window"),
    ({"topk_blocks": 0}, "topk_blocks"),
    ({"min_sparse_len": 100}, "min_sparse_len"),
    ({"dense_heads": (1, 1)}, "dense_heads"),
    ({"dense_heads": (-1,)}, "dense_heads"),
    ({"layout": {"kind": "diagonal"}}, "layout.kind"),
    ({"layout": {"kind": "strided", "stride": 0}}, "layout.stride"),
    ({"layout": {"kind": "strided", "stride": 4, "offset": 4}}, "layout.offset"),
    ({"layout": {"kind": "random", "density": 0.0}}, "layout.density"),
    ({"layout": {"kind": "random", "density": 1.5}}, "layout.density"),
    ({"layout": {"kind": "random", "density": 0.1, "stride": 2}}, "layout.stride"),
    ({"layout": {"kind": "strided", "stride": 2, "density": 0.5}}, "layout.density"),
    ({"widow": 128}, "pattern"),
    ({"selector": "mass"}, "selector"),
    ({"topk_blocks": 4, "selector": "quest"}, "selector"),
    ({"topk_blocks": 4, "mass_threshold": 0.0}, "mass_threshold"),
    ({"topk_blocks": 4, "mass_threshold": 1.5}, "mass_threshold"),
    ({"topk_blocks": 4, "mass_threshold": True}, "mass_threshold"),
    ({"mass_threshold": 0.9}, "mass_threshold"),
    ({"topk_blocks": 4, "selector": "meanpool", "mass_threshold": 0.9}, "mass_threshold"),
    ({"topk_blocks": 4, "probe_stride": 8}, "probe_stride"),  # the default selector is not the probe
    ({"topk_blocks": 4, "selector": "mass", "probe_stride": 8}, "probe_stride"),
    ({"topk_blocks": 4, "selector": "probe", "probe_stride": 12}, "probe_stride"),
    ({"topk_blocks": 4, "selector": "probe", "probe_stride": 0}, "probe_stride"),
    ({"block_size": 64, "topk_blocks": 4, "selector": "probe", "probe_stride": 128}, "probe_stride"),
    ({"topk_blocks": 4, "selector": "probe", "probe_stride": True}, "probe_stride"),
]


@pytest.mark.parametrize("fields,name", BAD_PATTERNS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_PATTERNS)])
def test_invalid_pattern_raises_naming_field(fields, name):
    with pytest.raises(ValueError) as err:
        SparsePattern.from_dict(fields)
    message = str(err.value)
    assert repr(name) in message and "invalid sparsity pattern field" in message


@pytest.mark.parametrize(
    "data,name",
    [
        ({"default": {}, "dense_layers": [-2]}, "dense_layers"),
        ({"default": {}, "layer_overrides": {"x": {}}}, "layer_overrides"),
        ({"default": {}, "layer_overrides": {"1": {"window": -5}}}, "window"),
        ({"default": {}, "layer_overrides": {"1": 7}}, "layer_overrides[1]"),
        ({"default": {}, "extra": 1}, "sparsek"),
        ({"default": {"block_size": 7}}, "block_size"),
    ],
)
def test_invalid_model_sparsity_raises(data, name):
    with pytest.raises(ValueError, match="invalid sparsity pattern field") as err:
        ModelSparsity.from_dict(data)
    assert repr(name) in str(err.value)


def test_json_round_trip_and_layer_resolution():
    sparsity = ModelSparsity(
        default=SparsePattern(sink_tokens=64, window=1024, layout=BlockLayout("strided", stride=8)),
        dense_layers=(0, 5),
        layer_overrides={3: {"window": 256, "dense_heads": [1]}},
        source="test",
    )
    again = ModelSparsity.from_json(sparsity.to_json())
    assert again == sparsity
    assert json.loads(again.to_json()) == json.loads(sparsity.to_json())
    assert again.for_layer(0).is_dense and again.for_layer(5).is_dense
    assert again.for_layer(3).window == 256 and again.for_layer(3).dense_heads == (1,)
    assert again.for_layer(3).sink_tokens == 64  # override keeps the other default fields
    assert again.for_layer(2) == sparsity.default


def test_dense_pattern_and_describe():
    assert SparsePattern().is_dense
    assert SparsePattern().describe() == "dense causal"
    text = SparsePattern(sink_tokens=128, window=4096).describe()
    assert "sink 128" in text and "window 4096" in text
    assert not SparsePattern(topk_blocks=4).is_dense


def test_random_layout_density_and_float_block_size():
    """``pattern_density`` of a random layout without dense heads (the ``random10`` preset) is a number in (0, 1),
    not a ZeroDivisionError; a float block size is refused when the pattern is made, naming the field."""
    from hf_sparsek.describe import pattern_density

    density = pattern_density(as_model_sparsity(PRESETS["random10"]).default, 4096)
    assert 0.0 < density < 1.0
    for bad in (64.0, True, "64"):
        with pytest.raises(ValueError, match="block_size"):
            SparsePattern(block_size=bad, window=32)


def test_as_model_sparsity_accepts_forms(tmp_path):
    pattern = SparsePattern(window=512)
    assert as_model_sparsity(pattern).default == pattern
    assert as_model_sparsity(pattern.to_dict()).default == pattern
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ModelSparsity(default=pattern).to_dict()))
    assert as_model_sparsity(str(path)).default == pattern
    with pytest.raises(TypeError):
        as_model_sparsity(3)


def test_default_files_for_required_model_types():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"}
    assert required <= set(available_model_types())
    for model_type in required:
        sparsity = default_sparsity(model_type)
        assert not sparsity.default.is_dense, model_type
    generic = default_sparsity("some_unknown_type")
    assert generic == default_sparsity(None)


def test_checkpoint_shape_picks_its_calibrated_entry():
    """A model type's file may hold per-layer patterns calibrated for one checkpoint shape: a config of that shape
    gets them (at most 25% density at 8K over its layers, dense heads within its KV heads), every other shape the
    type's default."""
    from importlib import resources

    from transformers import LlamaConfig

    from hf_sparsek.describe import pattern_density
    from hf_sparsek.model_defaults import CHECKPOINT_FIELDS, default_key, model_sparsity

    smollm2 = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                          intermediate_size=1536, vocab_size=49152)
    other = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=648,
                        intermediate_size=1536)
    assert default_key(smollm2) == "llama@30-9-3-576" and default_key(other) == "llama@30-9-3-648"
    assert default_key(type("C", (), {"model_type": "llama"})()) == "llama"  # no shape: the type alone
    calibrated, plain = model_sparsity(smollm2), model_sparsity(other)
    assert plain == default_sparsity("llama") and not plain.layer_overrides
    assert calibrated == default_sparsity(default_key(smollm2)) != plain
    assert calibrated.layer_overrides and any(calibrated.for_layer(i).dense_heads for i in range(30))
    assert smollm2.sparsek == calibrated.to_dict()  # written into the config, so save_pretrained keeps it
    for model_type in available_model_types():
        data = json.loads(resources.files("hf_sparsek").joinpath("model_patterns", f"{model_type}.json").read_text())
        for entry in data.get("checkpoints", []):
            match = entry["match"]
            assert sorted(match) == sorted(CHECKPOINT_FIELDS), model_type
            key = f"{model_type}@" + "-".join(str(match[f]) for f in CHECKPOINT_FIELDS)
            sparsity = default_sparsity(key)
            assert sparsity != default_sparsity(model_type) and entry["how_chosen"]
            layers = [sparsity.for_layer(i) for i in range(match["num_hidden_layers"])]
            kv = match["num_key_value_heads"]
            assert all(h < kv for p in layers for h in p.dense_heads)
            density = [1.0 if i in sparsity.dense_layers else pattern_density(p, 8192, kv)
                       for i, p in enumerate(layers)]
            assert sum(density) / len(density) <= 0.25, model_type


def test_presets_are_valid():
    for name, pattern in PRESETS.items():
        assert SparsePattern.from_dict(pattern.to_dict()) == pattern, name


def test_layer_pattern_rule_sliding_chunked_and_refusals():
    """The one per-layer rule (face, describe and eval use it): sliding layers keep exactly the model's window at the
    pattern's block size, chunked layers are dense (their chunks are segments), dense layers and overrides apply to
    plain layers, and a layer we cannot honour raises."""
    from hf_sparsek.model_defaults import resolve_layer_pattern

    sparsity = ModelSparsity(default=SparsePattern(block_size=64, sink_tokens=4, window=256), dense_layers=(1,))
    assert resolve_layer_pattern(sparsity, 0, "sliding_attention", 40) == SparsePattern(block_size=64, window=40)
    assert resolve_layer_pattern(sparsity, 0, None, 40) == SparsePattern(block_size=64, window=40)
    assert resolve_layer_pattern(sparsity, 0, "chunked_attention", None) == SparsePattern(block_size=64)
    assert resolve_layer_pattern(sparsity, 0, "full_attention", None) == sparsity.default
    assert resolve_layer_pattern(sparsity, 1, None, None) == SparsePattern(block_size=64)
    with pytest.raises(ValueError, match="does not support layer type"):
        resolve_layer_pattern(sparsity, 2, "linear_attention", None)
    with pytest.raises(ValueError, match="no sliding_window"):
        resolve_layer_pattern(sparsity, 2, "sliding_attention", None)


SELECTION_PATTERNS = [
    SparsePattern(block_size=64, window=256, topk_blocks=8),
    SparsePattern(block_size=64, window=256, topk_blocks=8, selector="meanpool"),
    SparsePattern(block_size=64, sink_tokens=64, topk_blocks=24, selector="mass", mass_threshold=0.95),
    SparsePattern(block_size=128, topk_blocks=3, selector="learned", mass_threshold=1),
    SparsePattern(block_size=64, sink_tokens=64, window=128, topk_blocks=5, selector="probe", probe_stride=4),
    SparsePattern(block_size=128, topk_blocks=5, selector="probe", probe_stride=128, mass_threshold=0.8),
]


@pytest.mark.parametrize("pattern", SELECTION_PATTERNS, ids=lambda p: p.describe())
def test_selector_fields_round_trip_through_json_and_the_op_text(pattern):
    from hf_sparsek.ops import _pattern_of_text, _pattern_text

    assert SparsePattern.from_dict(json.loads(json.dumps(pattern.to_dict()))) == pattern
    assert _pattern_of_text(_pattern_text(pattern)) == pattern


def test_selector_defaults_and_old_configs():
    """A config written before ``selector`` / ``mass_threshold`` existed loads; top-k alone means the mass selector."""
    old = {"block_size": 64, "sink_tokens": 64, "window": 256, "layout": None, "topk_blocks": 4,
           "dense_heads": [], "min_sparse_len": 0}
    pattern = SparsePattern.from_dict(old)
    assert pattern.selector is None and pattern.mass_threshold is None
    assert pattern.resolved_selector == "mass"
    assert SparsePattern(topk_blocks=4, selector="meanpool").resolved_selector == "meanpool"
    assert SparsePattern(window=64).resolved_selector is None
    assert "top-4 blocks by meanpool" in SparsePattern(topk_blocks=4, selector="meanpool").describe()
    assert "mass 0.9 (at most 4)" in SparsePattern(topk_blocks=4, mass_threshold=0.9).describe()
    # dropping top-k (an override, or the static part of a pattern) drops its selector fields too
    static = SparsePattern(topk_blocks=4, window=128, selector="mass", mass_threshold=0.9).replace(topk_blocks=None)
    assert static == SparsePattern(window=128)
    sparsity = ModelSparsity(default=SparsePattern(topk_blocks=4, window=128, selector="meanpool"),
                             layer_overrides={1: {"topk_blocks": None}})
    assert sparsity.for_layer(1) == SparsePattern(window=128)
    assert sparsity.for_layer(0).resolved_selector == "meanpool"


def test_probe_stride_is_written_only_where_set_and_follows_its_selector():
    probe = SparsePattern(block_size=64, window=128, topk_blocks=4, selector="probe", probe_stride=8)
    assert probe.to_dict()["probe_stride"] == 8 and "one row in 8" in probe.describe()
    assert "probe_stride" not in SparsePattern(topk_blocks=4, selector="probe").to_dict()  # old files unchanged
    assert probe.replace(selector="mass") == SparsePattern(block_size=64, window=128, topk_blocks=4, selector="mass")
    assert probe.replace(topk_blocks=None) == SparsePattern(block_size=64, window=128)
    assert probe.replace(topk_blocks=6).probe_stride == 8
    sparsity = ModelSparsity(default=probe, layer_overrides={2: {"probe_stride": 2}, 3: {"selector": "oracle"}})
    assert sparsity.for_layer(2).probe_stride == 2 and sparsity.for_layer(3).probe_stride is None
    assert ModelSparsity.from_json(sparsity.to_json()) == sparsity


def test_field_types_are_checked_by_name():
    """Wrong container types and layer keys get a ValueError naming the field, never a bare TypeError or a silent
    conversion; a strided layout refuses a seed it would ignore."""
    for bad in (3, None, "0"):
        with pytest.raises(ValueError, match="dense_heads"):
            SparsePattern(window=64, dense_heads=bad)
    with pytest.raises(ValueError, match="dense_layers"):
        ModelSparsity(default=SparsePattern(window=64), dense_layers=5)
    for key in (1.5, True):
        with pytest.raises(ValueError, match="layer_overrides"):
            ModelSparsity(default=SparsePattern(window=64), layer_overrides={key: {"window": 32}})
    assert ModelSparsity(layer_overrides={"2": {"window": 32}}).for_layer(2).window == 32  # JSON keys
    with pytest.raises(ValueError, match="seed"):
        BlockLayout("strided", stride=2, seed=5)


def test_sparse_attention_takes_a_preset_name_or_fields():
    import torch

    import hf_sparsek

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=gen) for _ in range(3))
    want = hf_sparsek.sparse_attention(q, k, v, PRESETS["sink128-window1024"])
    # the same pattern either way (CPU matmuls may round differently per allocation: float32 tolerances)
    torch.testing.assert_close(hf_sparsek.sparse_attention(q, k, v, "sink128-window1024"), want)
    fields = PRESETS["sink128-window1024"].to_dict()
    torch.testing.assert_close(hf_sparsek.sparse_attention(q, k, v, fields), want)
    with pytest.raises(ValueError, match="preset"):
        hf_sparsek.sparse_attention(q, k, v, "no-such-preset")
    with pytest.raises(ValueError, match="pattern must be"):
        hf_sparsek.sparse_attention(q, k, v, 42)


def test_model_sparsity_of_a_model_reads_its_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_sparsek

    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                         vocab_size=64)
    model = LlamaForCausalLM(config)
    model.config.sparsek = {"default": {"window": 96}}
    assert hf_sparsek.model_sparsity(model).default.window == 96
    assert not hasattr(model, "sparsek")


def test_density_counts_the_layers_kv_heads_and_missing_layers_are_named(caplog):
    """A dense head is one of the layer's KV heads: the density is the mean over all of them (not over the heads
    up to the highest dense one); a dense head the layer does not have is refused by name, a layer the model does not
    have is named in a warning (a model type's shipped default names the layers of the model it was tuned on)."""
    from transformers import LlamaConfig

    import hf_sparsek
    from hf_sparsek.describe import pattern_density

    pattern = SparsePattern(block_size=64, window=8, dense_heads=(0,))
    sparse_only = pattern_density(SparsePattern(block_size=64, window=8), 1024)
    assert pattern_density(pattern, 1024, kv_heads=8) == pytest.approx((1.0 + 7 * sparse_only) / 8)
    assert pattern_density(SparsePattern(block_size=64, window=8, dense_heads=(7,)), 1024, kv_heads=8) == \
        pytest.approx(pattern_density(pattern, 1024, kv_heads=8))
    with pytest.raises(ValueError, match="out of range"):
        pattern_density(SparsePattern(block_size=64, window=8, dense_heads=(9,)), 1024, kv_heads=8)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)
    hf_sparsek.set_pattern(config, pattern)
    text = hf_sparsek.describe(config, seq_len=1024)
    assert f"{(1.0 + 7 * sparse_only) / 8:.3f}" in text and "1.000" not in text
    hf_sparsek.set_pattern(config, SparsePattern(block_size=64, window=8, dense_heads=(9,)))
    assert "refused at the first forward: dense_heads [9] out of range" in hf_sparsek.describe(config, seq_len=1024)
    for sparsity, named in ((ModelSparsity(default=SparsePattern(window=64), dense_layers=(1, 5)), "[5]"),
                            (ModelSparsity(default=SparsePattern(window=64), layer_overrides={2: {"window": 32}}),
                             "[2]")):
        with caplog.at_level("WARNING", logger="hf_sparsek.model_defaults"):
            hf_sparsek.set_pattern(config, sparsity)
        assert f"name layers {named}, but the model has 2 layers" in caplog.text
