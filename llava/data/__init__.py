"""Data layer of pivot (DESIGN §3, docs/CONTRACTS.md §3).

Records flow one way: `mixture.load_records` (a .json/.jsonl file or a YAML mixture) → `records`
(validated `ConversationRecord` / `PreferenceRecord`) → `dataset.MultimodalDataset` (images via
`images.load_image`; `validate()` reads image headers only, via `images.probe_image`), text via
`templates` + `tokenization` with label masks) → `collator.DataCollator`. The MMPR converter
(`mmpr`, with `mmpr_input`, `mmpr_filters`, `mmpr_fit`) writes the Stage-2 SFT and DPO jsons.
Every bad record raises a `errors.RecordError` subclass naming the file, the record id and the reason.
"""
