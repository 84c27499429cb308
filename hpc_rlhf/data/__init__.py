"""Datasets, chat templates, packing and dynamic batching for the trainers.

read_rows (JSONL / JSON / Parquet / Arrow / datasets.save_to_disk) -> samples.*_sample per row
with ChatFormat (chat template or plain text) -> load_samples (max-length filter, bad-row
errors or skip-and-count) -> batches.*_batch -> TokenBatch (padded or packed).
"""
from hpc_rlhf.data.batches import (kto_batch, pair_batch, prm_batch, prompt_response_batch,
                                   rank_micro_batches, sft_batch, step_indices)
from hpc_rlhf.data.chat import ChatFormat, TemplateError, as_messages
from hpc_rlhf.data.packing import (TokenBatch, collate, pack_rows, segment_last_index,
                                   segment_sum, token_budget_batches)
from hpc_rlhf.data.readers import Row, data_files, read_rows
from hpc_rlhf.data.rows import DataError, DataStats
from hpc_rlhf.data.samples import (KTOSample, PairSample, PRMSample, PromptSample, SFTSample,
                                   kto_sample, load_samples, pair_sample, pretrain_sample,
                                   prm_sample, prompt_sample, sft_sample)

__all__ = ["ChatFormat", "DataError", "DataStats", "KTOSample", "PRMSample", "PairSample",
           "PromptSample", "Row", "SFTSample", "TemplateError", "TokenBatch", "as_messages",
           "collate", "data_files", "kto_batch", "kto_sample", "load_samples", "pack_rows",
           "pair_batch", "pair_sample", "prm_batch", "prm_sample", "prompt_response_batch",
           "prompt_sample", "rank_micro_batches", "read_rows", "segment_last_index",
           "segment_sum", "sft_batch", "sft_sample", "pretrain_sample", "step_indices",
           "token_budget_batches"]
