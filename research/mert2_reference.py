"""Golden outputs of MERT-v2's reference code (its Hugging Face remote code) for tests/test_mert2.py.

    python research/mert2_reference.py --reference DIR          # writes tests/data/mert2/
    python research/mert2_reference.py --reference DIR --check  # recomputes, compares with what is there

DIR holds the reference's own two files, `modeling_mert2.py` and `configuration_mert2.py`, as published
beside the weights of m-a-p/MERT-v2-30s / m-a-p/MERT-v2-FullSong (a snapshot folder of the Hugging Face
cache will do; nothing is downloaded). They are run as they are, on random weights saved in the real
checkpoint layout, for two configs:
  small  widths 32 -> 48 -> 64, 2 blocks of width 64, 4 heads, FFN 128, 32 mels (everything else as
         released: n_fft 2048, hop 240, depths 3, 4, 5, conv kernel 31); its weights are committed
         (`small/model.safetensors` + `config.json`, the window and filterbank the reference itself built
         with torchaudio), and every state of every case is stored whole;
  real2  the released widths (1024, 16 heads, FFN 4096, 128 mels, ConvNeXt 128/512/1024) with 2 blocks;
         its ~100M weights are not committed but made by `seeded_state` (torch's CPU generator seeded by
         the CRC-32 of each key name), which the test calls too; stored are a few whole frames of each state, a fixed
         projection of every frame and the mean of every channel (`summarise`).
Inputs (`wave`: seeded noise plus tones): clips of 1 s, 7.31 s and 30 s (30 s for small only, to keep
the test fast) and a right-padded batch of two lengths (three rows, two of one length, random values in
the padding) passed with the reference's own attention_mask convention (ones, then zeros); real2's batch is its 1 s and
7.31 s clips, so that the test runs the real width once.
State 0 (the downsampler output, the input of block 1) is caught by a forward pre-hook on the
reference's first block; states 1..n are its `hidden_states`.

Versions. The reference pins torch 2.6.0, torchaudio 2.6.0 and transformers 4.53.2 (its model card's
install line). The golden files were made in a venv with transformers 4.53.2 and torchaudio 2.6.0 on
torch 2.13.0+cpu, because PyPI's Linux torch 2.6.0 is the CUDA build (several GB of CUDA libraries):
    python -m venv /tmp/ref --system-site-packages      # sees torch 2.13, numpy, safetensors
    /tmp/ref/bin/pip install transformers==4.53.2
    /tmp/ref/bin/pip install --no-deps torchaudio==2.6.0
    /tmp/ref/bin/python research/mert2_reference.py --reference DIR
What is stubbed, and why (the numerical code is the reference's own throughout):
  - torchaudio 2.6's compiled extension (libtorchaudio.so) is built against torch 2.6 and does not load
    on torch 2.13, so `torchaudio.lib._torchaudio` is marked absent before import; torchaudio then runs
    without it, and Spectrogram, MelScale and AmplitudeToDB, the only parts the reference uses, are
    pure Python over torch.stft/matmul/log10.
  - The copy of modeling_mert2.py read for this (16,311 characters, configuration_mert2.py 3,860) calls
    its attention through `from shared.attention import pay_attention` with force_attention="sdpa", a
    helper of the project that copy lives in; it is given here as what that name means:
    F.scaled_dot_product_attention over (B, H, T, hd), not causal, no mask, default scale, returned as
    (B, T, H, hd).
The rotary cache of the reference (RotaryEmbedding._cos/_sin, kept across calls) is cleared before each
case, so that every golden output is the one a fresh model gives.
"""
import argparse
import json
import math
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "mert2"
SR = 24000

