"""The reward-model scorer on real tiny reward models: batching must not change a score."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fusechat.config import RewardModelConfig
from fusechat.errors import UserError
from fusechat.score.reward_model import (
    RewardModel,
    check_reward_model,
    conversation,
    pad,
    score_batches,
    token_batches,
)

pytestmark = pytest.mark.slow


def _conversations(n: int = 40, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    convs = [
        conversation([{"role": "user", "content": "question " * rng.randint(1, 4)}], "word " * rng.randint(0, 18))
        for _ in range(n)
    ]
    convs.append(conversation([{"role": "user", "content": "hi"}], "a reply holding the pad token <|pad|> inside"))
    convs.append(conversation([{"role": "user", "content": "hi"}], "long " * 200))  # over max_length
    return convs


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_size_and_padding_do_not_change_scores(tiny_reward, side):
    rm = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="float32", padding_side=side, max_length=160))
    convs = _conversations()
    one = rm.score(convs, batch_size=1)
    sixteen = rm.score(convs, batch_size=16)
    assert max(abs(a - b) for a, b in zip(one.rewards, sixteen.rewards, strict=True)) < 1e-4
    assert one.truncated[-1] and not any(one.truncated[:-1]) and one.num_tokens[-1] == 160
    assert one.verdicts[-1] == "truncated" and set(one.verdicts[:-1]) == {"ok"}
    ids = rm.encode(convs[-2:-1]).ids
    assert rm.pad_id in ids[0]  # scored alone, unpadded, so its last token is still found
    tight = RewardModel(
        RewardModelConfig(path=str(tiny_reward), dtype="float32", padding_side=side, max_length=160, batch_tokens=300)
    )
    assert max(abs(a - b) for a, b in zip(one.rewards, tight.score(convs).rewards, strict=True)) < 1e-4


def test_template_bos_written_once(tiny_dir):
    from fusechat.demo.tiny import TinySpec, make_tiny

    path = make_tiny(tiny_dir / "reward_llama3", TinySpec(arch="llama", chat="llama3", seed=5), reward=True)
    rm = RewardModel(RewardModelConfig(path=str(path), dtype="float32"))
    ids = rm.encode([conversation([{"role": "user", "content": "hi"}], "hello")]).ids
    assert ids[0].count(rm.tokenizer.bos_token_id) == 1 and ids[0][0] == rm.tokenizer.bos_token_id
    rendered = rm.tokenizer.apply_chat_template(
        conversation([{"role": "user", "content": "hi"}], "hello"), tokenize=False
    )
    assert rm.tokenizer.decode(ids[0]) == rendered


def test_out_of_memory_halves_the_token_budget(tiny_reward):
    rm = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="float32"))
    convs = _conversations(20)
    seqs = rm.encode(convs).ids
    lengths = [len(s) for s in seqs]
    widest = max(lengths)
    sizes = []

    def forward(idx):  # a device that holds at most 3 of the widest sequences at once
        sizes.append(len(idx))
        if len(idx) * max(lengths[i] for i in idx) > 3 * widest:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return rm.forward([seqs[i] for i in idx])

    batches = token_batches(lengths, 16 * widest, 16)
    scores, failures, halvings = score_batches(forward, batches, lengths)
    assert halvings == 3 and sizes[:4] == [16, 8, 4, 2] and not failures
    direct = rm.score(convs, batch_size=1).rewards
    assert max(abs(a - b) for a, b in zip(scores, direct, strict=True)) < 1e-4


def test_a_row_that_raises_inside_the_model_fails_alone(tiny_reward):
    """A hook on the real model's embedding raises for one row's token: only that row goes unscored."""
    rm = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="float32"))
    convs = _conversations(12)
    convs[5] = conversation([{"role": "user", "content": "hi"}], "a reply with a ~ in it")
    poison = rm.tokenizer.convert_tokens_to_ids("~")

    def fault(_, args):
        if (args[0] == poison).any():
            raise RuntimeError("CUDA error: device-side assert triggered")

    direct = rm.score(convs, batch_size=1)
    handle = rm.model.get_input_embeddings().register_forward_pre_hook(fault)
    try:
        got = rm.score(convs, batch_size=8)
        assert got.verdicts[5] == "error" and got.rewards[5] is None and got.num_tokens[5] is None
        assert got.errors == {5: "RuntimeError: CUDA error: device-side assert triggered"}
        others = [i for i in range(len(convs)) if i != 5]
        assert max(abs(got.rewards[i] - direct.rewards[i]) for i in others) < 1e-4
        with pytest.raises(RuntimeError, match="device-side assert"):  # no row scores: the model is broken
            rm.score([convs[5], convs[5]])
    finally:
        handle.remove()


def test_truncation_keeps_the_prompt(tiny_reward):
    rm = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="float32", max_length=80))
    user = [{"role": "user", "content": "question " * 4}]
    long_reply = conversation(user, "answer " * 30)
    long_prompt = conversation([{"role": "user", "content": "q" * 90}], "a")
    enc = rm.encode([long_reply, long_prompt])
    prompt = rm.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    prompt_ids = rm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert enc.verdicts == ["truncated", "prompt_too_long"] and enc.ids[1] == []
    assert len(enc.ids[0]) == 80 and enc.ids[0][: len(prompt_ids)] == prompt_ids
    got = rm.score([long_reply, long_prompt])
    assert got.verdicts == ["truncated", "prompt_too_long"] and got.truncated == [True, True]
    assert got.rewards[1] is None and got.num_tokens == [80, None]
    assert got.rewards[0] == pytest.approx(rm.forward([enc.ids[0]])[0], abs=1e-6)


def test_pad_sides_and_token_batches():
    ids, mask, pos = pad([[5, 6, 7], [8]], 0, "left")
    assert ids == [[5, 6, 7], [0, 0, 8]] and mask == [[1, 1, 1], [0, 0, 1]] and pos == [[0, 1, 2], [0, 0, 0]]
    ids, mask, pos = pad([[5, 6, 7], [8]], 0, "right")
    assert ids == [[5, 6, 7], [8, 0, 0]] and mask == [[1, 1, 1], [1, 0, 0]] and pos == [[0, 1, 2], [0, 0, 0]]
    assert token_batches([1, 5, 3, 4], 100, 2, [False, False, True, False]) == [[1, 3], [0], [2]]
    assert token_batches([10, 50, 30, 40, 20], 100, 8) == [[1, 3], [2, 4, 0]]
    assert token_batches([10, 50, 30, 40, 20], 99, 8) == [[1], [3, 2], [4, 0]]
    assert token_batches([10, 50, 30, 40, 20], 1000, 2) == [[1, 3], [2, 4], [0]]
    assert token_batches([5, 5, 5], 1, 8) == [[0], [1], [2]]  # wider than the budget: alone


CUSTOM_HEAD = '''
from dataclasses import dataclass
import torch
from transformers import LlamaForSequenceClassification
from transformers.utils import ModelOutput


@dataclass
class RewardOutput(ModelOutput):
    score: torch.FloatTensor = None
    rewards: torch.FloatTensor = None


class TinyArmoRM(LlamaForSequenceClassification):
    """ArmoRM-like: several objective heads, one gated `.score`."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        rewards = torch.cat([out.logits, 2 * out.logits, 3 * out.logits], dim=-1)
        return RewardOutput(score=rewards.mean(-1, keepdim=True), rewards=rewards)
