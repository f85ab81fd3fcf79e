"""Build a tiny Llama-architecture causal LM with its own BPE tokenizer into a folder, as vLLM
serves any Hugging Face model directory: nothing is downloaded. Random weights: it exercises the
engine, not the quality of its text. Runs with .venv-llm's interpreter (transformers lives there):

    .venv-llm/bin/python tests/tiny_llm.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Explain how the named entities look. Text: Velmora Rovers lift the cup. Entities: Velmora Rovers",
    "A band whose emblem is an orange diamond with purple dots, usually seen on a grey city street.",
    "A club whose emblem is a green circle with white stripes, usually seen on a football pitch.",
]


def build(out: Path) -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
