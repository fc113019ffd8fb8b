"""Tiny models with random weights, random direction sets and data: for tests, benchmarks and examples that
must run in seconds without a model hub."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from sqsd_callback.directions import DirectionSet
from sqsd_callback.layers import find_targets
from sqsd_callback.types import IGNORE_INDEX, Direction

VOCAB = 96
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, pad_token_id=0)
"""LlamaConfig arguments of SmolLM2-135M's shape, for benchmarks with random weights."""


def tiny_base(arch: str = "llama", seed: int = 0, attn: str = "eager", layers: int = 2, hidden: int = 32,
              intermediate: int = 48):
    """A ``layers``-layer causal LM with random weights and ``attn`` attention: ``llama``, ``qwen2`` or ``gpt2``
    (GPT-2's Conv1D layers store their weights in×out; its dropout is off, as the others', so a training step is the
    oracles' deterministic pass). ``hidden`` wide, with 4 heads (2 key/value heads) and an ``intermediate``-wide MLP
    (GPT-2's is 4 × ``hidden``)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                                          pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                                          attn_implementation=attn, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0))
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, attn_implementation=attn)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def tiny_lora(arch: str = "llama", targets=("q_proj", "v_proj", "down_proj"), r: int = 4, dropout: float = 0.0,
              rslora: bool = False, seed: int = 0, attn: str = "eager", layers: int = 2):
    """A tiny model with LoRA whose B factors are nonzero (so both factor gradients matter)."""
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=dropout, use_rslora=rslora)
    model = get_peft_model(tiny_base(arch, seed, attn, layers), config)
    return _nonzero_b(model, seed + 1)


QLORA_SIZES = dict(hidden=64, intermediate=128)
"""tiny_qlora's widths. Every Linear it quantizes is then out × in with out a multiple of 32 (32, 64, 128) and in a
multiple of 64 (64, 128), bitsandbytes' 4-bit block size, as each of its CPU 4-bit paths needs: the AVX512-BF16
repacking of a weight into its [K/blocksize, N] scales and 32-row tiles (functional._convert_weight_packed_for_cpu:
N % 32 == 0, absmax reshaped to N × K // blocksize; 32 inputs gave "shape '[32, 0]' is invalid for input of size
16"), the packed gemm's loop over K in blocksize groups, and the AVX-512 dequantization that reads row r's scales at
absmax[r · (K // blocksize)] (csrc/cpu_ops.cpp), wrong for K not a multiple of the block size."""


def tiny_qlora(folder, bits: int = 4, targets=("q_proj", "v_proj", "down_proj"), r: int = 4, seed: int = 0):
    """``tiny_lora``'s model, ``QLORA_SIZES`` wide, with its base weights quantized by bitsandbytes as QLoRA loads
    them (4-bit NF4 with fp32 compute, or LLM.int8), through a checkpoint written to ``folder``; the same seed gives
    the same model.

    Its 4-bit layers dequantize and multiply in fp32 on every CPU. On a CPU with AVX512-BF16, bitsandbytes would
    otherwise repack a Linear4bit's weight in place the first time the layer runs in eval mode on an input that needs
    no gradient (``Linear4bit.forward``), after which every forward, training's too, runs a bf16 kernel
    (``bitsandbytes::gemv_4bit``) with no backward: the scoring engines' eval-mode passes would then round to bf16
    where training does not, and lose the gradient through the base weights. The tests compare engines and the
    training step at 1e-5, so they pin the one kernel every CPU has."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if not (folder / "config.json").is_file():
        tiny_base("llama", seed, **QLORA_SIZES).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4") \
        if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu",
                                                dtype=torch.float32)
    for module in base.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # Linear4bit, where bitsandbytes has the AVX512-BF16 path
            module.support_avx512bf16_for_cpu = False
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    return _nonzero_b(model, seed + 1)


def _nonzero_b(model, seed: int):
    """Random LoRA B factors (PEFT starts them at zero), so that both factor gradients matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_full_ft(arch: str = "llama", modules=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"), seed: int = 0):
    """A tiny model trained in full on some of its attention and MLP Linear layers (embeddings, norms, head and
    the other Linears frozen)."""
    model = tiny_base(arch, seed)
    for name, p in model.named_parameters():
        p.requires_grad_(any(m in name for m in modules))
    return model


def random_set(model, kind: str, name: str, rank: int | None = 3, seed: int = 0, modules=None) -> DirectionSet:
    """Random directions for the model's LoRA modules: low-rank (``rank``) or dense (``rank=None``)."""
    g = torch.Generator().manual_seed(seed)
    dirs = {}
    for m, t in find_targets(model).items():
        if modules is not None and not any(s in m for s in modules):
            continue
        out, inp = t.shape
        if rank is None:
            dirs[m] = Direction(dense=torch.randn(out, inp, generator=g))
        else:
            dirs[m] = Direction(B=torch.randn(out, rank, generator=g), A=torch.randn(rank, inp, generator=g))
    return DirectionSet(dirs, kind, name)


def three_sets(model):
    """Two danger sets (one low-rank, one dense) and one safety set."""
    return ([random_set(model, "danger", "d1", seed=1), random_set(model, "danger", "d2", rank=None, seed=2)],
            [random_set(model, "safety", "s1", seed=3)])


def random_samples(n: int = 8, seed: int = 0, min_len: int = 6, max_len: int = 14, prompt_len: int = 3):
    """Token sequences of varied length whose first ``prompt_len`` tokens are not scored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt_len + ids[prompt_len:],
                    "attention_mask": [1] * L})
    return out


def pad_collator(side: str = "right"):
    """Pads input_ids (0), labels (−100) and attention_mask (0) on the given side; passes ``index`` through."""
    def collate(features):
        T = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = T - len(f["input_ids"])
            for key, value in (("input_ids", 0), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
                row = list(f[key])
                out[key].append([value] * pad + row if side == "left" else row + [value] * pad)
        if "index" in features[0]:
            out["index"] = [f["index"] for f in features]
        return {k: torch.tensor(v) for k, v in out.items()}
    return collate


def pack_collator():
    """Padding-free packing as TRL does it: the micro-batch's examples concatenated into one row, position_ids
    restarting at each example, no attention_mask, the label of each example's first token −100."""
    def collate(features):
        ids, labels, pos = [], [], []
        for f in features:
            ids += list(f["input_ids"])
            labels += [IGNORE_INDEX] + list(f["labels"])[1:]
            pos += list(range(len(f["input_ids"])))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos])}
    return collate


def rel_err(a, b, scale: float | None = None) -> float:
    """max |a − b| over paired values (None must pair with None), relative to ``scale``, the magnitude the values
    are judged against: max |b| unless given. A score formed from other scores (``sqsd`` = danger − safety; ``danger``
    and ``safety``, means over sets) is judged against its terms (``score_scale``, ``score_err``), not its own max |·|,
    which cancellation can make arbitrarily small. ``a`` and ``b`` must have the same length."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"rel_err: {len(a)} values against {len(b)} reference values; they must pair one to one")
    num = den = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None, (x, y)
            continue
        num, den = max(num, abs(x - y)), max(den, abs(y))
    if scale is not None:
        den = scale
    return num / den if den else num


def _max_abs(rows, key: str) -> float:
    return max((abs(r[key]) for r in rows if r.get(key) is not None), default=0.0)


def score_scale(rows, key: str) -> float:
    """The magnitude ``key``'s deviations from the reference ``rows`` are judged against: max |·| for a set's own
    score (``danger/d1``); for ``danger`` or ``safety``, the mean over that kind's sets of their max |·| (the kind's
    score is their mean); for ``sqsd`` = danger − safety, the sum of danger's and safety's scales. So where every term
    is within tol × its scale, the combination is within tol × its scale, however much the terms cancel. A key whose
    terms the rows do not carry falls back to its own max |·|."""
    if key == "sqsd":
        scale = score_scale(rows, "danger") + score_scale(rows, "safety")
    elif key in ("danger", "safety"):
        sets = sorted({k for r in rows for k in r if k.startswith(key + "/")})
        scale = sum(_max_abs(rows, k) for k in sets) / len(sets) if sets else 0.0
    else:
        scale = 0.0
    return scale or _max_abs(rows, key)


def score_err(got, want, key: str) -> float:
    """``rel_err`` of score ``key`` between paired rows ``got`` and reference rows ``want``, relative to
    ``score_scale(want, key)``: max |got − want| / that scale."""
    return rel_err([r[key] for r in got], [r[key] for r in want], score_scale(want, key))


def word_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w3 … w{vocab_size-1}`` with <pad>=0, <eos>=1, <unk>=2 (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
