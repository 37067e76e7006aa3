"""Checkpoint formats that are not a model's own, and `python convert.py` to write one as another.

    python convert.py runs/95m/ckpt.pt models/mine.pt              # the encoder alone (float16), for extract.py
    python convert.py runs/95m/ckpt.pt hf/mert-mine --format hf    # the Hugging Face MERT-v1 layout
    python convert.py MERT-v1-95M_fairseq.pt models/mert-95m.pt    # a fairseq MERT checkpoint, once, to ours

In: what mert.py reads (our .pt, Hugging Face folders, hub ids in the local cache) and fairseq MERT
checkpoints (`load_checkpoint`, `from_pretrained`). A fairseq .pt pickles its config (omegaconf) and label
Dictionaries, which torch.load(weights_only=True) refuses; a restricted unpickler admits tensors and plain
containers and turns every other class into an inert stand-in that runs nothing, so fairseq need not be
installed and the file cannot run code. Keys map as transformers' official conversion maps them; the
pretraining heads (for train.py --init) are gathered through the pickled Dictionaries, never assumed at
row code + 4.
Out: the layout m-a-p ships (config.json, model.safetensors, preprocessor_config.json), which transformers'
own HubertModel and AutoModel load without remote code; MERT's fields stand beside the HuBERT ones so the
official remote code reads it too. model.safetensors is written with the standard library, and the folder
appears whole or not at all (written beside it, then renamed).

--init: `init_from` maps a model in any of these formats onto a new training run (train.py imports this file
for --init only).
Kept apart from mert.py so that the model file stays the model: mert.py still reads its own format and the
official Hugging Face weights alone, and names this file (NeedsConvert) when handed a fairseq one.
`train.py export` is an alias of this command. Imports mert, torch and the standard library.
"""

import argparse
import ast
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import mert
from mert import MERT, CheckpointError, MERTConfig, NeedsConvert, fuse_qkv, is_fairseq, load_state_strict

# -----------------------------------------------------------------------------
# Reading every format


