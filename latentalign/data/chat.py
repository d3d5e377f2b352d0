"""Text rows as the turns of a chat, for the stages: every stage trains a chat model, and eval, `chat` and the
reward-model reward render a prompt through the chat template; TRL would train and roll out text rows without it.

- A text `prompt` becomes the user's turn, and its `completion` (or a preference pair's `chosen`/`rejected`) the
  assistant's reply.
- Anthropic's HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ...") becomes the conversation it writes out, with or
  without an explicit prompt, so that a reward model trained on it is scored in GRPO on the text it saw.

Conversations, `text` rows and other text pairs without a prompt (the whole exchange in each side) stay as they
are. `load_rows` returns rows as written; the stages and eval call `as_chat`.
"""

from __future__ import annotations

import logging
import re

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_turns(text: str, *, prompt: bool = False) -> list[dict] | None:
    """The messages of HH-RLHF's text, or None where `text` is not that: turns from "Human" and "Assistant"
    taking turns from the human's, each saying something, and ending with the assistant's (for a `prompt`, with
    the human's, or an assistant turn left open: "...\\n\\nAssistant:")."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = ["user" if who == "Human" else "assistant" for who in parts[1::2]]
    contents = [content.strip() for content in parts[2::2]]
    if prompt and roles[-1] == "assistant" and not contents[-1]:
        roles, contents = roles[:-1], contents[:-1]
    alternating = roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    if not roles or not alternating or not all(contents) or (roles[-1] == "assistant") == prompt:
        return None
    return [{"role": role, "content": content} for role, content in zip(roles, contents)]


def as_chat(rows: list[dict], fmt: str) -> list[dict]:
    """`rows` of format `fmt` with their text prompts (and HH-RLHF text) as chat turns (module docstring)."""
    if fmt == "preference" and rows and "prompt" not in rows[0] and isinstance(rows[0]["chosen"], str):
        sides = [(hh_turns(row["chosen"]), hh_turns(row["rejected"])) for row in rows]
        bad = [i for i, (chosen, rejected) in enumerate(sides) if not (chosen and rejected)]
        if 2 * len(bad) >= len(rows):  # not HH-RLHF's text: pairs of whole exchanges, trained as they are
            return rows
        log = logging.getLogger(__name__)
        log.info("HH-RLHF text pairs are read as the conversations they write out")
        if bad:  # HH-RLHF holds a few (a reply left empty): one row of text would leave the set unconverted
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            log.warning("%d of %d HH-RLHF pairs dropped: a side is not a conversation that ends with the "
                        "assistant saying something (rows %s)", len(bad), len(rows), shown)
        return [{**row, "chosen": chosen, "rejected": rejected}
                for row, (chosen, rejected) in zip(rows, sides) if chosen and rejected]
    replies = {"completion": ("completion",), "preference": ("chosen", "rejected")}.get(fmt, ())
    prompted = fmt in ("completion", "preference", "rl", "prompt") and rows and "prompt" in rows[0]
    if not prompted or not isinstance(rows[0]["prompt"], str):
        return rows
    logging.getLogger(__name__).info("text prompts are read as the user's turn of a chat (%s rows)", fmt)
    return [_prompted(row, replies) for row in rows]


def _prompted(row: dict, replies: tuple) -> dict:
    hh = hh_turns(row["prompt"], prompt=True)  # its replies follow "Assistant:" with a space the turn drops
    prompt = hh or [{"role": "user", "content": row["prompt"]}]
    return {**row, "prompt": prompt,
            **{key: [{"role": "assistant", "content": row[key].strip() if hh else reply_text(row[key])}]
               for key in replies}}


def reply_text(text: str) -> str:
    """A text completion as the assistant's turn: without the one space TRL's prompt/completion rows begin it with
    (" 4"), which the template writes itself ("Assistant: 4"); an indented line of code keeps its indent."""
    return text[1:] if text[:1] == " " and text[1:2].strip() else text


def pairs_as_trained(rows: list[dict], tokenizer, label: str) -> list[dict]:
    """Preference pairs as the reward stage trains them (and pairwise evaluation reads them): each reply's EOS
    text off, then the pairs this leaves tied dropped (" 5<EOS>" against " 5" is one reply where the template
    ends turns itself)."""
    from .loading import without_ties

    return without_ties(without_end_token(rows, tokenizer), label, " once their EOS text is off")


def without_end_token(rows: list[dict], tokenizer, keys=("messages", "completion", "chosen", "rejected")):
    """`rows` with the tokenizer's EOS text taken off the end of each assistant turn, where its chat template
    writes it after every one: a reply that spelled it (" 2<EOS>", as a prompt/completion split often does) would
    train two."""
    eos = getattr(tokenizer, "eos_token", None)
    try:
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        ends_turns = bool(eos) and tokenizer.apply_chat_template(probe, tokenize=False).endswith(eos)
    except Exception:  # noqa: BLE001 -- no chat template: TRL adds no EOS to a conversation's turns either
        ends_turns = False
    if not ends_turns:
        return rows

    def turn(message):
        if not (isinstance(message, dict) and message.get("role") == "assistant"):
            return message
        content = message.get("content")
        if not isinstance(content, str) or not content.endswith(eos):
            return message
        return {**message, "content": content[: -len(eos)]}

    changed = 0
    out = []
    for row in rows:
        fixed = {k: [turn(m) for m in row[k]] if isinstance(row.get(k), list) else row.get(k) for k in keys if k in row}
        if any(fixed[k] != row[k] for k in fixed):
            changed += 1
            row = {**row, **fixed}
        out.append(row)
    if changed:
        logging.getLogger(__name__).info("%d rows had assistant turns ending with %r, which the chat template "
                                         "adds itself: taken off", changed, eos)
    return out


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def from_sharegpt(rows: list[dict], label: str) -> list[dict]:
    """ShareGPT's conversations (`conversations` or `messages` of `{"from": "human" | "gpt" | "system", "value"}`)
    as `messages`, as TRL's SFTTrainer reads them; other rows as they are."""
    from .loading import DataError

    column = "conversations" if "conversations" in rows[0] and "messages" not in rows[0] else "messages"
    turns = rows[0].get(column)
    if not (isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]):
        return rows
    out = []
    for i, row in enumerate(rows):
        turns = row.get(column)
        if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
            raise DataError(f"{label}: row {i}: {column} is not a list of ShareGPT turns ({{from, value}}), as the "
                            f"first row's are.")
        messages = []
        for j, turn in enumerate(turns):
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise DataError(f"{label}: row {i}: turn {j} is from {turn['from']!r}; ShareGPT turns are from "
                                f"{', '.join(SHAREGPT_ROLES)}.")
            messages.append({"role": role, "content": turn["value"]})
        out.append({**{k: v for k, v in row.items() if k != column}, "messages": messages})
    logging.getLogger(__name__).info("%s: ShareGPT conversations read as messages", label)
    return out
