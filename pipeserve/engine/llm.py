"""`LLM`: the offline API, vLLM-compatible (`generate`, `chat`, `shutdown`, context manager)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.engine.request_stream import RequestStream
from pipeserve.engine.startup import build_async_engine
from pipeserve.outputs import RequestOutput
from pipeserve.sampling_params import SamplingParams

PromptType = str | dict[str, Any]
_Prepared = tuple[list[int], str | None, SamplingParams, str | None]  # token ids, text, sampling, cache salt


class LLM:
    """Loads a model and generates for batches of prompts; outputs come back in input order."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"LLM() got unknown arguments: {', '.join(sorted(unknown))}")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.engine = build_async_engine(self.engine_args.create_engine_config())
        self.config = self.engine.config  # with the KV block count the stages were sized for
        self.tokenizer = self.engine.tokenizer

    # ---- inputs --------------------------------------------------------------------------------------

    def _token_ids(self, prompt: PromptType) -> tuple[list[int], str | None]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"]), prompt.get("prompt")
            prompt = prompt.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError(f"model {self.config.model.path!r} ships no tokenizer: pass prompt_token_ids")
        return self.tokenizer.encode(prompt), prompt

    def _prepare(self, prompts: PromptType | Sequence[PromptType],
                 params: SamplingParams | Sequence[SamplingParams] | None) -> list[_Prepared]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = params if params is not None else SamplingParams()
        param_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(param_list)} SamplingParams")
        prepared = []
        for prompt, p in zip(prompts, param_list, strict=True):
            ids, text = self._token_ids(prompt)
            prepared.append((ids, text, p, prompt.get("cache_salt") if isinstance(prompt, dict) else None))
        return prepared

    # ---- generation ----------------------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_output: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion. `on_output(i, out)` sees each intermediate output (streaming)."""
        if self.engine is None:
            raise RuntimeError("this LLM has been shut down")
        prepared = self._prepare(prompts, sampling_params)
        return asyncio.run(self._run(prepared, on_output))

    async def _run(self, prepared, on_output) -> list[RequestOutput]:
        async with self.engine.running():
            streams: list[RequestStream] = []
            try:
                self._add_all(prepared, on_output is None, streams)
                return list(await asyncio.gather(*(self._collect(i, s, on_output) for i, s in enumerate(streams))))
            except BaseException:
                for stream in streams:  # the others stop now, not whenever their iterations are collected
                    self.engine.abort(stream.request_id)
                raise

    def _add_all(self, prepared: list[_Prepared], final_only: bool, streams: list[RequestStream]) -> None:
        """Queue every prompt (onto `streams`). The engine checks each as it takes it; nothing runs before the
        last is queued (no await here), so a bad prompt raises before any step, and the caller ends those
        already queued. `final_only`: nobody watches intermediate outputs, so only the last is built."""
        for i, (tok, text, p, salt) in enumerate(prepared):
            try:
                streams.append(self.engine.add_request(tok, p, text, final_only=final_only, cache_salt=salt))
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None

    async def _collect(self, index: int, stream: RequestStream, on_output) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
            if on_output is not None:
                on_output(index, out)
        return final

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, **kwargs: Any) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.config.model.path!r} has no chat template")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conv in conversations:
            if not conv:
                raise ValueError("messages is empty")
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            prompts.append({"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False), "prompt": text})
        return self.generate(prompts, sampling_params, **kwargs)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the engine and every worker process."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter teardown: best effort, never raise from __del__
            self.shutdown()
