"""`synth_translate`: translation between two languages of a seeded synchronous grammar.

The source language is English-like (SVO, determiner and adjectives before the noun,
prepositions); the target language is Japanese-like (SOV with case particles, adjectives after
the noun in reverse order, a definiteness particle, the indefinite article dropped,
postpositions). Each source word has one target word (a fixed lexicon of pseudo-words); the
sentences are chains of clauses long enough that attention cost matters. Only the sentences
depend on the data seed; the lexicon, hence the vocabulary and `decode`, is fixed.

    source: the big red dog sees a cat near the house and ...
    target: dog red big DEF SUBJ cat OBJ house DEF near sees and ...   (in pseudo-words)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from sparseformer.data.base import NUM_SPECIAL, Example, data_config, register_task
from sparseformer.data.builtin import BuiltinBuilder, BuiltinTask, default_builder_configs, int_sequence, split_sizes
from sparseformer.data.copying import encode_pair
from sparseformer.data.rng import Uniform
from sparseformer.data.text_codec import WordCodec

_LEXICON_SEED = 20240531  # fixed: the languages never change, only the sentences
_CATEGORIES = {"noun": 48, "verb": 24, "adj": 24, "prep": 8}
_SRC_FUNCTION = {"def": "the", "indef": "a", "conj": "and"}
_TGT_FUNCTION = {"def": "no", "subj": "ga", "obj": "wo", "conj": "to"}
# Disjoint letters, so no source word can equal a target word.
_SRC_LETTERS = ("bdgklmnprst", "aeiou")
_TGT_LETTERS = ("fhjvwyzc", "aeiouy")


@functools.cache
def lexicon() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(source words, target words) per category; word `i` of a category translates to word `i`."""
    u = Uniform(_LEXICON_SEED)

    def words(letters: tuple[str, str], count: int, taken: set[str]) -> list[str]:
        consonants, vowels = letters
        out: list[str] = []
        while len(out) < count:
            w = "".join(consonants[u.below(len(consonants))] + vowels[u.below(len(vowels))] for _ in range(u.between(2, 3)))
            if w not in taken:
                taken.add(w)
                out.append(w)
        return out

    src_taken, tgt_taken = set(_SRC_FUNCTION.values()), set(_TGT_FUNCTION.values())
    src = {c: words(_SRC_LETTERS, n, src_taken) for c, n in _CATEGORIES.items()}
    tgt = {c: words(_TGT_LETTERS, n, tgt_taken) for c, n in _CATEGORIES.items()}
    return src, tgt


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """All words, in id order after the shared specials."""
    src, tgt = lexicon()
    words = list(_SRC_FUNCTION.values()) + list(_TGT_FUNCTION.values())
    for c in _CATEGORIES:
        words += src[c] + tgt[c]
    return tuple(words)


@functools.cache
def codec() -> WordCodec:
    """Both languages' words (sources and targets share one vocabulary)."""
    return WordCodec(vocabulary(), offset=NUM_SPECIAL, name="synth_translate")


@functools.cache
def word_ids() -> dict[str, int]:
    return {w: NUM_SPECIAL + i for i, w in enumerate(vocabulary())}


VOCAB_SIZE = NUM_SPECIAL + len(_SRC_FUNCTION) + len(_TGT_FUNCTION) + 2 * sum(_CATEGORIES.values())


class _Grammar:
    """Synchronous productions: each returns (source words, target words)."""

    def __init__(self, u: Uniform, max_pp_depth: int = 2):
        self.u = u
        self.src, self.tgt = lexicon()
        self.max_pp_depth = max_pp_depth

    def word(self, category: str) -> tuple[str, str]:
        i = self.u.below(_CATEGORIES[category])
        return self.src[category][i], self.tgt[category][i]

    def noun_phrase(self, depth: int = 0) -> tuple[list[str], list[str]]:
        definite = self.u() < 0.5
        adjs = [self.word("adj") for _ in range(self.u.below(3))]
        noun = self.word("noun")
        src = [_SRC_FUNCTION["def" if definite else "indef"]] + [a for a, _ in adjs] + [noun[0]]
        tgt = [noun[1]] + [t for _, t in reversed(adjs)] + ([_TGT_FUNCTION["def"]] if definite else [])
        if depth < self.max_pp_depth and self.u() < 0.25:
            pp_src, pp_tgt = self.prep_phrase(depth + 1)
            src, tgt = src + pp_src, pp_tgt + tgt  # the target's modifier precedes its noun
        return src, tgt

    def prep_phrase(self, depth: int) -> tuple[list[str], list[str]]:
        prep = self.word("prep")
        np_src, np_tgt = self.noun_phrase(depth)
        return [prep[0]] + np_src, np_tgt + [prep[1]]

    def clause(self) -> tuple[list[str], list[str]]:
        subj_src, subj_tgt = self.noun_phrase()
        verb = self.word("verb")
        obj_src, obj_tgt = self.noun_phrase()
        src = subj_src + [verb[0]] + obj_src
        tgt = subj_tgt + [_TGT_FUNCTION["subj"]] + obj_tgt + [_TGT_FUNCTION["obj"]]
        if self.u() < 0.3:
            pp_src, pp_tgt = self.prep_phrase(1)
            src, tgt = src + pp_src, tgt + pp_tgt
        return src, tgt + [verb[1]]


