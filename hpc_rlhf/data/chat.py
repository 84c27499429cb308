"""Turning prompts, responses and conversations into token ids, with or without a chat template.

Assistant tokens are found by rendering prefixes of the conversation: the turn of message i
spans from len(render(messages[:i], generation prompt)) to len(render(messages[:i+1])) tokens.
That needs a template whose renders of a prefix are a prefix of the full render (true of the
usual HF templates); one that is not is refused with the message index, never silently masked
wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class TemplateError(ValueError):
    pass


def as_messages(prompt) -> list[dict]:
    """A prompt string becomes one user message; a message list is kept."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


_JINJA = ("{{", "{%")
_announced: set = set()


def resolve_chat_template(value: str | None) -> str | None:
    """data.chat_template: jinja text as is, or a path to a file holding it (read, and said
    once per process on rank 0). A value that is neither is refused, naming the field."""
    import os
    if not value or any(m in value for m in _JINJA):
        return value or None
    path = Path(value).expanduser()
    if not path.is_file():
        raise TemplateError(f"data.chat_template={value!r} is neither a jinja template (no "
                            "'{{' or '{%') nor an existing file; give the template text or the "
                            "path of a .jinja file")
    text = path.read_text()
    if not any(m in text for m in _JINJA):
        raise TemplateError(f"data.chat_template={value!r}: the file holds no jinja template "
                            "('{{' or '{%' not found)")
    if value not in _announced and os.environ.get("RANK", "0") == "0":
        _announced.add(value)
        print(f"[data] chat template read from {path}", flush=True)
    return text


def check_input_template(template: str | None, apply_chat_template: bool) -> None:
    """data.input_template must hold exactly one '{}' and needs the chat template off."""
    from hpc_rlhf.config.rules import input_template_problem
    problem = input_template_problem(template or "", apply_chat_template)
    if problem:
        raise TemplateError(problem)


@dataclass(frozen=True)
class ChatFormat:
    """How text becomes tokens for one tokenizer.

    apply_chat_template: wrap with `chat_template` (None = the tokenizer's own template);
    False: prompt and response are plain text and every response ends with the eos token.
    input_template: without a chat template, a prompt string becomes
    `input_template.format(prompt)` (OpenRLHF's --input_template, e.g. "User: {}\nAssistant: ").
    """
    tokenizer: object
    apply_chat_template: bool = True
    chat_template: str | None = None
    input_template: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "chat_template", resolve_chat_template(self.chat_template))
        check_input_template(self.input_template, self.apply_chat_template)
        if self.apply_chat_template and not (self.chat_template
                                             or getattr(self.tokenizer, "chat_template", None)):
            raise TemplateError("data.apply_chat_template=true but the tokenizer has no chat "
                                "template; give one or set data.apply_chat_template=false")

    # ---- primitives -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template)
        except TemplateError:
            raise
        except Exception as e:  # jinja2 syntax/undefined errors, raised from the template
            if type(e).__module__.split(".")[0] != "jinja2":
                raise
            which = ("the chat template given in data.chat_template" if self.chat_template
                     else "the tokenizer's chat template")
            raise TemplateError(f"{which} failed to render: {type(e).__name__}: {e}; fix the "
                                "template (or set data.apply_chat_template=false)") from e

    @property
    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise TemplateError("the tokenizer has no eos token; responses without a chat "
                                "template need one to mark their end")
        return int(eos)

    # ---- prompts ----------------------------------------------------------------------------
    def prompt_ids(self, prompt) -> list[int]:
        """Tokens of a prompt (string or messages), ending where the response starts."""
        if not self.apply_chat_template:
            if not isinstance(prompt, str):
                raise TemplateError("the prompt is a message list but data.apply_chat_template="
                                    "false; enable the chat template or store plain text")
            if self.input_template:
                prompt = self.input_template.replace("{}", prompt, 1)
            return self.encode(prompt)
        return self.encode(self.render(as_messages(prompt), add_generation_prompt=True))

    # ---- conversations ----------------------------------------------------------------------
    def conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[t] = 1 where token t belongs to an assistant turn (trained on)."""
        if not self.apply_chat_template:
            raise TemplateError("multi-turn conversations need data.apply_chat_template=true")
        ids = self.encode(self.render(messages, add_generation_prompt=False))
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.encode(self.render(messages[:i], add_generation_prompt=True)) if i else []
            upto = self.encode(self.render(messages[:i + 1], add_generation_prompt=False))
            if ids[:len(upto)] != upto or upto[:len(start)] != start:
                raise TemplateError(
                    f"the chat template does not render message {i}'s prefix as a prefix of the "
                    "conversation, so assistant tokens cannot be located; use a prefix-stable "
                    "template (data.apply_chat_template with a given template)")
            for t in range(len(start), len(upto)):
                mask[t] = 1
        return ids, mask

    def prompt_response(self, prompt, response: str) -> tuple[list[int], list[int]]:
        """(prompt_ids, response_ids) of a single response to `prompt` (string or messages).

        With a template the response tokens include the template's end-of-turn tokens; without
        one they end with eos.
        """
        if not self.apply_chat_template:
            return self.prompt_ids(prompt), self.encode(response) + [self.eos_id]
        p = self.prompt_ids(prompt)
        full = self.encode(self.render(as_messages(prompt) + [
            {"role": "assistant", "content": response}], add_generation_prompt=False))
        if full[:len(p)] != p:
            raise TemplateError("the chat template renders the prompt with a generation prompt "
                                "that is not a prefix of prompt + response; use a prefix-stable "
                                "template")
        return p, full[len(p):]
