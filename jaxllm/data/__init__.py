"""The data pipeline, one module per step.

sources.py   documents from the Hub, local parquet/jsonl files or the built-in synthetic corpus
synthetic.py the synthetic MathQA-style word problems
prepare.py   documents -> train.bin / val.bin uint16 token memmaps (cached, atomic)
batches.py   token memmaps -> batches, window order a pure function of (seed, step)
"""
