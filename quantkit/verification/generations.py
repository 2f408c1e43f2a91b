"""Greedy generations of fixed prompts by both models, side by side, stopping at the checkpoint's end tokens."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.errors import QuantkitError
from quantkit.untrusted import read_json
from quantkit.verification.report import Generation, Progress

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PLAIN_PROMPTS = ("def fibonacci(", "Hello, I'm a language model,", "The three primary colors are")
CHAT_PROMPTS = ("What is the capital of France?", "Write a Python function that checks whether a number is prime.")
SYSTEM_PROMPT = "You are a helpful assistant."
SYSTEM_ROLE_NOTE = "the chat template refuses a system role: the system message was put in the user turn"


def eos_ids(tokenizer: PreTrainedTokenizerBase, qdir: Path) -> list[int]:
    """The end tokens generations stop at: generation_config.json's eos_token_id and the tokenizer's own."""
    ids: list[int] = []
    path = qdir / "generation_config.json"
    if path.is_file():
        try:
            eos = read_json(path, "generation config").get("eos_token_id")
        except QuantkitError:
            eos = None  # not the checkpoint's weights: generations stop at the tokenizer's own end token
        if isinstance(eos, list):
            ids += [i for i in eos if isinstance(i, int)]
        elif isinstance(eos, int):
            ids.append(eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def chat_ids(tokenizer: PreTrainedTokenizerBase, user: str, notes: list[str]) -> list[int]:
    """Token ids of a chat turn with the system prompt, rendered by the tokenizer's chat template."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # some templates refuse a system role: fold it into the user turn
        if SYSTEM_ROLE_NOTE not in notes:
            notes.append(SYSTEM_ROLE_NOTE)
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{user}"}],
                                             tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def greedy(model: PreTrainedModel, prompt_ids: list[int], eos: list[int], pad: int,
           max_new_tokens: int) -> tuple[list[int], str]:
    """The greedy continuation's token ids and why it stopped ("eos" or "length")."""
    from transformers import GenerationConfig, GenerationMixin

    if not isinstance(model, GenerationMixin):
        raise QuantkitError(f"{type(model).__name__} cannot generate text")
    ids = torch.tensor([prompt_ids])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
                              pad_token_id=pad)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[0, ids.shape[1]:].tolist()
    stop = "eos" if new and new[-1] in eos else "length"
    return new, stop


def _text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Generated token ids as text, special tokens left out."""
    # the stubs say str | list[str]: a flat list of ids decodes to one str
    return tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[return-value]


def _prompts(tokenizer: PreTrainedTokenizerBase, notes: list[str]) -> list[tuple[str, str, list[int]]]:
    """(kind, prompt, token ids) of every prompt: the plain ones, and the chat ones when there is a template."""
    prompts = [("text", p, tokenizer(p)["input_ids"]) for p in PLAIN_PROMPTS]
    if getattr(tokenizer, "chat_template", None):
        prompts += [("chat", p, chat_ids(tokenizer, p, notes)) for p in CHAT_PROMPTS]
    else:
        notes.append("the tokenizer has no chat template: chat prompts skipped")
    return prompts


def generations(qmodel: PreTrainedModel, bmodel: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                qdir: Path, max_new_tokens: int, progress: Progress, notes: list[str]) -> list[Generation]:
    """Greedy continuations of the fixed prompts by both models, stopping at the eos tokens."""
    eos = eos_ids(tokenizer, qdir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    prompts = _prompts(tokenizer, notes)
    out = []
    for i, (kind, prompt, ids) in enumerate(prompts):
        progress("generating", i, len(prompts))
        q_ids, q_stop = greedy(qmodel, ids, eos, pad, max_new_tokens)
        gen = Generation(kind=kind, prompt=prompt, quantized=_text(tokenizer, q_ids),
                         quantized_stop=q_stop)
        if bmodel is not None:
            b_ids, gen.base_stop = greedy(bmodel, ids, eos, pad, max_new_tokens)
            gen.base = _text(tokenizer, b_ids)
            gen.match = q_ids == b_ids
            if not gen.match:
                gen.first_difference = next((j for j, (a, b) in enumerate(zip(q_ids, b_ids)) if a != b),
                                            min(len(q_ids), len(b_ids)))
        out.append(gen)
    progress("generating", len(prompts), len(prompts))
    return out
