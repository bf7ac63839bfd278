"""Chat messages as the OpenAI schema defines them, one model per role, so a malformed message is a 400 that
names the message and the field (`messages[2].tool_call_id`), never a template error or a 500.

Per role (OpenAI's rules): system and developer need `content`; user needs `content`; assistant needs
`content` unless it carries `tool_calls`; tool needs `content` and `tool_call_id`. Content is a string or
a list of parts; this server reads text parts only, so other part types (images, audio, files) are a 400
saying so. Tool calls need tools, which this server does not offer: an assistant message with
`tool_calls` is a 400 as well.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_MESSAGE_CONFIG = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
KNOWN_PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")


class ContentPart(BaseModel):
    """A part of a message's content; only text parts can be served."""

    model_config = _MESSAGE_CONFIG
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in KNOWN_PART_TYPES:
            raise ValueError(f"unknown content part type {self.type!r}")
        if self.type != "text":
            raise ValueError(f"only text content parts are supported, got {self.type!r}")
        if self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


Content = str | list[ContentPart]


class _Message(BaseModel):
    model_config = _MESSAGE_CONFIG
    name: str | None = None

    @field_validator("content", check_fields=False)
    @classmethod
    def _parts_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("content must not be an empty list")
        return v

    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None or isinstance(content, str):
            return content or ""
        return "".join(part.text or "" for part in content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: role, text content, and the optional fields given."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}  # type: ignore[attr-defined]
        if self.name:
            out["name"] = self.name
        return out


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> AssistantMessage:
        if self.tool_calls:
            raise ValueError("tool_calls are not supported (this server offers no tools)")
        if self.content is None and self.refusal is None:
            raise ValueError("an assistant message needs 'content' (or 'tool_calls')")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str

    def for_template(self) -> dict[str, Any]:
        return {**super().for_template(), "tool_call_id": self.tool_call_id}


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
