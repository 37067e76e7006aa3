"""mert.py against transformers' HubertModel: same weights, same hidden states (fp32, max abs error <= 1e-4).

The configs are MERT-v1-95M's and MERT-v1-330M's at full width, cut to 2 layers for CI speed.
"""
import os
import pickle
import sys
import types

import pytest
import torch

import convert
from conftest import need, randomise_
from mert import MERT, MERTConfig, CheckpointError, NeedsConvert, PRESETS

TOL = 1e-4

# The official MERT-v1 config.json fields (m-a-p/MERT-v1-95M and -330M); n layers reduced for speed.
MERT_95M_HF = dict(
    hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
    conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=False, feat_extract_norm="group", feat_proj_layer_norm=True, do_stable_layer_norm=False,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
    hidden_act="gelu", feat_extract_activation="gelu",
)
MERT_330M_HF = dict(MERT_95M_HF, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                    do_stable_layer_norm=True)


def hf_model(cfg_kwargs, seed=0):
    """A transformers HubertModel with every parameter random (norm weights and biases too)."""
    transformers = need("transformers")
    torch.manual_seed(seed)
    config = transformers.HubertConfig(**cfg_kwargs, attn_implementation="sdpa")
    return randomise_(transformers.HubertModel(config).eval())


def hf_states(m, wav):
    """transformers 4.x output_hidden_states convention: the pre-LN model's last state is the normed one."""
    with torch.no_grad():
        o = m(wav, output_hidden_states=True)
    return torch.stack(list(o.hidden_states[:-1]) + [o.last_hidden_state])