def load_checkpoint(path, map_location="cpu", for_training: bool = False) -> tuple[MERTConfig, dict, str]:
    """mert.load_checkpoint, fairseq MERT checkpoints included (with their pretraining heads when for_training)."""
    try:
        return mert.load_checkpoint(path, map_location, for_training)
    except NeedsConvert as e:
        p, obj = e.path, e.obj
    if obj is None:  # weights_only refused the pickle: read it again, admitting nothing that runs
        obj = _restricted_torch_load(p, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict checkpoint, found {type(obj).__name__}")
    if not is_fairseq(obj):
        raise CheckpointError(f"{p}: not a MERT checkpoint (ours needs 'config' and 'model'; "
                              f"fairseq needs 'model' with encoder.layers.*.self_attn.* keys)")
    return _from_fairseq(obj, str(p), heads=for_training)


def from_pretrained(path, map_location="cpu", **overrides) -> MERT:
    """MERT.from_pretrained for every format load_checkpoint reads: the model in eval mode."""
    cfg, state, src = load_checkpoint(path, map_location)
    cfg = replace(cfg, **overrides) if overrides else cfg
    model = MERT(cfg)
    load_state_strict(model, state, src)
    return model.eval()


# The fields that shape an encoder's weights and outputs: train.py --init takes them from its source.
ARCH_FIELDS = ("dim", "n_layers", "n_heads", "ffn_dim", "pre_ln", "conv_dim", "conv_kernel", "conv_stride", "conv_bias",
               "extractor_norm", "proj_norm", "pos_conv_kernel", "pos_conv_groups", "norm_eps", "sample_rate")


def init_from(path, size: str, heads: dict, given: dict, fits: str = "the teachers") -> tuple[MERTConfig, dict, list]:
    """train.py --init: (the run's model config, the weights to load, notes for the log) from a model in any format.

    The encoder's shape comes from the source; everything else (dropout, masking, loss weights) from the preset
    `size` and the model fields `given` on the command line, as for any fresh run. A pretraining head the source has
    (code heads: label tables and final projection; CQT head) must fit `heads` (the teachers') exactly and is loaded;
    one it lacks starts fresh. A source that cannot be read, or that a given field or the heads contradict, raises
    ValueError (CheckpointError) naming it; `fits` names what the heads come from in that message."""
    src_cfg, state, src = load_checkpoint(path, for_training=True)
    clash = [f"--{f} {given[f]} (source: {getattr(src_cfg, f)})" for f in ARCH_FIELDS + ("final_dim",)
             if f in given and given[f] != getattr(src_cfg, f)
             and (f != "final_dim" or "label_embs" in state)]  # final_dim is the source's only with its code heads
    if clash:
        raise ValueError(f"{src} fixes the model's shape; {', '.join(clash)} contradicts it")
    has_codes, has_cqt = "label_embs" in state, "cqt_head.weight" in state
    problems = []
    if has_codes and (src_cfg.n_codebooks, src_cfg.codebook_size) != (heads["n_codebooks"], heads["codebook_size"]):
        problems.append(f"code heads for {src_cfg.n_codebooks} codebooks x {src_cfg.codebook_size} codes, the teachers "
                        f"give {heads['n_codebooks']} x {heads['codebook_size']}")
    if has_cqt and src_cfg.cqt_bins != heads["cqt_bins"]:
        problems.append(f"a CQT head of {src_cfg.cqt_bins} bins, the teachers give {heads['cqt_bins']}")
    if problems:
        raise ValueError(f"{src} does not fit {fits}: it has {'; '.join(problems)}")
    cfg = MERTConfig.from_preset(size, **{**heads, **given})
    cfg = replace(cfg, **{f: getattr(src_cfg, f) for f in ARCH_FIELDS},
                  **({"final_dim": src_cfg.final_dim} if has_codes else {}))
    loaded, fresh = ["encoder"], []
    codes = f"code heads ({cfg.n_codebooks} x {cfg.codebook_size} codes, final_dim {cfg.final_dim})"
    if has_codes or cfg.n_codebooks:
        (loaded if has_codes else fresh).append(codes)
    if has_cqt or cfg.cqt_bins:
        (loaded if has_cqt else fresh).append(f"CQT head ({cfg.cqt_bins} bins)")
    if "masked_spec_embed" not in state:
        fresh.append("mask embedding")
    notes = [f"{src}: loaded {', '.join(loaded)}; fresh (not in the source): {', '.join(fresh) or 'nothing'}; the "
             f"optimiser, learning-rate schedule and step start anew"]
    shaped_like = [n for n in mert.PRESETS
                   if all(getattr(MERTConfig.from_preset(n), f) == getattr(cfg, f) for f in ARCH_FIELDS)]
    if shaped_like and size not in shaped_like:
        notes.append(f"the source has --size {shaped_like[0]}'s shape; the training settings follow --size {size} "
                     f"(pass --size {shaped_like[0]} for its learning rate, dropout and crops)")
    return cfg, state, notes


# -----------------------------------------------------------------------------
# fairseq: a restricted unpickler, the key mapping, the pretraining heads


class _Inert:
    """Stand-in for any class a checkpoint pickles that we do not admit: records its arguments, runs nothing."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # a stand-in function "called" by REDUCE just records its args
        return _Inert(*args, **kwargs)

    def __repr__(self):
        return f"<inert {self._qualname}>"


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits tensors and plain containers; any other global becomes an inert stand-in class."""

    _allowed = {
        ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    }

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Inert,), {"_qualname": f"{module}.{name}"})


class _RestrictedPickleModule:
    """The pickle_module torch.load needs: our Unpickler plus a load() built on it."""

    Unpickler = _RestrictedUnpickler
    __name__ = "convert._RestrictedPickleModule"

    @staticmethod
    def load(f, **kw):
        return _RestrictedUnpickler(f, **kw).load()


