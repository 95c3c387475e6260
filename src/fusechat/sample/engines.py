"""Two generation engines behind one small interface: token-id prompts in, k completions (token ids) out.

Both take prompts as token ids (no second BOS), stop at the source's end-of-turn ids, and return the ids with
the stop token included; the stage decodes them with the source's own tokenizer, so both engines give the same
text semantics. `vllm` is the fast path; `transformers` (batched `generate`) runs where vLLM does not.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

from fusechat.config import SamplingParams, SourceModel
from fusechat.errors import UserError

# transformers engine: the engine_args it understands; the rest (tensor_parallel_size, ...) are vLLM's.
TRANSFORMERS_ARGS = ("dtype", "max_model_len", "trust_remote_code", "attn_implementation", "revision")
CPU_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_tokens or the context ran out)


class Engine(Protocol):
    context_len: int  # a prompt needs at least one free position below this
    sampling: SamplingParams  # read at each generate call (eval sets it per benchmark)

    def generate(self, prompts: list[list[int]], k: int, seed: int) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def open_engine(source: SourceModel, stop_ids: list[int], pad_id: int) -> Engine:
    engine = {"vllm": VllmEngine, "transformers": TransformersEngine}[source.engine]
    return engine(source, stop_ids, pad_id)


def check_engine(source: SourceModel, where: str) -> None:
    """Fail before any model loads when the engine cannot run this source here."""
    if source.engine != "vllm":
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            f"{where}.engine: vllm is not installed (pip install 'fusechat[vllm]', or 'fusechat[cpu]' "
            "for the CPU build); or set engine: transformers"
        )
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from transformers import AutoConfig
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        config = AutoConfig.from_pretrained(source.model).get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in supported:
            raise UserError(
                f"{where}.model ({source.name}): head size {head_dim} is not supported by vLLM's CPU "
                f"attention (supported: {', '.join(map(str, supported))}); set engine: transformers"
            )


def cut_at_stop(ids: list[int], stop_ids: list[int], budget: int) -> Completion:
    """Generated ids up to and including the first stop id, within `budget` tokens."""
    stops = set(stop_ids)
    for i, tok in enumerate(ids[:budget]):
        if tok in stops:
            return Completion(ids[: i + 1], "stop")
    return Completion(ids[:budget], "length")


def model_context(config: Any) -> int:
    return getattr(config.get_text_config(), "max_position_embeddings", None) or CPU_MAX_MODEL_LEN


class VllmEngine:
    """Offline `vllm.LLM`. vLLM loads no tokenizer (`skip_tokenizer_init`): prompts come as ids and the ids come
    back undecoded, so AutoTokenizer's substitutes (Qwen2Tokenizer for qwen2 dirs) never touch the data."""

    def __init__(self, source: SourceModel, stop_ids: list[int], pad_id: int):
        from vllm import LLM
        from vllm.platforms import current_platform

        args = dict(source.engine_args)
        if current_platform.is_cpu():
            # The CPU build sizes its KV cache from this (GiB); in-process keeps start-up and shutdown simple.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            args.setdefault("dtype", "float32")
            args.setdefault("enforce_eager", True)
            if "max_model_len" not in args:
                from transformers import AutoConfig

                args["max_model_len"] = min(model_context(AutoConfig.from_pretrained(source.model)), CPU_MAX_MODEL_LEN)
            # A partly prefilled seeded request makes vLLM rewind its generator, which only CUDA generators can
            # ("CPU Generator does not use offset"): prefill every prompt whole.
            args.setdefault("enable_chunked_prefill", False)
            args.setdefault("max_num_batched_tokens", max(4096, args["max_model_len"]))
        if os.path.isdir(source.model):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # With no tokenizer vLLM's chat-template warm-up fails harmlessly but logs a traceback.
        logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)
        self.sampling = source.sampling
        self.stop_ids = stop_ids
        self.llm = LLM(model=source.model, skip_tokenizer_init=True, **args)
        self.context_len = self.llm.llm_engine.model_config.max_model_len

    def generate(self, prompts: list[list[int]], k: int, seed: int) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.sampling
        # vLLM seeds the k children of a request with seed + index, so requests are spaced k apart.
        params = [
            SamplingParams(
                n=k,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                repetition_penalty=s.repetition_penalty,
                max_tokens=s.max_tokens,
                seed=seed + i * k,
                stop_token_ids=self.stop_ids,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [
            [
                Completion(list(c.token_ids), "length" if c.finish_reason == "length" else "stop")
                for c in sorted(out.outputs, key=lambda c: c.index)
            ]
            for out in outputs
        ]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        _empty_device_cache()


class TransformersEngine:
    """Batched `generate`: prompts sorted by length (little padding), left-padded, `num_return_sequences=k`."""

    def __init__(self, source: SourceModel, stop_ids: list[int], pad_id: int):
        import torch
        from transformers import AutoModelForCausalLM

        args = {k: v for k, v in source.engine_args.items() if k in TRANSFORMERS_ARGS}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        max_model_len = args.pop("max_model_len", None)
        args.setdefault("dtype", "float32" if self.device == "cpu" else "auto")
        self.model = AutoModelForCausalLM.from_pretrained(source.model, **args).to(self.device).eval()
        self.context_len = max_model_len or model_context(self.model.config)
        self.sampling = source.sampling
        self.batch_size = source.batch_size
        self.stop_ids = stop_ids
        self.pad_id = pad_id

    def generate(self, prompts: list[list[int]], k: int, seed: int) -> list[list[Completion]]:
        import torch

        s = self.sampling
        sampled = s.temperature > 0
        copies = k if sampled else 1  # greedy: one sequence, repeated (generate refuses k greedy copies)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        for batch_no, start in enumerate(range(0, len(order), self.batch_size)):
            rows = order[start : start + self.batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            # Like vLLM: a completion ends at max_tokens or where the context is full, whichever comes first.
            budgets = [min(s.max_tokens, self.context_len - len(prompts[i])) for i in rows]
            torch.manual_seed(seed + batch_no)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=self._generation_config(copies, max(budgets)),
                )
            new = out[:, width:].tolist()
            for r, i in enumerate(rows):
                done = [cut_at_stop(new[r * copies + j], self.stop_ids, budgets[r]) for j in range(copies)]
                results[i] = done if sampled else done * k
        return results

    def _generation_config(self, copies: int, max_new_tokens: int):
        from transformers import GenerationConfig

        s = self.sampling
        sampled = s.temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_return_sequences=copies,
            do_sample=sampled,
            temperature=s.temperature if sampled else 1.0,
            top_p=s.top_p if sampled else 1.0,
            top_k=max(s.top_k, 0) if sampled else 0,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )

    def close(self) -> None:
        del self.model
        gc.collect()
        _empty_device_cache()


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