def music(n, seed=0):
    """A loud, music-like test signal: harmonic tones, an onset and noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 24000
    x = sum(0.3 / h * torch.sin(2 * torch.pi * 220 * h * t) for h in range(1, 6))
    x = x + 0.05 * torch.randn(n, generator=g)
    x[n // 2:] += 0.4 * torch.sin(2 * torch.pi * 330 * t[n // 2:])
    return x.float()


@pytest.fixture(scope="module", params=["95m", "330m"])
def pair(request, tmp_path_factory):
    """(HubertModel, our MERT loaded from its save_pretrained folder, folder)."""
    hf = hf_model(MERT_95M_HF if request.param == "95m" else MERT_330M_HF)
    folder = tmp_path_factory.mktemp(f"hf{request.param}")
    hf.save_pretrained(folder)
    return hf, MERT.from_pretrained(folder), folder


def test_hidden_states_match_transformers(pair):
    hf, ours, _ = pair
    wav = music(24000 + 123)[None]
    ref = hf_states(hf, wav)
    got = ours.extract(wav)
    assert got.shape == ref.shape == (3, 1, (wav.shape[1] - 400) // 320 + 1, hf.config.hidden_size)
    err = (got - ref).abs().amax(dim=(1, 2, 3))
    assert err.max() <= TOL, f"per-state max abs error {err.tolist()}"


def test_config_mapped_from_hf(pair):
    hf, ours, _ = pair
    c = ours.config
    assert (c.dim, c.n_heads, c.ffn_dim, c.pre_ln) == (hf.config.hidden_size, hf.config.num_attention_heads,
                                                      hf.config.intermediate_size, hf.config.do_stable_layer_norm)


def test_presets_are_the_official_sizes():
    p95, p330 = MERTConfig.from_preset("95m"), MERTConfig.from_preset("330m")
    for ours, hf in ((p95, MERT_95M_HF), (p330, MERT_330M_HF)):
        assert (ours.dim, ours.n_heads, ours.ffn_dim, ours.pre_ln) == (
            hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"], hf["do_stable_layer_norm"])
        assert list(ours.conv_kernel) == hf["conv_kernel"] and list(ours.conv_stride) == hf["conv_stride"]
        assert (ours.pos_conv_kernel, ours.pos_conv_groups) == (128, 16)
    assert (p95.n_layers, p330.n_layers) == (12, 24)
    n95 = sum(p.numel() for p in MERT(p95).parameters())
    assert 90e6 < n95 < 100e6, n95
    assert set(PRESETS) == {"tiny", "95m", "330m"}


def test_pytorch_model_bin_with_weight_g_v_layout(pair, tmp_path):
    """The older key layout (pos conv weight_g / weight_v) in a pytorch_model.bin gives the same numbers."""
    hf, ours, folder = pair
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    pc = "encoder.pos_conv_embed.conv."
    sd[pc + "weight_g"] = sd.pop(pc + "parametrizations.weight.original0")
    sd[pc + "weight_v"] = sd.pop(pc + "parametrizations.weight.original1")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    other = MERT.from_pretrained(tmp_path)
    wav = music(9000, seed=1)[None]
    assert (other.extract(wav) - ours.extract(wav)).abs().max() == 0


def test_padded_batch_equals_single_clips(pair):
    """Each clip of a zero-padded batch gets the features it gets alone (compared with transformers, one clip each)."""
    hf, ours, _ = pair
    lens = [24000, 15000, 9377]
    batch = torch.zeros(len(lens), max(lens))
    for i, n in enumerate(lens):
        batch[i, :n] = music(n, seed=i)
    got = ours.extract(batch, lengths=lens)
    for i, n in enumerate(lens):
        ref = hf_states(hf, batch[i:i + 1, :n])
        T = ref.shape[2]
        assert (got[:, i, :T] - ref[:, 0]).abs().max() <= TOL
        assert torch.count_nonzero(got[:, i, T:]) == 0  # padded frames come back as zeros


def test_fairseq_checkpoint_converts(pair, tmp_path, monkeypatch):
    """A fairseq-layout checkpoint, with pickled config and Dictionary objects, loads without fairseq."""
    hf, ours, _ = pair
    sd = hf_to_fairseq(hf.state_dict())
    sd["final_proj.weight"] = torch.randn(64 * 8, hf.config.hidden_size)  # a pretraining head: ignored
    sd["label_embs_concat"] = torch.randn(1028 * 8, 64)
    fake = fake_fairseq_modules(monkeypatch)
    layers = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
    model_cfg = fake.DictConfig({
        "_name": "mert", "encoder_embed_dim": hf.config.hidden_size, "encoder_layers": 2,
        "encoder_ffn_embed_dim": hf.config.intermediate_size,
        "encoder_attention_heads": hf.config.num_attention_heads,
        "layer_norm_first": hf.config.do_stable_layer_norm, "extractor_mode": "default",
        "conv_feature_layers": layers, "conv_pos": 128, "conv_pos_groups": 16, "conv_bias": False,
        "dropout": 0.1, "attention_relax": 32.0 if hf.config.do_stable_layer_norm else -1.0})
    ckpt = {"args": None, "cfg": fake.DictConfig({"model": model_cfg, "task": fake.DictConfig({"labels": ["x"]})}),
            "model": sd, "task_state": {"dictionaries": [fake.Dictionary()]},
            "optimizer_history": [{"criterion_name": "ModelCriterion"}]}
    path = tmp_path / "MERT-fairseq.pt"
    torch.save(ckpt, path)
    for name in list(sys.modules):  # fairseq is not importable while loading
        if name.split(".")[0] in ("fairseq", "omegaconf"):
            monkeypatch.delitem(sys.modules, name)
    with pytest.raises(pickle.UnpicklingError):  # weights_only refuses it, as it should
        torch.load(path, weights_only=True)
    with pytest.raises(NeedsConvert, match=r"MERT-fairseq\.pt: .*`python convert\.py "):  # mert.py names convert.py
        MERT.from_pretrained(path)
    conv = convert.from_pretrained(path)
    assert conv.config.pre_ln == hf.config.do_stable_layer_norm
    assert conv.config.attn_relax == (32.0 if hf.config.do_stable_layer_norm else 0.0)
    wav = music(20000, seed=3)[None]
    assert (conv.extract(wav) - hf_states(hf, wav)).abs().max() <= TOL


def test_restricted_unpickler_runs_nothing(tmp_path):
    """A checkpoint whose pickle would call os.system loads as inert data and calls nothing."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {"encoder.layers.0.self_attn.k_proj.weight": torch.zeros(1)}, "cfg": Evil()}, path)
    with pytest.raises(NeedsConvert):
        MERT.from_pretrained(path)  # mert.py does not unpickle it at all
    with pytest.raises(CheckpointError, match="missing key post_extract_proj.weight"):
        convert.from_pretrained(path)  # loads inertly, then fails on missing keys
    assert not marker.exists()


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = MERT(MERTConfig.from_preset("tiny")).eval()
    m.save(tmp_path / "m.pt", step=3)
    m2 = MERT.from_pretrained(tmp_path / "m.pt")
    assert m2.config == m.config
    wav = music(12000)[None]
    assert torch.equal(m.extract(wav), m2.extract(wav))
    assert not list(tmp_path.glob("*.tmp"))


