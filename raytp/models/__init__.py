"""Model families built from :mod:`raytp.nn`, and loading Hugging Face checkpoints into them."""

from raytp.models.bert import Bert, BertConfig, mean_pool, sentence_embeddings
from raytp.models.config import GPTConfig
from raytp.models.gpt import GPT
from raytp.models.hf import Pretrained, from_pretrained, pretrained

__all__ = ["GPT", "Bert", "BertConfig", "GPTConfig", "Pretrained", "from_pretrained", "mean_pool",
           "pretrained", "sentence_embeddings"]
