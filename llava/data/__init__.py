"""Data layer of pivot (DESIGN §3, docs/CONTRACTS.md §3).

Records flow one way: `mixture.load_records` (a .json/.jsonl file or a YAML mixture) → `records`
(validated `ConversationRecord` / `PreferenceRecord`) → `dataset.MultimodalDataset` (images via
`images.load_image`, text via `templates` + `tokenization` with label masks) → `collator.DataCollator`.
Every bad record raises a `errors.RecordError` subclass naming the file, the record id and the reason.
"""