def test_encoder_export_drops_heads_and_halves_the_file(tmp_path):
    torch.manual_seed(0)
    m = MERT(MERTConfig.from_preset("tiny")).eval()  # with pretraining heads
    m.save(tmp_path / "full.pt")
    m.save(tmp_path / "enc.pt", heads=False, dtype=torch.float16, step=7)
    e = MERT.from_pretrained(tmp_path / "enc.pt")
    assert e.config.n_codebooks == 0 and e.config.cqt_bins == 0 and not hasattr(e, "cqt_head")
    assert next(e.parameters()).dtype == torch.float32  # stored in half, computed in float
    assert torch.load(tmp_path / "enc.pt", weights_only=True)["step"] == 7
    assert (tmp_path / "enc.pt").stat().st_size < 0.45 * (tmp_path / "full.pt").stat().st_size
    wav = music(24000)[None]
    a, b = m.extract(wav), e.extract(wav)
    assert ((a - b).norm() / a.norm()).item() < 5e-3  # float16 rounding of the weights only


def test_extract_under_cpu_autocast():
    """Validation during bf16 training runs extract-like no-grad passes under autocast (fp32 weights)."""
    torch.manual_seed(0)
    m = MERT(MERTConfig.from_preset("tiny", n_layers=2)).eval()
    wav = music(12000)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m.extract(wav)
    ref = m.extract(wav)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.05