def _restricted_torch_load(path: Path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_RestrictedPickleModule)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def _plain(v):
    """Unwrap omegaconf value nodes pickled as inert stand-ins into plain values."""
    while isinstance(v, _Inert):
        st = v.state
        if isinstance(st, dict) and "_val" in st:
            v = st["_val"]
        elif isinstance(st, dict) and "_content" in st:
            v = st["_content"]
        else:
            return v
    return v


def _find_fairseq_model_cfg(obj, depth=0):
    """Search a fairseq checkpoint's pickled cfg/args for the dict holding the model's hyperparameters."""
    if depth > 12:
        return None
    obj = _plain(obj)
    if isinstance(obj, _Inert):  # argparse.Namespace and the like: look at their attribute dict
        obj = obj.state if isinstance(obj.state, dict) else (obj.state[0] if isinstance(obj.state, tuple) and obj.state else None)
        if isinstance(obj, dict) and "__dict__" in obj:
            obj = obj["__dict__"]
    if isinstance(obj, dict):
        if "encoder_embed_dim" in obj:
            return {k: _plain(v) for k, v in obj.items()}
        for key in ("model", "cfg", "args"):  # the usual places first
            if key in obj:
                found = _find_fairseq_model_cfg(obj[key], depth + 1)
                if found:
                    return found
        for v in obj.values():
            if isinstance(v, (dict, _Inert)):
                found = _find_fairseq_model_cfg(v, depth + 1)
                if found:
                    return found
    return None


