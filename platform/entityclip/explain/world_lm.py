"""The synthetic world's LLM: a tiny Llama-architecture causal LM with its own BPE tokenizer,
trained on the knowledge records of every entity, seen and held out alike (an LLM's world
knowledge covers entities a matcher never saw), to answer the explanation prompt the way the
knowledge engine does. vLLM then serves its folder like any Hugging Face model directory.

The training texts are news sentences drawn from the same event/city vocabulary as the data
(general news phrasing, not the dataset's samples); the answer is `KnowledgeEngine.describe` of
each named entity, so the LM learns exactly what the knowledge engine writes.

Runs in .venv-llm (`stage_lm` starts it as a subprocess, beside the torch vLLM serves it with):
    .venv-llm/bin/python -m entityclip.explain.world_lm ENTITIES_URI OUT_DIR [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from entityclip import storage
from entityclip.data.synthetic import CITIES, EVENTS
from entityclip.explain.engines import WORLD_LM_PROGRESS, KnowledgeEngine
from entityclip.explain.prompts import build_prompt

# Share of training prompts naming two entities: the data names one or two, and two-entity
# answers (two descriptions, in order) are where a small LM errs.
TWO_ENTITY_SHARE = 0.5


def examples(engine: KnowledgeEngine, names: list[str], rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs naming one or two entities, as the data's texts do; one in five
    without the entity list, as an online query's prompt is."""
    out = []
    for _ in range(n):
        named = rng.sample(names, 2 if rng.random() < TWO_ENTITY_SHARE else 1)
        text = f"{' and '.join(named)} {rng.choice(EVENTS)} in {rng.choice(CITIES)}."
        # Online queries come without an entity list: the LM finds the names in the text.
        listed = named if rng.random() < 0.8 else []
        out.append((build_prompt(text, listed), " " + " ".join(engine.describe(x) for x in named)))
    return out


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Token ids of prompt + answer + EOS; the loss reads the answer and EOS only."""
    ids, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels])}


def train(entities_uri: str, out_dir: str, steps: int = 1500, batch_size: int = 32, seed: int = 0,
          report=None) -> dict:
    """Train and save the LM; returns what it measured (loss, seconds, exact answers).
    `report(step, steps, loss)` is called about a hundred times along the way."""
    start = time.time()
    rng, engine = random.Random(seed), KnowledgeEngine(entities_uri)
    torch.manual_seed(seed)
    names = [r["name"] for r in storage.read_parquet(entities_uri).to_pylist()]
    tokenizer = train_tokenizer([p + a for p, a in examples(engine, names, rng, 4000)], vocab_size=2048)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    # One-cycle (warm-up, cosine anneal, inverse momentum): 95% exact answers at 600 steps where
    # a plain warm-up + cosine reached 38%. At least two warm-up steps: it divides by their count - 1.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps,
                                                   pct_start=max(0.05, 2.5 / steps))
    model.train()
    every = max(1, steps // 100)
    for step in range(1, steps + 1):
        loss = model(**batch(tokenizer, examples(engine, names, rng, batch_size))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if report and (step % every == 0 or step == steps):
            report(step, steps, loss.item())
    model.eval()
    exact = _exact_answers(model, tokenizer, examples(engine, names, random.Random(seed + 1), 32))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    facts = {"steps": steps, "seed": seed, "entities_sha256": hashlib.sha256(storage.read_bytes(entities_uri)).hexdigest(),
             "final_loss": round(loss.item(), 4), "exact_answers": exact,
             "seconds": round(time.time() - start, 1), "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training.json").write_text(json.dumps(facts, indent=2))
    return facts


@torch.no_grad()
def _exact_answers(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Share of fresh prompts whose greedy answer is the knowledge engine's, word for word."""
    hits = 0
    for prompt, answer in pairs:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=96, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        hits += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer.strip()
    return hits / len(pairs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entities")
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def report(step: int, steps: int, loss: float) -> None:
        # Read by `stage_lm`, which draws the progress bar; stdout carries only the result.
        print(f"{WORLD_LM_PROGRESS} {step} {steps} {loss:.4f}", file=sys.stderr, flush=True)

    print(json.dumps(train(args.entities, args.out_dir, args.steps, seed=args.seed, report=report)))
