"""The generalisation study's synthetic world: a lexicon, a pre-training corpus, a downstream task.

Adjectives, function words and labels are one-letter words (one token each), nouns and
fillers two-letter pseudo-words. Adjectives carry a sentiment; the pre-training grammar states it
in context ("X is A1 and A2": same sentiment, "A1 but A2": opposite, "not A1 so it is A2":
negation flips it, "so i love/hate it") and names it with the label words themselves, in a
different frame than the task's: "N is A [fillers]" + newline + "it is <label>". The
downstream task asks for the label word right after the newline ("N is [not] A [fillers]\n" ->
label), which the base never saw: the task is not solved zero-shot (the base predicts "it"),
but the sentiment is linearly decodable at the newline (the probe below) and the mapping is
learnable from few examples. Few training examples, a share of them with flipped labels, and
a clean test set drawn from the same distribution.

The base model is pre-trained here in plain PyTorch (one process) and cached under
``~/.cache/ds_bilevel/bench/pretrained-<hash of the settings>/`` as an HF folder.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE_ROOT = Path.home() / ".cache" / "ds_bilevel" / "bench"
CONSONANTS, VOWELS = "bdfgjkmnprstvwz", "aeiou"  # no h/l: "he", "la", "le" are merged pieces
SINGLE_TOKEN_WORDS = "abcdefghijklmnopqrstuvwxyzIRW"  # each " x" is one piece of the builtin tokenizer


@dataclass(frozen=True)
class WorldConfig:
    """Lexicon and pre-training settings (their hash names the cached model)."""

    lexicon_seed: int = 1234
    adjectives_per_sentiment: int = 8
    nouns: int = 16
    fillers: int = 8
    model: str = "builtin:tiny-llama"  # the LlamaConfig family, with the sizes below, trained from scratch
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    label_share: float = 0.3  # share of pre-training sentences in the "...\nit is <label>" frame
    pretrain_sentences: int = 40_000
    pretrain_steps: int = 800
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    pretrain_seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Lexicon:
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    nouns: tuple[str, ...]
    fillers: tuple[str, ...]
    function: dict  # role -> word: is, and, but, not, so, it, i
    verbs: tuple[tuple[str, ...], tuple[str, ...]]  # ("hate"-like, "love"-like): follow the sentiment
    labels: tuple[str, str]  # label word for negative, positive sentiment


def make_lexicon(world: WorldConfig) -> Lexicon:
    """Adjectives, function words, verbs and labels are single tokens (the builtin tokenizer's
    one-letter words): their sentiment is then a property of one embedding. Nouns and fillers
    (the distractors) are two-letter pseudo-words."""
    rng = random.Random(world.lexicon_seed)
    singles, pairs = list(SINGLE_TOKEN_WORDS), [c + v for c in CONSONANTS for v in VOWELS]
    rng.shuffle(singles)
    rng.shuffle(pairs)
    one, two = iter(singles), iter(pairs)
    a = world.adjectives_per_sentiment
    positive, negative = tuple(next(one) for _ in range(a)), tuple(next(one) for _ in range(a))
    function = {role: next(one) for role in ("is", "and", "but", "not", "so", "it", "i")}
    verbs = ((next(one),), (next(one),))
    labels = (next(one), next(one))
    nouns, fillers = tuple(next(two) for _ in range(world.nouns)), tuple(next(two) for _ in range(world.fillers))
    return Lexicon(positive, negative, nouns, fillers, function, verbs, labels)


def _adjective(lex: Lexicon, positive: bool, rng: random.Random) -> str:
    return rng.choice(lex.positive if positive else lex.negative)


def _sprinkle(words: list[str], lex: Lexicon, rng: random.Random, most: int = 2) -> list[str]:
    """Insert 0..most filler words at random positions after the first word (noise to ignore)."""
    for _ in range(rng.randint(0, most)):
        words.insert(rng.randint(1, len(words)), rng.choice(lex.fillers))
    return words


def pretraining_sentence(lex: Lexicon, rng: random.Random, label_share: float = 0.3) -> str:
    w, pol = lex.function, rng.random() < 0.5
    noun, a1 = rng.choice(lex.nouns), _adjective(lex, pol, rng)
    if rng.random() < label_share:  # the label words, in their own frame: "N is A [fillers]\nit is L"
        head = " ".join(_sprinkle([noun, w["is"], a1], lex, rng))
        return f"{head}\n{w['it']} {w['is']} {lex.labels[int(pol)]}"
    kind = rng.randrange(6)
    if kind >= 4:  # "so i love/hate it": the sentiment, possibly negated, decides the verb
        negated = kind == 5
        words = [noun, w["is"]] + [w["not"]] * negated + [a1, w["so"], w["i"], rng.choice(lex.verbs[pol != negated])]
    elif kind == 0:  # same sentiment
        words = [noun, w["is"], a1, w["and"], _adjective(lex, pol, rng)]
    elif kind == 1:  # contrast
        words = [noun, w["is"], a1, w["but"], _adjective(lex, not pol, rng)]
    elif kind == 2:  # negation flips the sentiment
        words = [noun, w["is"], w["not"], a1, w["so"], w["it"], w["is"], _adjective(lex, not pol, rng)]
    else:
        words = [noun, w["is"], a1, w["so"], w["it"], w["is"], _adjective(lex, pol, rng)]
    return " ".join(_sprinkle(words, lex, rng))


def task_example(lex: Lexicon, rng: random.Random, negation: float = 0.5) -> dict:
    """{"text", "label"}: label 1 when the effective sentiment is positive ("not" with probability negation)."""
    pol, negated = rng.random() < 0.5, rng.random() < negation
    words = [rng.choice(lex.nouns), lex.function["is"]] + ([lex.function["not"]] if negated else [])
    words += [_adjective(lex, pol, rng)]
    return {"text": " ".join(_sprinkle(words, lex, rng)), "label": int(pol != negated)}


def make_task(lex: Lexicon, n_train: int, n_test: int, noise: float, seed: int,
              negation: float = 0.5) -> tuple[list[dict], list[dict]]:
    """(train, test): exactly round(noise * n_train) training labels flipped (marked "noisy"),
    the test set clean. Every seed draws its own examples and its own flipped ones."""
    rng = random.Random(seed * 7_919 + 11)
    train = [task_example(lex, rng, negation) for _ in range(n_train)]
    test = [task_example(lex, rng, negation) for _ in range(n_test)]
    flipped = set(rng.sample(range(n_train), round(noise * n_train)))
    for i, example in enumerate(train):
        example["clean_label"] = example["label"]
        example["noisy"] = i in flipped
        if example["noisy"]:
            example["label"] = 1 - example["label"]
    return train, test


# ---- pre-training ---------------------------------------------------------------------------

def pretrained_model(world: WorldConfig, log=print) -> Path:
    """The cached pre-trained causal LM (an HF folder) for these settings, pre-training it on a miss."""
    folder = CACHE_ROOT / f"pretrained-{world.key()}"
    if (folder / "pretraining.json").is_file():
        return folder
    import torch
    from transformers import LlamaForCausalLM

    from ds_bilevel.builtin.model import builtin_llama_config
    from ds_bilevel.builtin.tokenizer import load_builtin_tokenizer

    start, tokenizer, lex = time.perf_counter(), load_builtin_tokenizer(), make_lexicon(world)
    torch.manual_seed(world.pretrain_seed)
    sizes = {k: getattr(world, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads")}
    model = LlamaForCausalLM(builtin_llama_config(world.model, len(tokenizer), **sizes))
    losses = pretrain(model, tokenizer, lex, world, log, corrupt=None)
    info = {"sentiment_probe_accuracy": sentiment_probe(model, tokenizer, lex), **task_probe(model, tokenizer, lex)}
    log(f"pretrained: verb probe {info['sentiment_probe_accuracy']:.3f}, linear probe "
        f"{info['linear_probe_accuracy']:.3f}, zero-shot exact match {info['zero_shot_exact_match']:.3f} "
        f"(label words compared: {info['zero_shot_label_choice']:.3f})")
    return save_pretrained(model, tokenizer, folder, world, losses, start, info)


# The encoder task's base (issue 14: BiDoRA's GLUE setting fine-tunes RoBERTa): builtin:tiny-roberta's
# architecture, pre-trained on the same corpus by masked-token prediction.
ENCODER_MODEL = "builtin:tiny-roberta"
MASK_SHARE = 0.15  # BERT's share of predicted positions


def pretrained_encoder(world: WorldConfig, log=print) -> Path:
    """The cached pre-trained encoder (an HF RoBERTa masked-LM folder, no classification head: the
    recipe adds one, as for a hub RoBERTa checkpoint), pre-training it on a miss.

    Masked-token prediction, with two changes a synthetic 2-layer base needs (both measured): the
    builtin tokenizer has no mask token, so a predicted position gets a random word in its place
    (BERT's random-replacement branch, for all of them); and the first token, the one RoBERTa's
    classification head reads, also predicts the sentence's first adjective (a sentence-summary
    objective on it, as BERT's next-sentence head on [CLS]): the label word of a sentence in the label
    frame (hidden from the input), as the decoder's pre-training predicts it after the newline, else the
    sentence's first adjective. Measured: with masked tokens alone the first token's state held no
    sentiment (linear probe 51.5%); with the adjective alone, 72.3%, and LoRA memorised the training
    labels at chance test accuracy."""
    folder = CACHE_ROOT / f"pretrained-encoder-{world.key()}"
    if (folder / "pretraining.json").is_file():
        return folder
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    from ds_bilevel.builtin.model import BUILTIN_ENCODERS
    from ds_bilevel.models import load_tokenizer

    start, tokenizer, lex = time.perf_counter(), load_tokenizer(ENCODER_MODEL), make_lexicon(world)
    torch.manual_seed(world.pretrain_seed)
    config = RobertaConfig(vocab_size=len(tokenizer), **BUILTIN_ENCODERS[ENCODER_MODEL.removeprefix("builtin:")],
                           bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer.pad_token_id)
    model = RobertaForMaskedLM(config)
    words = torch.tensor(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))
    special = torch.tensor(tokenizer.all_special_ids)
    adjectives = torch.tensor([tokenizer(a, add_special_tokens=False).input_ids[0]
                               for a in lex.positive + lex.negative])
    label_words = torch.tensor([tokenizer(word, add_special_tokens=False).input_ids[0] for word in lex.labels])

    def corrupt(ids: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        chosen = (torch.rand(ids.shape, generator=generator) < MASK_SHARE) & ~torch.isin(ids, special)
        replaced = words[torch.randint(len(words), ids.shape, generator=generator)]
        labels = labels.masked_fill(~chosen, -100)
        # The first token's target: the label word of a sentence in the label frame ("...\nit is L"),
        # as the decoder's pre-training predicts it, else the sentence's first adjective.
        rows = torch.arange(len(ids))
        framed = torch.isin(ids, label_words)
        summary = torch.where(framed.any(1), ids[rows, framed.int().argmax(1)],
                              ids[rows, torch.isin(ids, adjectives).int().argmax(1)])
        ids = ids.masked_fill(framed, tokenizer.unk_token_id)  # the label word itself is not seen
        labels[:, 0] = summary
        return torch.where(chosen, replaced, ids), labels

    losses = pretrain(model, tokenizer, lex, world, log, corrupt=corrupt)
    info = encoder_probe(model, tokenizer, lex)
    log(f"pretrained encoder: linear probe {info['linear_probe_accuracy']:.3f}")
    return save_pretrained(model, tokenizer, folder, world, losses, start, info)


def pretrain(model, tokenizer, lex: Lexicon, world: WorldConfig, log, corrupt=None) -> list[float]:
    """AdamW with a one-cycle schedule on the synthetic corpus: next-token prediction, or with
    ``corrupt`` (ids, labels, generator -> ids, labels) the masked-token objective."""
    import torch

    rng = random.Random(world.pretrain_seed)
    lines = [pretraining_sentence(lex, rng, world.label_share) for _ in range(world.pretrain_sentences)]
    encoded = [encode(tokenizer, line) for line in lines]
    optimizer = torch.optim.AdamW(model.parameters(), lr=world.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, world.pretrain_lr, total_steps=world.pretrain_steps,
                                                   pct_start=0.05)
    generator = torch.Generator().manual_seed(world.pretrain_seed)
    losses = []
    model.train()
    for step in range(world.pretrain_steps):
        rows = [encoded[i] for i in torch.randint(len(encoded), (world.pretrain_batch,), generator=generator)]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        for i, row in enumerate(rows):
            ids[i, :len(row)], labels[i, :len(row)] = torch.tensor(row), torch.tensor(row)
        attention = (labels != -100).long()
        if corrupt is not None:
            ids, labels = corrupt(ids, labels, generator)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 250 == 0 or step == world.pretrain_steps - 1:
            log(f"pretrain step {step}: loss {loss.item():.3f}")
    return losses


def save_pretrained(model, tokenizer, folder: Path, world: WorldConfig, losses: list[float], start: float,
                    info: dict) -> Path:
    """The HF folder and its pretraining.json, written under a temporary name and then renamed
    (a killed pre-training leaves no folder that looks finished)."""
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {"settings": asdict(world), "final_loss": sum(losses[-50:]) / 50, "first_loss": losses[0],
            "seconds": time.perf_counter() - start, "parameters": sum(p.numel() for p in model.parameters()), **info}
    (tmp / "pretraining.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def encode(tokenizer, line: str) -> list[int]:
    """Token ids as the recipe builds a classification example: BOS, text, newline, then the rest
    tokenised on its own (so " L" after the newline is the same piece as the task's response), EOS."""
    head, _, tail = line.partition("\n")
    if not _:
        return tokenizer(head).input_ids + [tokenizer.eos_token_id]
    return tokenizer(head + "\n").input_ids + tokenizer(tail, add_special_tokens=False).input_ids + \
        [tokenizer.eos_token_id]


def task_probe(model, tokenizer, lex: Lexicon, n_fit: int = 256, n_test: int = 400, seed: int = 7) -> dict:
    """The frozen base on task prompts ("N is A [fillers]\n", clean labels):
    linear_probe_accuracy: a logistic regression on the last hidden state at the newline (the
    position that predicts the label), fitted on n_fit examples, scored on n_test others;
    zero_shot_exact_match: the label word is the base's top next token there (the task's metric);
    zero_shot_label_choice: the right label word is the likelier of the two."""
    import torch

    rng = random.Random(seed)
    examples = [task_example(lex, rng, 0.0) for _ in range(n_fit + n_test)]
    label_ids = [tokenizer(word, add_special_tokens=False).input_ids[0] for word in lex.labels]
    feats, top, choice = [], [], []
    model.eval()
    with torch.no_grad():
        for e in examples:
            out = model(input_ids=torch.tensor([tokenizer(e["text"] + "\n").input_ids]), output_hidden_states=True)
            feats.append(out.hidden_states[-1][0, -1])
            logits = out.logits[0, -1]
            top.append(int(logits.argmax()) == label_ids[e["label"]])
            choice.append(int(logits[label_ids[1]] > logits[label_ids[0]]) == e["label"])
    model.train()
    return {"linear_probe_accuracy": linear_probe(torch.stack(feats), [e["label"] for e in examples], n_fit),
            "zero_shot_exact_match": sum(top) / len(top), "zero_shot_label_choice": sum(choice) / len(choice)}


def encoder_probe(model, tokenizer, lex: Lexicon, n_fit: int = 256, n_test: int = 400, seed: int = 7) -> dict:
    """The frozen encoder on task sentences (clean labels): a logistic regression on the last hidden
    state of the first token, the one RoBERTa's classification head reads."""
    import torch

    rng = random.Random(seed)
    examples = [task_example(lex, rng, 0.0) for _ in range(n_fit + n_test)]
    model.eval()
    with torch.no_grad():
        feats = [model(input_ids=torch.tensor([tokenizer(e["text"]).input_ids]),
                       output_hidden_states=True).hidden_states[-1][0, 0] for e in examples]
    model.train()
    return {"linear_probe_accuracy": linear_probe(torch.stack(feats), [e["label"] for e in examples], n_fit)}


def linear_probe(features, labels: list[int], n_fit: int) -> float:
    """Test accuracy of an L2-regularised logistic regression fitted (LBFGS) on the first n_fit rows."""
    import torch

    x, y = features.float(), torch.tensor([float(label) for label in labels])
    mean, std = x[:n_fit].mean(0), x[:n_fit].std(0) + 1e-6
    x = (x - mean) / std
    linear = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(x[:n_fit]).squeeze(1), y[:n_fit]) \
            + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (linear(x[n_fit:]).squeeze(1) > 0).float()
    return (predicted == y[n_fit:]).float().mean().item()


def sentiment_probe(model, tokenizer, lex: Lexicon, n: int = 200, seed: int = 99) -> float:
    """Zero-shot check that pre-training learned sentiment: after "N is [not] A so i", is the
    total probability of the verbs of the effective sentiment the larger one?"""
    import torch

    rng, w, right = random.Random(seed), lex.function, 0
    candidates = list(lex.verbs[1]) + list(lex.verbs[0])
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            pol, negated = rng.random() < 0.5, rng.random() < 0.5
            words = [rng.choice(lex.nouns), w["is"]] + ([w["not"]] if negated else [])
            prefix = " ".join(words + [_adjective(lex, pol, rng), w["so"], w["i"]])
            rows = [tokenizer(f"{prefix} {a}").input_ids for a in candidates]
            start = len(tokenizer(prefix).input_ids)
            ids = torch.tensor(rows)  # every adjective has the same number of pieces here or not:
            if len({len(r) for r in rows}) > 1:  # pad when lengths differ
                length = max(map(len, rows))
                ids = torch.tensor([r + [tokenizer.pad_token_id] * (length - len(r)) for r in rows])
            logp = model(input_ids=ids).logits.log_softmax(-1)
            scores = []
            for i, row in enumerate(rows):
                scores.append(sum(logp[i, t - 1, row[t]].item() for t in range(start, len(row))))
            half = len(lex.verbs[1])
            positive = torch.tensor(scores[:half]).logsumexp(0) > torch.tensor(scores[half:]).logsumexp(0)
            right += int(bool(positive) == (pol != negated))
    model.train()
    return right / n
