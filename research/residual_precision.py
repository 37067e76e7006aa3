"""How far autocast moves a 330m-shaped MERT from float64, with the pre-LN residual stream in the autocast dtype
or in float32 (README recipe table, precision row; issue 24 point 3).

    OMP_NUM_THREADS=2 python research/residual_precision.py --layers 4 --clips 2 --seconds 5.12

Under autocast the pre-LN stream x = x + attn(LN(x)) stays in the dtype the feature projection gave it (bf16 or
fp16: the sum of two half-precision tensors is half precision); "fp32 residual" casts it to float32 before the
first layer, so every later sum promotes to float32 while the matmuls still run in half precision. fairseq's
fp16 run (MERT's) kept the stream in fp16. Reports relative L2 errors against a float64 forward/backward of the
same weights, input, masks and targets: the last hidden state, the loss, and the whole gradient. The conv
front end runs in float32 in every row (on a CPU without AVX-512 its bf16 convolutions are emulated and take
tens of minutes); the feature projection, transformer and heads run as in training.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import audio  # noqa: E402
from mert import MERT, MERTConfig, compute_mask_indices  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clip.flac"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(model: MERT, wav, targets, mask, dtype, fp32_residual: bool):
    """(last hidden state, loss, flat gradient) under autocast `dtype` (None: the model's own dtype)."""
    model.zero_grad(set_to_none=True)
    hook = None
    front = model.feature_extractor.forward
    if not hasattr(front, "fp32"):  # the conv front end in float32 for every row (see the docstring)
        def fp32_front(*a, **k):
            with torch.autocast("cpu", enabled=False):
                return front(*a, **k)
        fp32_front.fp32 = True
        model.feature_extractor.forward = fp32_front
    if fp32_residual:  # the stream enters the first layer as float32; x + half -> float32 from then on
        hook = model.encoder.layers[0].register_forward_pre_hook(lambda m, a: (a[0].float(), *a[1:]))
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        x, loss, _ = model(wav, targets=targets, mask=mask)
    loss.backward()
    if hook is not None:
        hook.remove()
    grad = torch.cat([p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None])
    return x.detach().double(), loss.detach().double(), grad


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="transformer layers of the 330m shape")
    p.add_argument("--clips", type=int, default=2, help="clips per batch")
    p.add_argument("--seconds", type=float, default=5.12, help="seconds per clip (330m's crop)")
    p.add_argument("--seed", type=int, default=0, help="weights, targets and masks")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    cfg = MERTConfig.from_preset("330m", n_layers=args.layers, n_codebooks=8, codebook_size=1024, cqt_bins=336)
    model = MERT(cfg).train()  # 330m: no dropout, no layerdrop, so train mode is deterministic
    L = int(args.seconds * audio.SAMPLE_RATE)
    music = audio.load(EXAMPLE, sr=audio.SAMPLE_RATE)
    starts = np.linspace(0, len(music) - L, args.clips).astype(int)  # overlapping crops of the 6 s example
    wav = torch.stack([torch.as_tensor(music[s:s + L]) for s in starts]).float()
    T = model.num_frames(L)
    g = torch.Generator().manual_seed(args.seed)
    targets = {"codes": torch.randint(0, 1024, (args.clips, 8, T), generator=g),
               "cqt": torch.rand(args.clips, T, 336, generator=g)}
    mask = torch.as_tensor(compute_mask_indices(args.clips, T, cfg.mask_prob, cfg.mask_length, cfg.min_masks,
                                                rng=np.random.default_rng(args.seed)))
    ref = run(model.double(), wav.double(), {**targets, "cqt": targets["cqt"].double()}, mask, None, False)
    model.float()
    print(f"330m shape, {args.layers} layers, {args.clips} x {args.seconds} s of {EXAMPLE.name}, vs float64 "
          f"(loss {ref[1].item():.4f}); relative L2 errors:")
    print(f"{'precision':<34} {'last hidden':>12} {'loss':>10} {'gradient':>10}")
    for name, dtype, fp32_res in (("float32", None, False), ("bfloat16, bf16 residual (ours)", torch.bfloat16,
                                                                False),
                                  ("bfloat16, fp32 residual", torch.bfloat16, True),
                                  ("float16, fp16 residual (fairseq's)", torch.float16, False),
                                  ("float16, fp32 residual", torch.float16, True)):
        x, loss, grad = run(model, wav, targets, mask, dtype, fp32_res)
        print(f"{name:<34} {rel(x, ref[0]):>12.2e} {rel(loss, ref[1]):>10.2e} {rel(grad, ref[2]):>10.2e}",
              flush=True)


if __name__ == "__main__":
    main()