def _eval_layer_spec(spec: str) -> list:
    """Evaluate fairseq's conv_feature_layers string ('[(512,10,5)] + [(512,3,2)] * 4 + ...') without eval()."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise CheckpointError(f"unsupported conv_feature_layers expression: {spec!r}")
    return ev(ast.parse(spec, mode="eval"))


_FAIRSEQ_LAYER_KEYS = {
    "self_attn.out_proj": "attention.out_proj", "self_attn_layer_norm": "layer_norm",
    "fc1": "feed_forward.intermediate_dense", "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
}
# Everything under these prefixes belongs to the encoder and must map; other keys are pretraining heads.
_FAIRSEQ_ENCODER_PREFIXES = ("feature_extractor.", "post_extract_proj.", "layer_norm.", "encoder.", "mask_emb")


def fairseq_state_to_ours(sd: dict, cfg: MERTConfig) -> tuple[dict, list]:
    """fairseq HuBERT/MERT keys -> ours (the mapping of transformers' official conversion); returns (state, ignored keys)."""
    out, ignored = {}, []
    for k, v in sd.items():
        if not k.startswith(_FAIRSEQ_ENCODER_PREFIXES):
            ignored.append(k)
            continue
        new = k
        m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.(.+)", k)
        if m:
            i, rest = m.groups()
            rest = {"0.weight": "conv.weight", "0.bias": "conv.bias", "2.weight": "layer_norm.weight",
                    "2.bias": "layer_norm.bias", "2.1.weight": "layer_norm.weight",
                    "2.1.bias": "layer_norm.bias"}.get(rest, rest)
            new = f"feature_extractor.conv_layers.{i}.{rest}"
        elif k.startswith("post_extract_proj."):
            new = "feature_projection.projection." + k.split(".", 1)[1]
        elif k.startswith("layer_norm."):
            new = "feature_projection.layer_norm." + k.split(".", 1)[1]
        elif k == "mask_emb":
            new = "masked_spec_embed"
        elif k.startswith("encoder.pos_conv.0."):
            rest = k[len("encoder.pos_conv.0."):]
            rest = {"parametrizations.weight.original0": "weight_g",
                    "parametrizations.weight.original1": "weight_v"}.get(rest, rest)
            new = "encoder.pos_conv_embed.conv." + rest
        else:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
            if m:
                i, mod, p = m.groups()
                if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    new = f"encoder.layers.{i}.attention.{mod.split('.')[1]}.{p}"
                elif mod in _FAIRSEQ_LAYER_KEYS:
                    new = f"encoder.layers.{i}.{_FAIRSEQ_LAYER_KEYS[mod]}.{p}"
        out[new] = v
    for i in range(cfg.n_layers):
        a = f"encoder.layers.{i}.attention."
        fuse_qkv(out, a + "q_proj", a + "k_proj", a + "v_proj", a + "qkv")
    return out, ignored


def _from_fairseq(ckpt: dict, src: str, heads: bool = False) -> tuple[MERTConfig, dict, str]:
    sd = ckpt["model"]
    for key in ("post_extract_proj.weight", "encoder.layers.0.fc1.weight"):
        if key not in sd:
            raise CheckpointError(f"{src}: missing key {key} (not a fairseq MERT/HuBERT checkpoint?)")
    fc = _find_fairseq_model_cfg({k: ckpt.get(k) for k in ("cfg", "args") if ckpt.get(k) is not None}) or {}
    # Shapes settle what they can; the pickled config settles the rest (heads, pre-LN, strides).
    dim = sd["post_extract_proj.weight"].shape[0]
    n_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    kw = dict(dim=dim, n_layers=n_layers, ffn_dim=sd["encoder.layers.0.fc1.weight"].shape[0],
              n_heads=int(fc.get("encoder_attention_heads", dim // 64)),
              pre_ln=bool(fc.get("layer_norm_first", dim >= 1024)),
              conv_bias=bool(fc.get("conv_bias", "feature_extractor.conv_layers.0.0.bias" in sd)),
              extractor_norm="layer" if (fc.get("extractor_mode") == "layer_norm"
                                         or "feature_extractor.conv_layers.0.2.1.weight" in sd) else "group")
    if fc.get("conv_feature_layers"):
        spec = _eval_layer_spec(str(fc["conv_feature_layers"]))
        kw.update(conv_dim=[c for c, _, _ in spec], conv_kernel=[k for _, k, _ in spec],
                  conv_stride=[s for _, _, s in spec])
    else:  # MERT's stack; verify the kernels against the weights below
        convs = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.0\.weight", k)))
        kw.update(conv_dim=[sd[f"feature_extractor.conv_layers.{i}.0.weight"].shape[0] for i in convs],
                  conv_kernel=[sd[f"feature_extractor.conv_layers.{i}.0.weight"].shape[2] for i in convs],
                  conv_stride=[5] + [2] * (len(convs) - 1))
    pos = sd.get("encoder.pos_conv.0.weight_v", sd.get("encoder.pos_conv.0.parametrizations.weight.original1"))
    if pos is not None:
        kw.update(pos_conv_kernel=pos.shape[2], pos_conv_groups=dim // pos.shape[1])
    for theirs, ours in (("dropout", "dropout"), ("attention_dropout", "attn_dropout"),
                         ("activation_dropout", "act_dropout"), ("encoder_layerdrop", "layerdrop"),
                         ("feature_grad_mult", "conv_grad_mult")):
        if isinstance(fc.get(theirs), (int, float)):
            kw[ours] = float(fc[theirs])
    relax = fc.get("attention_relax", -1)
    kw["attn_relax"] = float(relax) if isinstance(relax, (int, float)) and relax > 0 else 0.0
    cfg = MERTConfig(**kw, n_codebooks=0, cqt_bins=0)  # the encoder; heads only when asked for (train.py --init)
    state, ignored = fairseq_state_to_ours(sd, cfg)
    if heads:
        head_cfg, head_state = fairseq_heads_to_ours(ckpt, dim, src)
        cfg = replace(cfg, **head_cfg)
        state.update(head_state)
        ignored = [k for k in ignored if not k.startswith(_FAIRSEQ_HEAD_KEYS)]
    if ignored:
        print(f"{src}: ignoring {len(ignored)} pretraining-head tensor(s): {', '.join(sorted(ignored)[:6])}"
              + (" ..." if len(ignored) > 6 else ""), file=sys.stderr)
    return cfg, state, src


_FAIRSEQ_HEAD_KEYS = ("label_embs_concat", "final_proj.", "encoder_cqt_model.fc.")


def _fairseq_dictionaries(ckpt: dict, src: str) -> list[list[str]] | None:
    """The symbol lists of the label Dictionaries pickled in a fairseq checkpoint's task_state (None if absent)."""
    ts = _plain(ckpt.get("task_state"))
    dicts = ts.get("dictionaries") if isinstance(ts, dict) else None
    if not dicts:
        return None
    out = []
    for i, d in enumerate(dicts):
        st = d.state if isinstance(d, _Inert) else d  # a Dictionary unpickles as an inert object holding its __dict__
        symbols = st.get("symbols") if isinstance(st, dict) else None
        if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
            raise CheckpointError(f"{src}: task_state dictionary {i} holds no list of symbols")
        out.append(symbols)
    return out


def fairseq_heads_to_ours(ckpt: dict, dim: int, src: str) -> tuple[dict, dict]:
    """A fairseq MERT checkpoint's pretraining heads in our layout: (config fields, tensors).

    label_embs_concat stacks one table per codebook of len(Dictionary) rows: fairseq's 4 special symbols
    (<s>, <pad>, </s>, <unk>) first, then the symbols of that codebook's dict.*.txt in file order. A label
    "c" is encoded through the Dictionary (its index of the symbol "c"), so code c's row is gathered through
    the pickled Dictionary, never assumed at c + 4; a code the Dictionary lacks was encoded as <unk> and gets
    that row. The special rows, never a target, are dropped. (fairseq's NCE also scores them as negatives,
    mert_model.py compute_pred; our loss scores the codes only.) final_proj is untied in MERT-v1
    (untie_final_proj: true): codebook k uses output rows [k F, (k + 1) F), as mert_model.py chunks it; a
    tied projection is copied to every codebook. The CQT head is encoder_cqt_model.fc (model_cqt_pred).
    """
    sd = ckpt["model"]
    fields_, state = {"n_codebooks": 0, "cqt_bins": 0}, {}
    table = sd.get("label_embs_concat")
    if table is not None:
        dicts = _fairseq_dictionaries(ckpt, src)
        if dicts is None:
            raise CheckpointError(f"{src}: label_embs_concat without the label dictionaries (task_state"
                                  f"['dictionaries']) that say which row holds which code; cannot map the label tables")
        sizes = [len(d) for d in dicts]
        if sum(sizes) != table.shape[0]:
            raise CheckpointError(f"{src}: label_embs_concat has {table.shape[0]} rows but the {len(dicts)} "
                                  f"dictionaries hold {sum(sizes)} symbols")
        rows_of = []
        for symbols in dicts:
            code_rows = {}
            for i, sym in enumerate(symbols):
                if sym.isdigit():
                    code_rows.setdefault(int(sym), i)
            if not code_rows:
                raise CheckpointError(f"{src}: a label dictionary holds no integer codes (symbols {symbols[:6]} ...)")
            unk = symbols.index("<unk>") if "<unk>" in symbols else 3
            rows_of.append((code_rows, unk))
        V = max(max(rows) for rows, _ in rows_of) + 1
        F_, offset, embs = table.shape[1], 0, []
        for k, ((code_rows, unk), n) in enumerate(zip(rows_of, sizes)):
            absent = V - len(code_rows)
            if absent:
                print(f"{src}: codebook {k}: {absent} of codes 0..{V - 1} are not in its dictionary; they take its "
                      f"<unk> row, as fairseq encoded them", file=sys.stderr)
            idx = torch.tensor([offset + code_rows.get(c, unk) for c in range(V)])
            embs.append(table.index_select(0, idx))
            offset += n
        state["label_embs"] = torch.stack(embs)  # (K, V, F): row c is code c
        K = len(dicts)
        w, b = sd.get("final_proj.weight"), sd.get("final_proj.bias")
        if w is None or w.shape[1] != dim or w.shape[0] not in (F_, K * F_):
            raise CheckpointError(f"{src}: final_proj.weight {None if w is None else tuple(w.shape)} does not fit "
                                  f"{K} codebooks of final_dim {F_} on width {dim}")
        if w.shape[0] == F_ and K > 1:  # tied: the same projection serves every codebook
            w, b = w.repeat(K, 1), None if b is None else b.repeat(K)
        state["final_proj.weight"] = w
        state["final_proj.bias"] = b if b is not None else torch.zeros(w.shape[0])
        fields_.update(n_codebooks=K, codebook_size=V, final_dim=F_)
    if "encoder_cqt_model.fc.weight" in sd:
        state["cqt_head.weight"] = sd["encoder_cqt_model.fc.weight"]
        state["cqt_head.bias"] = sd["encoder_cqt_model.fc.bias"]
        fields_["cqt_bins"] = sd["encoder_cqt_model.fc.weight"].shape[0]
    return fields_, state


# -----------------------------------------------------------------------------
# Hugging Face: the MERT-v1 folder that transformers' HubertModel loads

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Write tensors as a .safetensors file with the standard library (no safetensors package).

    Layout: an 8-byte little-endian header size N, N bytes of JSON header ({name: {"dtype", "shape",
    "data_offsets": [begin, end]}} with begin/end relative to the data, plus "__metadata__"), padded with
    spaces to a multiple of 8, then the raw little-endian tensor bytes back to back. Tensors go largest element
    first, so every tensor starts at a multiple of its element size (8-aligned data start, 8-, 4-, 2-, 1-byte
    tensors in that order).
    """
    if sys.byteorder != "little":
        raise RuntimeError("write_safetensors writes little-endian bytes and runs only on little-endian machines")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors code")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the raw bytes, without a copy


def hf_config(cfg: MERTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json of the MERT-v1 Hugging Face layout for the encoder of cfg.

    model_type "hubert": transformers' own HubertModel and AutoModel read it, no remote code needed. The
    fields m-a-p's remote MERTConfig adds (configuration_MERT.py: sample_rate, feature_extractor_cqt(_bins),
    deepnorm, attention_relax) stand beside the HuBERT ones with a plain MERT-v1's values, so the official
    remote code reads it too. The fine-tuning fields (SpecAugment, CTC) carry MERT-v1-95M's values; the
    encoder's outputs do not depend on them.
    """
    if cfg.norm_eps != 1e-5:  # modeling_hubert.py builds the conv extractor's norms with torch's default eps
        raise CheckpointError(f"norm_eps {cfg.norm_eps}: transformers' HuBERT conv extractor norms use eps 1e-5")
    return {
        "architectures": ["HubertModel"], "model_type": "hubert", "torch_dtype": str(dtype).removeprefix("torch."),
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "gelu", "do_stable_layer_norm": cfg.pre_ln,
        "layer_norm_eps": cfg.norm_eps,
        "num_feat_extract_layers": len(cfg.conv_dim), "conv_dim": list(cfg.conv_dim),
        "conv_kernel": list(cfg.conv_kernel), "conv_stride": list(cfg.conv_stride), "conv_bias": cfg.conv_bias,
        "feat_extract_norm": cfg.extractor_norm, "feat_extract_activation": "gelu",
        "feat_proj_layer_norm": cfg.proj_norm,
        "num_conv_pos_embeddings": cfg.pos_conv_kernel, "num_conv_pos_embedding_groups": cfg.pos_conv_groups,
        "conv_pos_batch_norm": False,
        "hidden_dropout": cfg.dropout, "attention_dropout": cfg.attn_dropout, "activation_dropout": cfg.act_dropout,
        "feat_proj_dropout": cfg.dropout, "feat_extract_dropout": 0.0, "final_dropout": cfg.dropout,
        "layerdrop": cfg.layerdrop, "initializer_range": 0.02,
        "apply_spec_augment": True, "mask_time_prob": 0.05, "mask_time_length": 10, "mask_time_min_masks": 2,
        "mask_feature_prob": 0.0, "mask_feature_length": 10, "mask_feature_min_masks": 0,
        "ctc_loss_reduction": "sum", "ctc_zero_infinity": False, "use_weighted_layer_sum": False,
        "classifier_proj_size": 256, "vocab_size": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        # m-a-p's MERTConfig fields
        "sample_rate": cfg.sample_rate, "feature_extractor_cqt": False, "feature_extractor_cqt_bins": 336,
        "deepnorm": False, "attention_relax": cfg.attn_relax if cfg.attn_relax > 0 else -1.0,
    }


def hf_preprocessor_config(cfg: MERTConfig) -> dict:
    """preprocessor_config.json: a Wav2Vec2FeatureExtractor at the model's rate, with MERT-v1's settings.

    MERT-v1's shipped file sets do_normalize and return_attention_mask to true (quoted in yizhilll/MERT
    issue #20), although pretraining read unnormalised audio (task.normalize: false in
    mert_fairseq/config/pretrain/MERT_RVQ-VAE_CQT_95M.yaml), as train.py and extract.py do. We follow the
    shipped file, so the processor behaves as it does for the official weights.
    """
    return {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
            "sampling_rate": cfg.sample_rate, "padding_side": "right", "padding_value": 0.0,
            "do_normalize": True, "return_attention_mask": True}


def ours_state_to_hf(state: dict) -> dict:
    """Our encoder state dict -> transformers HubertModel keys; pretraining heads dropped.

    Splits the fused qkv into q_proj/k_proj/v_proj and names the positional conv's weight norm as torch
    parametrizations (original0 = g, original1 = v), the layout transformers 5 saves and loads without
    renaming (transformers 4 renames it to weight_g/weight_v where its torch lacks parametrizations).
    """
    out = {}
    pc = "encoder.pos_conv_embed.conv."
    for k, v in state.items():
        if k.startswith(("final_proj.", "label_embs", "cqt_head.")):
            continue
        m = re.fullmatch(r"(encoder\.layers\.\d+\.attention\.)qkv\.(weight|bias)", k)
        if m:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{m.group(1)}{name}.{m.group(2)}"] = part
        elif k == pc + "weight_g":
            out[pc + "parametrizations.weight.original0"] = v
        elif k == pc + "weight_v":
            out[pc + "parametrizations.weight.original1"] = v
        else:
            out[k] = v
    return out


def save_hf_folder(cfg: MERTConfig, state: dict, folder, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False) -> Path:
    """Write the Hugging Face MERT-v1 layout (config.json, model.safetensors, preprocessor_config.json).

    Written under a temporary name beside `folder` and renamed into place, so `folder` is either the old one
    or the complete new one. A non-empty existing folder is replaced only with overwrite=True.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder}: folder exists and is not empty (overwrite it with --overwrite)")
    config = hf_config(cfg, dtype)  # refuses what transformers cannot express, before anything is written
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ours_state_to_hf(state).items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(cfg), indent=2) + "\n")
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if old.exists():
                os.replace(old, folder)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder

def save_pretrained(model: MERT, folder, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write model's encoder as a Hugging Face MERT-v1 folder that transformers' HubertModel loads (atomically).

    config.json (a HubertConfig with MERT's fields beside it), model.safetensors (no safetensors package
    needed) and preprocessor_config.json; the pretraining heads are left out, as in the official folders."""
    return save_hf_folder(model.config, model.state_dict(), folder, dtype=dtype, overwrite=overwrite)


# -----------------------------------------------------------------------------
# The command


def main(argv=None, prog: str = "convert.py") -> int:
    """Write a checkpoint's encoder alone, as our .pt (default) or a Hugging Face MERT-v1 folder."""
    p = argparse.ArgumentParser(
        prog=prog, description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n  python {prog} runs/95m/ckpt.pt models/mine.pt\n"
               f"  python {prog} runs/95m/ckpt.pt hf/mert-mine --format hf   # for transformers' HubertModel\n"
               f"  python {prog} MERT-v1-95M_fairseq.pt models/mert-95m.pt   # a fairseq checkpoint to ours")
    p.add_argument("ckpt", help="a checkpoint written by train.py (also: a fairseq MERT .pt, a Hugging Face folder)")
    p.add_argument("out", help="the .pt file (--format pt) or the folder (--format hf) to write, atomically")
    p.add_argument("--format", default="pt", choices=["pt", "hf"],
                   help="pt (default): our encoder checkpoint (extract.py, probe.py); hf: the Hugging Face MERT-v1 "
                        "layout (config.json, model.safetensors, preprocessor_config.json) that transformers' "
                        "HubertModel loads")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the weights (default: float16 for pt, float32 for hf as in MERT-v1's files)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .pt file or non-empty --format hf "
                                                            "folder")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float16" if args.format == "pt" else "float32"))
    meta = {}
    problem = _output_problem(Path(args.out), args.format == "hf", args.overwrite)
    if problem:  # before any work
        print(f"{prog}: {args.out}: {problem}", file=sys.stderr)
        return 2
    if not Path(args.ckpt).exists() and not _hub_id(args.ckpt):
        print(f"{prog}: {args.ckpt}: no such file or folder", file=sys.stderr)
        return 2
    try:
        return _convert(args, dtype, meta, prog)
    except KeyboardInterrupt:  # the writers remove their temp files: nothing partial stays
        print(f"{prog}: interrupted (Ctrl-C); {args.out} not written", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, an I/O error: the writers removed their temp files
        print(f"{prog}: {args.out}: could not be written ({' '.join(str(e).split())})", file=sys.stderr)
        return 1


def _hub_id(name: str) -> bool:
    """'org/name' with no such local path: a hub id that load_checkpoint looks up in the local cache."""
    return name.count("/") == 1 and not name.startswith((".", "/"))


def _output_problem(out: Path, folder: bool, overwrite: bool) -> str | None:
    """Why out cannot be written (exists without --overwrite, not writable), or None; asked before any work.
    A file made and removed in the nearest existing folder proves it writable (a read-only file system refuses
    root too, which permission bits do not)."""
    if folder and out.exists() and not out.is_dir():
        return "exists and is not a folder"
    if not folder and out.is_dir():
        return "is a folder (--format hf writes folders)"
    if not overwrite and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
        return "exists; pass --overwrite to replace it"
    here = out.absolute() if folder else out.absolute().parent
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        return f"cannot be written: {here} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=here)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"cannot be written in {here} ({' '.join(str(e).split())})"
    return None


def _convert(args, dtype, meta: dict, prog: str) -> int:
    """The export itself, once main() has checked the flags and the output location."""
    try:
        try:  # our checkpoints carry step and configs worth keeping in a .pt export
            obj = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        except Exception:  # a folder, a fairseq pickle, ...: load_checkpoint reads it or names the problem
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj:
            cfg, state, src = MERTConfig.from_dict(obj["config"]), obj["model"], args.ckpt
            meta = {k: obj[k] for k in ("step", "train_config", "data") if k in obj}
        elif is_fairseq(obj):  # read already: map it without reading the file again
            cfg, state, src = _from_fairseq(obj, args.ckpt)
        else:
            cfg, state, src = load_checkpoint(args.ckpt)
        model = MERT(cfg)
        load_state_strict(model, state, src)
    except (CheckpointError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    if args.format == "hf":
        try:
            folder = save_pretrained(model, args.out, dtype=dtype, overwrite=args.overwrite)
        except FileExistsError as e:  # made since main() looked
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
        except CheckpointError as e:
            print(f"{prog}: {args.ckpt}: cannot be expressed as a HuBERT config: {e}", file=sys.stderr)
            return 1
        mb = (folder / "model.safetensors").stat().st_size / 1e6
        print(f"{prog}: {folder}/ (Hugging Face MERT-v1 layout: config.json, model.safetensors {mb:.1f} MB "
              f"{args.dtype or 'float32'}, preprocessor_config.json; step {meta.get('step')})")
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out, heads=False, dtype=dtype, **meta)
    print(f"{prog}: {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, step {meta.get('step')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