'''


def test_custom_head_with_score_field(tiny_reward, tmp_path):
    import shutil

    path = tmp_path / "armo"
    shutil.copytree(tiny_reward, path)
    (path / "modeling_tiny_armo.py").write_text(CUSTOM_HEAD)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmoRM"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"^score.reward_model.trust_remote_code: .* custom reward head"):
        check_reward_model(RewardModelConfig(path=str(path)))
    convs = _conversations(6)
    custom = RewardModel(RewardModelConfig(path=str(path), trust_remote_code=True, dtype="float32"))
    plain = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="float32"))
    got, base = custom.score(convs, batch_size=4).rewards, plain.score(convs, batch_size=1).rewards
    assert got == pytest.approx([2 * b for b in base], abs=1e-4)  # mean of 1x, 2x, 3x


def test_float32_head_of_a_bf16_classifier(tiny_reward):
    convs = _conversations(8)
    exact = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="float32")).score(convs).rewards
    bf16 = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="bfloat16"))
    assert bf16.model.score.weight.dtype == torch.float32 and bf16.model.model.norm.weight.dtype == torch.bfloat16
    got = bf16.score(convs).rewards
    assert max(abs(a - b) for a, b in zip(got, exact, strict=True)) < 0.05
    published = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="bfloat16", head_dtype="model"))
    assert published.model.score.weight.dtype == torch.bfloat16
