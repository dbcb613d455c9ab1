"""Datasets read from JSONL files, with errors that name the file and the line."""

from alignkit.data.jsonl import read_jsonl, read_prompt_records, read_sft_pairs

__all__ = ["read_jsonl", "read_prompt_records", "read_sft_pairs"]
