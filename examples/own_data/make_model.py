"""Build the own-data example's base model: a tiny Llama with a ChatML chat template.

Stands in for a model you would name with ``model.path`` (a hub id or a folder): a
byte-level BPE tokenizer trained on the example's texts, ``<|im_start|>`` / ``<|im_end|>``
turn markers, a chat template, and a freshly initialised Llama of about 0.37M parameters::

    python examples/own_data/make_model.py examples/own_data/data outputs/tiny-llama-chat
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from alignkit.models.tiny import TinyArchSpec, build_tiny_causal_lm


def corpus(data: Path) -> Iterator[str]:
    """Every message text of the example's JSONL files, and the plain turn labels."""
    for path in sorted(data.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for value in record.values():
                for message in value if isinstance(value, list) else []:
                    yield f"{message['role']}\n{message['content']}"
    yield "System: User: Assistant:"


def main(data: Path, out: Path) -> Path:
    spec = TinyArchSpec(arch="llama", vocab_size=600, hidden=128, layers=2, heads=4, kv_heads=2)
    return build_tiny_causal_lm(out, corpus(data), spec)


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), Path(sys.argv[2])))
