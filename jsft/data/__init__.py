"""Chat data pipeline: rows -> validated conversations -> samples with inference-exact loss masks ->
cached sample table -> per-step, per-host packed micro-batches. See docs/data.md.

    sources.py       rows from JSONL / Parquet / datasets dirs with file:line locations
    arrow_rows.py    Arrow (Parquet, datasets) values as the JSON rows they were written from
    conversation.py  row validation and normalisation
    tokenizer.py     tokenizer, chat template, end-of-turn detection
    chat.py          conversation -> samples (the masking semantics)
    dataset.py       all rows -> tokenized sample table (grain workers, on-disk cache, bad rows, truncation)
    pipeline.py      sample table -> the samples of each optimizer step, per feeder (grain shuffle, resume)
    batch.py         the batch's one owner: samples -> packed rows -> micro-batches -> counts, loss weights,
                     the causal shift, shapes, zigzag -> typed MicroBatch for the step (numpy)
    summary.py       the data summary printed by inspect and the trainer
"""
