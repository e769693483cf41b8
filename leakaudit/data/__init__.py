"""Data loading, validation and the shipped datasets."""

from leakaudit.data.io import Record, load_records, read_rows, write_json, write_jsonl

__all__ = ["Record", "load_records", "read_rows", "write_json", "write_jsonl"]