SMALL = dict(model_type="mert2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_mel_bins=32, subsampling_channels=[32, 48, 64], subsampling_depths=[3, 4, 5], variant="30s")
REAL2 = dict(model_type="mert2", hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
             num_attention_heads=16, num_mel_bins=128, subsampling_channels=[128, 512, 1024],
             subsampling_depths=[3, 4, 5], variant="fs")
# clip lengths in samples (one per row) and the seed of each row's wave. The padded batches hold two
# lengths: small's has two different clips of one length; real2's rows are its 1 s and 7.31 s clips
# themselves, so that one run of it at the real width is checked against all three golden outputs.
CLIPS = {"1s": ([SR], [SR]), "7.31s": ([175440], [175440]), "30s": ([30 * SR], [30 * SR]),
         "small/padded": ([175440, SR + 123, 175440], [100, 101, 102]),
         "real2/padded": ([175440, SR], [175440, SR])}
PADDED_WIDTH = 175440 + 517
CASES = {"small": ["1s", "7.31s", "30s", "padded"], "real2": ["1s", "7.31s", "padded"]}
KEEP_FRAMES = 4  # real2: whole frames kept at the start, middle and end of each state
N_PROJ = 8


def seeded_tensor(name: str, shape) -> torch.Tensor:
    """A float32 tensor for a checkpoint key, from torch's CPU generator seeded by crc32(name), scaled by its role."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = tuple(shape)
    u, n = (lambda lo, hi: lo + (hi - lo) * torch.rand(shape, generator=g)), (lambda: torch.randn(shape, generator=g))
    if name.endswith("spectrogram.window"):
        return u(0.2, 1.0)
    if name.endswith("mel_scale.fb"):
        return u(0.0, 0.01)
    if name.endswith("mel_mean"):
        return 10.0 + 5.0 * n()
    if name.endswith("mel_std"):
        return u(5.0, 15.0)
    if len(shape) == 3 and shape[:2] == (1, 1):  # GRN weight and bias
        return 0.3 * n()
    if len(shape) == 1 and name.endswith(".weight"):  # LayerNorm
        return 1.0 + 0.1 * n()
    if len(shape) == 1:  # biases
        return 0.05 * n()
    return n() / math.sqrt(math.prod(shape[1:]))  # linear / conv weights: unit gain on the fan-in


def seeded_state(shapes: dict) -> dict:
    """{key: shape} -> {key: seeded_tensor(key, shape)}: the real2 weights, made the same on both sides."""
    return {k: seeded_tensor(k, s) for k, s in shapes.items()}


def wave(n: int, seed: int) -> torch.Tensor:
    """A float32 test signal of n samples at 24 kHz: seeded noise (std 0.05) plus two tones."""
    t = torch.arange(n, dtype=torch.float64) / SR
    x = 0.2 * torch.sin(2 * math.pi * 220.0 * t) + 0.1 * torch.sin(2 * math.pi * 1375.5 * t)
    return (0.05 * torch.randn(n, generator=torch.Generator().manual_seed(seed)) + x.float())


def case_input(config: str, case: str) -> tuple[torch.Tensor, list]:
    """(wav [B, W], lengths) of a case; a padded batch has seeded junk past each length."""
    lengths, seeds = CLIPS[f"{config}/{case}" if case == "padded" else case]
    width = PADDED_WIDTH if case == "padded" else lengths[0]
    g = torch.Generator().manual_seed(7)
    wav = 6.0 * torch.rand(len(lengths), width, generator=g) - 3.0
    for i, (n, seed) in enumerate(zip(lengths, seeds)):
        wav[i, :n] = wave(n, seed)
    return wav, lengths


def projection(dim: int) -> torch.Tensor:
    """A fixed [dim, N_PROJ] projection that every frame of a state is summarised by."""
    return seeded_tensor("projection", (N_PROJ, dim)).t()  # entries N(0, 1 / dim)


def summarise(states: torch.Tensor, lengths: list) -> dict:
    """states [S, B, T, D] -> {"frames": [S, B, 3 * KEEP_FRAMES, D], "proj": [S, B, T, N_PROJ],
    "chan_mean": [S, B, D]} over each clip's own frames (the rest are zeros in both)."""
    S, B, T, D = states.shape
    frames = torch.zeros(S, B, 3 * KEEP_FRAMES, D)
    mean = torch.zeros(S, B, D)
    for b, n in enumerate(lengths):
        t = n // 960
        k = torch.arange(KEEP_FRAMES)
        idx = torch.cat([k, t // 2 + k, t - KEEP_FRAMES + k])
        frames[:, b] = states[:, b, idx]
        mean[:, b] = states[:, b, :t].mean(1)
    return {"frames": frames, "proj": states @ projection(D), "chan_mean": mean}


# -----------------------------------------------------------------------------
# Running the reference


def import_reference(folder: Path):
    """The reference's MERT2Config and MERT2Model from folder, with the two stubs of the module docstring."""
    sys.modules["torchaudio.lib._torchaudio"] = None  # its compiled part cannot load on this torch; unused
    shared = types.ModuleType("shared")
    attention = types.ModuleType("shared.attention")

    def pay_attention(qkv, force_attention="sdpa"):
        assert force_attention == "sdpa"
        q, k, v = (t.transpose(1, 2) for t in qkv)  # (B, T, H, hd) -> (B, H, T, hd)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    attention.pay_attention = pay_attention
    shared.attention = attention
    sys.modules.update({"shared": shared, "shared.attention": attention})
    package = types.ModuleType("mert2_reference")  # the files use relative imports
    package.__path__ = [str(folder)]
    sys.modules["mert2_reference"] = package
    from mert2_reference.configuration_mert2 import MERT2Config
    from mert2_reference.modeling_mert2 import MERT2Model
    return MERT2Config, MERT2Model


def build(classes, cfg: dict, seeded_buffers: bool):
    """The reference model for cfg with seeded weights (and seeded front-end buffers if seeded_buffers)."""
    MERT2Config, MERT2Model = classes
    config = MERT2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    model = MERT2Model(config).eval()
    own = model.state_dict()
    state = seeded_state({k: v.shape for k, v in own.items()})
    if not seeded_buffers:  # keep the window and filterbank torchaudio built
        for k in ("feature_extractor.spectrogram.window", "feature_extractor.mel_scale.fb"):
            state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def run(model, config: str, case: str) -> torch.Tensor:
    """All states [1 + blocks, B, max frames, D] of the reference for a case (zeros past each clip)."""
    wav, lengths = case_input(config, case)
    model.embed_positions._cos = None  # a fresh rotary cache for every case
    caught = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: caught.append(args[0].clone()))
    try:
        if case == "padded":
            mask = (torch.arange(wav.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
            out = model(wav, attention_mask=mask, output_hidden_states=True, return_dict=True)
        else:
            out = model(wav, output_hidden_states=True, return_dict=True)
    finally:
        hook.remove()
    blocks = torch.stack(out.hidden_states)  # (n, B, T, D)
    state0 = torch.zeros_like(blocks[0])
    lens = torch.tensor(lengths)
    for h, n in zip(caught, torch.unique(lens, sorted=True).tolist()):  # groups in the reference's order
        rows = torch.where(lens == n)[0]
        state0[rows, :h.shape[1]] = h
    assert torch.equal(blocks[-1], out.last_hidden_state)
    return torch.cat([state0[None], blocks])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python research/mert2_reference.py --reference ~/MERT-v2-30s")
    p.add_argument("--reference", required=True, type=Path,
                   help="folder holding the reference's modeling_mert2.py and configuration_mert2.py")
    p.add_argument("--out", type=Path, default=OUT, help=f"where the golden files go (default: {OUT})")
    p.add_argument("--check", action="store_true", help="compare with the golden files there instead of writing")
    args = p.parse_args()
    torch.manual_seed(0)
    classes = import_reference(args.reference.expanduser())
    import torchaudio
    import transformers
    versions = {"torch": torch.__version__, "torchaudio": torchaudio.__version__,
                "transformers": transformers.__version__}
    print(versions, file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)

    # the full released layout's key names and shapes, built on the meta device (the front end's buffers
    # are made on the CPU by the reference itself)
    MERT2Config, MERT2Model = classes
    full = MERT2Config()
    full._attn_implementation = "sdpa"
    with torch.device("meta"):
        keys = {k: list(v.shape) for k, v in MERT2Model(full).state_dict().items()}

    results = {}
    for name, cfg in (("small", SMALL), ("real2", REAL2)):
        model = build(classes, cfg, seeded_buffers=name == "real2")
        for case in CASES[name]:
            states = run(model, name, case)
            print(f"{name} {case}: states {tuple(states.shape)}", file=sys.stderr)
            if name == "small":
                results[f"{name}/{case}/states"] = states
            else:
                for k, v in summarise(states, case_input(name, case)[1]).items():
                    results[f"{name}/{case}/{k}"] = v
        if name == "small" and not args.check:
            from safetensors.torch import save_file
            folder = args.out / "small"
            folder.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
                      metadata={"format": "pt"})
            (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        del model

    arrays = {k: v.numpy() for k, v in results.items()}
    if args.check:
        old = np.load(args.out / "golden.npz")
        worst = max(float(np.abs(old[k] - v).max()) for k, v in arrays.items())
        same_keys = json.loads((args.out / "reference_keys.json").read_text())["keys"] == keys
        print(f"max abs difference from the stored golden outputs: {worst:.3g}; key list unchanged: {same_keys}")
        return
    np.savez_compressed(args.out / "golden.npz", **arrays)
    (args.out / "reference_keys.json").write_text(json.dumps({"versions": versions, "keys": keys}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