def generate(
    num_examples: int, seed: int | Sequence[int], min_len: int, max_len: int
) -> list[tuple[list[str], list[str]]]:
    """`num_examples` (source words, target words) pairs, both at most `max_len` words.

    Each sentence aims at a length drawn uniformly from `[min_len, max_len]` and chains clauses
    with a conjunction until it gets there (a clause that would overflow either side ends it).
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"synth_translate: need 1 <= min_len ({min_len}) <= max_len ({max_len})")
    u = Uniform(seed)
    grammar = _Grammar(u)
    out = []
    while len(out) < num_examples:
        goal = u.between(min_len, max_len)
        src, tgt = grammar.clause()
        if len(src) > max_len or len(tgt) > max_len:
            continue
        while len(src) < goal:
            c_src, c_tgt = grammar.clause()
            if len(src) + 1 + len(c_src) > max_len or len(tgt) + 1 + len(c_tgt) > max_len:
                break
            src += [_SRC_FUNCTION["conj"]] + c_src
            tgt += [_TGT_FUNCTION["conj"]] + c_tgt
        out.append((src, tgt))
    return out


class SparseformerSynthTranslate(BuiltinBuilder):
    """TFDS builder of the built-in synthetic translation task."""

    TASK = "synth_translate"


@register_task
class SynthTranslate(BuiltinTask):
    name = "synth_translate"
    kind = "seq2seq"
    vocab_size = VOCAB_SIZE
    metrics = ("bleu",)
    description = "translation between two languages of a seeded synchronous grammar (reordering + lexicon)"
    builder_class = SparseformerSynthTranslate
    generation_keys = ("data_seed", "num_train", "num_validation", "num_test", "min_len", "max_len", "max_target_len")

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        n_train, n_eval, min_len, max_len = {
            "tiny": (1000, 100, 8, 64),
            "small": (10000, 500, 32, 256),
            "paper": (100000, 2000, 256, 1024),
        }[scale]
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            data_seed=0,  # seed of the generated data (the training seed only sets the shuffle order)
            num_train=n_train,  # training pairs
            num_validation=n_eval,  # validation pairs
            num_test=n_eval,  # test pairs
            min_len=min_len,  # the shortest length a source sentence aims at (in words)
            max_len=max_len,  # padded source length (a multiple of 64)
            max_target_len=max_len,  # padded target length, EOS included (a multiple of 64)
        )

    def features(self) -> dict[str, Any]:
        return {"inputs": int_sequence(), "targets": int_sequence()}

    def generate(self, params: dict[str, Any]) -> dict[str, list[Example]]:
        ids = word_ids()
        limit = min(params["max_len"], params["max_target_len"] - 1)  # the target needs room for EOS
        out = {}
        for i, (split, size) in enumerate(split_sizes(params).items()):
            pairs = generate(size, (params["data_seed"], i), min(params["min_len"], limit), limit)
            out[split] = [
                {"inputs": np.array([ids[w] for w in s], np.int32), "targets": np.array([ids[w] for w in t], np.int32)}
                for s, t in pairs
            ]
        return out

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        return encode_pair(example["inputs"], example["targets"], data)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return codec().decode(ids)

    def codec(self, config: ml_collections.ConfigDict | None = None) -> WordCodec:
        return codec()


SparseformerSynthTranslate.BUILDER_CONFIGS = default_builder_configs(SynthTranslate)