def test_missing_and_mismatched_keys_are_named(tmp_path):
    m = MERT(MERTConfig.from_preset("tiny"))
    sd = m.state_dict()
    del sd["encoder.layers.1.attention.qkv.bias"]
    sd["encoder.layer_norm.weight"] = torch.ones(7)
    torch.save({"config": m.config.__dict__, "model": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.attention\.qkv\.bias.*encoder\.layer_norm\.weight"):
        MERT.from_pretrained(tmp_path / "bad.pt")


def test_hub_id_resolves_in_local_cache_only(pair, tmp_path, monkeypatch):
    hf, ours, folder = pair
    repo = tmp_path / "hub" / "models--m-a-p--MERT-v1-test"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    wav = music(8000)[None]
    assert torch.equal(MERT.from_pretrained("m-a-p/MERT-v1-test").extract(wav), ours.extract(wav))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        MERT.from_pretrained("m-a-p/MERT-v1-absent")


def test_attention_relaxation_path_equals_fused():
    torch.manual_seed(0)
    fused = MERT(MERTConfig.from_preset("tiny", pre_ln=True)).eval()
    with pytest.warns(UserWarning, match="slow"):
        math_ = MERT(MERTConfig.from_preset("tiny", pre_ln=True, attn_impl="math", attn_relax=32.0)).eval()
    math_.load_state_dict(fused.state_dict())
    lens = [16000, 11000]
    wav = torch.stack([music(16000, 0), music(16000, 1)])
    assert (fused.extract(wav, lens) - math_.extract(wav, lens)).abs().max() <= TOL


def test_layer_selection_and_frames():
    torch.manual_seed(0)
    m = MERT(MERTConfig.from_preset("tiny")).eval()
    wav = music(24000 * 2)[None]
    full = m.extract(wav)
    assert full.shape[2] == m.num_frames(wav.shape[1]) == (wav.shape[1] - 400) // 320 + 1 == 149
    assert torch.equal(m.extract(wav, layers=[0, 2]), full[[0, 2]])
    with pytest.raises(ValueError, match="shorter than one frame"):
        m.extract(torch.zeros(1, 399))
    with pytest.raises(ValueError, match="out of range"):
        m.extract(wav, layers=[9])


# -- helpers that write the fairseq layout, independently of convert.py's reader -------------------------


def hf_to_fairseq(sd):
    """transformers HuBERT keys -> fairseq's (inverse of the official conversion script's mapping)."""
    out = {}
    for k, v in sd.items():
        n = k
        if ".conv.weight" in n and n.startswith("feature_extractor"):
            n = n.replace(".conv.weight", ".0.weight")
        elif n.startswith("feature_extractor") and ".layer_norm." in n:
            n = n.replace(".layer_norm.", ".2.")
        n = n.replace("feature_projection.projection.", "post_extract_proj.")
        n = n.replace("feature_projection.layer_norm.", "layer_norm.")
        n = n.replace("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g")
        n = n.replace("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v")
        n = n.replace("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias")
        n = n.replace(".attention.", ".self_attn.")
        n = n.replace("feed_forward.intermediate_dense", "fc1").replace("feed_forward.output_dense", "fc2")
        if n.startswith("encoder.layers.") and ".layer_norm." in n:
            n = n.replace(".layer_norm.", ".self_attn_layer_norm.")
        n = n.replace("masked_spec_embed", "mask_emb")
        out[n] = v.clone()
    return out


def fake_fairseq_modules(monkeypatch):
    """Classes pickled under fairseq's and omegaconf's module names, as real fairseq checkpoints hold them."""
    ns = types.SimpleNamespace()

    class AnyNode:
        def __init__(self, v):
            self.__dict__.update(_val=v, _metadata={"ref_type": "Any"}, _parent=None)

    class DictConfig:
        def __init__(self, d):
            self.__dict__.update(_content={k: v if isinstance(v, DictConfig) else AnyNode(v) for k, v in d.items()},
                                 _metadata={"object_type": dict}, _parent=None)

    class Dictionary:
        def __init__(self):
            self.symbols, self.indices = ["<s>", "<pad>", "</s>", "<unk>", "0"], {"0": 4}

    for cls, mod in ((AnyNode, "omegaconf.nodes"), (DictConfig, "omegaconf.dictconfig"),
                     (Dictionary, "fairseq.data.dictionary")):
        parts = mod.split(".")
        for i in range(1, len(parts)):  # pickle imports the parent packages too
            parent = ".".join(parts[:i])
            if parent not in sys.modules:
                monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
        module = types.ModuleType(mod)
        setattr(module, cls.__name__, cls)
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        monkeypatch.setitem(sys.modules, mod, module)
        setattr(ns, cls.__name__, cls)
    return ns


# -- FLOPs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    dict(),  # tiny as shipped: even positional kernel (128), heads on
    dict(n_layers=2, ffn_dim=512, conv_dim=(64,) * 6 + (96,), pos_conv_kernel=65, pos_conv_groups=8,
         n_codebooks=4, final_dim=32, cqt_bins=84),  # odd positional kernel: no extra frame
])
def test_estimate_flops_counts_the_forward_pass(overrides):
    """estimate_flops / 3 equals the multiply-adds torch's FlopCounterMode sees in a real forward plus the heads.

    Exact, not a tolerance: both count 2 x multiply-adds of convs, matmuls and attention and nothing else
    (norms, GELU, softmax are left out by both). The one known difference is the positional conv: an even
    kernel with padding k // 2 computes T + 1 frames before the last is trimmed, and the estimate counts T.
    The unfused attention path is used because FlopCounterMode does not count CPU SDPA kernels. The factor 3
    (backward = 2 x forward) is a convention not checked here: FlopCounterMode overcounts strided convs'
    backward (it prices the input gradient as a dense transposed conv)."""
    from torch.utils.flop_counter import FlopCounterMode
    with pytest.warns(UserWarning, match="slow"):
        m = MERT(MERTConfig.from_preset("tiny", attn_impl="math", **overrides)).eval()
    cfg = m.config
    for n in (16000, 24000 * 2 + 123):
        T = m.num_frames(n)
        with FlopCounterMode(display=False) as fc:
            m(torch.randn(1, n))  # no targets: the heads do not run; counted on their own below
            x = torch.zeros(T, cfg.dim)
            m.final_proj(x), m.cqt_head(x)  # the estimate prices the heads on every frame
        extra = 2 * cfg.dim * (cfg.dim // cfg.pos_conv_groups) * cfg.pos_conv_kernel * (cfg.pos_conv_kernel % 2 == 0)
        assert fc.get_total_flops() - extra == m.estimate_flops(n) / 3
