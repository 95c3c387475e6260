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
    length_batches,
    pad,
    score_batches,
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
    ids, _ = rm.encode(convs[-2:-1])
    assert rm.pad_id in ids[0]  # scored alone, unpadded, so its last token is still found


def test_template_bos_written_once(tiny_dir):
    from fusechat.demo.tiny import TinySpec, make_tiny

    path = make_tiny(tiny_dir / "reward_llama3", TinySpec(arch="llama", chat="llama3", seed=5), reward=True)
    rm = RewardModel(RewardModelConfig(path=str(path), dtype="float32"))
    ids, _ = rm.encode([conversation([{"role": "user", "content": "hi"}], "hello")])
    assert ids[0].count(rm.tokenizer.bos_token_id) == 1 and ids[0][0] == rm.tokenizer.bos_token_id
    rendered = rm.tokenizer.apply_chat_template(
        conversation([{"role": "user", "content": "hi"}], "hello"), tokenize=False
    )
    assert rm.tokenizer.decode(ids[0]) == rendered


def test_out_of_memory_halves_the_batch(tiny_reward):
    rm = RewardModel(RewardModelConfig(path=str(tiny_reward), dtype="float32"))
    convs = _conversations(20)
    seqs, _ = rm.encode(convs)
    sizes = []

    def forward(idx):  # a device that holds at most 3 sequences at once
        sizes.append(len(idx))
        if len(idx) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return rm.forward([seqs[i] for i in idx])

    batches = length_batches([len(s) for s in seqs], 16)
    scores, halvings = score_batches(forward, batches, len(seqs))
    assert halvings == 3 and sizes[:4] == [16, 8, 4, 2] and max(sizes[4:]) == 2
    direct = rm.score(convs, batch_size=1).rewards
    assert max(abs(a - b) for a, b in zip(scores, direct, strict=True)) < 1e-4


def test_pad_sides():
    ids, mask, pos = pad([[5, 6, 7], [8]], 0, "left")
    assert ids == [[5, 6, 7], [0, 0, 8]] and mask == [[1, 1, 1], [0, 0, 1]] and pos == [[0, 1, 2], [0, 0, 0]]
    ids, mask, pos = pad([[5, 6, 7], [8]], 0, "right")
    assert ids == [[5, 6, 7], [8, 0, 0]] and mask == [[1, 1, 1], [1, 0, 0]] and pos == [[0, 1, 2], [0, 0, 0]]
    assert length_batches([1, 5, 3, 4], 2, [False, False, True, False]) == [[1, 3], [0], [2]]


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
