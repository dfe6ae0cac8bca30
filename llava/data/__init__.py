"""Data layer of pivot (DESIGN §3, docs/CONTRACTS.md §3).

Records flow one way: `mixture.load_records` (a .json/.jsonl file or a YAML mixture) → `records`
(validated `ConversationRecord` / `PreferenceRecord`) → `dataset.MultimodalDataset` (images via
`images.load_image`; `validate()` reads image headers only, via `images.probe_image`), text via
`templates` + `tokenization` with label masks) → `collator.DataCollator`. Training reads records from a
memory-mapped `store.RecordStore` (built once from files or `sources` data tables, validated once by
`validation`, both cached; `prepared.prepare_dataset` is the entry point's way in). The MMPR converter
(`mmpr`, with `mmpr_input`, `mmpr_filters`, `mmpr_fit`) writes the Stage-2 SFT and DPO jsons.
Every bad record raises a `errors.RecordError` subclass naming the file, the record id and the reason.
"""
