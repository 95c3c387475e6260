"""Tiny tokenizers and models built locally in seconds (no hub access): the demo world and the tests use them.

Tokenizers are character-level (`char`) or byte-level BPE trained on a given corpus (`bpe`), each with one of
four chat-template families that mimic the real ones: ChatML (Qwen), Llama-3 (the template itself emits BOS,
and the tokenizer adds one too with add_special_tokens: the classic double-BOS trap), Mistral ([INST]) and Gemma
(`<start_of_turn>model`, content trimmed, a system turn rejected as Gemma-2's template does).
Assistant content is wrapped in `{% generation %}` so assistant masks work.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eot_id|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + '\n' }}"
        "{% else %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ '<start_of_turn>model\n' }}"
        "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<start_of_turn>user\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}

# Special tokens per family: (bos, eos = end of turn, pad, extra specials)
SPECIALS = {
    "chatml": ("<|endoftext|>", "<|im_end|>", "<|pad|>", ["<|im_start|>"]),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|pad|>",
        ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
    ),
    "mistral": ("<s>", "</s>", "<pad>", ["[INST]", "[/INST]"]),
    "gemma": ("<bos>", "<end_of_turn>", "<pad>", ["<start_of_turn>", "<eos>"]),
}
ROLE_WORDS = ["user", "assistant", "system"]
DEFAULT_CHARS = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")


@dataclass(frozen=True)
class TinySpec:
    """One tiny model: architecture, tokenizer kind and chat family, sizes."""

    arch: str = "llama"  # llama, qwen2, mistral, gemma2
    tokenizer: str = "char"  # char or bpe
    chat: str = "chatml"  # chatml, llama3, mistral, gemma
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 256
    max_positions: int = 512
    seed: int = 0


def build_tokenizer(
    chat: str = "chatml", kind: str = "char", corpus: Iterable[str] | None = None, vocab_size: int = 400
):
    """A fast tokenizer with a chat template. `bpe` needs a corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, extra = SPECIALS[chat]
    specials = [pad, bos, eos, "<unk>", *extra]
    if kind == "char":
        vocab = {tok: i for i, tok in enumerate(specials)}
        for ch in DEFAULT_CHARS:
            vocab.setdefault(ch, len(vocab))
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    elif kind == "bpe":
        if corpus is None:
            raise ValueError("a bpe tokenizer needs a corpus")
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.add_special_tokens(specials)
    tok.add_tokens(ROLE_WORDS)
    if chat == "llama3":
        # Real Llama-3 tokenizers prepend BOS on encode(add_special_tokens=True) although the template emits one.
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )
    hf.add_special_tokens({"additional_special_tokens": extra})
    hf.chat_template = TEMPLATES[chat]
    return hf


def backbone_config(spec: TinySpec, tokenizer, *, tie_word_embeddings: bool) -> dict:
    """The transformer's sizes and special ids, as config keyword arguments."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(spec: TinySpec, tokenizer, *, reward: bool = False):
    """A randomly initialised tiny causal LM (or a one-output sequence classifier when `reward`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(spec.seed)
    kwargs = backbone_config(spec, tokenizer, tie_word_embeddings=True)
    if spec.arch == "gemma2":
        kwargs.update(head_dim=spec.hidden // spec.heads, sliding_window=spec.max_positions)
    if spec.arch == "mistral":
        kwargs.update(sliding_window=None)
    if reward:
        kwargs.update(num_labels=1)
    config = AutoConfig.for_model(spec.arch, **kwargs)
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    return cls.from_config(config)


def save_tiny(model, tokenizer, out: str | Path) -> Path:
    """Save model + tokenizer + generation config (stop on the end-of-turn token) as one HF directory."""
    from transformers import GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not getattr(model.config, "num_labels", None) or model.config.architectures[0].endswith("CausalLM"):
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(out)
    return out


def make_tiny(
    out: str | Path, spec: TinySpec = TinySpec(), *, reward: bool = False, corpus: Iterable[str] | None = None
) -> Path:
    """Build and save a tiny model directory in one call."""
    tok = build_tokenizer(spec.chat, spec.tokenizer, corpus)
    model = build_model(spec, tok, reward=reward)
    return save_tiny(model, tok, out)


# The published checkpoint's remote code, reduced to the import that fails on transformers 5 (so that nothing can
# run it by accident, exactly as with the real file); fusechat loads this layout natively.
ARMORM_REMOTE_CODE = '''"""Stand-in for modeling_custom.py of RLHFlow/ArmoRM-Llama3-8B-v0.1 (fusechat's tiny ArmoRM layout)."""
from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING  # noqa: F401  (gone in transformers 5)
from transformers.utils import add_start_docstrings_to_model_forward  # noqa: F401
'''


def make_tiny_armorm(
    out: str | Path,
    spec: TinySpec = TinySpec(arch="llama", chat="llama3", seed=7),
    *,
    num_objectives: int = 19,
    gating_hidden_dim: int = 32,
    gating_n_hidden: int = 3,
    gating_temperature: float = 10.0,
    corpus: Iterable[str] | None = None,
) -> Path:
    """A random tiny reward model with the layout of `RLHFlow/ArmoRM-Llama3-8B-v0.1`: config.json with
    `model_type: llama`, `architectures: [LlamaForRewardModelWithGating]`, an `auto_map` to remote code and the
    gating keys; safetensors with a bf16 backbone (`model.*`) and a float32 head (`regression_layer`, `gating.*`,
    `reward_transform_matrix`); a Llama-3-like tokenizer (`<|eot_id|>`, `<|start_header_id|>`, ...); and a
    `modeling_custom.py` that, like the real one, does not import on transformers 5. The head is drawn wide enough
    that the gate is far from uniform and every term of the score matters."""
    import torch
    from transformers import LlamaConfig

    from fusechat.score.armorm import ARCHITECTURE, LlamaForRewardModelWithGating

    if spec.chat != "llama3":
        raise ValueError("ArmoRM gates on the Llama-3 assistant header: use chat='llama3'")
    tok = build_tokenizer(spec.chat, spec.tokenizer, corpus)
    torch.manual_seed(spec.seed)
    config = LlamaConfig(**backbone_config(spec, tok, tie_word_embeddings=False), num_labels=1)
    config.update(
        {
            "num_objectives": num_objectives,
            "gating_temperature": gating_temperature,
            "gating_hidden_dim": gating_hidden_dim,
            "gating_n_hidden": gating_n_hidden,
            "architectures": [ARCHITECTURE],
            "auto_map": {"AutoModelForSequenceClassification": f"modeling_custom.{ARCHITECTURE}"},
        }
    )
    model = LlamaForRewardModelWithGating(config)
    with torch.no_grad():
        for layer in model.gating.layers:
            layer.weight.normal_(0.0, 1.5 / layer.in_features**0.5)
            layer.bias.normal_(0.0, 0.5)
        model.gating.layers[-1].weight.mul_(gating_temperature)
        model.gating.logit_scale.fill_(1.3)
        model.regression_layer.weight.normal_(0.0, 0.05)
        model.reward_transform_matrix.add_(0.1 * torch.randn(num_objectives, num_objectives))
    model.model.to(torch.bfloat16)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "dtype": "bfloat16"}, indent=2, sort_keys=True) + "\n")
    (out / "modeling_custom.py").write_text(ARMORM_REMOTE_CODE)
    return out
