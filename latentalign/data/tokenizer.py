"""The DeepSeek-V2 chat template, and the tokenizer of the embedded default.

The embedded tokenizer is a byte-level BPE trained with `tokenizers` on the built-in arithmetic corpus, with
digits split one by one as DeepSeek's tokenizer does. The space before a number rides on its first digit
(" 47" -> " 4", "7") instead of standing as a token of its own: a worked reply is a fifth shorter, and the
`tiny` model learns it far faster (bench/README.md). It is deterministic, cached on disk, and wrapped as a
`PreTrainedTokenizerFast` carrying the chat template. Real models keep their own tokenizer; our template is
set only where a tokenizer has none.

The template renders `<bos>{system}\n\nUser: {u1}\n\nAssistant: {a1}<eos>User: {u2}\n\nAssistant:` (§9 of the
design facts). The generation prompt has no trailing space, so a completion starts with one. The training
variant wraps `" " + answer + <eos>` of each assistant turn in `{% generation %}` markers, which TRL's
`assistant_only_loss` reads; it renders the same text.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜pad▁token｜>"
GENERATION_PROMPT = "Assistant:"


def _template(training: bool) -> str:
    if training:
        assistant = ("{{ 'Assistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}"
                     "{% endgeneration %}")
    else:
        assistant = "{{ 'Assistant: ' + message['content'] + eos_token }}"
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
        f"{{% elif message['role'] == 'assistant' %}}{assistant}"
        "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


CHAT_TEMPLATE = _template(training=False)
TRAINING_CHAT_TEMPLATE = _template(training=True)

TOKENIZER_VERSION = 2  # bump when the trainer settings change (the corpus is part of the cache key)


def cache_dir() -> Path:
    root = os.environ.get("LATENTALIGN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latentalign"
    return Path(root)


def _train(vocab_size: int, texts: list[str] | None = None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from .arithmetic import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else corpus(), trainer)
    return tok


def default_tokenizer(vocab_size: int = 512):
    """The embedded default's tokenizer (ids: pad 0, bos 1, eos 2), built once and cached."""
    from transformers import PreTrainedTokenizerFast

    from .arithmetic import corpus

    texts = corpus()
    key = hashlib.sha256("\n".join([str(TOKENIZER_VERSION), str(vocab_size), CHAT_TEMPLATE, *texts]).encode())
    key = key.hexdigest()[:12]
    path = cache_dir() / f"tokenizer-{key}.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    else:
        tok = _train(vocab_size, texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent builders never read a half-written file
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE, model_max_length=512, clean_up_tokenization_spaces=False,
    )
    return tokenizer


def ensure_chat_template(tokenizer):
    """Give a tokenizer without a chat template the DeepSeek-V2 one; keep any template it already has."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Conversations on which a tokenizer's template must write what ours writes to count as ours: a system prompt, several
# turns, with and without the generation prompt.
_PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And 1 + 1?"},
     {"role": "assistant", "content": "2"}],
)


def training_template_for(tokenizer) -> str | None:
    """The `{% generation %}`-marked variant of our template when the tokenizer's template writes what ours writes
    (ours, or DeepSeek-V2-Chat's own as its tokenizer_config.json spells it: another string, the same text), else
    None (leave it to TRL)."""
    template = tokenizer.chat_template
    if template == CHAT_TEMPLATE:
        return TRAINING_CHAT_TEMPLATE
    if not isinstance(template, str):
        return None
    try:
        for messages in _PROBE_CONVERSATIONS:
            for prompt in (messages, messages[:-1]):
                rendered = [tokenizer.apply_chat_template(prompt, chat_template=t, tokenize=False,
                                                          add_generation_prompt=prompt is not messages)
                            for t in (template, CHAT_TEMPLATE)]
                if rendered[0] != rendered[1]:
                    return None
    except Exception:  # noqa: BLE001 -- a template that cannot render these is not ours
        return None
    return TRAINING_CHAT_TEMPLATE


def digit_variants(tokenizer) -> list[tuple[int, int]]:
    """(id of "d", id of " d") for each digit d that the tokenizer has both as a token of its own and with a
    leading space: the embedded tokenizer puts a number's space on its first digit, so every digit value has two
    tokens. Empty for a tokenizer without such pairs (DeepSeek's own keeps the space apart)."""
    pairs = []
    for digit in "0123456789":
        plain = tokenizer.convert_tokens_to_ids(digit)
        spaced = tokenizer.convert_tokens_to_ids("Ġ" + digit)  # byte-level BPE writes the space as Ġ
        unknown = tokenizer.unk_token_id
        if None not in (plain, spaced) and unknown not in (plain, spaced) and plain != spaced:
            pairs.append((plain, spaced))
    return pairs


def align_digit_embeddings(model, tokenizer) -> int:
    """Start each " d" token's input and output embedding as that of "d" plus that of the space, so that a digit
    means the same whether or not a space rides on it; returns the number of digits aligned.

    Why: at random init the two tokens of a digit are unrelated, and training did not bring them together (in an
    SFT model of the embedded default their cosine was about 0.05, while plain digits sat at 0.4 from each other),
    so the model had to learn every digit twice and to compare digits across the two (the working's "= 8" with
    the answer's "83": " 8" and "8"). Aligned, the SFT defaults' held-out exact match went from 31.3% to 60.3%
    on the same machine (one run each, bench/README.md). Presets only: a checkpoint keeps its embeddings."""
    import torch

    pairs = digit_variants(tokenizer)
    space = tokenizer.convert_tokens_to_ids("Ġ")
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    with torch.no_grad():
        for weight in tables:
            if weight.shape[0] < len(tokenizer):
                continue  # a head that is not over the vocabulary (a reward model's score)
            for plain, spaced in pairs:
                weight[spaced] = (weight[plain] + weight[space]) / 2**0.5 if space is not None else weight[plain]
    return len(pairs)
