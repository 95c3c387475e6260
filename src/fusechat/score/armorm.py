"""ArmoRM (`RLHFlow/ArmoRM-Llama3-8B-v0.1`) without its remote code.

The checkpoint's `modeling_custom.py` imports names transformers 5 removed, so it cannot run on our stack. This
module is the same model over transformers' own `LlamaModel`, loading the same tensors (`model.*`,
`regression_layer.weight`, `gating.layers.N.weight/bias`, `gating.logit_scale`, `reward_transform_matrix`) and the
same config keys (`num_objectives`, `gating_temperature`, `gating_hidden_dim`, `gating_n_hidden`), and scoring as
the published model does:

- objective rewards = `regression_layer`(hidden state of the last real token);
- gate = softmax(MLP(hidden state where the LAST `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`
  pattern starts) / temperature) x logit_scale, ReLU between the MLP's layers;
- score = sum(gate x (rewards @ reward_transform_matrix)).

Two differences, neither of which changes an unpadded score: the last real token and the pattern are found
through the attention mask (so either padding side works, and the pad id is never looked for), and the pattern's
ids are set by the caller from the model's own tokenizer (`gating_pattern`) instead of being constants. The head
(regression, gating, transform) is kept and computed in float32 unless the config says otherwise
(`fusechat_head_in_model_dtype`): the published model, loaded in bf16, rounds it to bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

ARCHITECTURE = "LlamaForRewardModelWithGating"
GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
HEAD = ("regression_layer", "gating", "reward_transform_matrix")


def is_armorm(config: dict) -> bool:
    return ARCHITECTURE in (config.get("architectures") or [])


class GatingNetwork(nn.Module):
    """`n_hidden` Linear+ReLU layers, a last Linear, then softmax(x / temperature) x logit_scale."""

    def __init__(self, in_features: int, out_features: int, temperature: float, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        dims = [in_features] + [hidden_dim] * n_hidden + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = self.layers[-1](x)
        return F.softmax(x / self.temperature, dim=1) * self.logit_scale[0]


@dataclass
class RewardOutput(ModelOutput):
    score: torch.FloatTensor | None = None  # [batch]: the gated preference score
    rewards: torch.FloatTensor | None = None  # [batch, num_objectives]
    gating_output: torch.FloatTensor | None = None  # [batch, num_objectives]
    logits: torch.FloatTensor | None = None  # same as score, as the published model returns it


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    # Kept in float32 when the backbone loads in bf16/fp16 (see the module docstring); emptied per instance
    # when the config asks for the published behaviour.
    _keep_in_fp32_modules_strict = list(HEAD)

    def __init__(self, config):
        super().__init__(config)
        n = getattr(config, "num_objectives", 19)
        self.num_objectives = n
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, n, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.eye(n), requires_grad=False)
        self.gating = GatingNetwork(
            config.hidden_size,
            n,
            temperature=getattr(config, "gating_temperature", 10),
            hidden_dim=getattr(config, "gating_hidden_dim", 1024),
            n_hidden=getattr(config, "gating_n_hidden", 3),
        )
        self.gating_pattern: list[int] | None = getattr(config, "gating_token_pattern", None)
        self.post_init()
        if getattr(config, "fusechat_head_in_model_dtype", False):
            self._keep_in_fp32_modules_strict = set()

    def _init_weights(self, module):
        super()._init_weights(module)
        # transformers' init functions skip tensors a checkpoint already filled
        if module is self:
            init.eye_(self.reward_transform_matrix)
        elif isinstance(module, GatingNetwork):
            init.ones_(module.logit_scale)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> RewardOutput:
        hidden = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        ).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = torch.arange(input_ids.shape[0], device=hidden.device)
        last = last_real_token(attention_mask).to(hidden.device)
        start = gating_positions(input_ids, attention_mask, self.gating_pattern).to(hidden.device)
        head_dtype = self.regression_layer.weight.dtype
        rewards = self.regression_layer(hidden[rows, last].to(head_dtype))
        gate = self.gating(hidden[rows, start].to(head_dtype))
        score = torch.sum(gate * (rewards @ self.reward_transform_matrix), dim=1)
        return RewardOutput(score=score, rewards=rewards, gating_output=gate, logits=score)


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost attended position of each row (either padding side)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def gating_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, pattern: list[int] | None) -> torch.Tensor:
    """Start of the last occurrence of `pattern` among each row's real tokens; ValueError naming the row if absent."""
    if not pattern:
        raise ValueError(f"{ARCHITECTURE}: gating_pattern is not set (the token ids of {GATING_TEXT!r})")
    width = len(pattern)
    if input_ids.shape[-1] < width:
        raise ValueError(f"{ARCHITECTURE}: the gating token pattern is not in row 0 (sequence too short)")
    want = torch.tensor(pattern, device=input_ids.device, dtype=input_ids.dtype)
    hit = (input_ids.unfold(1, width, 1) == want).all(-1) & attention_mask.unfold(1, width, 1).bool().all(-1)
    starts = torch.arange(hit.shape[-1], device=input_ids.device)
    found = torch.where(hit, starts, -1).max(-1).values
    missing = (found < 0).nonzero()
    if len(missing):
        raise ValueError(f"{ARCHITECTURE}: the gating token pattern {GATING_TEXT!r} is not in row {int(missing[0])}")
    return found


def load(path: str, dtype, *, head_in_float32: bool, tokenizer) -> LlamaForRewardModelWithGating:
    """The model from a checkpoint of the ArmoRM layout (its auto_map is not followed), gating on the assistant
    header as `tokenizer` writes it (unless config.json names the ids in `gating_token_pattern`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)  # model_type llama: a LlamaConfig, remote code untouched
    config.fusechat_head_in_model_dtype = not head_in_float32
    model = LlamaForRewardModelWithGating.from_pretrained(path, config=config, dtype=dtype)
    if not model.gating_pattern:
        model.gating_pattern = tokenizer.encode(GATING_TEXT, add_special_tokens=False)
    return model
